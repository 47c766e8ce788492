"""A dense variable placed on a pserver, with its optimizer state: numpy only."""

from __future__ import annotations

import threading

import numpy as np

from pserver.config import DenseSpec
from pserver.tables import initializers, optimizers


class DenseVariable:
    """A dense variable with its optimizer state. Thread-safe."""

    def __init__(self, spec: DenseSpec) -> None:
        self.spec = spec
        self.shape = tuple(spec.shape)
        self.lock = threading.Lock()
        self.value = initializers.dense_value(
            spec.initializer, spec.init_scale, spec.seed, self.shape
        )
        layout = optimizers.state_layout(spec.optimizer, self.shape)
        self.state = {
            name: np.full(shape, init, dtype=dtype) for name, (shape, dtype, init) in layout.items()
        }

    def pull(self) -> np.ndarray:
        with self.lock:
            return self.value.copy()

    def push(self, grad: np.ndarray) -> None:
        with self.lock:
            optimizers.apply(self.spec.optimizer, self.value, grad, self.state)

    def load(self, value: np.ndarray, state: dict[str, np.ndarray]) -> None:
        if tuple(value.shape) != self.shape:
            raise ValueError(f"dense variable {self.spec.name!r} has shape {list(self.shape)}, "
                             f"the checkpoint holds {list(value.shape)}")
        with self.lock:
            self.value = np.array(value, dtype=np.float32)
            for k in self.state:
                self.state[k] = np.array(state[k], dtype=self.state[k].dtype)
