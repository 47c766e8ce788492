"""The job file: one schema (`schema`) and the sections every process reads (`job`).

- `schema`: a key is a dataclass field with its default, meaning and check; one parser,
  one validation, one `describe` (`--help`, the README's key tables).
- `job`: the sections every process reads, as those dataclasses; `build(dict)` checks a
  parsed document into a `JobConfig`; `describe()` lists every key for `--help`.
- `load`: `load(path, overrides)` reads a job file with its `PSRT_*` and `--set`
  overrides; `add_job_arguments` gives a command its --config and --set.
"""

from ckpt.config import ConfigError
from pserver.config.job import (
    INITIALIZERS,
    MODES,
    OPTIMIZERS,
    OTHER_SECTIONS,
    SECTIONS,
    DenseSpec,
    JobConfig,
    MetricsConfig,
    OptimizerSpec,
    RecoveryConfig,
    RpcConfig,
    TableSpec,
    build,
    describe,
    name_seed,
)
from pserver.config.load import add_job_arguments, apply_override, env_overrides, load

__all__ = [
    "INITIALIZERS", "MODES", "OPTIMIZERS", "OTHER_SECTIONS", "SECTIONS", "ConfigError",
    "DenseSpec", "JobConfig", "MetricsConfig", "OptimizerSpec", "RecoveryConfig", "RpcConfig",
    "TableSpec", "add_job_arguments", "apply_override", "build", "describe", "env_overrides",
    "load", "name_seed",
]
