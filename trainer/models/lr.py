"""Logistic regression over hashed ids: one weight per id, plus a bias and numeric weights.

logit = lr_bias + sum over slots of w[id] + numeric @ lr_numeric, where w is the
single table "lr_w" of dim 1 read by all slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.models.base import Batch, Model


class LogisticRegression(Model):
    """Table "lr_w" (dim 1, all slots); dense "lr_bias" (1,) and, with numerics, "lr_numeric"."""

    def __init__(
        self,
        num_slots: int = 26,
        num_numeric: int = 13,
        use_numeric: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__(num_slots, num_numeric, dtype)
        self.use_numeric = use_numeric and num_numeric > 0

    def tables(self) -> dict[str, int]:
        return {"lr_w": 1}

    def table_slots(self) -> dict[str, tuple[int, int]]:
        return {"lr_w": (0, self.num_slots)}

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"lr_bias": (1,)}
        if self.use_numeric:
            shapes["lr_numeric"] = (self.num_numeric,)
        return shapes

    def _forward(
        self, batch: Batch, rows: dict[str, np.ndarray], params: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, Any]:
        w = rows["lr_w"]
        z = w.sum(axis=(1, 2)) + params["lr_bias"][0]
        x = None
        if self.use_numeric:
            x = self._numeric(batch, w.shape[0])
            z += x @ params["lr_numeric"]
        return z, (w.shape, x)

    def _backward(
        self, cache: Any, dz: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        shape, x = cache
        row_grads = {"lr_w": np.broadcast_to(dz[:, None, None], shape).copy()}
        dense_grads = {"lr_bias": dz.sum(keepdims=True)}
        if x is not None:
            dense_grads["lr_numeric"] = dz @ x
        return row_grads, dense_grads
