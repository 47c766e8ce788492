"""The [model] section of the job file, and the factory that builds a model from it.

`MODEL_SCHEMA` lists every key with its type, default and meaning;
`describe_schema()` renders it for `--help` and the README. Errors are
`ModelConfigError` (a ValueError) whose message starts with `model.<key>: `.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.models.base import Model
from trainer.models.deepfm import DeepFM
from trainer.models.lr import LogisticRegression

KINDS = ("lr", "deepfm")


class ModelConfigError(ValueError):
    """A bad [model] key; the message starts with `model.<key>: `."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"model.{key}: {problem}" if key else f"model: {problem}")
        self.key = key


@dataclass(frozen=True)
class ModelKey:
    """One key of the [model] section."""

    name: str
    type: type
    default: Any
    doc: str


MODEL_SCHEMA: list[ModelKey] = [
    ModelKey("kind", str, "deepfm", "lr (logistic regression) or deepfm"),
    ModelKey("embedding_dim", int, 8, "deepfm: row dim of the embedding tables emb_*"),
    ModelKey(
        "slot_groups",
        int,
        1,
        "deepfm: the 26 slots split into this many contiguous "
        "groups, one embedding table each (emb_0, emb_1, ...)",
    ),
    ModelKey("hidden", list, [64, 32], "deepfm: sizes of the ReLU hidden layers of the MLP"),
    ModelKey("use_fm", bool, True, "deepfm: add the FM second-order term"),
    ModelKey("use_wide", bool, True, "deepfm: add a first-order weight per id (table wide)"),
    ModelKey(
        "use_numeric",
        bool,
        True,
        "feed the 13 numeric features (lr: linear weights lr_numeric; deepfm: into the MLP input)",
    ),
]


def describe_schema() -> str:
    """Every [model] key with type, default and meaning, one per line."""
    lines = ["[model]"]
    for k in MODEL_SCHEMA:
        lines.append(f"  {k.name} ({k.type.__name__}, default {k.default!r}): {k.doc}")
    return "\n".join(lines)


def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(key: ModelKey, value: Any) -> Any:
    """Check one value's type and range; returns it (lists as tuples of int)."""
    if key.type is bool:
        if not isinstance(value, bool):
            raise ModelConfigError(key.name, f"expected bool, got {_type_name(value)}")
    elif key.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelConfigError(key.name, f"expected int, got {_type_name(value)}")
        if value <= 0:
            raise ModelConfigError(key.name, f"expected an int > 0, got {value!r}")
    elif key.type is list:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise ModelConfigError(
                key.name, f"expected a list of ints > 0, got {_type_name(value)}"
            )
        return tuple(value)
    elif not isinstance(value, key.type):
        raise ModelConfigError(key.name, f"expected {key.type.__name__}, got {_type_name(value)}")
    return value


def parse_model_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the [model] section; returns every key, defaults filled in."""
    if not isinstance(section, Mapping):
        raise ModelConfigError("", f"expected a table of keys, got {_type_name(section)}")
    keys = {k.name: k for k in MODEL_SCHEMA}
    for name in section:
        if name not in keys:
            raise ModelConfigError(str(name), f"unknown key (expected one of {', '.join(keys)})")
    out = {
        name: _coerce(k, section[name]) if name in section else k.default
        for name, k in keys.items()
    }
    if out["kind"] not in KINDS:
        raise ModelConfigError("kind", f"expected one of {', '.join(KINDS)}, got {out['kind']!r}")
    return out


def build_model(
    model_section: Mapping[str, Any], *, num_slots: int = 26, num_numeric: int = 13
) -> Model:
    """The model the [model] section describes (deepfm-only keys are ignored for lr)."""
    v = parse_model_section(model_section)
    if v["kind"] == "lr":
        return LogisticRegression(num_slots, num_numeric, use_numeric=v["use_numeric"])
    if v["slot_groups"] > num_slots:
        raise ModelConfigError(
            "slot_groups",
            f"expected at most {num_slots} (one slot per group), got {v['slot_groups']}",
        )
    return DeepFM(
        num_slots,
        num_numeric,
        embedding_dim=v["embedding_dim"],
        slot_groups=v["slot_groups"],
        hidden=tuple(v["hidden"]),
        use_fm=v["use_fm"],
        use_wide=v["use_wide"],
        use_numeric=v["use_numeric"],
    )
