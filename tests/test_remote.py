"""Checkpoints on remote storage: fsspec URLs, against a real S3-protocol server.

The S3 server is moto's stand-alone server, started by this module on a free
loopback port; psrt reaches it through s3fs, like any S3 endpoint. `memory://`
(fsspec's in-process store) serves the fast units.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckpt import CheckpointConfig, layout, lock, reader, retention, writer
from ckpt.__main__ import main as ckpt_main
from ckpt.backends import open_storage
from ckpt.local import LocalStorage
from ckpt.manifest import merge
from ckpt.remote import FsspecStorage
from ckpt.storage import Storage
from pserver.config import build as build_job
from tests.conftest import generated_data, python_env
from tests.test_checkpoint import _pid_of, assert_identical, launch, write_job

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CREDS = {"AWS_ACCESS_KEY_ID": "psrt-test", "AWS_SECRET_ACCESS_KEY": "psrt-test-secret",
         "AWS_DEFAULT_REGION": "us-east-1"}
JOB = {"name": "j", "mode": "sync", "num_pservers": 1, "num_trainers": 1,
       "virtual_shards": 4, "tables": {"t": {"dim": 2, "optimizer": "sgd", "state": []}},
       "dense": {}}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A real S3-protocol server (moto) on 127.0.0.1, on a free port."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": CREDS["AWS_ACCESS_KEY_ID"],
            "secret": CREDS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture
def bucket(endpoint: str) -> str:
    """A fresh, empty bucket on the S3 server."""
    name = f"psrt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options(endpoint)).mkdir(name)
    return name


@pytest.fixture(params=["memory", "s3"])
def remote(request: pytest.FixtureRequest) -> Storage:
    if request.param == "memory":
        return open_storage(f"memory://psrt-{uuid.uuid4().hex[:12]}/ck")
    endpoint = request.getfixturevalue("endpoint")
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/ck", options(endpoint))


def save(storage: Storage, serial: int, step: int = 0) -> None:
    ids = np.arange(5, dtype=np.uint64)
    shard = writer.write_shard(storage, serial, 0,
                               {"t": {"ids": ids, "values": np.full((5, 2), step, np.float32)}},
                               {"t": ids.astype(np.int64) % 4}, 4, {})
    part = writer.write_trainer(storage, serial, 0, 0, step, {"global_step": step + 1})
    writer.commit(storage, merge(serial, JOB, [shard, part]))


# ---- units ------------------------------------------------------------------------------

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


@pytest.mark.parametrize("section,match", [
    ({"checkpoint_dir": "nosuch://b/ck"}, r"checkpoint_dir: unknown protocol 'nosuch' in "
                                          r"'nosuch://b/ck' \(fsspec knows \d+, e.g. s3, gs"),
    ({"checkpoint_dir": "s3://"}, r"checkpoint_dir: expected s3://BUCKET/PATH .*got 's3://'"),
    ({"checkpoint_dir": "file://rel"}, r"checkpoint_dir: a file:// URL needs an absolute path"),
    ({"checkpoint_dir": "ck", "storage_options": {"key": "k"}},
     r"storage_options: only for a URL checkpoint_dir, and 'ck' is a local path"),
    ({"checkpoint_dir": "s3://b/ck", "storage_options": "key=k"},
     r"storage_options: expected a table of keys \(passed to fsspec\), got str"),
])
def test_bad_locations_are_refused_naming_the_key(section: dict, match: str) -> None:
    with pytest.raises(ValueError, match="^checkpoint." + match):
        build_job({"checkpoint": section})


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
    with pytest.raises(lock.LockedError, match=r"is used by job 'a' \(host .*pid "
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


# ---- the CLI and a real job on S3 -------------------------------------------------------

def s3_env(endpoint: str) -> dict[str, str]:
    """Credentials and endpoint for child processes, the way users give them."""
    return {**python_env(), **CREDS, "FSSPEC_S3_ENDPOINT_URL": endpoint}


def ckpt_cli(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt", *args], env=s3_env(endpoint),
                          capture_output=True, text=True, timeout=60)


def test_ckpt_cli_on_an_s3_url(endpoint: str, bucket: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{bucket}/ck"
    storage = open_storage(url, options(endpoint))
    save(storage, 0)
    save(storage, 1, 1)
    # a child process, credentials and endpoint from the environment
    ls = ckpt_cli(endpoint, "ls", url)
    assert ls.returncode == 0, ls.stderr
    assert re.search(r"^\s+0 .* complete", ls.stdout, re.M)
    assert re.search(r"^\s+1 .* complete", ls.stdout, re.M)
    ok = ckpt_cli(endpoint, "verify", url)
    assert ok.returncode == 0 and "checkpoint_1: ok" in ok.stdout, ok.stdout + ok.stderr
    # in this process, with -o storage options
    opts = [a for k, v in options(endpoint).items() for a in ("-o", f"{k}={v}")]
    rel = f"checkpoint_1/{layout.table_file(0, 't', 'values')}"
    raw = bytearray(storage.read_bytes(rel))
    raw[-1] ^= 0x40
    storage.replace(rel, bytes(raw))
    capsys.readouterr()
    assert ckpt_main([*opts, "verify", url]) == 1
    assert "checkpoint_1: DAMAGED" in capsys.readouterr().out
    lock.acquire(storage, "held")
    assert ckpt_main([*opts, "unlock", url]) == 0
    assert "removed the lock of job 'held'" in capsys.readouterr().out
    assert lock.holder(storage) is None
    assert ckpt_main([*opts, "ls", "s3://no-such-bucket/ck"]) == 2
    assert "s3://no-such-bucket/ck bucket 'no-such-bucket' does not exist" in \
        capsys.readouterr().err
    assert ckpt_main(["ls", "nosuch://b/ck"]) == 2
    assert "nosuch://b/ck" in capsys.readouterr().err
    assert ckpt_main(["-o", "novalue", "ls", url]) == 2
    assert "-o: expected KEY=VALUE, got 'novalue'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "remotedata", 3000, seed=5)


def final_state(storage: Storage) -> dict:
    manifest = reader.newest_complete(storage)
    assert manifest is not None and manifest.final
    return reader.read_all(storage, manifest)


@pytest.fixture(scope="module")
def local_reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final parameters of the job, never interrupted, checkpointing to a local dir."""
    work = tmp_path_factory.mktemp("local")
    p = launch(write_job(data_dir, work, work / "ckpt", epochs=1))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return final_state(LocalStorage(work / "ckpt"))


@pytest.mark.e2e
@pytest.mark.parametrize("heal", [False, True])
def test_a_job_on_s3_survives_sigkill_and_ends_bit_identical(
        data_dir: Path, tmp_path: Path, endpoint: str, bucket: str, local_reference: dict,
        heal: bool) -> None:
    """2 pservers, 2 trainers, sync: pserver 1 is killed in the middle of writing a
    checkpoint to S3. heal: the launcher starts it again and it rolls back from S3; else
    the job stops and, run again, restores from S3. Either way the torn checkpoint is
    skipped and the job ends as the uninterrupted one that checkpointed locally."""
    url = f"s3://{bucket}/jobs/demo"
    job = write_job(data_dir, tmp_path / "s3", url, epochs=1,  # type: ignore[arg-type]
                    storage_options={"endpoint_url": endpoint},
                    recovery=None if heal else {"max_restarts": 0})
    p = launch(job, env={**python_env(), **CREDS, "PSRT_FAULT_SAVE_SLEEP_S": "2"})
    at = 2
    for line in p.stdout:
        m = re.search(r"writing checkpoint_(\d+)", line)
        if m and int(m.group(1)) == at:
            break
    else:
        pytest.fail("the job ended before the kill")
    os.kill(_pid_of(job, "pserver", 1), signal.SIGKILL)
    storage = open_storage(url, options(endpoint))
    if heal:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
        assert "launch: pserver[1] exited with code -9; starting it again" in out
        assert "rolled back from global step" in out
    else:
        p.communicate(timeout=120)
        assert p.returncode != 0
        torn = [e for e in reader.entries(storage) if e.serial == at]
        assert torn and not torn[0].complete  # on S3, parts of it, without _SUCCESS
        p = launch(job, env={**python_env(), **CREDS})
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert f"restored checkpoint_{at - 1}" in out and f"restored checkpoint_{at}" not in out
    assert_identical(final_state(storage), local_reference)
    entries = reader.entries(storage)
    assert len(entries) == 3  # rotation on S3 keeps max_num_checkpoints ...
    assert all(e.problem is None for e in entries)  # ... and the torn leftover is gone
    if heal:
        return
    # a second job on the same S3 directory is refused, naming the holder
    other = write_job(data_dir, tmp_path / "other", url, epochs=1,  # type: ignore[arg-type]
                      storage_options={"endpoint_url": endpoint})
    r = subprocess.run([sys.executable, "-m", "pserver", "--id", "0", "--config", str(other),
                        "--set", 'job.name="other"', "--port", "0"], env=s3_env(endpoint),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "checkpoint.checkpoint_dir:" in r.stderr, r.stderr
    assert f"{url} is used by job 'demo' (host" in r.stderr


@pytest.mark.e2e
def test_background_saves_to_s3_end_like_local_ones(data_dir: Path, tmp_path: Path,
                                                     endpoint: str, bucket: str) -> None:
    """A stand-alone trainer whose background saves go to S3 from the writer thread ends
    with the same parameters as one saving blocking to a local directory."""
    def standalone(job: Path, env: dict) -> str:
        r = subprocess.run([sys.executable, "-m", "trainer", "--standalone", "--config",
                            str(job)], cwd=job.parent, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stderr

    local = tmp_path / "local" / "ckpt"
    standalone(write_job(data_dir, tmp_path / "local", local, 1, 1, epochs=1), python_env())
    url = f"s3://{bucket}/standalone"
    job = write_job(data_dir, tmp_path / "s3", url, 1, 1, epochs=1,  # type: ignore[arg-type]
                    background=True)
    out = standalone(job, s3_env(endpoint))  # endpoint from FSSPEC_S3_ENDPOINT_URL
    assert "copied; committing in the background" in out
    storage = open_storage(url, options(endpoint))
    assert_identical(final_state(storage), final_state(LocalStorage(local)))
