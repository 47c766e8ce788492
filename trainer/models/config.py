"""The [model] section of the job file, and the factory that builds a model from it.

`ModelConfig`'s fields are the section's keys (type, default, meaning and
check: `pserver.config.schema`); `build_model` makes the model they describe.
A bad key raises `ConfigError` naming `model.<key>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pserver.config import ConfigError
from pserver.config.schema import parse, setting, validate
from trainer.models.base import Model
from trainer.models.deepfm import DeepFM
from trainer.models.lr import LogisticRegression

KINDS = ("lr", "deepfm")


def _kind(v: str) -> str | None:
    return None if v in KINDS else f"expected one of {', '.join(KINDS)}, got {v!r}"


def _positive(v: int) -> str | None:
    return None if v > 0 else f"expected an int > 0, got {v!r}"


def _sizes(v: Any) -> str | None:
    if isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                    for x in v):
        return None
    got = f"list {list(v)!r}" if isinstance(v, tuple) else f"{type(v).__name__} {v!r}"
    return f"expected a list of ints > 0, got {got}"


@dataclass(frozen=True)
class ModelConfig:
    """[model]: which model, and its sizes."""

    SECTION: ClassVar[str] = "model"
    kind: str = setting("deepfm", "lr (logistic regression) or deepfm")  # checked last
    embedding_dim: int = setting(8, "deepfm: row dim of the embedding tables emb_*", _positive)
    slot_groups: int = setting(1, "deepfm: the 26 slots split into this many contiguous "
                               "groups, one embedding table each (emb_0, emb_1, ...)", _positive)
    hidden: tuple = setting((64, 32), "deepfm: sizes of the ReLU hidden layers of the MLP",
                            _sizes)
    use_fm: bool = setting(True, "deepfm: add the FM second-order term")
    use_wide: bool = setting(True, "deepfm: add a first-order weight per id (table wide)")
    use_numeric: bool = setting(True, "feed the 13 numeric features (lr: linear weights "
                                "lr_numeric; deepfm: into the MLP input)")

    def __post_init__(self) -> None:
        validate(self, self.SECTION)
        if (problem := _kind(self.kind)) is not None:
            raise ConfigError("model.kind", problem)


def build_model(model_section: Mapping[str, Any], *, num_slots: int = 26,
                num_numeric: int = 13) -> Model:
    """The model the [model] section describes (deepfm-only keys are ignored for lr)."""
    v = parse("model", ModelConfig, model_section)
    if v.kind == "lr":
        return LogisticRegression(num_slots, num_numeric, use_numeric=v.use_numeric)
    if v.slot_groups > num_slots:
        raise ConfigError("model.slot_groups",
                          f"expected at most {num_slots} (one slot per group), got {v.slot_groups}")
    return DeepFM(num_slots, num_numeric, embedding_dim=v.embedding_dim,
                  slot_groups=v.slot_groups, hidden=tuple(v.hidden), use_fm=v.use_fm,
                  use_wide=v.use_wide, use_numeric=v.use_numeric)
