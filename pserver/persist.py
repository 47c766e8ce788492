"""A shard to and from a checkpoint: what a pserver saves and how it restores.

Saving writes the live arrays (the barrier holds every trainer, so nothing
changes meanwhile) with rows grouped by virtual shard. Restoring reads, from
every old pserver's files, the rows of the virtual shards this pserver owns
now, so a checkpoint restores onto any number of pservers.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ckpt import reader, writer
from ckpt.manifest import Manifest, Part
from ckpt.storage import Storage
from pserver import metrics as pmetrics
from pserver import optimizers
from pserver.errors import FailedPrecondition
from pserver.shard import Shard
from pserver.sharding import owned_range, virtual_shard

log = logging.getLogger(__name__)


@dataclass
class Staged:
    """What a pserver saves: its tables, dense optimizer state and step counters, either
    live (blocking saves, under the locks) or copied (background saves)."""

    tables: dict[str, dict[str, np.ndarray]]
    vshards: dict[str, np.ndarray]
    dense_state: dict[str, dict[str, np.ndarray]]
    applied: dict[str, int]


def _locks(shard: Shard) -> list:
    return [t.lock for t in shard.tables.values()] + [d.lock for d in shard.dense.values()]


def _stage(shard: Shard, copy: bool) -> Staged:
    """The shard as it is now (call with every lock held)."""
    v = shard.config.virtual_shards
    tables = {n: t.snapshot() if copy else t.arrays() for n, t in shard.tables.items()}
    return Staged(tables, {n: virtual_shard(arrays["ids"], v) for n, arrays in tables.items()},
                  {n: {k: a.copy() if copy else a for k, a in d.state.items()}
                   for n, d in shard.dense.items()},
                  {n: g.applied for n, g in shard.gates.items()})


def _write(shard: Shard, staged: Staged, storage: Storage, serial: int,
           started: float) -> Part:
    try:
        part = writer.write_shard(storage, serial, shard.pserver_id, staged.tables,
                                  staged.vshards, shard.config.virtual_shards,
                                  staged.dense_state, {"applied": staged.applied},
                                  midway=_fault(serial))
    except BaseException:
        pmetrics.of(shard).save_failed()
        raise
    seconds = time.perf_counter() - started
    size = sum(f.size for f in part.files)
    pmetrics.of(shard).shard_written(seconds, size)
    log.info("pserver[%d] wrote its part of checkpoint_%d: %.1f MB in %.2fs (%.2f GB/s)",
             shard.pserver_id, serial, size / 1e6, seconds, size / max(seconds, 1e-9) / 1e9)
    return part


def save_shard(shard: Shard, storage: Storage, serial: int) -> Part:
    """Write this pserver's part of checkpoint `serial` (a blocking save: nothing changes
    meanwhile, the barrier holds every trainer, so the live arrays are written).

    Fault injection for tests: PSRT_FAULT_SAVE_SLEEP_S=x sleeps x seconds in the middle
    of the save (after the first files are written), so a test can kill it there;
    PSRT_FAULT_SAVE_ENOSPC=serial makes that serial's save fail there as a full disk would.
    """
    started = time.perf_counter()
    locks = _locks(shard)
    for lock in locks:
        lock.acquire()
    try:
        part = _write(shard, _stage(shard, copy=False), storage, serial, started)
        pmetrics.of(shard).stalled(time.perf_counter() - started)
        return part
    finally:
        for lock in locks:
            lock.release()


def save_shard_background(shard: Shard, storage: Storage, serial: int,
                          report: Callable[[Part | None, str | None], None]) -> float:
    """Copy the shard in memory (the only part the trainers wait for), then write it in a
    thread and `report(part, error)`. Returns the seconds the copy took."""
    started = time.perf_counter()
    locks = _locks(shard)
    for lock in locks:
        lock.acquire()
    try:
        staged = _stage(shard, copy=True)
    finally:
        for lock in locks:
            lock.release()
    stall = time.perf_counter() - started
    pmetrics.of(shard).stalled(stall)

    def write() -> None:
        try:
            part = _write(shard, staged, storage, serial, started)
        except Exception as e:  # noqa: BLE001 - reported to the coordinator
            log.exception("pserver[%d] failed to write checkpoint_%d", shard.pserver_id, serial)
            report(None, f"{type(e).__name__}: {e}")
            return
        report(part, None)

    threading.Thread(target=write, name=f"save-{serial}", daemon=True).start()
    log.info("pserver[%d] copied its shard for checkpoint_%d in %.2fs; writing it in the "
             "background", shard.pserver_id, serial, stall)
    return stall


def _fault(serial: int) -> Callable[[], None] | None:
    """The fault injected in the middle of a save, if the environment asks for one."""
    pause = float(os.environ.get("PSRT_FAULT_SAVE_SLEEP_S", "0") or 0)
    full = os.environ.get("PSRT_FAULT_SAVE_ENOSPC", "")
    if full and int(full) == serial:
        def fail() -> None:
            raise OSError(errno.ENOSPC, f"No space left on device (injected, checkpoint_{serial})")
        return fail
    return (lambda: time.sleep(pause)) if pause else None


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
    checkpoint's, reading only the virtual shards it owns."""
    check_compatible(shard, manifest)
    started = time.perf_counter()
    cfg = shard.config
    vs = owned_range(shard.pserver_id, cfg.num_pservers, cfg.virtual_shards)
    for name, t in shard.tables.items():
        names = ["ids", "values", *optimizers.state_layout(t.spec.optimizer, (t.dim,))]
        arrays = reader.read_table(storage, manifest, name, names, vs.start, vs.stop)
        t.load(arrays if arrays else t.empty_arrays())
    for name, d in shard.dense.items():
        value = reader.read_dense(storage, manifest.serial, name)
        state = {k: reader.read_dense(storage, manifest.serial, name, k) for k in d.state}
        d.load(value, state)
    for gate in shard.gates.values():
        with gate.cond:
            gate.applied = manifest.global_step if cfg.mode == "sync" else 0
            gate.pending.clear()
            gate.cond.notify_all()
    log.info("pserver[%d] restored checkpoint_%d (step %d) in %.2fs: %s", shard.pserver_id,
             manifest.serial, manifest.global_step, time.perf_counter() - started,
             ", ".join(f"{n} {len(t)} rows" for n, t in shard.tables.items()) or "no tables")
