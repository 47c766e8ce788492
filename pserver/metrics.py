"""Prometheus metrics: the part every process shares (`Exporter`) and a pserver's own.

Each process has its own `CollectorRegistry` (tests run several servers in one
process) served over HTTP when the job file's `metrics.port` is not -1: pserver i
on `port + i`, trainer j on `port + P + j`, or a free port when `port` is 0. The
bound HOST:PORT is logged and, with `metrics.targets_dir`, written there as a
Prometheus file_sd target. Every series carries `psrt_job` (job.name), `role` and
`id` labels.

The hot path pays one method call per RPC: with metrics off the servicer holds a
`NullServerMetrics` whose methods do nothing. Rows and memory per table are read
from the shard at scrape time, not counted per call.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

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


class _TableCounters:
    __slots__ = ("pull_calls", "pull_rows", "pull_bytes", "push_calls", "push_rows",
                 "push_bytes")

    def __init__(self, m: ServerMetrics, table: str) -> None:
        for attr in self.__slots__:
            setattr(self, attr, getattr(m, f"_{attr}").labels(**m.labels, table=table))


class ServerMetrics(Exporter):
    """A pserver's metrics: traffic per table, RPC latency, checkpoints, and (at scrape
    time) rows and memory of its shard."""

    def __init__(self, config: JobConfig, pserver_id: int, shard: Any) -> None:
        super().__init__(config, "pserver", pserver_id)
        self.shard = shard
        t = ("table",)
        for verb in ("pull", "push"):
            what = "answered" if verb == "pull" else "applied or queued"
            setattr(self, f"_{verb}_calls", self.counter(
                f"psrt_{verb}_calls", f"{verb} calls per table ({what}; a batch call counts "
                "once per table in it)", t))
            setattr(self, f"_{verb}_rows", self.counter(
                f"psrt_{verb}_rows", f"rows {'pulled' if verb == 'pull' else 'pushed'} per "
                "table", t))
            setattr(self, f"_{verb}_bytes", self.counter(
                f"psrt_{verb}_bytes", f"{'row' if verb == 'pull' else 'gradient'} bytes "
                f"{'sent' if verb == 'pull' else 'received'} per table", t))
        self._tables = {name: _TableCounters(self, name) for name in shard.tables}
        self._dense_pull = self.counter("psrt_dense_pull_bytes", "dense values sent, bytes")
        self._dense_push = self.counter("psrt_dense_push_bytes", "dense gradients received, "
                                        "bytes")
        self._rpc = self.histogram("psrt_rpc_duration_seconds", "time to answer an RPC, per "
                                   "method (sync mode: includes waiting for other trainers)",
                                   RPC_BUCKETS, ("method",))
        self._rpc_errors = self.counter("psrt_rpc_errors", "RPCs answered with an error status, "
                                        "per method", ("method",))
        self._save = self.histogram("psrt_checkpoint_save_duration_seconds", "time to write "
                                    "this pserver's part of a checkpoint", SAVE_BUCKETS)
        self._stall = self.histogram("psrt_checkpoint_stall_seconds", "time this pserver held "
                                     "its tables for a checkpoint (the whole write, or the "
                                     "in-memory copy of a background save)", SAVE_BUCKETS)
        self._save_bytes = self.counter("psrt_checkpoint_written_bytes", "checkpoint bytes "
                                        "written by this pserver")
        self._last_bytes = self.gauge("psrt_checkpoint_last_save_bytes", "size of this "
                                      "pserver's part of its last checkpoint")
        self._save_failures = self.counter("psrt_checkpoint_save_failures", "this pserver's "
                                           "checkpoint writes that failed")
        self.registry.register(_ShardCollector(shard, self.labels))
        attach(shard, self)

    # ---- per RPC (the hot path) ----------------------------------------------

    def timed(self, method: str, handler: Callable[[bytes, Any], bytes]
              ) -> Callable[[bytes, Any], bytes]:
        hist = self._rpc.labels(**self.labels, method=method)
        errors = self._rpc_errors.labels(**self.labels, method=method)

        def timed_handler(raw: bytes, ctx: Any) -> bytes:
            started = time.perf_counter()
            try:
                return handler(raw, ctx)
            except BaseException:
                errors.inc()
                raise
            finally:
                hist.observe(time.perf_counter() - started)

        return timed_handler

    def _table(self, name: str) -> _TableCounters:
        c = self._tables.get(name)
        if c is None:  # not reached: unknown tables are rejected before counting
            c = self._tables[name] = _TableCounters(self, name)
        return c

    def pulled(self, table: str, rows: np.ndarray) -> None:
        c = self._table(table)
        c.pull_calls.inc()
        c.pull_rows.inc(len(rows))
        c.pull_bytes.inc(rows.nbytes)

    def pushed(self, table: str, grads: np.ndarray) -> None:
        c = self._table(table)
        c.push_calls.inc()
        c.push_rows.inc(len(grads))
        c.push_bytes.inc(grads.nbytes)

    def dense_pulled(self, values: Iterable[np.ndarray]) -> None:
        self._dense_pull.inc(sum(v.nbytes for v in values))

    def dense_pushed(self, grads: Iterable[np.ndarray]) -> None:
        self._dense_push.inc(sum(g.nbytes for g in grads))

    def pulled_batch(self, tables: Sequence[tuple[str, np.ndarray]], rows: Sequence[np.ndarray],
                     values: Sequence[np.ndarray]) -> None:
        for (name, _), r in zip(tables, rows, strict=True):
            self.pulled(name, r)
        if values:
            self.dense_pulled(values)

    def pushed_batch(self, sparse: Sequence[tuple[str, np.ndarray, np.ndarray]],
                     dense_grads: Sequence[np.ndarray]) -> None:
        for name, _, g in sparse:
            self.pushed(name, g)
        if dense_grads:
            self.dense_pushed(dense_grads)

    # ---- checkpoints ------------------------------------------------------------

    def shard_written(self, seconds: float, size: int) -> None:
        self._save.observe(seconds)
        self._save_bytes.inc(size)
        self._last_bytes.set(size)

    def stalled(self, seconds: float) -> None:
        self._stall.observe(seconds)

    def save_failed(self) -> None:
        self._save_failures.inc()

    def watch_coordinator(self, coordinator: Any) -> None:
        """Count the checkpoints of the coordinator this pserver hosts (pserver 0)."""
        self._committed = self.counter("psrt_checkpoints_committed", "checkpoints committed "
                                       "(coordinator, pserver 0)")
        self._failed = self.counter("psrt_checkpoints_failed", "checkpoints that failed and "
                                    "were not committed (coordinator, pserver 0)")
        self._last_serial = self.gauge("psrt_checkpoint_last_committed_serial", "serial of "
                                       "the newest committed checkpoint (coordinator; -1: none)")
        self._last_time = self.gauge("psrt_checkpoint_last_committed_timestamp_seconds",
                                     "when the newest committed checkpoint was committed")
        attach(coordinator, self)
        manifest = coordinator.restore_manifest
        self._last_serial.set(coordinator.restore_serial)
        if manifest is not None:
            self._last_time.set(manifest.created)

    def checkpoint_outcome(self, serial: int, error: str | None) -> None:
        if error is None:
            self._committed.inc()
            self._last_serial.set(serial)
            self._last_time.set(time.time())
        else:
            self._failed.inc()


class NullServerMetrics:
    """Metrics off: every hook does nothing."""

    port = None

    def timed(self, method: str, handler: Callable) -> Callable:
        return handler

    def _nothing(self, *_args: Any) -> None:
        return None

    pulled = pushed = dense_pulled = dense_pushed = pulled_batch = pushed_batch = _nothing
    shard_written = stalled = save_failed = watch_coordinator = checkpoint_outcome = _nothing
    set_generation = recovered = start = stop = _nothing


NULL = NullServerMetrics()
_attached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(obj: Any, metrics: ServerMetrics) -> None:
    _attached[obj] = metrics


def of(obj: Any) -> ServerMetrics | NullServerMetrics:
    """The metrics of the pserver that owns `obj` (a Shard or Coordinator), or NULL."""
    return _attached.get(obj, NULL)


def for_pserver(config: JobConfig, pserver_id: int, shard: Any) -> ServerMetrics | \
        NullServerMetrics:
    """The metrics of a pserver (`start()` serves them), or NULL when `metrics.port` is -1."""
    return NULL if config.metrics.port < 0 else ServerMetrics(config, pserver_id, shard)


class _ShardCollector:
    """Rows and memory of every table of a shard, read when Prometheus scrapes."""

    def __init__(self, shard: Any, labels: dict[str, str]) -> None:
        self.shard, self.labels = shard, labels

    def collect(self) -> Iterable[GaugeMetricFamily]:
        keys = [*ROLE, "table"]
        rows = GaugeMetricFamily("psrt_table_rows", "rows this pserver holds, per table", None,
                                 keys)
        live = GaugeMetricFamily("psrt_table_bytes", "bytes of the rows held (ids, values, "
                                 "optimizer state), per table", None, keys)
        mem = GaugeMetricFamily("psrt_table_memory_bytes", "memory allocated for a table "
                                "(arrays grow by doubling; checkpoint copy buffers)", None, keys)
        steps = GaugeMetricFamily("psrt_applied_steps", "steps applied (sync mode), per table "
                                  "or dense variable", None, keys)
        dense = GaugeMetricFamily("psrt_dense_memory_bytes", "memory of the dense variables "
                                  "placed on this pserver, with optimizer state", None, list(ROLE))
        base = [self.labels[k] for k in ROLE]
        for name, t in list(self.shard.tables.items()):
            rows.add_metric([*base, name], len(t))
            live.add_metric([*base, name], t.payload_bytes)
            mem.add_metric([*base, name], t.allocated_bytes)
        for name, g in list(self.shard.gates.items()):
            steps.add_metric([*base, name], g.applied)
        dense.add_metric(base, sum(v.value.nbytes + sum(s.nbytes for s in v.state.values())
                                   for v in self.shard.dense.values()))
        return [rows, live, mem, steps, dense]
