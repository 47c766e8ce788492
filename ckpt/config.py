"""`CheckpointConfig`, as in the user guide, and the save trigger."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckpt.storage import Storage, open_storage, protocol_of, shown

PRIORITIES = ("idle", "low", "normal")  # of the thread writing a background save


def check_priority(value: object) -> None:
    """ValueError unless `value` is one of PRIORITIES (the message names neither key nor
    caller: they prefix it)."""
    if value not in PRIORITIES:
        raise ValueError(f"expected one of {', '.join(PRIORITIES)}, got {value!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to checkpoint.

    A save happens after a step where `epoch_id % epoch_interval == 0` and
    `step_id % step_interval == 0` (the guide's rule: with epoch_interval=2
    nothing is saved in odd epochs). `step_id` counts steps within the epoch
    from 0. `checkpoint_dir` may be a local path or a URL (`s3://bucket/path`,
    `gs://`, `hdfs://`, `memory://`, `file://`); `storage_options` go to the
    fsspec file system of a URL (kept out of repr: they may hold secrets).
    """

    checkpoint_dir: str = "checkpoints"
    max_num_checkpoints: int = 3
    epoch_interval: int = 1
    step_interval: int = 10
    background: bool = False  # psrt's addition: write files after releasing the trainers
    full_every: int = 1  # psrt's addition: a full checkpoint every K saves, deltas between
    background_duty: float = 1.0  # psrt's addition: share of the time a background writer works
    background_priority: str = "idle"  # psrt's addition: CPU priority of a background writer
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir.strip():
            raise ValueError(f"checkpoint_dir: expected a non-empty path or URL, "
                             f"got {self.checkpoint_dir!r}")
        for name in ("max_num_checkpoints", "epoch_interval", "step_interval", "full_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.background, bool):
            raise ValueError(f"background: expected true or false, got {self.background!r}")
        duty = self.background_duty
        if isinstance(duty, bool) or not isinstance(duty, int | float) or not 0 < duty <= 1:
            raise ValueError(f"background_duty: expected a number in (0, 1], got {duty!r}")
        try:
            check_priority(self.background_priority)
        except ValueError as e:
            raise ValueError(f"background_priority: {e}") from None
        _check_location(self.checkpoint_dir, self.storage_options)

    def storage(self) -> Storage:
        """The storage of `checkpoint_dir` (see ckpt.storage.open_storage)."""
        return open_storage(self.checkpoint_dir, self.storage_options)

    def should_save(self, epoch_id: int, step_id: int) -> bool:
        return epoch_id % self.epoch_interval == 0 and step_id % self.step_interval == 0

    def next_base(self, last: int, deltas: int) -> int:
        """The base of the next save, -1 for a full one: the last committed (or restored)
        checkpoint `last` (-1: none), which is `deltas` deltas past a full checkpoint. Every
        `full_every`-th save of a chain is full."""
        return -1 if last < 0 or deltas + 1 >= self.full_every else last


def _check_location(location: str, options: Any) -> None:
    """The URL's protocol is known and installed, and the options are a table; ValueError
    names the key. Nothing is contacted here."""
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"storage_options: expected a table of keys (passed to fsspec), "
                         f"got {type(options).__name__}")
    protocol = protocol_of(location)
    location = shown(location)  # for the messages below
    if protocol is None:
        if options:
            raise ValueError(f"storage_options: only for a URL checkpoint_dir, and "
                             f"{location!r} is a local path")
        return
    if protocol == "file":
        if not location.startswith("file:///"):
            raise ValueError(f"checkpoint_dir: a file:// URL needs an absolute path "
                             f"(file:///dir), got {location!r}")
        return
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"checkpoint_dir: {location!r} is a URL, which needs the fsspec "
                         f"package") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        known = fsspec.available_protocols()
        common = ", ".join(p for p in ("s3", "gs", "az", "hdfs", "memory", "file") if p in known)
        raise ValueError(f"checkpoint_dir: unknown protocol {protocol!r} in {location!r} "
                         f"(fsspec knows {len(known)}, e.g. {common})") from None
    except ImportError as e:
        raise ValueError(f"checkpoint_dir: {location!r} needs a package that is not "
                         f"installed: {e}") from None
    rest = location.split("://", 1)[1].strip("/")
    if not rest and protocol != "memory":
        raise ValueError(f"checkpoint_dir: expected {protocol}://BUCKET/PATH (or HOST/PATH), "
                         f"got {location!r}")


KEYS = {
    "checkpoint_dir": (str, "checkpoints", "directory or URL of the checkpoints (relative paths "
                       "are relative to the working directory)"),
    "max_num_checkpoints": (int, 3, "complete checkpoints kept; older ones are removed"),
    "epoch_interval": (int, 1, "save only in epochs where epoch_id % epoch_interval == 0"),
    "step_interval": (int, 10, "save after steps where step_id % step_interval == 0"),
    "background": (bool, False, "true: trainers wait only while pservers note a snapshot "
                   "of their shards; files are written and committed in the background (a trigger "
                   "that comes while a save is still being written is skipped; the final "
                   "checkpoint waits for it)"),
    "full_every": (int, 1, "a full checkpoint every K saves; the saves between hold only the "
                   "rows changed since the previous checkpoint (deltas, restored as the chain "
                   "from the last full one); 1: every checkpoint is full"),
    "background_duty": (float, 1.0, "share of the time the thread writing a background save "
                        "works: below 1 it pauses after each chunk (0.5: half speed), so "
                        "training slows less while a save is written, for longer; 1: no "
                        "pauses"),
    "background_priority": (str, "idle", "CPU priority of the thread writing a background "
                            "save: \"idle\" (Linux's SCHED_IDLE: it gets a core only when no "
                            "other thread wants it, so serving comes first; where something "
                            "keeps every core busy the write waits), \"low\" (nice 19) or "
                            "\"normal\" (the pserver's own)"),
    "storage_options": (dict, {}, "for a URL checkpoint_dir: options of its fsspec file "
                        "system, e.g. {endpoint_url = \"...\", profile = \"...\"} for s3 "
                        "(credentials are better left to the environment; never logged)"),
}


def from_section(section: dict) -> CheckpointConfig:
    """A CheckpointConfig from the job file's [checkpoint] section; ValueError names the key."""
    for key in section:
        if key not in KEYS:
            raise ValueError(f"checkpoint.{key}: unknown key (known: {', '.join(KEYS)})")
    try:
        return CheckpointConfig(**section)
    except ValueError as e:
        raise ValueError(f"checkpoint.{e}") from None
