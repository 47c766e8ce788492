"""`CheckpointConfig`, as in the user guide, and the save trigger."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import fsspec

from ckpt.backends import open_storage
from ckpt.faulty import FaultyStorage, parse_faults
from ckpt.lock import LEASE_S
from ckpt.storage import Storage, protocol_of, shown

PRIORITIES = ("idle", "low", "normal")  # of the thread writing a background save


def check_priority(value: object) -> None:
    """ValueError unless `value` is one of PRIORITIES (the message names neither key nor
    caller: they prefix it)."""
    if (problem := _priority(value)) is not None:
        raise ValueError(problem)


class ConfigError(ValueError):
    """A bad config value: the message starts with the key (`checkpoint.full_every: ...`,
    or the bare field when a CheckpointConfig is made in code). psrt's one config error:
    the job file's parser (`pserver.config`) raises it too."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def _at_least_one(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f"expected an integer >= 1, got {v!r}"
    return None


def _location(v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return f"expected a non-empty path or URL, got {v!r}"
    return None


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, got {v!r}"


def _seconds(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        return f"expected a number of seconds > 0, got {v!r}"
    return None


def _duty(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
        return f"expected a number in (0, 1], got {v!r}"
    return None


def _priority(v: Any) -> str | None:
    return None if v in PRIORITIES else f"expected one of {', '.join(PRIORITIES)}, got {v!r}"


def _key(default: Any, doc: str, check: Any = None, **kw: Any) -> Any:
    """A key of the [checkpoint] section: its default, meaning and check (the job file's
    schema convention, read by `pserver.config.schema`)."""
    return field(default=default, metadata={"doc": doc, "check": check}, **kw)


def _faults(v: Any) -> str | None:
    try:
        parse_faults(v)
    except ValueError as e:
        return str(e)
    return None


# the order the fields are checked in (a value that breaks two rules names the first)
_CHECK_ORDER = ("checkpoint_dir", "max_num_checkpoints", "epoch_interval", "step_interval",
                "full_every", "background", "background_duty", "background_priority",
                "lock_lease_s", "faults")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to checkpoint.

    A save happens after a step where `epoch_id % epoch_interval == 0` and
    `step_id % step_interval == 0` (the guide's rule: with epoch_interval=2
    nothing is saved in odd epochs). `step_id` counts steps within the epoch
    from 0. `checkpoint_dir` may be a local path or a URL (`s3://bucket/path`,
    `gs://`, `hdfs://`, `memory://`, `file://`); `storage_options` go to the
    fsspec file system of a URL (kept out of repr: they may hold secrets).
    The fields after `step_interval` are psrt's additions to the guide's.
    """

    checkpoint_dir: str = _key("checkpoints", "directory or URL of the checkpoints (relative "
                               "paths are relative to the working directory)", _location)
    max_num_checkpoints: int = _key(3, "complete checkpoints kept; older ones are removed",
                                    _at_least_one)
    epoch_interval: int = _key(1, "save only in epochs where epoch_id % epoch_interval == 0",
                               _at_least_one)
    step_interval: int = _key(10, "save after steps where step_id % step_interval == 0",
                              _at_least_one)
    background: bool = _key(False, "true: trainers wait only while pservers note a snapshot "
                            "of their shards; files are written and committed in the "
                            "background (a trigger that comes while a save is still being "
                            "written is skipped; the final checkpoint waits for it)", _bool)
    full_every: int = _key(1, "a full checkpoint every K saves; the saves between hold only "
                           "the rows changed since the previous checkpoint (deltas, restored "
                           "as the chain from the last full one); 1: every checkpoint is full",
                           _at_least_one)
    background_duty: float = _key(1.0, "share of the time the thread writing a background "
                                  "save works: below 1 it pauses after each chunk (0.5: half "
                                  "speed), so training slows less while a save is written, for "
                                  "longer; 1: no pauses", _duty)
    background_priority: str = _key("idle", "CPU priority of the thread writing a background "
                                    "save: \"idle\" (Linux's SCHED_IDLE: it gets a core only "
                                    "when no other thread wants it, so serving comes first; "
                                    "where something keeps every core busy the write waits), "
                                    "\"low\" (nice 19) or \"normal\" (the pserver's own)",
                                    _priority)
    lock_lease_s: float = _key(LEASE_S, "the checkpoint lock's lease: the coordinator renews it "
                               "every third of this; another run of the job may take the lock "
                               "once it was not renewed for this long (ckpt/lock.py)", _seconds)
    faults: tuple = _key((), "store faults to inject, for tests and drills (`ckpt/faulty.py`): "
                         "a list of tables {kind = \"slow\"|\"enospc\"|\"eio\"|\"torn\"|"
                         "\"damage\"|\"vanish\", op, path, after, times, seconds}; empty: none",
                         _faults)
    storage_options: dict[str, Any] = field(
        default_factory=dict, repr=False, compare=False,
        metadata={"doc": "for a URL checkpoint_dir: options of its fsspec file system, e.g. "
                  "{endpoint_url = \"...\", profile = \"...\"} for s3 (credentials are better "
                  "left to the environment; never logged)"})

    def __post_init__(self) -> None:
        checks = {f.name: f.metadata.get("check") for f in fields(self)}
        for name in _CHECK_ORDER:
            if (problem := checks[name](getattr(self, name))) is not None:
                raise ConfigError(name, problem)
        _check_location(self.checkpoint_dir, self.storage_options)
        object.__setattr__(self, "faults", parse_faults(self.faults))

    def storage(self) -> Storage:
        """The storage of `checkpoint_dir` (see ckpt.backends.open_storage), with the
        configured `faults` injected (ckpt.faulty)."""
        storage = open_storage(self.checkpoint_dir, self.storage_options)
        return FaultyStorage(storage, self.faults) if self.faults else storage

    def should_save(self, epoch_id: int, step_id: int) -> bool:
        return epoch_id % self.epoch_interval == 0 and step_id % self.step_interval == 0

    def next_base(self, last: int, deltas: int) -> int:
        """The base of the next save, -1 for a full one: the last committed (or restored)
        checkpoint `last` (-1: none), which is `deltas` deltas past a full checkpoint. Every
        `full_every`-th save of a chain is full."""
        return -1 if last < 0 or deltas + 1 >= self.full_every else last


def _check_location(location: str, options: Any) -> None:
    """The URL's protocol is known and installed, and the options are a table (ConfigError
    names the key). Nothing is contacted here."""
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ConfigError("storage_options", f"expected a table of keys (passed to fsspec), "
                         f"got {type(options).__name__}")
    protocol = protocol_of(location)
    location = shown(location)  # for the messages below
    if protocol is None:
        if options:
            raise ConfigError("storage_options", f"only for a URL checkpoint_dir, and "
                             f"{location!r} is a local path")
        return
    if protocol == "file":
        if not location.startswith("file:///"):
            raise ConfigError("checkpoint_dir", f"a file:// URL needs an absolute path "
                             f"(file:///dir), got {location!r}")
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        known = fsspec.available_protocols()
        common = ", ".join(p for p in ("s3", "gs", "az", "hdfs", "memory", "file") if p in known)
        raise ConfigError("checkpoint_dir", f"unknown protocol {protocol!r} in {location!r} "
                         f"(fsspec knows {len(known)}, e.g. {common})") from None
    except ImportError as e:
        raise ConfigError("checkpoint_dir", f"{location!r} needs a package that is not "
                         f"installed: {e}") from None
    rest = location.split("://", 1)[1].strip("/")
    if not rest and protocol != "memory":
        raise ConfigError("checkpoint_dir", f"expected {protocol}://BUCKET/PATH (or HOST/PATH), "
                         f"got {location!r}")


