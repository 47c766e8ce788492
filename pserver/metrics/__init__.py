"""Prometheus metrics of every process.

- `hooks`: what tables, saves and the coordinator report (`NULL`: metrics off); no
  dependency, so pure logic can report without knowing about Prometheus.
- `exporter`: one process's registry, its HTTP port and targets file.
- `server_metrics`: a pserver's metrics (traffic, latency, checkpoints, memory).
"""
