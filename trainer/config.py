"""The trainer's sections of the job file: [trainer], [data], [model], [checkpoint].

[trainer] and [data] are described by `TRAINER_KEYS` and `DATA_KEYS` (same
`Key` schema as the pserver's sections); [model] by `trainer.models`;
[checkpoint] by `ckpt`. Relative data paths are relative to the job file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt import CheckpointConfig
from ckpt.config import KEYS as CHECKPOINT_KEYS
from pserver.config import ConfigError, JobConfig, Key, parse_section
from trainer.models import MODEL_SCHEMA, Model, build_model


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _fraction(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v!r}"


def _progress(v: Any) -> str | None:
    choices = ("auto", "bar", "log", "off")
    return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"


TRAINER_KEYS = [
    Key("epochs", int, 2, "epochs to train", _positive),
    Key("batch_size", int, 512, "examples per step per trainer", _positive),
    Key("eval_batch_size", int, 4096, "examples per step when evaluating", _positive),
    Key("progress", str, "auto", "auto (a bar on a terminal, else log lines), bar, log or off",
        _progress),
    Key("log_every", int, 100, "steps between progress log lines (progress = log)", _positive),
]
DATA_KEYS = [
    Key("train_path", str, None, "training data, Criteo text format (required)"),
    Key("eval_path", str, "", "held-out data; empty: hold out data.holdout_fraction of "
        "train_path"),
    Key("holdout_fraction", float, 0.1, "share of train_path held out for evaluation when "
        "eval_path is empty", _fraction),
    Key("strict", bool, False, "fail on the first malformed line (file:line) instead of "
        "skipping and counting malformed lines"),
    Key("cache", bool, True, "keep parsed data in a .npz next to the file"),
]


@dataclass(frozen=True)
class TrainerSettings:
    epochs: int
    batch_size: int
    eval_batch_size: int
    progress: str
    log_every: int
    train_path: Path
    eval_path: Path | None
    holdout_fraction: float
    strict: bool
    cache: bool
    model_section: dict
    checkpoint: CheckpointConfig | None


def settings(job: JobConfig) -> TrainerSettings:
    """Validate the trainer's sections of a job; ConfigError names the key."""
    sec = job.sections
    t = parse_section("trainer", TRAINER_KEYS, sec.get("trainer", {}))
    d = parse_section("data", DATA_KEYS, sec.get("data", {}))
    base = Path(job.source).parent if job.source not in ("<defaults>", "<dict>") else Path(".")
    train = base / d["train_path"]
    eval_path = base / d["eval_path"] if d["eval_path"] else None
    for key, path in (("data.train_path", train), ("data.eval_path", eval_path)):
        if path is not None and not path.is_file():
            raise ConfigError(key, f"no such file: {path}")
    ckpt = job.checkpoint
    return TrainerSettings(epochs=t["epochs"], batch_size=t["batch_size"],
                           eval_batch_size=t["eval_batch_size"], progress=t["progress"],
                           log_every=t["log_every"], train_path=train, eval_path=eval_path,
                           holdout_fraction=d["holdout_fraction"], strict=d["strict"],
                           cache=d["cache"], model_section=dict(sec.get("model", {})),
                           checkpoint=ckpt)


def model_for(job: JobConfig, model_section: dict) -> Model:
    """Build the model and check the job's tables and dense variables fit it."""
    try:
        model = build_model(model_section)
    except ValueError as e:
        key, _, problem = str(e).partition(": ")
        raise ConfigError(key, problem) from None
    kind = model_section.get("kind", "deepfm")
    for name, dim in model.tables().items():
        spec = job.table(name)
        if spec is None:
            raise ConfigError(f"tables.{name}", f"model {kind!r} needs a table {name!r} of dim "
                              f"{dim}; the job file has none")
        if spec.dim != dim:
            raise ConfigError(f"tables.{name}.dim", f"model {kind!r} needs dim {dim}, "
                              f"the job file says {spec.dim}")
    dense = {d.name: d.shape for d in job.dense}
    for name, shape in model.dense_shapes().items():
        if name not in dense:
            raise ConfigError(f"dense.{name}", f"model {kind!r} needs a dense variable {name!r} "
                              f"of shape {list(shape)}; the job file has none")
        if tuple(dense[name]) != tuple(shape):
            raise ConfigError(f"dense.{name}.shape", f"model {kind!r} needs shape {list(shape)}, "
                              f"the job file says {list(dense[name])}")
    return model


def job_sections_for(model: Model, table_opts: dict | None = None,
                     dense_opts: dict | None = None) -> dict[str, dict]:
    """[tables.*] and [dense.*] sections that fit `model` (for demo and example job files)."""
    tables = {n: {"dim": d, **(table_opts or {})} for n, d in model.tables().items()}
    dense = {}
    for n, shape in model.dense_shapes().items():
        init = {"initializer": "zeros"} if len(shape) == 1 else {}
        dense[n] = {"shape": list(shape), **init, **(dense_opts or {})}
    return {"tables": tables, "dense": dense}


def describe() -> str:
    lines = []
    for section, schema in (("trainer", TRAINER_KEYS), ("data", DATA_KEYS)):
        lines.append(f"[{section}]")
        for k in schema:
            default = "required" if k.default is None else repr(k.default)
            lines.append(f"  {k.name} ({k.type.__name__}, default {default}): {k.doc}")
    lines.append("[model]")
    for mk in MODEL_SCHEMA:
        lines.append(f"  {mk.name} ({mk.type.__name__}, default {mk.default!r}): {mk.doc}")
    lines.append("[checkpoint]")
    for name, (typ, default, doc) in CHECKPOINT_KEYS.items():
        lines.append(f"  {name} ({typ.__name__}, default {default!r}): {doc}")
    return "\n".join(lines)
