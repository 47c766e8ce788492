"""The job file (TOML) that every process of a job reads, and its overrides.

Sections owned here: [job], [rpc], [tables.NAME], [dense.NAME]. Sections owned
by other packages ([trainer], [data], [model], [checkpoint]) are kept as raw
dicts in `JobConfig.sections` and validated by their owners. Every key, its
type, default and meaning is in the schemas below; `describe()` prints them
for `--help` and the README's table is made from the same text.

Overrides, applied in this order over the file: `PSRT_<SECTION>__<KEY>`
environment variables (`PSRT_JOB__MODE=async`, `PSRT_TABLES__EMB__DIM=32`),
then `--set section.key=value` flags. Values are read as TOML values, falling
back to a plain string.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt import CheckpointConfig
from ckpt.config import from_section as checkpoint_from_section
from pserver import initializers, optimizers
from pserver.initializers import name_seed
from pserver.optimizers import OptimizerSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad job file or override; the message starts with the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"

    return check


def _addresses(v: list) -> str | None:
    if not v:
        return "needs at least one pserver address"
    for a in v:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            return f"{a!r} is not HOST:PORT"
    return None


def _shape(v: list) -> str | None:
    if not v or any(d <= 0 for d in v):
        return f"must be a non-empty list of positive integers, got {v!r}"
    return None


def _fraction(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v!r}"


JOB_KEYS = [
    Key("name", str, "psrt-job", "job id: names the job in logs and in the checkpoint lock"),
    Key("mode", str, "sync", "sync: apply step s once all trainers pushed it; async: apply "
        "each push on arrival", _one_of("sync", "async")),
    Key("seed", int, 0, "seed of every random draw (tables, dense init, data order)"),
    Key("num_trainers", int, 1, "number of trainers T (ids 0..T-1)", _positive),
    Key("pservers", list, ["127.0.0.1:7070"], "HOST:PORT of pserver 0, 1, ... (P = length)",
        _addresses),
    Key("virtual_shards", int, 1024, "V: ids hash to V virtual shards, split over pservers in "
        "contiguous ranges; fixed for the life of a job", _positive),
]
RPC_KEYS = [
    Key("deadline_s", float, 60.0, "deadline of every client call, seconds", _positive),
    Key("connect_timeout_s", float, 60.0, "how long a client waits for pservers to start",
        _positive),
    Key("max_message_bytes", int, 256 * 1024 * 1024, "largest gRPC message sent or received; "
        "larger ones get RESOURCE_EXHAUSTED", _positive),
    Key("server_threads", int, 32, "worker threads per pserver", _positive),
    Key("grace_s", float, 5.0, "on SIGTERM, how long in-flight calls may finish", _non_negative),
    Key("checkpoint_timeout_s", float, 600.0, "deadline of the checkpoint calls (restore, "
        "barrier, commit), which wait for other processes and for the disk", _positive),
    # security (pserver/security.py; README "Security")
    Key("tls", str, "off", "off; tls: pservers present tls_cert, clients verify it against "
        "tls_ca; mtls: clients present a certificate too and pservers verify it against tls_ca",
        _one_of("off", "tls", "mtls")),
    Key("tls_cert", str, "", "PEM certificate (chain) pservers present; in mtls clients too, "
        "unless tls_client_cert is set"),
    Key("tls_key", str, "", "PEM private key of tls_cert"),
    Key("tls_ca", str, "", "PEM CA certificates that verify the peer (clients: the pservers'; "
        "mtls pservers: the clients'); empty: the system's roots (tls only)"),
    Key("tls_client_cert", str, "", "mtls: PEM certificate clients present (default: tls_cert)"),
    Key("tls_client_key", str, "", "mtls: PEM private key of tls_client_cert (default: tls_key)"),
    Key("tls_server_name", str, "", "host name clients expect in the pservers' certificates "
        "(default: the host of each job.pservers address)"),
    Key("token_file", str, "", "file holding the shared token every call must carry "
        "(or the PSRT_TOKEN environment variable, not both); empty: no token check"),
]
_OPT_KEYS = [
    Key("optimizer", str, None, "sgd, adagrad or adam", _one_of(*optimizers.KINDS)),
    Key("learning_rate", float, None, "learning rate", _positive),
    Key("initial_accumulator", float, 0.1, "adagrad: initial value of the accumulator",
        _non_negative),
    Key("beta1", float, 0.9, "adam: decay of the first moment", _fraction),
    Key("beta2", float, 0.999, "adam: decay of the second moment", _fraction),
    Key("epsilon", float, 1e-8, "adagrad, adam: added to the denominator", _positive),
    Key("seed", int, None, "seed of the initializer (default: derived from job.seed and the name)"),
]
_OPT_ONLY = {"initial_accumulator": "adagrad", "beta1": "adam", "beta2": "adam"}
TABLE_KEYS = [
    Key("dim", int, None, "row width (required)", _positive),
    Key("initializer", str, "normal", "zeros, constant, uniform, normal or glorot_uniform",
        _one_of(*initializers.KINDS)),
    Key("init_scale", float, 0.01, "std (normal), half-width (uniform), value (constant), "
        "gain (glorot_uniform)"),
    *[dataclasses.replace(k, default={"optimizer": "adagrad", "learning_rate": 0.05}[k.name])
      if k.name in ("optimizer", "learning_rate") else k for k in _OPT_KEYS],
]
DENSE_KEYS = [
    Key("shape", list, None, "shape of the variable (required)", _shape),
    Key("initializer", str, "glorot_uniform", "as for tables", _one_of(*initializers.KINDS)),
    Key("init_scale", float, 1.0, "as for tables"),
    *[dataclasses.replace(k, default={"optimizer": "adam", "learning_rate": 0.001}[k.name])
      if k.name in ("optimizer", "learning_rate") else k for k in _OPT_KEYS],
]
RECOVERY_KEYS = [
    Key("heartbeat_s", float, 1.0, "how often every process tells the coordinator it is alive, "
        "seconds", _positive),
    Key("liveness_timeout_s", float, 5.0, "a process silent this long is taken for dead and the "
        "job rolls back to its newest complete checkpoint", _positive),
    Key("rejoin_timeout_s", float, 120.0, "how long the job waits for a lost process to come "
        "back before it fails, naming it", _positive),
    Key("max_restarts", int, 3, "local launcher: how many times it restarts a process that "
        "died (0: stop the job instead); needs a [checkpoint] section", _non_negative),
]
METRICS_KEYS = [
    Key("port", int, -1, "Prometheus metrics over HTTP: -1 off; 0 each process picks a free port "
        "(logged, and written to metrics.targets_dir); N > 0: pserver i serves on N + i, "
        "trainer j on N + P + j", lambda v: None if v >= -1 else f"must be >= -1, got {v!r}"),
    Key("host", str, "127.0.0.1", "address the metrics port listens on (0.0.0.0 in a "
        "container)", lambda v: None if v.strip() else "must not be empty"),
    Key("targets_dir", str, "", "if set, each process writes ROLE_ID.json there (a Prometheus "
        "file_sd target list: its HOST:PORT) once its metrics port serves, and removes it when "
        "it stops; relative to the working directory"),
    Key("curves_dir", str, "", "if set, trainer j appends its per-step figures to "
        "trainer_J.jsonl there, relative to the working directory (`python -m trainer "
        "launch` sets WORKDIR/curves)"),
]
SCHEMAS: dict[str, list[Key]] = {"job": JOB_KEYS, "rpc": RPC_KEYS, "recovery": RECOVERY_KEYS,
                               "metrics": METRICS_KEYS}
NAMED_SCHEMAS: dict[str, list[Key]] = {"tables": TABLE_KEYS, "dense": DENSE_KEYS}
OTHER_SECTIONS = ("trainer", "data", "model")


@dataclass(frozen=True)
class TableSpec:
    name: str
    dim: int
    initializer: str = "normal"
    init_scale: float = 0.01
    seed: int = 0
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)


@dataclass(frozen=True)
class DenseSpec:
    name: str
    shape: tuple[int, ...]
    initializer: str = "glorot_uniform"
    init_scale: float = 1.0
    seed: int = 0
    optimizer: OptimizerSpec = field(
        default_factory=lambda: OptimizerSpec(kind="adam", learning_rate=0.001)
    )


@dataclass(frozen=True)
class RpcConfig:
    deadline_s: float = 60.0
    connect_timeout_s: float = 60.0
    max_message_bytes: int = 256 * 1024 * 1024
    server_threads: int = 32
    grace_s: float = 5.0
    checkpoint_timeout_s: float = 600.0
    tls: str = "off"
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    tls_server_name: str = ""
    token_file: str = ""

    def __post_init__(self) -> None:
        from pserver.security import check  # imports this module

        check(self)


@dataclass(frozen=True)
class RecoveryConfig:
    heartbeat_s: float = 1.0
    liveness_timeout_s: float = 5.0
    rejoin_timeout_s: float = 120.0
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.liveness_timeout_s <= 2 * self.heartbeat_s:
            raise ConfigError("recovery.liveness_timeout_s", f"must be over twice "
                              f"recovery.heartbeat_s ({self.heartbeat_s}), got "
                              f"{self.liveness_timeout_s}")


@dataclass(frozen=True)
class MetricsConfig:
    port: int = -1
    host: str = "127.0.0.1"
    targets_dir: str = ""
    curves_dir: str = ""


@dataclass(frozen=True)
class JobConfig:
    name: str = "psrt-job"
    mode: str = "sync"
    seed: int = 0
    num_trainers: int = 1
    pservers: tuple[str, ...] = ("127.0.0.1:7070",)
    virtual_shards: int = 1024
    rpc: RpcConfig = field(default_factory=RpcConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tables: tuple[TableSpec, ...] = ()
    dense: tuple[DenseSpec, ...] = ()
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = "<defaults>"
    checkpoint: CheckpointConfig | None = None  # None: the job file has no [checkpoint]

    @property
    def num_pservers(self) -> int:
        return len(self.pservers)

    def table(self, name: str) -> TableSpec | None:
        return next((t for t in self.tables if t.name == name), None)

    def dense_owner(self, name: str) -> int:
        """Dense variables go round-robin, in name order, over the pservers."""
        names = sorted(d.name for d in self.dense)
        return names.index(name) % self.num_pservers


def _coerce(key: str, spec: Key, value: Any) -> Any:
    want = spec.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(key, f"expected {want.__name__}, got {type(value).__name__} {value!r}")
    if want is list:
        inner = str if spec.name == "pservers" else int
        if not all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
            raise ConfigError(key, f"expected a list of {inner.__name__}, got {value!r}")
    if spec.check is not None and (problem := spec.check(value)) is not None:
        raise ConfigError(key, problem)
    return value


def parse_section(prefix: str, schema: Iterable[Key], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate one section: unknown keys, types, ranges; returns every key with defaults."""
    keys = {k.name: k for k in schema}
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, f"expected a table of keys, got {raw!r}")
    for name in raw:
        if name not in keys:
            raise ConfigError(f"{prefix}.{name}", f"unknown key (known: {', '.join(keys)})")
    out = {}
    for name, spec in keys.items():
        if name in raw:
            out[name] = _coerce(f"{prefix}.{name}", spec, raw[name])
        elif spec.default is None and spec.name not in ("seed",):
            raise ConfigError(f"{prefix}.{name}", "required key is missing")
        else:
            out[name] = spec.default
    return out


def _optimizer(prefix: str, raw: Mapping[str, Any], v: dict[str, Any]) -> OptimizerSpec:
    for name, kind in _OPT_ONLY.items():
        if name in raw and v["optimizer"] != kind:
            raise ConfigError(f"{prefix}.{name}", f"only for optimizer {kind!r}, "
                              f"this one uses {v['optimizer']!r}")
    return OptimizerSpec(kind=v["optimizer"], learning_rate=v["learning_rate"],
                         initial_accumulator=v["initial_accumulator"], beta1=v["beta1"],
                         beta2=v["beta2"], epsilon=v["epsilon"])


def build(raw: Mapping[str, Any], source: str = "<dict>") -> JobConfig:
    """A validated JobConfig from the parsed TOML document."""
    for section in raw:
        if section not in SCHEMAS and section not in NAMED_SCHEMAS \
                and section not in OTHER_SECTIONS and section != "checkpoint":
            known = ", ".join([*SCHEMAS, *NAMED_SCHEMAS, *OTHER_SECTIONS, "checkpoint"])
            raise ConfigError(section, f"unknown section (known: {known})")
    job = parse_section("job", JOB_KEYS, raw.get("job", {}))
    rpc = RpcConfig(**parse_section("rpc", RPC_KEYS, raw.get("rpc", {})))
    recovery = RecoveryConfig(**parse_section("recovery", RECOVERY_KEYS, raw.get("recovery", {})))
    metrics = MetricsConfig(**parse_section("metrics", METRICS_KEYS, raw.get("metrics", {})))
    last = metrics.port + len(job["pservers"]) + job["num_trainers"] - 1
    if metrics.port > 0 and last > 65535:
        raise ConfigError("metrics.port", f"{metrics.port} + P + T - 1 = {last} is over 65535")
    tables, dense = [], []
    for kind, schema in NAMED_SCHEMAS.items():
        named = raw.get(kind, {})
        if not isinstance(named, Mapping):
            raise ConfigError(kind, f"expected [{kind}.NAME] tables, got {named!r}")
        for name, body in named.items():
            prefix = f"{kind}.{name}"
            v = parse_section(prefix, schema, body)
            seed = v["seed"] if v["seed"] is not None else name_seed(job["seed"], name)
            common = dict(name=name, initializer=v["initializer"], init_scale=v["init_scale"],
                          seed=seed, optimizer=_optimizer(prefix, body, v))
            if kind == "tables":
                tables.append(TableSpec(dim=v["dim"], **common))
            else:
                dense.append(DenseSpec(shape=tuple(v["shape"]), **common))
    clash = {t.name for t in tables} & {d.name for d in dense}
    if clash:
        raise ConfigError(f"dense.{sorted(clash)[0]}", "a table has the same name")
    sections = {k: dict(raw[k]) for k in OTHER_SECTIONS if k in raw}
    return JobConfig(**{**job, "pservers": tuple(job["pservers"])}, rpc=rpc, recovery=recovery,
                     metrics=metrics,
                     tables=tuple(tables), dense=tuple(dense), sections=sections, source=source,
                     checkpoint=_checkpoint(raw.get("checkpoint")))


def _checkpoint(section: Any) -> CheckpointConfig | None:
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError("checkpoint", f"expected a table of keys, got {section!r}")
    try:
        return checkpoint_from_section(dict(section))
    except ValueError as e:
        key, _, problem = str(e).partition(": ")
        raise ConfigError(key, problem) from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(dotted, "an override names SECTION.KEY or SECTION.NAME.KEY")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{p!r} is not a section")
    node[parts[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    out = []
    for name, text in sorted(environ.items()):
        if name.startswith("PSRT_") and "__" in name:
            dotted = ".".join(p.lower() for p in name[len("PSRT_"):].split("__"))
            out.append((dotted, _parse_value(text)))
    return out


def load(path: str | Path | None, overrides: Iterable[str] = (),
         environ: Mapping[str, str] | None = None) -> JobConfig:
    """Read a job file (or none: defaults), apply env and `--set` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    for dotted, value in env_overrides(os.environ if environ is None else environ):
        apply_override(raw, dotted, value)
    for item in overrides:
        dotted, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(item, "--set takes SECTION.KEY=VALUE")
        apply_override(raw, dotted.strip(), _parse_value(text.strip()))
    return build(raw, source)


def describe() -> str:
    """Every key owned here, with type, default and meaning (for --help and the README)."""
    lines = []
    for section, schema in [*SCHEMAS.items(), *NAMED_SCHEMAS.items()]:
        head = f"[{section}.NAME]" if section in NAMED_SCHEMAS else f"[{section}]"
        lines.append(head)
        for k in schema:
            default = "required" if k.default is None and k.name != "seed" else repr(k.default)
            lines.append(f"  {k.name} ({k.type.__name__}, default {default}): {k.doc}")
    return "\n".join(lines)
