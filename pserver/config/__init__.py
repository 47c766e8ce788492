"""The job file: one schema (`schema`) and the sections every process reads (`job`).

`load(path, overrides)` reads a job file with its `PSRT_*` and `--set`
overrides into a validated `JobConfig`; `build(dict)` does the same from a
parsed document; `describe()` lists every key for `--help`.
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
    add_job_arguments,
    apply_override,
    build,
    describe,
    env_overrides,
    load,
    name_seed,
)

__all__ = [
    "INITIALIZERS", "MODES", "OPTIMIZERS", "OTHER_SECTIONS", "SECTIONS", "ConfigError",
    "DenseSpec", "JobConfig", "MetricsConfig", "OptimizerSpec", "RecoveryConfig", "RpcConfig",
    "TableSpec", "add_job_arguments", "apply_override", "build", "describe", "env_overrides",
    "load", "name_seed",
]
