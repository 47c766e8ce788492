"""In-process tables with the client's interface: stand-alone training.

`LocalClient` holds every table and dense variable of the job in this process
and runs exactly the code a pserver runs (the same table, optimizer and dedup
functions), so a stand-alone run and a 1-pserver, 1-trainer sync run with the
same seeds end bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from pserver.config import JobConfig
from pserver.errors import NotFound, PsrtError
from pserver.rpc.api import checked_grads
from pserver.tables.dedup import sum_duplicates
from pserver.tables.dense import DenseVariable
from pserver.tables.shard import Shard
from pserver.tables.sparse import SparseTable


class LocalClient:
    """The client interface (`pserver.rpc.api.Client`) over in-process tables (one
    trainer, no generations: nothing to fence)."""

    def __init__(self, config: JobConfig) -> None:
        self.config = dataclasses.replace(config, pservers=("in-process:0",), num_trainers=1)
        self.trainer_id = 0
        self.generation = 0
        self.shard = Shard(self.config, 0)  # every table and dense variable, as pserver 0
        self.tables: dict[str, SparseTable] = self.shard.tables
        self.dense: dict[str, DenseVariable] = self.shard.dense

    def wait_ready(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        return None

    def set_generation(self, generation: int) -> None:
        self.generation = generation

    def fence(self, error: PsrtError) -> None:
        return None

    def _table(self, name: str) -> SparseTable:
        if name not in self.tables:
            raise NotFound(f"unknown table {name!r} (tables: {', '.join(self.tables)})")
        return self.tables[name]

    def dim(self, table: str) -> int:
        return self._table(table).dim

    def pull(self, table: str, ids: np.ndarray, step: int = 0, unique: bool = False) -> np.ndarray:
        return self._table(table).pull(np.asarray(ids, dtype=np.uint64).ravel())

    def push(self, table: str, ids: np.ndarray, grads: np.ndarray, step: int = 0) -> int:
        t = self._table(table)
        ids = np.asarray(ids, dtype=np.uint64).ravel()
        grads = checked_grads(table, t.dim, len(ids), grads)
        uniq, summed = sum_duplicates(ids, grads)
        t.push(uniq, summed)
        return step + 1

    def plan(self, ids: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t: np.asarray(x, dtype=np.uint64).ravel() for t, x in ids.items()}

    def pull_all(self, plan: Mapping[str, np.ndarray],
                 step: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return {t: self.pull(t, x) for t, x in plan.items()}, self.pull_dense()

    def start_push_many(self, plan: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
                        dense: Mapping[str, np.ndarray] | None = None,
                        step: int = 0) -> Callable[[], int]:
        done = self.push_many(plan, grads, dense, step)
        return lambda: done

    def push_many(self, plan: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
                  dense: Mapping[str, np.ndarray] | None = None, step: int = 0) -> int:
        for t, ids in plan.items():
            self.push(t, ids, grads[t], step)
        if dense:
            self.push_dense(dense, step)
        return step + 1

    def pull_dense(self, names: Iterable[str] | None = None, step: int = 0,
                   deadline: float | None = None) -> dict[str, np.ndarray]:
        names = list(self.dense if names is None else names)
        for n in names:
            if n not in self.dense:
                raise NotFound(f"unknown dense variable {n!r}")
        return {n: self.dense[n].pull() for n in names}

    def push_dense(self, grads: Mapping[str, np.ndarray], step: int = 0) -> int:
        for n, g in grads.items():
            if n not in self.dense:
                raise NotFound(f"unknown dense variable {n!r}")
            self.dense[n].push(np.asarray(g, dtype=np.float32).copy())
        return step + 1
