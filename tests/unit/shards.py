"""Shared by the unit tests of tables, snapshots and incremental checkpoints: in-process
shards of a job (no server), and pushes that train them."""

from __future__ import annotations

import numpy as np

from pserver.tables import sharding
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
