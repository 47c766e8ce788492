"""A storage that fails on purpose: faults of the store, chosen by configuration.

`[checkpoint] faults = [...]` wraps a job's storage in a `FaultyStorage`, which
passes every call to the real one except those a fault matches (PyTorch DCP's
faulty writer is the model). For tests and drills: the production code has no
hooks of its own. Each fault is a table with these keys:

- `kind`: "slow" (wait `seconds`, then go on), "enospc" or "eio" (raise the
  OSError a full or failing disk raises), "torn" (a write keeps only the first
  half of the file's bytes and reports success, as a crash before the flush
  would leave it), "damage" (a read gets the bytes with one flipped, and the
  file's checksum no longer matches), "vanish" (the directory is not there:
  listings are empty, reads and writes raise FileNotFoundError).
- `op`: which calls: "write" (a file written, or a directory made), "read" (a
  file read or checksummed), "list" (listings, sizes, exists, the root's
  checks), "remove", "fsync", or "any" (the default).
- `path`: a glob of the path relative to checkpoint_dir, e.g.
  "checkpoint_2/__lockup_table__/*" or "*/emb_0.values"; "*" (the default)
  matches every path, the root included.
- `after` (skip the first N matching calls, default 0), `times` (then act on at
  most N, default: all), `seconds` (for "slow": the wait; for the others: how
  long the fault lasts from the first call it acts on, default: for good).

Counts and windows are per process, kept from one `FaultyStorage` to the next
(each process opens its storage more than once).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from ckpt.storage import ArrayWriter, FileEntry, Storage, check_bytes, join, npy_header

KINDS = ("slow", "enospc", "eio", "torn", "damage", "vanish")
OPS = ("any", "write", "read", "list", "remove", "fsync")
_KEYS = ("kind", "op", "path", "after", "times", "seconds")
_state_lock = threading.Lock()
_seen: dict[tuple[int, Fault], int] = {}  # (index, fault) -> matching calls so far
_since: dict[tuple[int, Fault], float] = {}  # -> when it first acted


@dataclass(frozen=True)
class Fault:
    kind: str
    op: str = "any"
    path: str = "*"
    after: int = 0
    times: int | None = None
    seconds: float | None = None


def parse_faults(value: Any) -> tuple[Fault, ...]:
    """The faults of a config value (a list of tables); ValueError names what is wrong."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a list of tables, got {value!r}")
    out = []
    for i, raw in enumerate(value):
        where = f"fault {i}"
        if isinstance(raw, Fault):
            out.append(raw)
            continue
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a table, got {raw!r}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
        if raw.get("kind") not in KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, "
                             f"got {raw.get('kind')!r}")
        if raw.get("op", "any") not in OPS:
            raise ValueError(f"{where}: op must be one of {', '.join(OPS)}, got {raw['op']!r}")
        if not isinstance(raw.get("path", "*"), str):
            raise ValueError(f"{where}: path must be a glob, got {raw['path']!r}")
        for key in ("after", "times"):
            v = raw.get(key, 0 if key == "after" else None)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{where}: {key} must be an integer >= 0, got {v!r}")
        s = raw.get("seconds")
        if s is not None and (isinstance(s, bool) or not isinstance(s, int | float) or s < 0):
            raise ValueError(f"{where}: seconds must be a number >= 0, got {s!r}")
        if raw["kind"] == "slow" and s is None:
            raise ValueError(f"{where}: a slow fault needs seconds")
        out.append(Fault(**raw))
    return tuple(out)


def reset() -> None:
    """Forget the counts and windows of every fault (between tests in one process)."""
    with _state_lock:
        _seen.clear()
        _since.clear()


class FaultyStorage(Storage):
    """`inner` with `faults` applied (see the module's doc)."""

    def __init__(self, inner: Storage, faults: tuple[Fault, ...]) -> None:
        self.inner, self.faults = inner, faults
        self.root = inner.root
        self.exclusive_create = inner.exclusive_create

    def __getattr__(self, name: str) -> Any:  # a backend's own attributes (path, fs, ...)
        return getattr(self.inner, name)

    # ---- which fault acts on a call ---------------------------------------------------

    def _acting(self, op: str, rel: str) -> list[Fault]:
        """The faults that act on this call (counted), "slow" ones waited out already."""
        acting = []
        now = time.monotonic()
        for key in enumerate(self.faults):
            f = key[1]
            if f.op not in ("any", op) or not fnmatch.fnmatchcase(rel, f.path):
                continue
            with _state_lock:
                n = _seen.get(key, 0)
                _seen[key] = n + 1
                if n < f.after or (f.times is not None and n >= f.after + f.times):
                    continue
                since = _since.setdefault(key, now)
            if f.kind == "slow":
                time.sleep(f.seconds or 0)
                continue
            if f.seconds is not None and now - since > f.seconds:
                continue
            acting.append(f)
        return acting

    def _check(self, op: str, rel: str) -> set[str]:
        """Raise the OSError of a failing fault; the kinds of the others that act."""
        kinds = {f.kind for f in self._acting(op, rel)}
        if "vanish" in kinds and op != "list":
            raise FileNotFoundError(errno.ENOENT, f"{rel}: no such file (injected: vanished)")
        for kind, code in (("enospc", errno.ENOSPC), ("eio", errno.EIO)):
            if kind in kinds:
                raise OSError(code, f"{os.strerror(code)} (injected, {rel or '.'})")
        return kinds

    # ---- listings ---------------------------------------------------------------------

    def connect(self) -> None:
        self.inner.connect()

    def exists(self, rel: str) -> bool:
        return "vanish" not in self._check("list", rel) and self.inner.exists(rel)

    def listdir(self, rel: str = "") -> list[str]:
        return [] if "vanish" in self._check("list", rel) else self.inner.listdir(rel)

    def sizes(self, rel: str) -> dict[str, int]:
        return {} if "vanish" in self._check("list", rel) else self.inner.sizes(rel)

    def size(self, rel: str) -> int:
        if "vanish" in self._check("list", rel):
            raise FileNotFoundError(errno.ENOENT, f"{rel}: no such file (injected: vanished)")
        return self.inner.size(rel)

    def missing(self) -> str | None:
        if "vanish" in self._check("list", ""):
            return "is not a directory (injected: vanished)"
        return self.inner.missing()

    def check_root(self) -> None:
        if "vanish" in self._check("list", ""):
            raise FileNotFoundError(errno.ENOENT, f"{self.root}: no such directory "
                                    "(injected: vanished)")
        self.inner.check_root()

    # ---- reads --------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        damaged = "damage" in self._check("read", rel)
        data = self.inner.read_bytes(rel)
        return _flip(data) if damaged else data

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        damaged = "damage" in self._check("read", rel)
        arr = self.inner.read_array(rel, mmap=mmap and not damaged)
        if damaged and arr.size:
            arr = np.array(arr)
            arr.reshape(-1).view(np.uint8)[0] ^= 0xFF
        return arr

    def read_verified(self, rel: str, size: int, xxh3: int) -> np.ndarray:
        if "damage" in self._check("read", rel):
            data = _flip(self.inner.read_bytes(rel))
            check_bytes(rel, data, size, xxh3)  # (raises: one byte is flipped)
        return self.inner.read_verified(rel, size, xxh3)

    def checksum(self, rel: str) -> tuple[int, int]:
        size, digest = self.inner.checksum(rel)
        if "damage" in self._check("read", rel):
            digest ^= 1
        return size, digest

    # ---- writes -------------------------------------------------------------------------

    def makedirs(self, rel: str) -> None:
        self._check("write", rel)
        self.inner.makedirs(rel)

    def write_bytes(self, base: str, rel: str, data: bytes) -> FileEntry:
        torn = "torn" in self._check("write", join(base, rel))
        entry = self.inner.write_bytes(base, rel, data[:len(data) // 2] if torn else data)
        return FileEntry(rel, len(data), xxhash.xxh3_64_intdigest(data)) if torn else entry

    @contextlib.contextmanager
    def open_array(self, base: str, rel: str, dtype: np.dtype, shape: tuple[int, ...],
                   fsync: bool = True) -> Iterator[ArrayWriter]:
        kinds = self._check("write", join(base, rel))
        with self.inner.open_array(base, rel, dtype, shape, fsync) as w:
            yield _TornWriter(w, rel, dtype, shape) if "torn" in kinds else w  # type: ignore

    def create(self, rel: str, data: bytes) -> None:
        self._check("write", rel)
        self.inner.create(rel, data)

    def replace(self, rel: str, data: bytes) -> None:
        self._check("write", rel)
        self.inner.replace(rel, data)

    def fsync(self, rels: list[str]) -> None:
        for rel in rels:
            self._check("fsync", rel)
        self.inner.fsync(rels)

    def fsync_dir(self, rel: str) -> None:
        self._check("fsync", rel)
        self.inner.fsync_dir(rel)

    def remove(self, rel: str) -> None:
        self._check("remove", rel)
        self.inner.remove(rel)

    def remove_tree(self, rel: str) -> None:
        self._check("remove", rel)
        self.inner.remove_tree(rel)


class _TornWriter:
    """Passes the first half of a file's bytes to the real writer, drops the rest, and
    reports the entry of the whole file: what a write cut short leaves behind (a file that
    is shorter, or, where its blocks were allocated ahead, holds zeros at the end)."""

    def __init__(self, inner: ArrayWriter, rel: str, dtype: np.dtype,
                 shape: tuple[int, ...]) -> None:
        header = npy_header(np.dtype(dtype), tuple(shape))
        self.inner, self.rel = inner, rel
        self.digest = xxhash.xxh3_64(header)
        self.expected = inner.expected
        self.size = len(header)

    def write(self, block: np.ndarray) -> None:
        flat = np.ascontiguousarray(block).reshape(-1)
        data = flat.view(np.uint8)
        room = max(0, self.expected // 2 - self.size) // max(1, flat.itemsize)
        if room:
            self.inner.write(flat[:room])
        self.digest.update(data)
        self.size += len(data)

    def entry(self) -> FileEntry:
        return FileEntry(self.rel, self.size, self.digest.intdigest())


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:] if data else data
