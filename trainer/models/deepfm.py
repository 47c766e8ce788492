"""DeepFM: bias + wide (first order) + FM (second order) + an MLP over the embeddings.

The slots are split into `slot_groups` contiguous groups, one embedding table
per group ("emb_0", "emb_1", ...); when the slots do not divide evenly the
first groups get one slot more (as `numpy.array_split`). With `use_wide` the
table "wide" (dim 1) holds a first-order weight per id for every slot.

    deep input = [embeddings of all slots, flattened in slot order | numeric]
    deep       = Linear(ReLU(... ReLU(Linear(deep input)))) to 1
    fm         = 0.5 * sum_d[(sum_s v_sd)^2 - sum_s v_sd^2]
    logit      = bias + wide + fm + deep

Numeric features enter the deep part only, as given (scale them in the data).
Dense variables: "mlp_w{i}" (in, out) and "mlp_b{i}" (out,) for i = 0..L
(L = len(hidden)), and "bias" (1,).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.models.base import Batch, Model


@dataclass
class _Cache:
    emb: np.ndarray  # (B, S, D) embeddings of all slots
    acts: list[np.ndarray]  # MLP input, then each hidden layer's output (after ReLU)
    emb_sum: np.ndarray | None  # (B, D) sum over slots, for the FM gradient
    wide_shape: tuple[int, ...] | None
    params: dict[str, np.ndarray]


class DeepFM(Model):
    """DeepFM over `num_slots` categorical slots and `num_numeric` numeric features."""

    def __init__(
        self,
        num_slots: int = 26,
        num_numeric: int = 13,
        embedding_dim: int = 8,
        slot_groups: int = 1,
        hidden: Sequence[int] = (64, 32),
        use_fm: bool = True,
        use_wide: bool = True,
        use_numeric: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__(num_slots, num_numeric, dtype)
        if embedding_dim <= 0:
            raise ValueError(f"DeepFM: embedding_dim must be > 0, got {embedding_dim}")
        if not 1 <= slot_groups <= num_slots:
            raise ValueError(f"DeepFM: slot_groups must be in 1..{num_slots}, got {slot_groups}")
        if any(h <= 0 for h in hidden):
            raise ValueError(f"DeepFM: hidden sizes must be > 0, got {list(hidden)}")
        self.embedding_dim = embedding_dim
        self.slot_groups = slot_groups
        self.hidden = tuple(int(h) for h in hidden)
        self.use_fm = use_fm
        self.use_wide = use_wide
        self.use_numeric = use_numeric and num_numeric > 0
        bounds = np.cumsum([0] + [len(g) for g in np.array_split(range(num_slots), slot_groups)])
        self._groups = {
            f"emb_{g}": (int(bounds[g]), int(bounds[g + 1])) for g in range(slot_groups)
        }
        self._emb_width = num_slots * embedding_dim

    def tables(self) -> dict[str, int]:
        dims = {t: self.embedding_dim for t in self._groups}
        if self.use_wide:
            dims["wide"] = 1
        return dims

    def table_slots(self) -> dict[str, tuple[int, int]]:
        slots = dict(self._groups)
        if self.use_wide:
            slots["wide"] = (0, self.num_slots)
        return slots

    def dense_shapes(self) -> dict[str, tuple[int, ...]]:
        width = self._emb_width + (self.num_numeric if self.use_numeric else 0)
        shapes: dict[str, tuple[int, ...]] = {}
        for i, out in enumerate((*self.hidden, 1)):
            shapes[f"mlp_w{i}"] = (width, out)
            shapes[f"mlp_b{i}"] = (out,)
            width = out
        shapes["bias"] = (1,)
        return shapes

    def _forward(
        self, batch: Batch, rows: dict[str, np.ndarray], params: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, Any]:
        groups = [rows[t] for t in self._groups]
        emb = groups[0] if len(groups) == 1 else np.concatenate(groups, axis=1)
        n = emb.shape[0]
        x = emb.reshape(n, self._emb_width)
        if self.use_numeric:
            x = np.concatenate([x, self._numeric(batch, n)], axis=1)
        acts = [x]
        for i in range(len(self.hidden)):
            a = acts[-1] @ params[f"mlp_w{i}"]
            a += params[f"mlp_b{i}"]
            acts.append(np.maximum(a, 0, out=a))
        last = len(self.hidden)
        z = (acts[-1] @ params[f"mlp_w{last}"])[:, 0] + (
            params[f"mlp_b{last}"][0] + params["bias"][0]
        )
        emb_sum = None
        if self.use_fm:
            emb_sum = np.einsum("bsd->bd", emb)  # much faster than emb.sum(axis=1)
            z += 0.5 * (np.einsum("bd,bd->b", emb_sum, emb_sum) - np.einsum("bsd,bsd->b", emb, emb))
        wide_shape = None
        if self.use_wide:
            z += rows["wide"].sum(axis=(1, 2))
            wide_shape = rows["wide"].shape
        return z, _Cache(emb, acts, emb_sum, wide_shape, params)

    def _backward(
        self, cache: Any, dz: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        dense, d_input = self._mlp_backward(cache, dz)
        d_emb = d_input.reshape(cache.emb.shape)
        if self.use_fm:
            # d fm / d v_sd = sum_s' v_s'd - v_sd, accumulated in place
            d_emb -= dz[:, None, None] * cache.emb
            d_emb += (dz[:, None] * cache.emb_sum)[:, None, :]
        row_grads = {
            t: d_emb if len(self._groups) == 1 else np.ascontiguousarray(d_emb[:, a:b])
            for t, (a, b) in self._groups.items()
        }
        if self.use_wide:
            row_grads["wide"] = np.broadcast_to(dz[:, None, None], cache.wide_shape).copy()
        dense["bias"] = dz.sum(keepdims=True)
        return row_grads, {name: dense[name] for name in self.dense_shapes()}

    def _mlp_backward(
        self, cache: _Cache, dz: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """MLP weight gradients, and the gradient of its embedding part of the input (B, S*D)."""
        params, acts = cache.params, cache.acts
        last = len(self.hidden)
        grads: dict[str, np.ndarray] = {}
        d_out = dz[:, None]
        for i in range(last, -1, -1):
            if i < last:
                d_out *= acts[i + 1] > 0  # ReLU: its output is positive exactly where it passed
            grads[f"mlp_w{i}"] = acts[i].T @ d_out
            grads[f"mlp_b{i}"] = d_out.sum(axis=0)
            w = params[f"mlp_w{i}"]
            d_out = d_out @ (w if i else w[: self._emb_width]).T
        return grads, d_out
