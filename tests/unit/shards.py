"""Shared by the unit tests of tables, snapshots, incremental checkpoints and commits:
in-process shards of a job (no server), pushes that train them, and a coordinator over one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ckpt import writer
from ckpt.manifest import Part
from pserver.coord.coordinator import Coordinator
from pserver.tables import persist, sharding
from pserver.tables.shard import Shard
from tests.helpers import job


def shards(num_pservers: int) -> list[Shard]:
    config = job(num_pservers, mode="async")
    return [Shard(config, p) for p in range(num_pservers)]


def by_owner(group: list[Shard], ids: np.ndarray) -> list[np.ndarray]:
    cfg = group[0].config
    owners = sharding.owner(ids, cfg.num_pservers, cfg.virtual_shards)
    return [ids[owners == p] for p in range(len(group))]


def train(group: list[Shard], ids: np.ndarray, seed: int) -> None:
    """Push gradients for `ids` (creating absent rows) and to every dense variable."""
    rng = np.random.default_rng(seed)
    for shard, mine in zip(group, by_owner(group, ids), strict=True):
        shard.push("emb", mine, rng.standard_normal((len(mine), 8)).astype(np.float32))
        for name, var in shard.dense.items():
            shard.push_dense([name], [rng.standard_normal(var.shape).astype(np.float32)])


def coordinator(tmp_path: Path, faults: list[dict], keep: int = 3, run: str = "",
                lease_s: float = 30.0, **checkpoint: object) -> tuple[Coordinator, Shard]:
    """A coordinator of a 1-pserver, 1-trainer job on `tmp_path`, running: its shard is
    saved in this process, and its one trainer has joined. `checkpoint`: more keys."""
    config = job(1, checkpoint={"checkpoint_dir": str(tmp_path), "faults": faults,
                                "max_num_checkpoints": keep, "lock_lease_s": lease_s,
                                **checkpoint},
                 recovery={"heartbeat_s": 0.2, "liveness_timeout_s": 60.0})
    config = dataclasses.replace(config, run_id=run)
    shard = Shard(config, 0)
    storage = config.checkpoint.storage()

    def save_shard(_pserver: int, serial: int, base: int) -> Part:
        return persist.save_shard(shard, storage, serial, base if base >= 0 else None)

    coord = Coordinator(config, config.checkpoint, persist.job_facts(shard), save_shard,
                        watch=False)
    coord.join_pserver(0, "in-process", "first")
    coord.ready(0, coord.restore_serial)
    coord.join_trainer(0, 5)
    return coord, shard


def save(coord: Coordinator, shard: Shard, step: int) -> int:
    """One checkpoint at `step` through the coordinator's barrier and commit."""
    serial = coord.barrier(0, step, 0, step, False, 5)
    dense = {n: v.value for n, v in shard.dense.items()}
    part = writer.write_trainer(coord.storage, serial, 0, 0, step, {"global_step": step}, dense)
    return coord.commit(0, serial, part, None, 30)
