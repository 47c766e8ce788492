"""Checkpoint stores picked by URL, without a server: the backend for a location, connecting
in the calling thread, and a lock whose read-back catches a lost race (fsspec's in-process
`memory://` store). The same against a real S3-protocol server:
tests/integration/test_remote_storage.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from ckpt import lock
from ckpt.backends import open_storage
from ckpt.local import LocalStorage
from ckpt.remote import FsspecStorage


def test_open_storage_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    local = open_storage(f"file://{tmp_path}")
    assert isinstance(local, LocalStorage) and local.root == tmp_path
    assert isinstance(open_storage("memory://x/y"), FsspecStorage)
    with pytest.raises(ValueError, match="file:///dir"):
        open_storage("file://relative/dir")


def test_connect_makes_the_file_system_in_the_calling_thread(tmp_path: Path) -> None:
    """(A background save connects before its writing thread starts: threads fsspec starts
    with its first file system would inherit that thread's low priority.)"""
    store = open_storage(f"memory://psrt-{uuid.uuid4().hex[:12]}/ck")
    assert "fs" not in vars(store)  # made on first use
    store.connect()
    assert "fs" in vars(store)
    open_storage(str(tmp_path)).connect()  # a local directory needs nothing


class _Racing(FsspecStorage):
    """A check-then-write store on which another job writes the lock right after us."""

    def create(self, rel: str, data: bytes) -> None:
        super().create(rel, data)
        theirs = {"job": "quick", "host": "h", "pid": 7, "since": 0, "token": "t"}
        self.replace(rel, json.dumps(theirs).encode())


def test_the_read_back_catches_a_lost_race() -> None:
    storage = _Racing(f"memory://psrt-{uuid.uuid4().hex[:12]}/ck", {})
    with pytest.raises(lock.LockedError, match="is used by job 'quick'"):
        lock.acquire(storage, "slow")
