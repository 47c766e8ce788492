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
import time
from collections.abc import Callable

from ckpt import reader, writer
from ckpt.manifest import Manifest, Part
from ckpt.storage import LocalStorage
from pserver import optimizers
from pserver.errors import FailedPrecondition
from pserver.shard import Shard
from pserver.sharding import owned_range, virtual_shard

log = logging.getLogger(__name__)


def save_shard(shard: Shard, storage: LocalStorage, serial: int) -> Part:
    """Write this pserver's part of checkpoint `serial`.

    Fault injection for tests: PSRT_FAULT_SAVE_SLEEP_S=x sleeps x seconds in the middle
    of the save (after the first files are written), so a test can kill it there;
    PSRT_FAULT_SAVE_ENOSPC=serial makes that serial's save fail there as a full disk would.
    """
    started = time.perf_counter()
    v = shard.config.virtual_shards
    tables, vshards = {}, {}
    locks = [t.lock for t in shard.tables.values()] + [d.lock for d in shard.dense.values()]
    for lock in locks:
        lock.acquire()
    try:
        for name, t in shard.tables.items():
            tables[name] = t.arrays()
            vshards[name] = virtual_shard(tables[name]["ids"], v)
        dense_state = {n: d.state for n, d in shard.dense.items()}
        applied = {n: g.applied for n, g in shard.gates.items()}
        part = writer.write_shard(storage, serial, shard.pserver_id, tables, vshards, v,
                                  dense_state, {"applied": applied}, midway=_fault(serial))
        seconds = time.perf_counter() - started
        size = sum(f.size for f in part.files)
        log.info("pserver[%d] wrote its part of checkpoint_%d: %.1f MB in %.2fs (%.2f GB/s)",
                 shard.pserver_id, serial, size / 1e6, seconds, size / max(seconds, 1e-9) / 1e9)
        return part
    finally:
        for lock in locks:
            lock.release()


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


def load_shard(shard: Shard, storage: LocalStorage, manifest: Manifest) -> None:
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
