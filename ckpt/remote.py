"""Checkpoints on any store fsspec reaches: S3, GCS, HDFS, Azure, memory, ...

`FsspecStorage` implements `ckpt.storage.Storage` over an fsspec file system.
Credentials and endpoints come from fsspec's usual places (the environment,
e.g. `AWS_ACCESS_KEY_ID` or `FSSPEC_S3_ENDPOINT_URL`, and fsspec's config
files) and from the job's `checkpoint.storage_options`, passed to the file
system as they are. They are never logged: messages show the URL only.

No rename is ever needed: every file is written once, in place (on an object
store, a PUT or a multipart upload, which readers see whole or not at all), and
a checkpoint counts only once its `_SUCCESS` object is there, written last.
Listings are not cached between calls (other processes write the same
directory). Reading never creates anything, and nothing here creates a bucket.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import xxhash

from ckpt.storage import CHUNK, ArrayWriter, FileEntry, Storage, join, shown

# stores whose directories are only key prefixes: nothing to create, and the first
# path component is a bucket (or container) that must exist already
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
# stores where a write with If-None-Match (fsspec's mode="create") is atomic
ATOMIC_CREATE = {"s3", "s3a", "memory"}


def _problem(url: str, e: BaseException) -> ValueError:
    return ValueError(f"checkpoint_dir {shown(url)!r}: {type(e).__name__}: {e}")


class FsspecStorage(Storage):
    """A checkpoint directory at an fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        """Checks the URL; the file system is made (and any connection opened) on first
        use, so a store that cannot be reached fails there, naming the URL."""
        self._url, self._options = url.rstrip("/"), storage_options
        self.root = shown(self._url)  # in messages: never credentials
        self.protocol = url.split("://", 1)[0].lower()
        try:
            cls = fsspec.get_filesystem_class(self.protocol)
        except ImportError as e:  # the protocol's implementation is not installed
            raise ValueError(f"checkpoint_dir {self.root!r}: {e}") from None
        except ValueError as e:  # unknown protocol
            raise _problem(url, e) from None
        self.base = cls._strip_protocol(self._url).rstrip("/")
        self.object_store = self.protocol in OBJECT_STORES
        self.exclusive_create = self.protocol in ATOMIC_CREATE
        if self.object_store and not self.base:
            raise ValueError(f"checkpoint_dir {self.root!r}: expected "
                             f"{self.protocol}://BUCKET/PATH")

    @functools.cached_property
    def fs(self) -> Any:  # noqa: ANN401 - an fsspec AbstractFileSystem
        try:
            return fsspec.core.url_to_fs(self._url, **self._options)[0]
        except (OSError, ValueError, TypeError) as e:  # unreachable, bad options
            raise _problem(self._url, e) from None

    def connect(self) -> None:
        self.fs  # noqa: B018 - made now (fsspec starts its I/O thread with the first one)

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _fresh(self, rel: str) -> str:
        """The full path, with any cached listing of it dropped (others write here too)."""
        path = self._path(rel)
        self.fs.invalidate_cache(path)
        return path

    # ---- reading ------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._fresh(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        path = self._fresh(rel)
        try:
            names = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = {n.rstrip("/").rsplit("/", 1)[-1] for n in names}
        return sorted(n for n in out if n and f"{path}/{n}" != path)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._fresh(rel))

    def read_array(self, rel: str, mmap: bool = False) -> np.ndarray:
        """The whole array, downloaded (`mmap` is a local-disk feature, ignored here)."""
        return np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._fresh(rel)))

    def sizes(self, rel: str) -> dict[str, int]:
        top = self._fresh(rel)
        try:
            found = self.fs.find(top, detail=True)
        except FileNotFoundError:
            return {}
        n = len(top) + 1
        return {path[n:]: int(info["size"]) for path, info in found.items()
                if info.get("type") != "directory" and path.startswith(f"{top}/")}

    def checksum(self, rel: str) -> tuple[int, int]:
        digest, size = xxhash.xxh3_64(), 0
        with self.fs.open(self._fresh(rel), "rb", block_size=CHUNK) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.intdigest()

    # ---- writing ------------------------------------------------------------

    def _no_bucket(self) -> str | None:
        if not self.object_store:
            return None
        bucket = self.base.split("/", 1)[0]
        self.fs.invalidate_cache(bucket)
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            return (f"bucket {bucket!r} does not exist or is not visible with these "
                    f"credentials (psrt does not create buckets)")
        return None

    def missing(self) -> str | None:
        try:
            problem = self._no_bucket()
            if problem is None and not self.fs.exists(self._fresh("")):
                problem = "holds nothing"
        except Exception as e:  # noqa: BLE001 - the store's own errors (botocore, ...)
            problem = f"cannot be read: {type(e).__name__}: {e}"
        return problem

    def check_root(self) -> None:
        """The bucket must exist (psrt never creates one); elsewhere, make the directory.
        Any failure (an endpoint that cannot be reached too) is a ValueError naming the
        URL."""
        try:
            problem = self._no_bucket()
            if not problem and not self.object_store:
                self.fs.makedirs(self.base, exist_ok=True)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the store's own errors (botocore, ...)
            raise _problem(self._url, e) from None
        if problem:
            raise ValueError(f"checkpoint_dir {self.root!r}: {problem}")

    def makedirs(self, rel: str) -> None:
        if not self.object_store:
            self.fs.makedirs(self._path(rel), exist_ok=True)

    def _parent(self, path: str) -> None:
        if not self.object_store and "/" in path:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)

    def write_bytes(self, base: str, rel: str, data: bytes) -> FileEntry:
        path = self._path(join(base, rel))
        self._parent(path)
        self.fs.pipe_file(path, data)
        return FileEntry(rel, len(data), xxhash.xxh3_64_intdigest(data))

    @contextlib.contextmanager
    def open_array(self, base: str, rel: str, dtype: np.dtype, shape: tuple[int, ...],
                   fsync: bool = True) -> Iterator[ArrayWriter]:
        """Streamed to the store (multipart on object stores); the file is complete (and
        durable, as the store makes it) when the context closes."""
        path = self._path(join(base, rel))
        self._parent(path)
        with self.fs.open(path, "wb") as f:
            yield ArrayWriter(f, rel, dtype, shape)

    def create(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        self._parent(path)
        try:
            self.fs.pipe_file(path, data, mode="create")  # FileExistsError if it is there
        except TypeError:  # an implementation without mode=: check, then write
            if self.fs.exists(path):
                raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)

    def replace(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        self._parent(path)
        self.fs.pipe_file(path, data)  # one PUT: readers see the old or the new object

    def remove(self, rel: str) -> None:
        self.fs.rm_file(self._fresh(rel))

    def remove_tree(self, rel: str) -> None:
        path = self._fresh(rel)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
