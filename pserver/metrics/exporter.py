"""The Prometheus side every psrt process shares: a registry, its HTTP server, a targets file.

Each process has its own `CollectorRegistry` (tests run several servers in one
process) served over HTTP when the job file's `metrics.port` is not -1: pserver i
on `port + i`, trainer j on `port + P + j`, or a free port when `port` is 0. The
bound HOST:PORT is logged and, with `metrics.targets_dir`, written there as a
Prometheus file_sd target. Every series carries `psrt_job` (job.name), `role` and
`id` labels. `pserver.metrics.server_metrics` (a pserver's metrics) and `trainer.metrics_export`
(a trainer's) build on `Exporter`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from pserver.config import ConfigError, JobConfig

log = logging.getLogger(__name__)
disable_created_metrics()  # no `_created` series next to every counter

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
               5.0, 10.0, 30.0, 60.0)
SAVE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                600.0)
ROLE = ("psrt_job", "role", "id")  # on every series


def port_for(config: JobConfig, role: str, index: int) -> int:
    """The metrics port of pserver `index` or trainer `index` (0: any free port)."""
    base = config.metrics.port
    if base <= 0:
        return base
    return base + index if role == "pserver" else base + config.num_pservers + index


class Exporter:
    """One process's registry, its HTTP server, and the metrics every process has."""

    def __init__(self, config: JobConfig, role: str, index: int) -> None:
        self.config, self.role, self.index = config, role, index
        self.name = f"{role}[{index}]"
        self.registry = CollectorRegistry()
        self.labels = {"psrt_job": config.name, "role": role, "id": str(index)}
        ProcessCollector(registry=self.registry)
        self._generation = self.gauge("psrt_generation", "the job's generation this process "
                                      "is in (grows at every recovery)")
        self._recoveries = self.counter("psrt_recoveries", "rollbacks to a checkpoint this "
                                        "process went through")
        self._generation.set(0)
        self._httpd: Any = None
        self._target: Path | None = None
        self.port: int | None = None

    def _make(self, kind: Callable, name: str, doc: str, labels: Sequence[str] = (),
              **kw: Any) -> Any:
        metric = kind(name, doc, [*ROLE, *labels], registry=self.registry, **kw)
        return metric if labels else metric.labels(**self.labels)

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        return self._make(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Any:
        return self._make(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, buckets: Sequence[float],
                  labels: Sequence[str] = ()) -> Any:
        return self._make(Histogram, name, doc, labels, buckets=buckets)

    def set_generation(self, generation: int) -> None:
        self._generation.set(generation)

    def recovered(self) -> None:
        self._recoveries.inc()

    def start(self) -> int | None:
        """Serve /metrics if the job asks for it; returns the bound port (None: off)."""
        m = self.config.metrics
        if m.port < 0 or self._httpd is not None:
            return self.port
        port = port_for(self.config, self.role, self.index)
        try:
            self._httpd, _ = start_http_server(port, m.host, self.registry)
        except OSError as e:
            raise ConfigError("metrics.port", f"{self.name} cannot serve metrics on "
                              f"{m.host}:{port}: {e}") from None
        self.port = self._httpd.server_address[1]
        log.info("%s serving metrics on http://%s:%d/metrics", self.name, m.host, self.port)
        if m.targets_dir:
            self._target = write_target(Path(m.targets_dir), self.config, self.role,
                                        self.index, self.port)
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._target is not None:
            self._target.unlink(missing_ok=True)
            self._target = None


def write_target(directory: Path, config: JobConfig, role: str, index: int, port: int) -> Path:
    """DIR/ROLE_ID.json: a Prometheus file_sd target list with this process in it (no
    labels: the series carry psrt_job, role and id themselves)."""
    host = config.metrics.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{role}_{index}.json"
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps([{"targets": [f"{host}:{port}"], "labels": {}}]) + "\n")
    tmp.replace(path)
    return path
