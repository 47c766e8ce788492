"""`LocalStorage`: a checkpoint directory on a local or mounted file system.

Files are written with fsync, large ones around the page cache (`DirectFile`,
O_DIRECT where the file system allows it), and read memory-mapped; `create`
is atomic (a hard link), so two jobs starting together cannot both take the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xxhash

from ckpt.storage import (
    CHUNK,
    ArrayWriter,
    Damaged,
    FileEntry,
    Storage,
    check_bytes,
    join,
    mismatch,
    npy_from_buffer,
)


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
        self._mkdirs(self.path(rel))

    def _mkdirs(self, path: Path) -> None:
        """Make `path` and its parents below the root, never the root itself: a
        checkpoint_dir that vanished after start (a lost mount) stays missing, and the
        write fails with FileNotFoundError instead of landing in a fresh directory."""
        if path != self.root:
            try:
                path.mkdir(exist_ok=True)  # its parent is there: the common case
                return
            except FileNotFoundError:
                pass
        if not self.root.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"{self.root} is gone (checkpoint_dir is "
                                    f"not made again after start)")
        at = self.root
        for part in path.relative_to(self.root).parts:
            at = at / part
            try:
                at.mkdir()
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, f"{self.root} is gone (checkpoint_dir "
                                        f"is not made again after start)") from None

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
        target = self.path(join(base, rel))
        self._mkdirs(target.parent)
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return FileEntry(rel, len(data), xxhash.xxh3_64_intdigest(data))

    @contextlib.contextmanager
    def open_array(self, base: str, rel: str, dtype: np.dtype, shape: tuple[int, ...],
                   fsync: bool = True) -> Iterator[ArrayWriter]:
        target = self.path(join(base, rel))
        self._mkdirs(target.parent)
        with DirectFile(target) as f:
            yield ArrayWriter(f, rel, dtype, shape)
            if fsync:
                f.fsync()

    def fsync(self, rels: list[str]) -> None:
        """Make files written with fsync=False durable. Writing many files first and
        syncing them together lets the kernel write them back while the next is written."""
        for rel in rels:
            _fsync(self.path(rel))

    def fsync_dir(self, rel: str) -> None:
        _fsync(self.path(rel))

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.path(rel), mmap_mode="r" if mmap else None, allow_pickle=False)

    def read_verified(self, rel: str, size: int, xxh3: int) -> np.ndarray:
        """One read into memory of the manifest's size, hashed there (no second pass over
        the disk), then the array as a view of it."""
        buf = _buffer(size)
        view = memoryview(buf)
        with open(self.path(rel), "rb", buffering=0) as f:
            got = 0
            while got < size and (n := f.readinto(view[got:got + CHUNK])):
                got += n
            extra = len(f.read(1)) if got == size else 0
        if got != size or extra:
            actual = os.path.getsize(self.path(rel))
            raise Damaged(rel, mismatch(actual, None, {"size": size, "xxh3": xxh3}))
        check_bytes(rel, view, size, xxh3)
        return npy_from_buffer(buf, rel)

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


_BIG = 4 << 20  # a file this large is read into huge pages
_POPULATE_WRITE = 23  # MADV_POPULATE_WRITE (Linux 5.14)


def _buffer(size: int) -> bytearray | mmap.mmap:
    """Memory to read `size` bytes into. A large one is anonymous memory in transparent
    huge pages, mapped in bulk before the read: faulting 4 KiB pages in one by one costs
    several times the read itself on virtual machines (0.75-0.85 s against 0.13-0.30 s
    for 0.5 GB here). Where the system refuses either advice, plain pages."""
    if size < _BIG or not hasattr(mmap, "MAP_ANONYMOUS"):
        return bytearray(size)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in (getattr(mmap, "MADV_HUGEPAGE", None), _POPULATE_WRITE):
        if advice is not None:
            try:
                buf.madvise(advice)
            except OSError:
                pass
    return buf


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
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self.direct = False


def _take_buffer() -> memoryview:
    """An aligned buffer (mmap: page-aligned) of CHUNK bytes, for one open file."""
    with _free_lock:
        if _free:
            return _free.pop()
    return memoryview(mmap.mmap(-1, CHUNK))


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _fsync(path: Path) -> None:
    """fsync a file or directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
