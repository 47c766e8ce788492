"""The job file (TOML) that every process of a job reads, and its overrides.

Sections owned here: [job], [rpc], [recovery], [metrics], [tables.NAME],
[dense.NAME], and [checkpoint] (`ckpt.CheckpointConfig`). The trainer's
sections ([trainer], [data], [model]) are kept as raw dicts in
`JobConfig.sections` and read by the trainer with the same schema
(`pserver.config.schema`). Every key, its type, default and meaning is a field
of the dataclasses below; `describe()` prints them for `--help` and the
README's tables are made from the same fields.

A job file is read, with its overrides, by `pserver.config.load`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ckpt import CheckpointConfig
from ckpt.config import ConfigError
from pserver.config.schema import (
    describe_sections,
    fraction,
    non_negative,
    one_of,
    parse,
    positive,
    setting,
    validate,
)

MODES = ("sync", "async")
INITIALIZERS = ("zeros", "constant", "uniform", "normal", "glorot_uniform")
OPTIMIZERS = ("sgd", "adagrad", "adam")
TLS_MODES = ("off", "tls", "mtls")
_TLS_FILES = ("tls_cert", "tls_key", "tls_ca", "tls_client_cert", "tls_client_key")


def _addresses(v: tuple[str, ...]) -> str | None:
    if not v:
        return "needs at least one pserver address"
    for a in v:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            return f"{a!r} is not HOST:PORT"
    return None


def _run_id(v: str) -> str | None:
    if len(v) > 128 or not all(c.isalnum() or c in "-_.:" for c in v):
        return f"expected up to 128 letters, digits or -_.:, got {v!r}"
    return None


def _shape(v: tuple[int, ...]) -> str | None:
    if not v or any(d <= 0 for d in v):
        return f"must be a non-empty list of positive integers, got {list(v)!r}"
    return None


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer keys of a [tables.NAME] or [dense.NAME] section (`optimizer` names
    the kind); the update rules are in `pserver.tables.optimizers`."""

    kind: str = setting("adagrad", "sgd, adagrad or adam", one_of(*OPTIMIZERS), key="optimizer")
    learning_rate: float = setting(0.05, "learning rate", positive)
    initial_accumulator: float = setting(0.1, "adagrad: initial value of the accumulator",
                                         non_negative, only_for=("kind", "adagrad"))
    beta1: float = setting(0.9, "adam: decay of the first moment", fraction,
                           only_for=("kind", "adam"))
    beta2: float = setting(0.999, "adam: decay of the second moment", fraction,
                           only_for=("kind", "adam"))
    epsilon: float = setting(1e-8, "adagrad, adam: added to the denominator", positive)

    def __post_init__(self) -> None:
        validate(self)


_SEED_DOC = "seed of the initializer (default: derived from job.seed and the name)"


@dataclass(frozen=True)
class TableSpec:
    """A [tables.NAME] section: one sparse table."""

    name: str
    dim: int = setting(doc="row width (required)", check=positive)
    initializer: str = setting("normal", "zeros, constant, uniform, normal or glorot_uniform",
                               one_of(*INITIALIZERS))
    init_scale: float = setting(0.01, "std (normal), half-width (uniform), value (constant), "
                                "gain (glorot_uniform)")
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec, metadata={"flatten": True})
    seed: int = setting(0, _SEED_DOC, shown="derived")  # a job file without it: name_seed

    def __post_init__(self) -> None:
        validate(self, f"tables.{self.name}")


@dataclass(frozen=True)
class DenseSpec:
    """A [dense.NAME] section: one dense variable."""

    name: str
    shape: tuple[int, ...] = setting(doc="shape of the variable (required)", check=_shape)
    initializer: str = setting("glorot_uniform", "as for tables", one_of(*INITIALIZERS))
    init_scale: float = setting(1.0, "as for tables")
    optimizer: OptimizerSpec = field(
        default_factory=lambda: OptimizerSpec(kind="adam", learning_rate=0.001),
        metadata={"flatten": True})
    seed: int = setting(0, _SEED_DOC, shown="derived")  # a job file without it: name_seed

    def __post_init__(self) -> None:
        validate(self, f"dense.{self.name}")


@dataclass(frozen=True)
class RpcConfig:
    """[rpc]: deadlines, sizes, threads, and security (`pserver.rpc.security`; README
    "Security")."""

    SECTION: ClassVar[str] = "rpc"
    deadline_s: float = setting(60.0, "deadline of every client call, seconds", positive)
    connect_timeout_s: float = setting(60.0, "how long a client waits for pservers to start",
                                       positive)
    max_message_bytes: int = setting(256 * 1024 * 1024, "largest gRPC message sent or "
                                     "received; larger ones get RESOURCE_EXHAUSTED", positive)
    server_threads: int = setting(32, "worker threads per pserver", positive)
    grace_s: float = setting(5.0, "on SIGTERM, how long in-flight calls may finish",
                             non_negative)
    checkpoint_timeout_s: float = setting(600.0, "deadline of the checkpoint calls (restore, "
                                          "barrier, commit), which wait for other processes "
                                          "and for the disk", positive)
    tls: str = setting("off", "off; tls: pservers present tls_cert, clients verify it against "
                       "tls_ca; mtls: clients present a certificate too and pservers verify it "
                       "against tls_ca", one_of(*TLS_MODES))
    tls_cert: str = setting("", "PEM certificate (chain) pservers present; in mtls clients "
                            "too, unless tls_client_cert is set")
    tls_key: str = setting("", "PEM private key of tls_cert")
    tls_ca: str = setting("", "PEM CA certificates that verify the peer (clients: the "
                          "pservers'; mtls pservers: the clients'); empty: the system's roots "
                          "(tls only)")
    tls_client_cert: str = setting("", "mtls: PEM certificate clients present (default: "
                                   "tls_cert)")
    tls_client_key: str = setting("", "mtls: PEM private key of tls_client_cert (default: "
                                  "tls_key)")
    tls_server_name: str = setting("", "host name clients expect in the pservers' certificates "
                                   "(default: the host of each job.pservers address)")
    token_file: str = setting("", "file holding the shared token every call must carry (or "
                              "the PSRT_TOKEN environment variable, not both); empty: no token "
                              "check")

    def __post_init__(self) -> None:
        validate(self, self.SECTION)
        self._check_security()

    def _check_security(self) -> None:
        """The TLS keys fit together. No file is opened here, and what only one role needs
        (a pserver's certificate, a client's in mtls) is asked for when that role starts:
        each process reads only the files it uses, so a trainer needs no server key."""
        if self.tls == "off":
            for key in (*_TLS_FILES, "tls_server_name"):
                if getattr(self, key):
                    raise ConfigError(f"rpc.{key}", "is set but rpc.tls is 'off'; set rpc.tls "
                                      "to 'tls' or 'mtls' to use it")
            return
        if self.tls == "tls":
            for key in ("tls_client_cert", "tls_client_key"):
                if getattr(self, key):
                    raise ConfigError(f"rpc.{key}", "only used when rpc.tls is 'mtls', got "
                                      "'tls'")
        for cert, key in (("tls_cert", "tls_key"), ("tls_client_cert", "tls_client_key")):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                have, missing = (cert, key) if getattr(self, cert) else (key, cert)
                raise ConfigError(f"rpc.{missing}", f"required because rpc.{have} is set")
        if self.tls == "mtls" and not self.tls_ca:
            raise ConfigError("rpc.tls_ca", "required when rpc.tls is 'mtls' (the CA that "
                              "signed the certificates of the pservers and of the clients)")


@dataclass(frozen=True)
class RecoveryConfig:
    """[recovery]: heartbeats, liveness, rejoining, restarts."""

    SECTION: ClassVar[str] = "recovery"
    heartbeat_s: float = setting(1.0, "how often every process tells the coordinator it is "
                                 "alive, seconds", positive)
    liveness_timeout_s: float = setting(5.0, "a process silent this long is taken for dead and "
                                        "the job rolls back to its newest complete checkpoint",
                                        positive)
    rejoin_timeout_s: float = setting(120.0, "how long the job waits for a lost process to come "
                                      "back before it fails, naming it", positive)
    max_restarts: int = setting(3, "local launcher: how many times it restarts a process that "
                                "died (0: stop the job instead); needs a [checkpoint] section",
                                non_negative)

    def __post_init__(self) -> None:
        validate(self, self.SECTION)
        if self.liveness_timeout_s <= 2 * self.heartbeat_s:
            raise ConfigError("recovery.liveness_timeout_s", f"must be over twice "
                              f"recovery.heartbeat_s ({self.heartbeat_s}), got "
                              f"{self.liveness_timeout_s}")


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus ports and the training curves' files."""

    SECTION: ClassVar[str] = "metrics"
    port: int = setting(-1, "Prometheus metrics over HTTP: -1 off; 0 each process picks a free "
                        "port (logged, and written to metrics.targets_dir); N > 0: pserver i "
                        "serves on N + i, trainer j on N + P + j",
                        lambda v: None if v >= -1 else f"must be >= -1, got {v!r}")
    host: str = setting("127.0.0.1", "address the metrics port listens on (0.0.0.0 in a "
                        "container)", lambda v: None if v.strip() else "must not be empty")
    targets_dir: str = setting("", "if set, each process writes ROLE_ID.json there (a "
                               "Prometheus file_sd target list: its HOST:PORT) once its metrics "
                               "port serves, and removes it when it stops; relative to the "
                               "working directory")
    curves_dir: str = setting("", "if set, trainer j appends its per-step figures to "
                              "trainer_J.jsonl there, relative to the working directory "
                              "(`python -m trainer launch` sets WORKDIR/curves)")

    def __post_init__(self) -> None:
        validate(self, self.SECTION)


@dataclass(frozen=True)
class JobConfig:
    """The whole job file: [job]'s keys are this class's own fields, the other sections
    its parts."""

    SECTION: ClassVar[str] = "job"
    name: str = setting("psrt-job", "job id: names the job in logs and in the checkpoint lock")
    run_id: str = setting("", "names one run of the job in the checkpoint lock: the same for "
                          "every process of a launch and its restarts, another for the next "
                          "launch (the launcher makes one; set it per deployment, e.g. as "
                          "PSRT_JOB__RUN_ID, never in a job file shared by runs); empty: one "
                          "per process", _run_id)
    mode: str = setting("sync", "sync: apply step s once all trainers pushed it; async: apply "
                        "each push on arrival", one_of(*MODES))
    seed: int = setting(0, "seed of every random draw (tables, dense init, data order)")
    num_trainers: int = setting(1, "number of trainers T (ids 0..T-1)", positive)
    pservers: tuple[str, ...] = setting(("127.0.0.1:7070",), "HOST:PORT of pserver 0, 1, ... "
                                        "(P = length)", _addresses)
    virtual_shards: int = setting(1024, "V: ids hash to V virtual shards, split over pservers "
                                  "in contiguous ranges; fixed for the life of a job", positive)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tables: tuple[TableSpec, ...] = ()
    dense: tuple[DenseSpec, ...] = ()
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "<defaults>"
    checkpoint: CheckpointConfig | None = None  # None: the job file has no [checkpoint]

    def __post_init__(self) -> None:
        validate(self, self.SECTION)

    @property
    def num_pservers(self) -> int:
        return len(self.pservers)

    def table(self, name: str) -> TableSpec | None:
        return next((t for t in self.tables if t.name == name), None)

    def dense_owner(self, name: str) -> int:
        """Dense variables go round-robin, in name order, over the pservers."""
        names = sorted(d.name for d in self.dense)
        return names.index(name) % self.num_pservers


# The sections this module reads, in the order --help and the README show them.
SECTIONS: list[tuple[str, type]] = [
    ("job", JobConfig), ("rpc", RpcConfig), ("recovery", RecoveryConfig),
    ("metrics", MetricsConfig), ("tables.NAME", TableSpec), ("dense.NAME", DenseSpec),
]
OTHER_SECTIONS = ("trainer", "data", "model")  # the trainer's (`trainer.config`)
_PARTS = {"rpc": RpcConfig, "recovery": RecoveryConfig, "metrics": MetricsConfig}
_NAMED = {"tables": TableSpec, "dense": DenseSpec}


def name_seed(seed: int, name: str) -> int:
    """A seed for one named table or variable, derived from the job seed."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF


def _named(kind: str, raw: Any, seed: int) -> list[Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(kind, f"expected [{kind}.NAME] tables, got {raw!r}")
    out = []
    for name, body in raw.items():
        spec = parse(f"{kind}.{name}", _NAMED[kind], body, name=name)
        if "seed" not in body:
            spec = dataclasses.replace(spec, seed=name_seed(seed, name))
        out.append(spec)
    return out


def _table(section: str, raw: Any) -> dict[str, Any]:
    """A section kept for the trainer, as a dict (it checks the keys)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(section, f"expected a table of keys, got {raw!r}")
    return dict(raw)


def build(raw: Mapping[str, Any], source: str = "<dict>") -> JobConfig:
    """A validated JobConfig from the parsed TOML document."""
    known = ["job", *_PARTS, *_NAMED, *OTHER_SECTIONS, "checkpoint"]
    for section in raw:
        if section not in known:
            raise ConfigError(section, f"unknown section (known: {', '.join(known)})")
    job = parse("job", JobConfig, raw.get("job", {}))
    parts = {name: parse(name, cls, raw.get(name, {})) for name, cls in _PARTS.items()}
    metrics = parts["metrics"]
    last = metrics.port + job.num_pservers + job.num_trainers - 1
    if metrics.port > 0 and last > 65535:
        raise ConfigError("metrics.port", f"{metrics.port} + P + T - 1 = {last} is over 65535")
    tables = _named("tables", raw.get("tables", {}), job.seed)
    dense = _named("dense", raw.get("dense", {}), job.seed)
    clash = {t.name for t in tables} & {d.name for d in dense}
    if clash:
        raise ConfigError(f"dense.{sorted(clash)[0]}", "a table has the same name")
    ckpt = raw.get("checkpoint")
    return dataclasses.replace(job, **parts, tables=tuple(tables), dense=tuple(dense),
                               source=source,
                               sections={k: _table(k, raw[k]) for k in OTHER_SECTIONS
                                         if k in raw},
                               checkpoint=None if ckpt is None else
                               parse("checkpoint", CheckpointConfig, ckpt))


def describe() -> str:
    """Every key of the sections a pserver reads, [checkpoint] too, with type, default and
    meaning (for --help)."""
    return describe_sections([*SECTIONS, ("checkpoint", CheckpointConfig)])
