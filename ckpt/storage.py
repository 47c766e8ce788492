"""Where checkpoint bytes go: `Storage`, the interface every file operation of a
checkpoint goes through, and `open_storage`, which picks the backend for a
`checkpoint_dir`.

`LocalStorage` writes to a local (or mounted) file system with fsync; it serves
plain paths and `file://` URLs. Any other URL (`s3://`, `gs://`, `hdfs://`,
`memory://`, ...) goes to `ckpt.remote.FsspecStorage`, through fsspec: a new
kind of store needs only its fsspec implementation installed, and a storage
backend of our own would touch this file (its class and one line in
`open_storage`) and nothing else.

Every write returns a `FileEntry` (relative path, size, xxh3 checksum) for the
manifest. The checksum is XXH3-64 (the `xxhash` package, ~16 GB/s here,
against ~2.5 GB/s for zlib's crc32), so checksumming costs next to nothing
beside the disk.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint's directory
    size: int
    xxh3: int  # XXH3-64 of the file's bytes


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header of a C-ordered array of this dtype and shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def protocol_of(location: str) -> str | None:
    """The URL scheme of a `checkpoint_dir` (`s3`, `file`, ...); None for a plain path."""
    m = _URL.match(location)
    return m.group(1).lower() if m else None


def shown(location: str) -> str:
    """A location as messages show it: a URL's user:password@ is masked."""
    return re.sub(r"://[^/@]*@", "://***@", location)


def open_storage(location: str | os.PathLike[str],
                 storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage of a `checkpoint_dir`: a plain path or `file://` URL is a LocalStorage
    (fsync, memory-mapped reads); any other URL goes through fsspec with
    `storage_options` (credentials and endpoints, else fsspec's own configuration and
    the environment). ValueError names the location when it cannot be used."""
    text = os.fspath(location)
    protocol = protocol_of(text)
    if protocol is None:
        return LocalStorage(text)
    if protocol == "file":
        path = text[len("file://"):]
        if not path.startswith("/"):
            raise ValueError(f"{shown(text)}: a file:// URL needs an absolute path "
                             f"(file:///dir)")
        return LocalStorage(path)
    from ckpt.remote import FsspecStorage

    return FsspecStorage(text, storage_options or {})


class Storage:
    """A checkpoint directory: every file operation of ckpt/ goes through these methods.

    Paths are relative to the directory, with `/` separators. Reading never creates
    anything. Writes need no rename to be correct: a checkpoint is committed by its
    `_SUCCESS` object, written last (see ckpt.writer).
    """

    root: Any  # shown in messages: the path or URL (never credentials)

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def listdir(self, rel: str = "") -> list[str]:
        """The names directly under `rel`, sorted; [] when there is nothing."""
        raise NotImplementedError

    def makedirs(self, rel: str) -> None:
        """Make a directory where the store has them (a no-op on object stores)."""
        raise NotImplementedError

    def missing(self) -> str | None:
        """Why there is no directory to read here ("is not a directory", "is in no
        bucket: ..."), or None. Creates nothing."""
        raise NotImplementedError

    def check_root(self) -> None:
        """Raise (OSError or ValueError, naming the location) if the directory cannot be
        written at all, e.g. a missing bucket. Creates the directory where that is done."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        raise NotImplementedError

    def size(self, rel: str) -> int:
        raise NotImplementedError

    def sizes(self, rel: str) -> dict[str, int]:
        """{path relative to `rel`: size} of every file under directory `rel`, in one
        listing ({} when there is none): one request on an object store."""
        raise NotImplementedError

    def checksum(self, rel: str) -> tuple[int, int]:
        """(size, xxh3) of a file as it is now."""
        raise NotImplementedError

    def write_bytes(self, base: str, rel: str, data: bytes) -> FileEntry:
        """Write a small file durably; `rel` is relative to checkpoint dir `base`."""
        raise NotImplementedError

    def write_array(self, base: str, rel: str, arr: np.ndarray,
                    order: np.ndarray | None = None, fsync: bool = True) -> FileEntry:
        raise NotImplementedError

    def fsync(self, rels: list[str]) -> None:
        """Make files written with fsync=False durable (a no-op where a closed file is)."""

    def fsync_dir(self, rel: str) -> None:
        """Make a directory's entries durable (a no-op where there are no directories)."""

    def create(self, rel: str, data: bytes) -> None:
        """Write a new file, or raise FileExistsError if there is one (atomically where
        the store can: see `exclusive_create`)."""
        raise NotImplementedError

    def replace(self, rel: str, data: bytes) -> None:
        """Write a file so that readers see the old or the new bytes, never a mix."""
        raise NotImplementedError

    def remove(self, rel: str) -> None:
        """Remove one file; FileNotFoundError if it is not there."""
        raise NotImplementedError

    def remove_tree(self, rel: str) -> None:
        """Remove a directory and everything under it (nothing there is fine)."""
        raise NotImplementedError

    #: True when `create` is atomic (two writers: exactly one succeeds)
    exclusive_create: bool = False


class LocalStorage(Storage):
    """A checkpoint directory on a local or mounted file system."""

    exclusive_create = True  # os.link fails if the target exists

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def listdir(self, rel: str = "") -> list[str]:
        p = self.path(rel)
        return sorted(os.listdir(p)) if p.is_dir() else []

    def makedirs(self, rel: str) -> None:
        self.path(rel).mkdir(parents=True, exist_ok=True)

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def size(self, rel: str) -> int:
        return self.path(rel).stat().st_size

    def sizes(self, rel: str) -> dict[str, int]:
        top = self.path(rel)
        out = {}
        for parent, _dirs, files in os.walk(top):
            prefix = Path(parent).relative_to(top).as_posix()
            for name in files:
                try:
                    size = os.stat(os.path.join(parent, name)).st_size
                except FileNotFoundError:
                    continue
                out[name if prefix == "." else f"{prefix}/{name}"] = size
        return out

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def check_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def missing(self) -> str | None:
        return None if self.root.is_dir() else "is not a directory"

    def remove(self, rel: str) -> None:
        os.remove(self.path(rel))

    def create(self, rel: str, data: bytes) -> None:
        tmp = self._tmp(rel, data)
        try:
            os.link(tmp, self.path(rel))  # atomic, and never a half-written file
        finally:
            os.remove(tmp)

    def replace(self, rel: str, data: bytes) -> None:
        os.replace(self._tmp(rel, data), self.path(rel))

    def _tmp(self, rel: str, data: bytes) -> Path:
        tmp = self.path(f"{rel}.{uuid.uuid4().hex}.tmp")
        self.write_bytes("", tmp.relative_to(self.root).as_posix(), data)
        return tmp

    def write_bytes(self, base: str, rel: str, data: bytes) -> FileEntry:
        """Write a small file durably; `rel` is relative to checkpoint dir `base`."""
        target = self.path(_join(base, rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return FileEntry(rel, len(data), xxhash.xxh3_64_intdigest(data))

    def write_array(self, base: str, rel: str, arr: np.ndarray,
                    order: np.ndarray | None = None, fsync: bool = True) -> FileEntry:
        """Write `arr` (rows permuted by `order`, if given) as .npy data, checksumming the
        chunks as they are written; durable unless `fsync=False` (then call `fsync`)."""
        if order is None:
            arr = np.ascontiguousarray(arr)
        shape = arr.shape if order is None else (len(order),) + arr.shape[1:]
        header = npy_header(arr.dtype, shape)
        target = self.path(_join(base, rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = xxhash.xxh3_64(header)
        size = len(header)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, header)
            for chunk in _chunks(arr, order):
                _write_all(fd, chunk)
                digest.update(chunk)
                size += len(chunk)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return FileEntry(rel, size, digest.intdigest())

    def fsync(self, rels: list[str]) -> None:
        """Make files written with fsync=False durable. Writing many files first and
        syncing them together lets the kernel write them back while the next is written."""
        for rel in rels:
            fd = os.open(self.path(rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def fsync_dir(self, rel: str) -> None:
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.path(rel), mmap_mode="r" if mmap else None, allow_pickle=False)

    def checksum(self, rel: str) -> tuple[int, int]:
        """(size, xxh3) of a file as it is now."""
        digest, size = xxhash.xxh3_64(), 0
        buf = bytearray(CHUNK)  # one buffer, reused: no fresh pages per chunk
        view = memoryview(buf)
        with open(self.path(rel), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                digest.update(view[:n])
                size += n
        return size, digest.intdigest()


def _chunks(arr: np.ndarray, order: np.ndarray | None):  # noqa: ANN202 - a generator
    """The bytes of `arr` (rows in `order`) in pieces of about CHUNK bytes."""
    rows = len(arr) if order is None else len(order)
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    step = max(1, CHUNK // row_bytes)
    for lo in range(0, rows, step):
        block = arr[lo:lo + step] if order is None else np.take(arr, order[lo:lo + step], axis=0)
        yield memoryview(np.ascontiguousarray(block)).cast("B")


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]
