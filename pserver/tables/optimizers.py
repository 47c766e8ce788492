"""Update rules (SGD, Adagrad, Adam) as plain numpy functions (their keys: `OptimizerSpec`).

Each optimizer names its per-row (or per-variable) state and updates a
gathered block of parameters in place: for a sparse table the block is the
rows touched by a push, for a dense variable the whole variable. All
arithmetic stays in float32.
"""

from __future__ import annotations

import numpy as np

from pserver.config import OPTIMIZERS, OptimizerSpec


def state_layout(spec: OptimizerSpec, shape: tuple[int, ...]) -> dict[str, tuple]:
    """name -> (per-row shape, dtype, initial value) of the optimizer state."""
    if spec.kind == "sgd":
        return {}
    if spec.kind == "adagrad":
        return {"accum": (shape, np.float32, spec.initial_accumulator)}
    if spec.kind == "adam":
        return {
            "m": (shape, np.float32, 0.0),
            "v": (shape, np.float32, 0.0),
            "t": ((), np.int64, 0),
        }
    raise ValueError(f"unknown optimizer {spec.kind!r}; expected one of {', '.join(OPTIMIZERS)}")


def apply(
    spec: OptimizerSpec, w: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray]
) -> None:
    """Update `w` and `state` (gathered blocks, leading axis = rows) in place with gradient `g`."""
    lr = np.float32(spec.learning_rate)
    if spec.kind == "sgd":
        w -= lr * g
    elif spec.kind == "adagrad":
        acc = state["accum"]
        tmp = g * g
        acc += tmp
        np.sqrt(acc, out=tmp)
        tmp += np.float32(spec.epsilon)
        np.divide(g, tmp, out=tmp)
        tmp *= lr
        w -= tmp
    elif spec.kind == "adam":
        b1, b2 = np.float32(spec.beta1), np.float32(spec.beta2)
        m, v, t = state["m"], state["v"], state["t"]
        t += 1
        m *= b1
        m += (np.float32(1.0) - b1) * g
        v *= b2
        v += (np.float32(1.0) - b2) * (g * g)
        tf = t.astype(np.float32).reshape(t.shape + (1,) * (w.ndim - t.ndim))
        c1 = np.float32(1.0) - b1**tf
        c2 = np.float32(1.0) - b2**tf
        w -= lr * (m / c1) / (np.sqrt(v / c2) + np.float32(spec.epsilon))
    else:
        raise ValueError(f"unknown optimizer {spec.kind!r}")
