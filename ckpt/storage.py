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

import contextlib
import errno
import io
import mmap
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
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

    @contextlib.contextmanager
    def open_array(self, base: str, rel: str, dtype: np.dtype, shape: tuple[int, ...],
                   fsync: bool = True) -> Iterator[ArrayWriter]:
        target = self.path(_join(base, rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        with DirectFile(target) as f:
            yield ArrayWriter(f, rel, dtype, shape)
            if fsync:
                f.fsync()

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


_BLOCK = 4096  # O_DIRECT: buffer address, length and file offset are multiples of this
_free: list[memoryview] = []  # aligned buffers of files written before, kept: touching
_free_lock = threading.Lock()  # fresh memory costs a page fault per 4 KiB


class DirectFile:
    """A new file written around the page cache (O_DIRECT) where the file system allows
    it, else through it as usual.

    Checkpoint files are written once and not read back soon: through the page cache
    every byte is copied into the kernel first and written back later by the kernel's
    flusher threads, at normal priority, while the trainers' pushes wait for the CPU.
    Bytes are gathered in an aligned buffer and written in whole blocks; the tail is
    written without O_DIRECT.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as e:  # e.g. tmpfs: EINVAL
            if not self.direct or e.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, flags, 0o644)
        self.buf = _take_buffer()
        self.array = np.frombuffer(self.buf, dtype=np.uint8)
        self.fill = 0

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._flush(final=True)
        finally:
            os.close(self.fd)
            with _free_lock:
                if len(_free) < 8:
                    _free.append(self.buf)

    def write(self, src: np.ndarray) -> None:
        """Append bytes (a flat uint8 array). Whole blocks at an aligned address go to the
        disk as they are; anything else is gathered in the buffer first."""
        if not self.direct:
            if self.fill:  # gathered before direct writes were refused
                _write_all(self.fd, self.buf[:self.fill])
                self.fill = 0
            _write_all(self.fd, memoryview(src))
            return
        if self.fill % _BLOCK == 0 and src.ctypes.data % _BLOCK == 0 and len(src) >= _BLOCK:
            self._flush(final=False)
            whole = len(src) - len(src) % _BLOCK
            if self._write_direct(memoryview(src[:whole])):
                src = src[whole:]
        cap = len(self.buf)
        while len(src):
            n = min(len(src), cap - self.fill)
            # numpy copies without the GIL (a memoryview assignment holds it)
            np.copyto(self.array[self.fill:self.fill + n], src[:n])
            self.fill += n
            src = src[n:]
            if self.fill == cap:
                self._flush(final=False)

    def fsync(self) -> None:
        self._flush(final=True)
        os.fsync(self.fd)

    def reserve(self, size: int) -> None:
        """Allocate the file's blocks now, in one piece where the file system can: direct
        writes allocate as they go, so files written side by side would be interleaved on
        disk. Only with O_DIRECT (local file systems that allocate without writing)."""
        if self.direct and size > 0:
            try:
                os.posix_fallocate(self.fd, 0, size)
            except OSError:  # not supported, or no space: the writes will say
                pass

    def _flush(self, final: bool) -> None:
        """Write the buffer's whole blocks (and, if final, the rest)."""
        whole = self.fill - self.fill % _BLOCK
        if whole and not self._write_direct(self.buf[:whole]):
            _write_all(self.fd, self.buf[:whole])
        rest = self.fill - whole
        if rest and final:
            self._buffered()
            _write_all(self.fd, self.buf[whole:self.fill])
            whole, rest = self.fill, 0
        self.buf[:rest] = self.buf[whole:whole + rest]
        self.fill = rest

    def _write_direct(self, data: memoryview) -> bool:
        """Write aligned whole blocks; False (nothing written, O_DIRECT now off) where the
        file system opened the file O_DIRECT but refuses such writes."""
        if not self.direct:
            return False
        try:
            _write_all(self.fd, data)
        except OSError as e:
            if e.errno != errno.EINVAL or os.lseek(self.fd, 0, os.SEEK_CUR) % _BLOCK:
                raise
            self._buffered()
            return False
        return True

    def _buffered(self) -> None:
        if self.direct:
            import fcntl

            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self.direct = False


def _take_buffer() -> memoryview:
    """An aligned buffer (mmap: page-aligned) of CHUNK bytes, for one open file."""
    with _free_lock:
        if _free:
            return _free.pop()
    return memoryview(mmap.mmap(-1, CHUNK))


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]
