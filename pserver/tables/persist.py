"""A shard to and from a checkpoint: what a pserver saves and how it restores.

A blocking save writes the live arrays (the barrier holds every trainer, so
nothing changes meanwhile) with rows grouped by virtual shard. A background
save snapshots the tables (SparseTable.begin_snapshot): the trainers go on at
once, the writing thread reads the rows out of the live tables chunk by chunk
as it writes them, while a push first keeps aside the old values of rows the
writer has not reached yet. Restoring reads, from
every old pserver's files, the rows of the virtual shards this pserver owns
now, so a checkpoint restores onto any number of pservers.

A delta save (`base` given) writes, in the same files, only the rows changed
since checkpoint `base` (see SparseTable.begin_save); dense variables are
always whole. Restoring a delta loads its chain: the full checkpoint at its
root, then each delta's rows over it, oldest first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpt import reader, writer
from ckpt.config import check_priority
from ckpt.manifest import Manifest, Part
from ckpt.storage import Storage
from pserver.errors import FailedPrecondition, MissingBase
from pserver.tables import optimizers
from pserver.tables.shard import Shard
from pserver.tables.sharding import owned_range, virtual_shard
from pserver.tables.snapshot import Snapshot

log = logging.getLogger(__name__)
WRITER_NICE = 19  # the nice value of a "low" priority background writer (19: the lowest)
PROGRESS_S = 10.0  # a background save logs how far it is this often


@dataclass
class Staged:
    """What a pserver saves: its tables (live arrays under the locks, copies, or snapshots
    read as they are written), dense optimizer state and step counters."""

    tables: dict[str, writer.Rows]
    dense_state: dict[str, dict[str, np.ndarray]]
    applied: dict[str, int]

    def close(self, locked: bool = False) -> None:
        """Stop the snapshots (done, or the save failed): pushes no longer keep rows.
        `locked`: the caller holds the tables' locks."""
        for t in self.tables.values():
            if isinstance(t, Snapshot):
                t.close(locked)


def _locks(shard: Shard) -> list:
    return [t.lock for t in shard.tables.values()] + [d.lock for d in shard.dense.values()]


def _stage(shard: Shard, serial: int, base: int | None, how: str,
           duty: float = 1.0) -> Staged:
    """The shard as it is now (call with every lock held): every row, or (base given) the
    rows changed since checkpoint `base`. `how`: "live" (the arrays themselves; a delta's
    rows are copied), "copy" (copies) or "snapshot" (read out of the live tables as they
    are written, working `duty` of the time; the dense state is copied)."""
    tables: dict[str, writer.Rows] = {}
    try:
        for n, t in shard.tables.items():
            rows = t.begin_save(serial, base)
            if how == "snapshot":
                tables[n] = t.begin_snapshot(rows, base, duty)
            elif rows is not None or how == "copy":
                tables[n] = writer.ArrayRows(t.rows_of(np.arange(len(t)) if rows is None
                                                       else rows))
            else:
                tables[n] = writer.ArrayRows(t.arrays())
    except BaseException:
        Staged(tables, {}, {}).close(locked=True)
        raise
    copy = how != "live"
    return Staged(tables, {n: {k: a.copy() if copy else a for k, a in d.state.items()}
                           for n, d in shard.dense.items()},
                  {n: g.applied for n, g in shard.gates.items()})


def _write(shard: Shard, staged: Staged, storage: Storage, serial: int,
           started: float, base: int | None,
           progress: Callable[[int], None] | None = None) -> Part:
    facts = {"applied": staged.applied,
             "kind": "full" if base is None else "delta", "base": -1 if base is None else base}
    v = shard.config.virtual_shards
    cpu = time.thread_time()
    try:
        for t in staged.tables.values():  # before the pushes to any table fill its log
            if isinstance(t, Snapshot):
                t.map_ahead()
        vshards = {n: virtual_shard(t.ids, v) for n, t in staged.tables.items()}
        part = writer.write_shard(storage, serial, shard.pserver_id, staged.tables, vshards,
                                  shard.config.virtual_shards, staged.dense_state, facts,
                                  progress=progress)
    except BaseException:
        shard.metrics.save_failed()
        raise
    finally:
        staged.close()
    seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
    size = sum(f.size for f in part.files)
    shard.metrics.shard_written(seconds, size)
    what = "" if base is None else f" (delta of checkpoint_{base})"
    log.info("pserver[%d] wrote its part of checkpoint_%d%s: %.1f MB in %.2fs (%.2f GB/s; "
             "%.2fs of this thread's CPU)", shard.pserver_id, serial, what, size / 1e6, seconds,
             size / max(seconds, 1e-9) / 1e9, cpu)
    return part


def _begin(shard: Shard, serial: int, base: int | None, how: str,
           duty: float = 1.0) -> Staged:
    """Stage the shard under every lock; a table that cannot write the delta stages
    nothing (MissingBase)."""
    locks = _locks(shard)
    for lock in locks:
        lock.acquire()
    try:
        return _stage(shard, serial, base, how, duty)
    except MissingBase as e:
        raise MissingBase(f"checkpoint_{serial}: {e}") from None
    except ValueError as e:
        raise FailedPrecondition(f"checkpoint_{serial}: {e}") from None
    finally:
        for lock in locks:
            lock.release()


def save_shard(shard: Shard, storage: Storage, serial: int,
               base: int | None = None) -> Part:
    """Write this pserver's part of checkpoint `serial` (a blocking save: nothing changes
    meanwhile, the barrier holds every trainer, so the live arrays are written). Faults of
    the store for tests come from `checkpoint.faults` (ckpt.faulty)."""
    started = time.perf_counter()
    if base is not None:  # a delta: the changed rows are copied, then written unlocked
        part = _write(shard, _begin(shard, serial, base, "copy"), storage, serial,
                      started, base)
        shard.metrics.stalled(time.perf_counter() - started)
        return part
    locks = _locks(shard)
    for lock in locks:
        lock.acquire()
    try:
        part = _write(shard, _stage(shard, serial, None, "live"), storage, serial, started,
                      None)
        shard.metrics.stalled(time.perf_counter() - started)
        return part
    finally:
        for lock in locks:
            lock.release()


def save_shard_background(shard: Shard, storage: Storage, serial: int,
                          report: Callable[[Part | None, str | None], None],
                          base: int | None = None, duty: float | None = None,
                          priority: str | None = None) -> float:
    """Snapshot the shard (the only part the trainers wait for: the dense state is copied,
    the tables' rows are read out as they are written), then write it in a thread of its
    own at CPU `priority` ("idle", "low" or "normal"), working `duty` of the time (None:
    the job's checkpoint.background_priority and background_duty); when it ends,
    `report(part, error)` is called from a thread at the pserver's own priority. Returns
    the seconds the trainers waited. ValueError, with nothing snapshotted: an unknown
    priority, or a store that cannot be used."""
    ckpt = shard.config.checkpoint
    if duty is None:
        duty = 1.0 if ckpt is None else ckpt.background_duty
    if priority is None:
        priority = "idle" if ckpt is None else ckpt.background_priority
    try:
        check_priority(priority)
    except ValueError as e:
        raise ValueError(f"background priority: {e}") from None
    # a remote store's file system (and the I/O thread fsspec starts with it) is made here:
    # threads the writing thread started would keep its low priority for good
    storage.connect()
    started = time.perf_counter()
    staged = _begin(shard, serial, base, "snapshot", duty)
    stall = time.perf_counter() - started
    shard.metrics.stalled(stall)
    total = sum(t.count for t in staged.tables.values())
    shown = {"at": started}
    result: dict[str, Any] = {"error": "the writing thread ended without a part"}

    def progress(rows: int) -> None:
        now = time.perf_counter()
        if now - shown["at"] >= PROGRESS_S:
            shown["at"] = now
            log.info("pserver[%d] writing checkpoint_%d: %d of %d rows (%.0f%%) after %.0fs",
                     shard.pserver_id, serial, rows, total, 100 * rows / max(total, 1),
                     now - started)

    def write() -> None:  # at the low priority
        try:
            _lower_priority(priority)
            result["part"] = _write(shard, staged, storage, serial, started, base, progress)
            result["error"] = None
        except Exception as e:  # noqa: BLE001 - reported to the coordinator
            log.exception("pserver[%d] failed to write checkpoint_%d", shard.pserver_id, serial)
            result["error"] = f"{type(e).__name__}: {e}"

    def supervise() -> None:  # at the pserver's priority: reporting opens a gRPC channel
        writing = threading.Thread(target=write, name=f"save-{serial}-write", daemon=True)
        writing.start()
        writing.join()
        report(result.get("part"), result["error"])

    try:
        threading.Thread(target=supervise, name=f"save-{serial}", daemon=True).start()
    except BaseException:  # no thread: pushes must not keep rows for this snapshot
        staged.close()
        raise
    log.info("pserver[%d] snapshotted its shard for checkpoint_%d in %.3fs; copying and "
             "writing it in the background (CPU priority %s)", shard.pserver_id, serial,
             stall, priority)
    return stall


def _lower_priority(priority: str) -> None:
    """Lower this (background writing) thread's CPU priority, so that serving pushes and
    pulls comes first (Linux: the policy and the nice value are per thread; the thread
    ends with the save). "idle": the SCHED_IDLE policy, the kernel runs the thread only
    where nothing else wants the core, and a woken serving thread takes the core at once
    (also nice 19, for where it is refused); "low": nice 19; "normal": as it is. An
    unprivileged thread cannot go back, so each save has a thread of its own, which
    starts no thread: those would inherit its priority."""
    if priority == "normal":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       max(WRITER_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
        if priority == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: write as it is
        pass


def job_facts(shard_or_config: Shard) -> dict:
    """The world and specs the manifest records (see ckpt.manifest.merge)."""
    cfg = shard_or_config.config
    return {
        "name": cfg.name, "mode": cfg.mode, "num_pservers": cfg.num_pservers,
        "num_trainers": cfg.num_trainers, "virtual_shards": cfg.virtual_shards,
        "tables": {t.name: {"dim": t.dim, "optimizer": t.optimizer.kind,
                            "state": list(optimizers.state_layout(t.optimizer, (t.dim,)))}
                   for t in cfg.tables},
        "dense": {d.name: {"shape": list(d.shape), "optimizer": d.optimizer.kind,
                           "state": list(optimizers.state_layout(d.optimizer, d.shape)),
                           "pserver": cfg.dense_owner(d.name)} for d in cfg.dense},
    }


def check_compatible(shard: Shard, manifest: Manifest) -> None:
    """Refuse a checkpoint whose tables or variables do not fit this job."""
    where = f"checkpoint_{manifest.serial}"
    if manifest.virtual_shards != shard.config.virtual_shards:
        raise FailedPrecondition(f"{where} has {manifest.virtual_shards} virtual shards, the job "
                                 f"has {shard.config.virtual_shards} (job.virtual_shards is "
                                 f"fixed for the life of a job)")
    for name, t in shard.tables.items():
        saved = manifest.tables.get(name)
        if saved is None:
            raise FailedPrecondition(f"{where} has no table {name!r}")
        if saved["dim"] != t.dim or saved["optimizer"] != t.spec.optimizer.kind:
            raise FailedPrecondition(
                f"{where}: table {name!r} was saved with dim {saved['dim']} and "
                f"{saved['optimizer']}, the job has dim {t.dim} and {t.spec.optimizer.kind}")
    for name, d in shard.dense.items():
        saved = manifest.dense.get(name)
        if saved is None or tuple(saved["shape"]) != d.shape or \
                saved["optimizer"] != d.spec.optimizer.kind:
            raise FailedPrecondition(f"{where}: dense variable {name!r} does not match the job "
                                     f"(saved: {saved})")


def load_shard(shard: Shard, storage: Storage, manifest: Manifest) -> None:
    """Replace this pserver's tables, dense variables and step counters with the
    checkpoint's, reading only the virtual shards it owns (of each link of its chain)."""
    check_compatible(shard, manifest)
    started = time.perf_counter()
    cfg = shard.config
    vs = owned_range(shard.pserver_id, cfg.num_pservers, cfg.virtual_shards)
    links = reader.chain(storage, manifest, deep=False)
    for link in links:
        check_compatible(shard, link)
    for name, t in shard.tables.items():
        names = ["ids", "values", *optimizers.state_layout(t.spec.optimizer, (t.dim,))]
        arrays = reader.read_table(storage, links[0], name, names, vs.start, vs.stop)
        t.load(arrays if arrays else t.empty_arrays())
        for link in links[1:]:
            delta = reader.read_table(storage, link, name, names, vs.start, vs.stop)
            if delta:
                t.upsert(delta)
        t.restored(manifest.serial)
    for name, d in shard.dense.items():
        value = reader.read_dense(storage, manifest.serial, name, manifest=manifest)
        state = {k: reader.read_dense(storage, manifest.serial, name, k, manifest)
                 for k in d.state}
        d.load(value, state)
    for gate in shard.gates.values():
        with gate.cond:
            gate.applied = manifest.global_step if cfg.mode == "sync" else 0
            gate.pending.clear()
            gate.cond.notify_all()
    chain = "" if len(links) == 1 else \
        " (chain " + " -> ".join(str(m.serial) for m in links) + ")"
    log.info("pserver[%d] restored checkpoint_%d%s (step %d) in %.2fs: %s", shard.pserver_id,
             manifest.serial, chain, manifest.global_step, time.perf_counter() - started,
             ", ".join(f"{n} {len(t)} rows" for n, t in shard.tables.items()) or "no tables")
