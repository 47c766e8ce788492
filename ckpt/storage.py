"""Where checkpoint bytes go: `Storage`, the interface every file operation of a
checkpoint goes through, and what every backend shares.

The backends: `ckpt.local.LocalStorage` (a local or mounted file system, with
fsync and direct writes) and `ckpt.remote.FsspecStorage` (any fsspec URL:
`s3://`, `gs://`, `hdfs://`, `memory://`, ...); `ckpt.backends.open_storage`
picks one for a `checkpoint_dir`. A storage backend of our own is one new
module and one line in `open_storage`.

Every write returns a `FileEntry` (relative path, size, xxh3 checksum) for the
manifest. The checksum is XXH3-64 (the `xxhash` package, ~16 GB/s here,
against ~2.5 GB/s for zlib's crc32), so checksumming costs next to nothing
beside the disk.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint's directory
    size: int
    xxh3: int  # XXH3-64 of the file's bytes


HEADER_ALIGN = 4096  # .npy data starts at a multiple of this (direct I/O needs it)


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy (version 1.0) header of a C-ordered array of this dtype and shape, padded
    with spaces to HEADER_ALIGN bytes, so that the data starts on a block boundary: rows
    can be written straight from aligned memory, around the page cache. (The format
    allows any padding that keeps the length a multiple of 64; numpy reads headers of up
    to 10,000 bytes.)"""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    header = buf.getvalue()
    text = header[10:].rstrip()  # after the magic (8 bytes) and the length (2 bytes)
    pad = HEADER_ALIGN - 10 - len(text) - 1
    if pad < 0:  # a very long shape: numpy's own padding
        return header
    return header[:8] + (len(text) + pad + 1).to_bytes(2, "little") + text + b" " * pad + b"\n"


class Damaged(ValueError):
    """A checkpoint file does not match its manifest entry (size or checksum)."""

    def __init__(self, rel: str, problem: str) -> None:
        super().__init__(f"{rel}: {problem}")
        self.rel = rel


def mismatch(size: int, digest: int | None, want: dict) -> str | None:
    """Why a file of `size` bytes with XXH3 `digest` (None: not read) is not the manifest's
    entry `want` ({"size", "xxh3"}), or None."""
    if size != want["size"]:
        return f"size {size}, manifest says {want['size']}"
    if digest is not None and digest != want["xxh3"]:
        return f"checksum xxh3 {digest:016x}, manifest says {want['xxh3']:016x}"
    return None


def check_bytes(rel: str, data: Any, size: int, xxh3: int) -> None:
    """Damaged unless `data` (bytes-like) has the manifest's size and checksum."""
    problem = mismatch(len(data), xxhash.xxh3_64_intdigest(data), {"size": size, "xxh3": xxh3})
    if problem is not None:
        raise Damaged(rel, problem)


def npy_from_buffer(data: Any, rel: str) -> np.ndarray:
    """The array of a .npy file's bytes (no copy: a view of `data`; writable if it is)."""
    head = io.BytesIO(memoryview(data)[:HEADER_ALIGN * 4])
    try:
        version = np.lib.format.read_magic(head)
        if version not in ((1, 0), (2, 0)):  # (3.0: UTF-8 names) numpy's own reader, a copy
            return np.load(io.BytesIO(data), allow_pickle=False)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(head)
    except ValueError as e:
        raise ValueError(f"{rel}: not a .npy file: {e}") from None
    if dtype.hasobject:
        raise ValueError(f"{rel}: holds Python objects, which checkpoints never do")
    count = int(np.prod(shape, dtype=np.int64))
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=head.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


class ArrayWriter:
    """One .npy file written block by block (rows in order), checksummed as it goes.
    `out.write` takes a flat uint8 array."""

    def __init__(self, out: Any, rel: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        header = npy_header(np.dtype(dtype), tuple(shape))
        self.out, self.rel, self.dtype = out, rel, np.dtype(dtype)
        self.digest = xxhash.xxh3_64(header)
        self.size = len(header)
        self.expected = len(header) + self.dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        reserve = getattr(out, "reserve", None)
        if reserve is not None:
            reserve(self.expected)
        out.write(np.frombuffer(header, dtype=np.uint8))

    def write(self, block: np.ndarray) -> None:
        """The next rows (of the file's dtype)."""
        if block.dtype != self.dtype:
            raise TypeError(f"{self.rel}: rows of {block.dtype}, the file holds {self.dtype}")
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        if len(data):
            self.out.write(data)
            self.digest.update(data)
            self.size += len(data)

    def entry(self) -> FileEntry:
        """The written file's entry; ValueError if fewer or more bytes than its shape."""
        if self.size != self.expected:
            raise ValueError(f"{self.rel}: wrote {self.size} bytes, its header promises "
                             f"{self.expected}")
        return FileEntry(self.rel, self.size, self.digest.intdigest())


_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def protocol_of(location: str) -> str | None:
    """The URL scheme of a `checkpoint_dir` (`s3`, `file`, ...); None for a plain path."""
    m = _URL.match(location)
    return m.group(1).lower() if m else None


def shown(location: str) -> str:
    """A location as messages show it: a URL's user:password@ is masked."""
    return re.sub(r"://[^/@]*@", "://***@", location)


class Storage:
    """A checkpoint directory: every file operation of ckpt/ goes through these methods.

    Paths are relative to the directory, with `/` separators. Reading never creates
    anything. Writes need no rename to be correct: a checkpoint is committed by its
    `_SUCCESS` object, written last (see ckpt.writer).
    """

    root: Any  # shown in messages: the path or URL (never credentials)

    def connect(self) -> None:
        """Make what later calls use (a remote store's file system, and any threads of its
        own) now, in the calling thread. Local directories need nothing."""

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

    def read_verified(self, rel: str, size: int, xxh3: int) -> np.ndarray:
        """A .npy file read whole, once, and checked against its manifest entry while it
        is read: Damaged names the file if its size or checksum differ."""
        data = self.read_bytes(rel)
        check_bytes(rel, data, size, xxh3)
        return npy_from_buffer(bytearray(data), rel)

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
                    fsync: bool = True) -> FileEntry:
        """Write `arr` as .npy data, checksummed as it is written; durable unless
        `fsync=False` (then call `fsync`)."""
        with self.open_array(base, rel, arr.dtype, arr.shape, fsync) as w:
            if arr.ndim == 0:
                w.write(arr)
            else:
                step = max(1, CHUNK // max(1, arr[:1].nbytes))
                for lo in range(0, len(arr), step):
                    w.write(arr[lo:lo + step])
        return w.entry()

    def open_array(self, base: str, rel: str, dtype: np.dtype, shape: tuple[int, ...],
                   fsync: bool = True) -> contextlib.AbstractContextManager[ArrayWriter]:
        """A .npy file to write block by block (several can be open at once): the context
        closes it (durable unless `fsync=False`); then `entry()` gives its FileEntry."""
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




def join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel
