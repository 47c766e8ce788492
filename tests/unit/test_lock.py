"""The checkpoint lock is held by one run at a time: a lease its coordinator renews and
checks before every commit (ckpt/lock.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt import layout, lock, reader
from ckpt.faulty import FaultyStorage, parse_faults, reset
from ckpt.local import LocalStorage
from pserver.errors import CheckpointFailed, JobFailed
from tests.unit.shards import coordinator, save


@pytest.fixture(autouse=True)
def fresh_counts() -> Iterator[None]:
    reset()
    yield
    reset()


def test_another_run_is_refused_while_the_lease_lives(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = lock.acquire(storage, "ctr", "run-a", lease_s=30)
    with pytest.raises(lock.LockedError) as e:
        lock.acquire(storage, "ctr", "run-b", lease_s=30)
    msg = str(e.value)
    assert "job 'ctr' (run run-a, host" in msg and f"pid {first['pid']}" in msg
    assert "lease renewed 0s ago" in msg and "checkpoint.lock_lease_s" in msg
    assert "python -m ckpt unlock" in msg
    assert lock.holder(storage)["token"] == first["token"]  # refused: nothing changed
    again = lock.acquire(storage, "ctr", "run-a")  # a restarted process of the same run
    assert lock.holder(storage)["token"] == again["token"] != first["token"]


def test_an_expired_or_released_lease_is_taken_by_the_same_job_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = lock.acquire(storage, "ctr", "run-a", lease_s=0.3)
    time.sleep(0.5)  # not renewed: expired
    second = lock.acquire(storage, "ctr", "run-b", lease_s=30)
    with pytest.raises(lock.LockLost, match="now held by job 'ctr' .run run-b"):
        lock.renew(storage, first)  # the old holder finds out at its next renewal
    lock.release(storage, second)
    assert lock.holder(storage)["released"] is True
    lock.release(storage, first)  # not its own any more: changes nothing
    assert lock.holder(storage)["run"] == "run-b"
    with pytest.raises(lock.LockedError, match="is used by job 'ctr'.*released"):
        lock.acquire(storage, "other", "run-c")  # another job: never, released or not
    assert lock.acquire(storage, "ctr", "run-c")["run"] == "run-c"  # the job's next run


def test_a_holder_on_this_host_whose_process_is_gone_is_taken_over_at_once(
        tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    now = time.time()
    held = {"job": "ctr", "run": "run-a", "host": socket.gethostname(),
            "pid": int(dead.stdout), "since": now, "renewed": now, "lease_s": 30, "token": "t"}
    (tmp_path / layout.LOCK).write_text(json.dumps(held))
    assert lock.acquire(storage, "ctr", "run-b")["run"] == "run-b"
    elsewhere = {**held, "host": "another-host", "token": "u", "renewed": time.time()}
    (tmp_path / layout.LOCK).write_text(json.dumps(elsewhere))
    with pytest.raises(lock.LockedError, match="another run of this job"):
        lock.acquire(storage, "ctr", "run-c")  # a pid of another host says nothing


def test_a_renewal_in_an_outage_is_an_error_not_a_lost_lock(tmp_path: Path) -> None:
    mine = lock.acquire(LocalStorage(tmp_path), "ctr", "run-a")
    away = FaultyStorage(LocalStorage(tmp_path), parse_faults([{"kind": "vanish"}]))
    with pytest.raises(FileNotFoundError, match="vanished"):
        lock.renew(away, mine)
    (tmp_path / layout.LOCK).unlink()  # unlocked by hand: lost
    with pytest.raises(lock.LockLost, match="nobody"):
        lock.renew(LocalStorage(tmp_path), mine)


def test_a_coordinator_whose_lock_was_taken_commits_nothing_and_fails_the_job(
        tmp_path: Path) -> None:
    coord, shard = coordinator(tmp_path, [], run="run-a", lease_s=0.6)
    try:
        assert save(coord, shard, 1) == 0
        assert lock.holder(LocalStorage(tmp_path))["renewed"] > coord.holder["since"]
        coord._lease_stop.set()  # the process stalls: no renewals
        time.sleep(0.8)
        other, _ = coordinator(tmp_path, [], run="run-b")  # takes over the expired lease
        try:
            with pytest.raises((CheckpointFailed, JobFailed)) as e:
                save(coord, shard, 2)
            assert "run run-b" in str(e.value)
            assert coord.members.fatal is not None and "run run-b" in coord.members.fatal
            assert reader.newest_complete(LocalStorage(tmp_path)).serial == 0
            assert lock.holder(LocalStorage(tmp_path))["run"] == "run-b"
            coord.close()  # releases nothing that is not its own
            assert not lock.holder(LocalStorage(tmp_path)).get("released")
        finally:
            other.close()
        assert lock.holder(LocalStorage(tmp_path))["released"] is True
    finally:
        coord.close()
