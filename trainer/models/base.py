"""The model interface: a pure function of (batch, rows, params), and its shared loss.

A model owns no parameters. The training loop asks it which sparse tables it
reads (`tables`), which dense variables (`dense_shapes`) and which ids of a
batch it looks up per table (`slot_ids`); it pulls those rows and variables
from the pservers and calls `forward_backward`, then pushes the returned
gradients. `rows[table]` has shape (B, k, dim): row j of example b is the row
of id `slot_ids(batch)[table][b, j]`.

The loss is the mean logloss over the batch, computed from logits so it stays
finite for any logit; gradients are of that mean. Everything is computed in
the model's `dtype` (float32 unless a test asks for float64): inputs are cast
to it once on entry and every output has it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class Batch(Protocol):
    """What a model reads from a batch (the data module defines the real class)."""

    labels: np.ndarray  # float (B,), 0 or 1
    numeric: np.ndarray  # float (B, num_numeric)
    ids: np.ndarray  # uint64 (B, num_slots): one id per categorical slot


@dataclass(frozen=True)
class Result:
    """What `forward_backward` returns; the gradient dicts are empty without compute_grads."""

    loss: float  # mean logloss over the batch
    probs: np.ndarray  # (B,) sigmoid of the logits
    logits: np.ndarray  # (B,)
    row_grads: dict[str, np.ndarray] = field(default_factory=dict)  # table -> (B, k, dim)
    dense_grads: dict[str, np.ndarray] = field(default_factory=dict)  # name -> its shape


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Sigmoid that never overflows: exp only of -|z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def logloss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example logloss from logits: softplus(z) - y * z, stable for any z."""
    return np.maximum(z, 0) - y * z + np.log1p(np.exp(-np.abs(z)))


class Model(ABC):
    """A CTR model: tables and dense variables it needs, and its loss and gradients."""

    def __init__(self, num_slots: int, num_numeric: int, dtype: Any = np.float32) -> None:
        if num_slots <= 0 or num_numeric < 0:
            raise ValueError(
                f"{type(self).__name__}: need num_slots > 0 and num_numeric >= 0, "
                f"got {num_slots} and {num_numeric}"
            )
        self.num_slots = num_slots
        self.num_numeric = num_numeric
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(
                f"{type(self).__name__}: dtype must be float32 or float64, got {self.dtype}"
            )

    @abstractmethod
    def tables(self) -> dict[str, int]:
        """Sparse table name -> row dim."""

    @abstractmethod
    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        """Dense variable name -> shape."""

    @abstractmethod
    def table_slots(self) -> dict[str, tuple[int, int]]:
        """Sparse table name -> the slots [start, stop) whose ids it looks up."""

    @abstractmethod
    def _forward(
        self, batch: Batch, rows: dict[str, np.ndarray], params: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, Any]:
        """Logits (B,) and whatever `_backward` needs."""

    @abstractmethod
    def _backward(
        self, cache: Any, dz: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Row and dense gradients, given d(loss)/d(logits) `dz` (B,)."""

    def slot_ids(self, batch: Batch) -> dict[str, np.ndarray]:
        """For each table, the uint64 ids (B, k) the model looks up, k = its number of slots."""
        ids = np.asarray(batch.ids)
        if ids.ndim != 2 or ids.shape[1] != self.num_slots:
            raise ValueError(
                f"slot_ids: batch.ids has shape {ids.shape}, expected (B, {self.num_slots})"
            )
        if ids.dtype.kind not in "ui":
            raise ValueError(f"slot_ids: batch.ids must hold integers, got {ids.dtype}")
        ids = ids.astype(np.uint64, copy=False)
        return {t: np.ascontiguousarray(ids[:, a:b]) for t, (a, b) in self.table_slots().items()}

    def forward_backward(
        self,
        batch: Batch,
        rows: Mapping[str, np.ndarray],
        params: Mapping[str, np.ndarray],
        compute_grads: bool = True,
    ) -> Result:
        """Mean logloss, probabilities and (if compute_grads) gradients of the mean loss."""
        rows_, params_ = self._check("forward_backward", rows, params)
        z, cache = self._forward(batch, rows_, params_)
        y = np.asarray(batch.labels, dtype=self.dtype)
        if y.shape != z.shape:
            raise ValueError(
                f"forward_backward: batch.labels has shape {y.shape}, expected {z.shape}"
            )
        loss = float(np.mean(logloss(z, y), dtype=np.float64))  # reported only: exact mean
        probs = sigmoid(z)
        if not compute_grads:
            return Result(loss, probs, z)
        dz = (probs - y) * (1 / len(z))  # python float: stays in self.dtype
        row_grads, dense_grads = self._backward(cache, dz)
        return Result(loss, probs, z, row_grads, dense_grads)

    def predict(
        self, batch: Batch, rows: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        """Click probabilities (B,); needs no labels."""
        rows_, params_ = self._check("predict", rows, params)
        z, _ = self._forward(batch, rows_, params_)
        return sigmoid(z)

    def _check(
        self, call: str, rows: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Cast inputs to self.dtype and check every shape; messages name the call and field."""
        out_rows: dict[str, np.ndarray] = {}
        batch_size = None
        for t, (a, b) in self.table_slots().items():
            if t not in rows:
                raise ValueError(f"{call}: missing rows of table {t!r}")
            r = np.asarray(rows[t], dtype=self.dtype)
            batch_size = r.shape[0] if batch_size is None and r.ndim else batch_size
            want = (batch_size, b - a, self.tables()[t])
            if r.shape != want:
                raise ValueError(f"{call}: table {t!r} rows have shape {r.shape}, expected {want}")
            out_rows[t] = r
        out_params: dict[str, np.ndarray] = {}
        for name, shape in self.dense_shapes().items():
            if name not in params:
                raise ValueError(f"{call}: missing dense variable {name!r}")
            p = np.asarray(params[name], dtype=self.dtype)
            if p.shape != shape:
                raise ValueError(
                    f"{call}: dense variable {name!r} has shape {p.shape}, expected {shape}"
                )
            out_params[name] = p
        return out_rows, out_params

    def _numeric(self, batch: Batch, batch_size: int) -> np.ndarray:
        """batch.numeric as (B, num_numeric) in self.dtype."""
        x = np.asarray(batch.numeric, dtype=self.dtype)
        if x.shape != (batch_size, self.num_numeric):
            raise ValueError(
                f"forward: batch.numeric has shape {x.shape}, "
                f"expected ({batch_size}, {self.num_numeric})"
            )
        return x
