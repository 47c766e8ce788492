"""What was saved: MANIFEST.json, written by the coordinator just before _SUCCESS.

A part (one pserver's shard, one trainer's counters, trainer 0's dense values)
reports its files and facts as a `Part`; the coordinator merges the parts of
every process into one `Manifest`. `verify` checks files against it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt.storage import FileEntry

FORMAT = "psrt-checkpoint/1"  # files: {"size": bytes, "xxh3": XXH3-64 of the bytes}


@dataclass
class Part:
    """One process's contribution to a checkpoint."""

    role: str  # "pserver" or "trainer"
    id: int
    files: list[FileEntry] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"role": self.role, "id": self.id, "facts": self.facts,
                           "files": [asdict(f) for f in self.files]})

    @staticmethod
    def from_json(text: str) -> Part:
        d = json.loads(text)
        return Part(d["role"], int(d["id"]), [FileEntry(**f) for f in d["files"]], d["facts"])


@dataclass
class Manifest:
    serial: int
    job: str
    mode: str
    num_pservers: int
    num_trainers: int
    virtual_shards: int
    global_step: int
    tables: dict[str, Any]
    dense: dict[str, Any]
    trainers: dict[str, Any]
    pservers: dict[str, Any]
    files: dict[str, dict[str, int]]
    created: float = field(default_factory=time.time)
    final: bool = False
    format: str = FORMAT
    kind: str = "full"  # "full", or "delta": only the rows changed since checkpoint `base`
    base: int = -1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> Manifest:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown manifest format {d.get('format')!r}, expected {FORMAT!r}")
        m = Manifest(**d)
        if m.kind not in ("full", "delta"):
            raise ValueError(f"kind: expected 'full' or 'delta', got {m.kind!r}")
        if m.kind == "delta" and not (isinstance(m.base, int) and 0 <= m.base < m.serial):
            raise ValueError(f"base: a delta needs the serial of an older checkpoint, got "
                             f"{m.base!r}")
        return m

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def merge(serial: int, job: dict[str, Any], parts: list[Part], final: bool = False,
          base: int = -1) -> Manifest:
    """The manifest of a checkpoint from its parts; `job` holds the world and specs. With
    `base` >= 0 it is a delta of checkpoint `base`, and every pserver's part must say so."""
    kind = "full" if base < 0 else "delta"
    files: dict[str, dict[str, int]] = {}
    trainers, pservers = {}, {}
    for part in parts:
        if part.role == "pserver" and (part.facts.get("kind", "full"),
                                       part.facts.get("base", -1)) != (kind, base):
            raise ValueError(f"pserver {part.id} wrote a {part.facts.get('kind', 'full')} part "
                             f"(base {part.facts.get('base', -1)}); checkpoint_{serial} is "
                             f"{kind} (base {base})")
        for f in part.files:
            if f.path in files:
                raise ValueError(f"two parts wrote {f.path}")
            files[f.path] = {"size": f.size, "xxh3": f.xxh3}
        (trainers if part.role == "trainer" else pservers)[str(part.id)] = part.facts
    steps = {t.get("global_step") for t in trainers.values()}
    return Manifest(serial=serial, job=job["name"], mode=job["mode"],
                    num_pservers=job["num_pservers"], num_trainers=job["num_trainers"],
                    virtual_shards=job["virtual_shards"],
                    global_step=max(s for s in steps if s is not None) if steps else 0,
                    tables=job["tables"], dense=job["dense"], trainers=trainers,
                    pservers=pservers, files=files, final=final, kind=kind, base=base)
