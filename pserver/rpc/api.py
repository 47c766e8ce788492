"""The one interface a trainer talks to pservers through: `Client`.

`PSClient` (`pserver.rpc.client`: every pserver of a job over gRPC) and
`LocalClient` (`pserver.rpc.local`: the tables in this process, for the
stand-alone trainer) both implement it, so the training loop and the
checkpointer run unchanged either way. A *plan* is what `plan(ids)` returns for
one step's ids (deduplicated and split by pserver, for a PSClient): opaque to
the trainer, handed back to `pull_all` and `start_push_many`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from pserver.errors import InvalidArgument, PsrtError


class Client(Protocol):
    trainer_id: int
    generation: int  # the generation every call belongs to (0: none, no coordinator)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every pserver answers (Unavailable naming it, after `timeout`)."""

    def close(self) -> None: ...

    def set_generation(self, generation: int) -> None:
        """Every call from now on belongs to `generation`."""

    def fence(self, error: PsrtError) -> None:
        """The job rolled back or failed: the next call raises `error`."""

    def dim(self, table: str) -> int: ...

    def plan(self, ids: Mapping[str, np.ndarray]) -> Any:
        """One step's ids per table, prepared once for `pull_all` and `start_push_many`."""

    def pull_all(self, plan: Any, step: int = 0
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(rows of the planned ids, in request order; every dense variable's value)."""

    def start_push_many(self, plan: Any, grads: Mapping[str, np.ndarray],
                        dense: Mapping[str, np.ndarray] | None = None,
                        step: int = 0) -> Callable[[], int]:
        """Push the planned tables' gradients (and dense ones) without waiting: returns a
        function that waits for the answers, raising the first error."""

    def push_many(self, plan: Any, grads: Mapping[str, np.ndarray],
                  dense: Mapping[str, np.ndarray] | None = None, step: int = 0) -> int: ...

    def pull(self, table: str, ids: np.ndarray, step: int = 0,
             unique: bool = False) -> np.ndarray: ...

    def push(self, table: str, ids: np.ndarray, grads: np.ndarray, step: int = 0) -> int: ...

    def pull_dense(self, names: Iterable[str] | None = None, step: int = 0,
                   deadline: float | None = None) -> dict[str, np.ndarray]: ...

    def push_dense(self, grads: Mapping[str, np.ndarray], step: int = 0) -> int: ...


def checked_grads(table: str, dim: int, n: int, grads: np.ndarray) -> np.ndarray:
    """`grads` as float32, or InvalidArgument if they are not n rows of the table's dim."""
    grads = np.asarray(grads, dtype=np.float32)
    if grads.shape != (n, dim):
        raise InvalidArgument(f"Push: table {table!r} has dim {dim}; {n} ids need "
                              f"gradients of shape {[n, dim]}, got {list(grads.shape)}")
    return grads
