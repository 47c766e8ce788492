"""Checkpoints on remote storage: fsspec URLs, against a real S3-protocol server.

The S3 server is moto's stand-alone server, started in this process on a free loopback port
(the `endpoint` fixture of tests/conftest.py); psrt reaches it through s3fs, like any S3
endpoint. `memory://` (fsspec's in-process store) runs the same cases without a server.
"""

from __future__ import annotations

import os
import re
import socket
import uuid

import pytest

from ckpt import CheckpointConfig, layout, lock, reader, retention
from ckpt.backends import open_storage
from ckpt.storage import Storage
from tests.s3 import options, save

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")  # the `endpoint` fixture's server


@pytest.fixture(params=["memory", "s3"])
def remote(request: pytest.FixtureRequest) -> Storage:
    if request.param == "memory":
        return open_storage(f"memory://psrt-{uuid.uuid4().hex[:12]}/ck")
    endpoint = request.getfixturevalue("endpoint")
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/ck", options(endpoint))


def test_storage_options_stay_out_of_repr_and_messages(endpoint: str) -> None:
    c = CheckpointConfig("s3://b/ck", storage_options=options(endpoint))
    assert "psrt-test-secret" not in repr(c)
    storage = c.storage()
    with pytest.raises(lock.LockedError) as e:
        lock.acquire(storage, "j")  # bucket b does not exist
    assert "psrt-test-secret" not in str(e.value)


def test_save_rotate_restore_on_a_remote_store(remote: Storage) -> None:
    assert remote.missing() == "holds nothing" and reader.entries(remote) == []
    for serial in range(5):
        save(remote, serial, serial)
        retention.rotate(remote, 2)
    assert [e.serial for e in reader.entries(remote)] == [3, 4]
    assert remote.listdir() == ["checkpoint_3", "checkpoint_4"]
    m = reader.newest_complete(remote)
    assert m is not None and m.serial == 4
    values = reader.read_all(remote, m)["table/t"]["values"]
    assert values.shape == (5, 2) and (values == 4).all()
    assert reader.read_trainer(remote, 4, 0) == (0, 4, {"global_step": 5})
    assert reader.verify(remote, 4, deep=True) == []


def test_a_torn_checkpoint_is_skipped_and_left_to_rotation(remote: Storage) -> None:
    save(remote, 0)
    save(remote, 1, 1)
    remote.remove(f"checkpoint_1/{layout.SUCCESS}")  # all files, but never committed
    save(remote, 2, 2)
    remote.remove(f"checkpoint_2/{layout.SUCCESS}")
    entries = reader.entries(remote)
    assert [(e.serial, e.problem is None) for e in entries] == [(0, True), (1, False),
                                                                  (2, False)]
    assert "no _SUCCESS" in entries[1].problem
    assert reader.newest_complete(remote).serial == 0
    assert reader.max_serial(remote) == 2  # the next save does not reuse a torn serial
    save(remote, 3, 3)
    retention.rotate(remote, 1)  # torn 1 and 2 are older than the newest complete: gone
    assert remote.listdir() == ["checkpoint_3"]


def test_damage_on_a_remote_store_is_found(remote: Storage) -> None:
    save(remote, 0)
    rel = f"checkpoint_0/{layout.table_file(0, 't', 'values')}"
    raw = bytearray(remote.read_bytes(rel))
    raw[-1] ^= 0x40
    remote.replace(rel, bytes(raw))
    problems = reader.verify(remote, 0, deep=True)
    assert len(problems) == 1 and "checksum xxh3" in problems[0]
    assert reader.verify(remote, 0, deep=False) == []  # same size: only the checksum tells
    assert reader.newest_complete(remote) is None


def test_reading_creates_nothing(remote: Storage) -> None:
    assert reader.entries(remote) == [] and reader.newest_complete(remote) is None
    assert reader.max_serial(remote) == -1 and lock.holder(remote) is None
    assert remote.missing() == "holds nothing"  # still nothing there


def test_the_lock_on_a_remote_store(remote: Storage) -> None:
    mine = lock.acquire(remote, "a")
    assert lock.holder(remote)["token"] == mine["token"]
    with pytest.raises(lock.LockedError, match=r"is used by job 'a' \(run .*host .*pid "
                                               rf"{os.getpid()}.*python -m ckpt unlock "
                                               rf"{re.escape(str(remote.root))}"):
        lock.acquire(remote, "b")
    assert lock.holder(remote)["token"] == mine["token"]  # the refusal changed nothing
    again = lock.acquire(remote, "a")  # the same job restarting takes it back
    assert lock.holder(remote)["token"] == again["token"] != mine["token"]
    assert lock.break_lock(remote)["job"] == "a" and lock.holder(remote) is None
    assert lock.acquire(remote, "b")["job"] == "b"


def test_create_is_exclusive_on_s3(endpoint: str, bucket: str) -> None:
    """S3 honours If-None-Match: two jobs creating the lock at once cannot both win."""
    storage = open_storage(f"s3://{bucket}/ck", options(endpoint))
    assert storage.exclusive_create
    storage.create("x", b"first")
    with pytest.raises(FileExistsError):
        storage.create("x", b"second")
    assert storage.read_bytes("x") == b"first"


def test_a_missing_bucket_is_named(endpoint: str) -> None:
    storage = open_storage("s3://no-such-bucket/ck", options(endpoint))
    assert "bucket 'no-such-bucket' does not exist" in storage.missing()
    with pytest.raises(lock.LockedError, match=r"^s3://no-such-bucket/ck: .*bucket "
                                               r"'no-such-bucket' does not exist"):
        lock.acquire(storage, "j")
    fs = s3fs.S3FileSystem(**options(endpoint))
    assert not fs.exists("no-such-bucket")  # and nothing made it


def test_an_endpoint_that_cannot_be_reached_is_named() -> None:
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = open_storage("s3://b/ck", {"endpoint_url": f"http://127.0.0.1:{port}",
                                         "key": "k", "secret": "s",
                                         "config_kwargs": {"retries": {"max_attempts": 1}}})
    with pytest.raises(lock.LockedError, match=r"^s3://b/ck: cannot take the lock: .*"
                                               r"EndpointConnectionError.*127.0.0.1"):
        lock.acquire(storage, "j")
    assert "cannot be read: EndpointConnectionError" in storage.missing()
