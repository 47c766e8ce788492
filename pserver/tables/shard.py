"""One pserver's state and the rules of every request, with no gRPC in it.

`Shard` holds pserver i's shard of every sparse table and the dense variables
placed on it, checks each request (table, dims, owner, finiteness, trainer,
step), and applies pushes: on arrival in async mode; in sync mode once all T
trainers pushed step s for that table or variable, summing their gradients in
trainer-id order. A rejected request changes nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pserver.config import JobConfig
from pserver.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from pserver.metrics.hooks import NULL
from pserver.tables import sharding
from pserver.tables.dense import DenseVariable
from pserver.tables.sparse import SparseTable


class StepGate:
    """Sync-mode bookkeeping of one table or variable: steps applied and pushes waiting."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.applied = 0
        self.pending: dict[int, Any] = {}
        self.cond = threading.Condition()
        self.fenced: str | None = None  # why this shard no longer serves (a rollback)

    def wait_for(self, step: int, timeout: float, where: str, num_trainers: int) -> None:
        """Block until every step before `step` is applied."""
        with self.cond:
            if self.cond.wait_for(lambda: self.applied >= step or self.fenced is not None,
                                  timeout=max(0.0, timeout)):
                if self.fenced is not None:
                    raise Unavailable(f"{where}: {self.fenced}")
                return
            missing = [j for j in range(num_trainers) if j not in self.pending]
            raise DeadlineExceeded(
                f"{where}: waited {timeout:.1f}s for step {step - 1} of {self.name!r} to be "
                f"applied; trainers {missing} have not pushed it"
            )


class Shard:
    """Pserver `pserver_id`'s tables and dense variables, and the request rules."""

    def __init__(self, config: JobConfig, pserver_id: int) -> None:
        self.config = config
        self.pserver_id = pserver_id
        self.sync = config.mode == "sync"
        self.tables = {t.name: SparseTable(t) for t in config.tables}
        self.dense = {
            d.name: DenseVariable(d)
            for d in config.dense
            if config.dense_owner(d.name) == pserver_id
        }
        self.gates = {name: StepGate(name) for name in [*self.tables, *self.dense]}
        self.metrics: Any = NULL  # what its saves report (a pserver's ServerMetrics)

    def fence(self, reason: str) -> None:
        """Stop serving: calls waiting for a step fail with UNAVAILABLE (a rollback replaces
        this shard with one restored from a checkpoint)."""
        for gate in self.gates.values():
            with gate.cond:
                gate.fenced = reason
                gate.cond.notify_all()

    # ---- checks -------------------------------------------------------------

    def table(self, name: str, where: str) -> SparseTable:
        table = self.tables.get(name)
        if table is None:
            known = ", ".join(sorted(self.tables)) or "none"
            raise NotFound(f"{where}: unknown table {name!r} (tables: {known})")
        return table

    def variable(self, name: str, where: str) -> DenseVariable:
        var = self.dense.get(name)
        if var is None:
            if any(d.name == name for d in self.config.dense):
                owner = self.config.dense_owner(name)
                raise NotFound(f"{where}: dense variable {name!r} lives on pserver {owner}, "
                               f"not on pserver {self.pserver_id}")
            raise NotFound(f"{where}: unknown dense variable {name!r}")
        return var

    def check_trainer(self, trainer_id: int, where: str) -> None:
        t = self.config.num_trainers
        if not 0 <= trainer_id < t:
            raise InvalidArgument(f"{where}: trainer_id {trainer_id} is out of range 0..{t - 1}")

    def check_owner(self, ids: np.ndarray, where: str) -> None:
        cfg = self.config
        if cfg.num_pservers == 1 or not len(ids):
            return
        owners = sharding.owner(ids, cfg.num_pservers, cfg.virtual_shards)
        wrong = np.flatnonzero(owners != self.pserver_id)
        if len(wrong):
            i = wrong[0]
            raise InvalidArgument(
                f"{where}: id {int(ids[i])} belongs to pserver {int(owners[i])}, not to "
                f"pserver {self.pserver_id} ({len(wrong)} of {len(ids)} ids are not ours)"
            )

    # ---- sparse -------------------------------------------------------------

    def _wait(self, names: list[str], trainer_id: int, step: int, timeout: float,
              where: str) -> None:
        """Sync mode: block until every step before `step` of these variables is applied."""
        if not (self.sync and step > 0):
            return
        self.check_trainer(trainer_id, where)
        deadline = time.monotonic() + timeout
        for n in names:
            self.gates[n].wait_for(step, deadline - time.monotonic(), where,
                                   self.config.num_trainers)

    def pull(self, name: str, ids: np.ndarray, trainer_id: int = 0, step: int = 0,
             timeout: float = 60.0) -> np.ndarray:
        return self.pull_batch([(name, ids)], [], trainer_id, step, timeout, "Pull")[0][0]

    def pull_batch(self, tables: list[tuple[str, np.ndarray]], dense: list[str],
                   trainer_id: int = 0, step: int = 0, timeout: float = 60.0,
                   where: str = "PullBatch") -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Rows of several tables and dense values; everything is checked before any row
        is created."""
        found = [self.table(name, where) for name, _ in tables]
        for _, ids in tables:
            self.check_owner(ids, where)
        variables = [self.variable(n, where) for n in dense]
        self._wait([n for n, _ in tables] + list(dense), trainer_id, step, timeout, where)
        return [t.pull(ids) for t, (_, ids) in zip(found, tables, strict=True)], \
            [v.pull() for v in variables]

    def pull_dense(self, names: list[str], trainer_id: int = 0, step: int = 0,
                   timeout: float = 60.0) -> list[np.ndarray]:
        return self.pull_batch([], names, trainer_id, step, timeout, "PullDense")[1]

    def _check_sparse(self, name: str, ids: np.ndarray, grads: np.ndarray,
                      where: str) -> SparseTable:
        table = self.table(name, where)
        if grads.ndim != 2 or grads.shape[0] != len(ids):
            raise InvalidArgument(f"{where}: {len(ids)} ids need gradients of shape "
                                  f"[{len(ids)}, {table.dim}], got {list(grads.shape)}")
        if grads.shape[1] != table.dim:
            raise InvalidArgument(f"{where}: table {name!r} has dim {table.dim}, got gradients "
                                  f"of dim {grads.shape[1]}")
        check_finite(grads, where)
        self.check_owner(ids, where)
        return table

    def _check_dense(self, names: list[str], grads: list[np.ndarray],
                     where: str) -> list[DenseVariable]:
        if len(names) != len(grads):
            raise InvalidArgument(f"{where}: {len(names)} names but {len(grads)} gradients")
        if len(set(names)) != len(names):
            raise InvalidArgument(f"{where}: a variable is named twice in {names}")
        variables = [self.variable(n, where) for n in names]
        for n, v, g in zip(names, variables, grads, strict=True):
            if tuple(g.shape) != v.shape:
                raise InvalidArgument(f"{where}: variable {n!r} has shape {list(v.shape)}, got "
                                      f"gradients of shape {list(g.shape)}")
            check_finite(g, f"{where}: variable {n!r}")
        return variables

    def push(self, name: str, ids: np.ndarray, grads: np.ndarray, trainer_id: int = 0,
             step: int = 0, timeout: float = 60.0) -> int:
        return self.push_batch([(name, ids, grads)], [], [], trainer_id, step, timeout, "Push")

    def push_dense(self, names: list[str], grads: list[np.ndarray], trainer_id: int = 0,
                   step: int = 0, timeout: float = 60.0) -> int:
        return self.push_batch([], names, grads, trainer_id, step, timeout, "PushDense")

    def push_batch(self, tables: list[tuple[str, np.ndarray, np.ndarray]], dense: list[str],
                   dense_grads: list[np.ndarray], trainer_id: int = 0, step: int = 0,
                   timeout: float = 60.0, where: str = "PushBatch") -> int:
        """Gradients of several tables and dense variables, checked as a whole first: a
        rejected push changes nothing."""
        found = [self._check_sparse(n, ids, g, where) for n, ids, g in tables]
        if len({n for n, _, _ in tables}) != len(tables):
            raise InvalidArgument(f"{where}: a table is named twice")
        variables = self._check_dense(list(dense), list(dense_grads), where)
        self.check_trainer(trainer_id, where)
        if not self.sync:
            for t, (_, ids, g) in zip(found, tables, strict=True):
                t.push(ids, g)
            for v, g in zip(variables, dense_grads, strict=True):
                v.push(g)
            return 0
        for n in [n for n, _, _ in tables] + list(dense):
            self._check_step(self.gates[n], trainer_id, step, where)
        applied = 0
        # a step's parts are applied once all T are in; table.push sums an id's
        # gradients left to right, so in trainer-id order here
        for t, (n, ids, g) in zip(found, tables, strict=True):
            applied = self._sync_push(n, (ids, g), trainer_id, step, timeout, where,
                                      lambda parts, t=t: t.push(
                                          np.concatenate([p[0] for p in parts]),
                                          np.concatenate([p[1] for p in parts])))
        for n, v, g in zip(dense, variables, dense_grads, strict=True):
            applied = self._sync_push(n, g, trainer_id, step, timeout, where,
                                      lambda parts, v=v: v.push(_sum_in_order(parts)))
        return applied

    # ---- sync ---------------------------------------------------------------

    def _check_step(self, gate: StepGate, trainer_id: int, step: int, where: str) -> None:
        if step < gate.applied:
            raise FailedPrecondition(f"{where}: step {step} of {gate.name!r} is already applied "
                                     f"(next step is {gate.applied})")
        if step == gate.applied and trainer_id in gate.pending:
            raise FailedPrecondition(f"{where}: trainer {trainer_id} already pushed step {step} "
                                     f"of {gate.name!r}")

    def _sync_push(self, name: str, payload: Any, trainer_id: int, step: int, timeout: float,
                   where: str, apply: Callable[[list[Any]], None]) -> int:
        gate = self.gates[name]
        self._check_step(gate, trainer_id, step, where)
        gate.wait_for(step, timeout, where, self.config.num_trainers)
        with gate.cond:
            if gate.fenced is not None:
                raise Unavailable(f"{where}: {gate.fenced}")
            self._check_step(gate, trainer_id, step, where)
            gate.pending[trainer_id] = payload
            if len(gate.pending) == self.config.num_trainers:
                apply([gate.pending[j] for j in range(self.config.num_trainers)])
                gate.pending.clear()
                gate.applied += 1
                gate.cond.notify_all()
            return gate.applied


def _sum_in_order(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def check_finite(arr: np.ndarray, where: str) -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InvalidArgument(f"{where}: gradients hold NaN or Inf (first at index {bad})")
