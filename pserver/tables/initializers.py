"""Initial values of rows and dense variables, deterministic from (seed, id).

A sparse row's value depends only on the table seed and the row's id, never on
which pserver holds it or when it was created: every element is drawn from a
counter-based hash of (seed, id, column).
"""

from __future__ import annotations

import numpy as np

from pserver.config import INITIALIZERS
from pserver.tables.sharding import splitmix64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S40 = np.uint64(40)


def _unit(seed: int, ids: np.ndarray, dim: int, stream: int) -> np.ndarray:
    """Uniform float32 in (0, 1), shape (len(ids), dim), a pure function of its inputs."""
    key = splitmix64(np.uint64((seed * 2 + stream) & 0xFFFFFFFFFFFFFFFF))
    base = splitmix64(np.asarray(ids, dtype=np.uint64) ^ key)
    ctr = (np.arange(1, dim + 1, dtype=np.uint64)) * _GOLDEN
    bits = splitmix64(base[:, None] + ctr[None, :]) >> _S40
    return (bits.astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)


def sparse_rows(kind: str, scale: float, seed: int, ids: np.ndarray, dim: int) -> np.ndarray:
    """Initial values (float32, (len(ids), dim)) of the rows with these ids."""
    n = len(ids)
    if kind == "zeros":
        return np.zeros((n, dim), dtype=np.float32)
    if kind == "constant":
        return np.full((n, dim), scale, dtype=np.float32)
    if kind == "uniform":
        u = _unit(seed, ids, dim, 0)
        return (u * np.float32(2.0) - np.float32(1.0)) * np.float32(scale)
    if kind == "normal":
        u1, u2 = _unit(seed, ids, dim, 0), _unit(seed, ids, dim, 1)
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        return r * np.cos(np.float32(2.0 * np.pi) * u2) * np.float32(scale)
    if kind == "glorot_uniform":
        limit = np.float32(np.sqrt(6.0 / (1 + dim)) * scale)
        return (_unit(seed, ids, dim, 0) * np.float32(2.0) - np.float32(1.0)) * limit
    raise ValueError(f"unknown initializer {kind!r}; expected one of {', '.join(INITIALIZERS)}")


def dense_value(kind: str, scale: float, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Initial value (float32) of a dense variable."""
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return np.zeros(shape, dtype=np.float32)
    if kind == "constant":
        return np.full(shape, scale, dtype=np.float32)
    if kind == "uniform":
        return rng.uniform(-scale, scale, size=shape).astype(np.float32)
    if kind == "normal":
        return (rng.standard_normal(size=shape) * scale).astype(np.float32)
    if kind == "glorot_uniform":
        fan_in = shape[0] if len(shape) > 1 else 1
        fan_out = shape[-1]
        limit = np.sqrt(6.0 / (fan_in + fan_out)) * scale
        return rng.uniform(-limit, limit, size=shape).astype(np.float32)
    raise ValueError(f"unknown initializer {kind!r}; expected one of {', '.join(INITIALIZERS)}")
