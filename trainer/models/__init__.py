"""CTR models in plain numpy with hand-written backward passes.

A model owns no parameters: it is a pure function of (batch, rows, params).
The training loop pulls the rows of `slot_ids(batch)` from the sparse tables
and the dense variables, calls `forward_backward`, and pushes the gradients.

- `base`: the `Model` interface, `Result`, the stable logloss.
- `lr`: `LogisticRegression`.  `deepfm`: `DeepFM`.
- `config`: `build_model` from the [model] section (`ModelConfig`).
"""

from __future__ import annotations

from trainer.models.base import Batch, Model, Result, logloss, sigmoid
from trainer.models.config import KINDS, ModelConfig, build_model
from trainer.models.deepfm import DeepFM
from trainer.models.lr import LogisticRegression

__all__ = [
    "KINDS",
    "Batch",
    "DeepFM",
    "LogisticRegression",
    "Model",
    "ModelConfig",
    "Result",
    "build_model",
    "logloss",
    "sigmoid",
]
