"""Where checkpoint bytes go: the one file a new storage backend touches.

`LocalStorage` writes to a local (or mounted) file system with fsync; every
write returns a `FileEntry` (relative path, size, crc32) for the manifest.
Large arrays are written in chunks while a second thread computes the crc32
of the chunk before, so checksumming costs little beyond the disk's time.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint's directory
    size: int
    crc32: int


def npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


class LocalStorage:
    """A checkpoint directory on a local or mounted file system."""

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

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def write_bytes(self, base: str, rel: str, data: bytes) -> FileEntry:
        """Write a small file durably; `rel` is relative to checkpoint dir `base`."""
        target = self.path(_join(base, rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return FileEntry(rel, len(data), zlib.crc32(data))

    def write_array(self, base: str, rel: str, arr: np.ndarray) -> FileEntry:
        """Write `arr` as .npy data durably, checksumming while writing."""
        arr = np.ascontiguousarray(arr)
        header = npy_header(arr)
        data = memoryview(arr).cast("B") if arr.nbytes else memoryview(b"")
        target = self.path(_join(base, rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        crc = zlib.crc32(header)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, header)
            writer: threading.Thread | None = None
            for lo in range(0, len(data), CHUNK):
                chunk = data[lo:lo + CHUNK]
                if writer is not None:
                    writer.join()
                writer = threading.Thread(target=_write_all, args=(fd, chunk))
                writer.start()
                crc = zlib.crc32(chunk, crc)  # releases the GIL, runs beside the write
            if writer is not None:
                writer.join()
            os.fsync(fd)
        finally:
            os.close(fd)
        return FileEntry(rel, len(header) + len(data), crc)

    def fsync_dir(self, rel: str) -> None:
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.path(rel), mmap_mode="r" if mmap else None, allow_pickle=False)

    def crc32(self, rel: str) -> tuple[int, int]:
        """(size, crc32) of a file as it is now."""
        crc, size = 0, 0
        with open(self.path(rel), "rb") as f:
            while chunk := f.read(CHUNK):
                crc = zlib.crc32(chunk, crc)
                size += len(chunk)
        return size, crc


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if base else rel


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]
