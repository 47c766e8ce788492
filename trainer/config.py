"""The trainer's sections of the job file: [trainer], [data], [model], [checkpoint].

[trainer] and [data] are `TrainerConfig` and `DataConfig`, [model]
`trainer.models.ModelConfig`, [checkpoint] `ckpt.CheckpointConfig`: the same
schema as the pserver's sections (`pserver.config.schema`). Relative data
paths are relative to the job file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ckpt import CheckpointConfig
from pserver.config import SECTIONS as JOB_SECTIONS
from pserver.config import ConfigError, JobConfig
from pserver.config.schema import describe_sections, fraction, one_of, parse, positive, setting
from pserver.config.schema import validate as validate_keys
from trainer.models import Model, ModelConfig, build_model


@dataclass(frozen=True)
class TrainerConfig:
    """[trainer]: epochs, batch sizes, progress."""

    SECTION: ClassVar[str] = "trainer"
    epochs: int = setting(2, "epochs to train", positive)
    batch_size: int = setting(512, "examples per step per trainer", positive)
    eval_batch_size: int = setting(4096, "examples per step when evaluating", positive)
    progress: str = setting("auto", "auto (a bar on a terminal, else log lines), bar, log or "
                            "off", one_of("auto", "bar", "log", "off"))
    log_every: int = setting(100, "steps between progress log lines (progress = log)",
                             positive)

    def __post_init__(self) -> None:
        validate_keys(self, self.SECTION)


@dataclass(frozen=True)
class DataConfig:
    """[data]: where the examples are."""

    SECTION: ClassVar[str] = "data"
    train_path: str = setting(doc="training data, Criteo text format (required)")
    eval_path: str = setting("", "held-out data; empty: hold out data.holdout_fraction of "
                             "train_path")
    holdout_fraction: float = setting(0.1, "share of train_path held out for evaluation when "
                                      "eval_path is empty", fraction)
    strict: bool = setting(False, "fail on the first malformed line (file:line) instead of "
                           "skipping and counting malformed lines")
    cache: bool = setting(True, "keep parsed data in a .npz next to the file")

    def __post_init__(self) -> None:
        validate_keys(self, self.SECTION)


# Every section of a job file, in the order --help and the README show them.
SECTIONS: list[tuple[str, type]] = [*JOB_SECTIONS, ("trainer", TrainerConfig),
                                    ("data", DataConfig), ("model", ModelConfig),
                                    ("checkpoint", CheckpointConfig)]


@dataclass(frozen=True)
class TrainerSettings:
    """A trainer's sections of a job, checked, with the data paths resolved."""

    trainer: TrainerConfig
    data: DataConfig
    train_path: Path
    eval_path: Path | None
    model_section: dict
    checkpoint: CheckpointConfig | None


def settings(job: JobConfig) -> TrainerSettings:
    """Validate the trainer's sections of a job; ConfigError names the key."""
    sec = job.sections
    t = parse("trainer", TrainerConfig, sec.get("trainer", {}))
    d = parse("data", DataConfig, sec.get("data", {}))
    base = Path(job.source).parent if job.source not in ("<defaults>", "<dict>") else Path(".")
    train = base / d.train_path
    eval_path = base / d.eval_path if d.eval_path else None
    for key, path in (("data.train_path", train), ("data.eval_path", eval_path)):
        if path is not None and not path.is_file():
            raise ConfigError(key, f"no such file: {path}")
    return TrainerSettings(trainer=t, data=d, train_path=train, eval_path=eval_path,
                           model_section=dict(sec.get("model", {})), checkpoint=job.checkpoint)


def model_for(job: JobConfig, model_section: dict) -> Model:
    """Build the model and check the job's tables and dense variables fit it."""
    model = build_model(model_section)
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
    """Every key of a job file (the trainer reads them all), for --help."""
    return describe_sections(SECTIONS)
