"""A pserver's Prometheus metrics: traffic per table, RPC latency, checkpoints, and rows
and memory of its shard (read at scrape time, not counted per call).

The hot path pays one method call per RPC: with metrics off the servicer, the
shard and the coordinator hold `pserver.metrics.hooks.NULL`, whose methods do
nothing. Served by `pserver.metrics.exporter.Exporter`, which documents ports
and labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily

from pserver.config import JobConfig
from pserver.metrics.exporter import ROLE, RPC_BUCKETS, SAVE_BUCKETS, Exporter
from pserver.metrics.hooks import NULL, NullServerMetrics


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
        self._collector = _ShardCollector(shard, self.labels)
        self.registry.register(self._collector)
        shard.metrics = self

    def use_shard(self, shard: Any) -> None:
        """A rollback replaced the shard: count and read the restored one."""
        self.shard = self._collector.shard = shard
        shard.metrics = self

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
        self.gauge("psrt_checkpoints_failed_in_a_row", "checkpoints that failed since the "
                   "last one committed (coordinator)").set_function(
            lambda: coordinator.failed_in_a_row)
        coordinator.metrics = self
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
