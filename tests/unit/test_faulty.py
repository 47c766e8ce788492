"""The faulty storage (`checkpoint.faults`, ckpt/faulty.py): each kind of fault does what it
says, only on the calls it matches, and a checkpoint written through it is judged as a
damaged one would be."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckpt import CheckpointConfig, reader, writer
from ckpt.faulty import FaultyStorage, parse_faults, reset
from ckpt.local import LocalStorage
from ckpt.manifest import merge
from pserver.config import ConfigError
from pserver.config import build as build_job
from pserver.tables import persist
from tests.unit.shards import shards, train


@pytest.fixture(autouse=True)
def fresh_counts() -> Iterator[None]:
    reset()  # counts and windows are per process
    yield
    reset()


def faulty(tmp_path: Path, *faults: dict) -> FaultyStorage:
    return FaultyStorage(LocalStorage(tmp_path), parse_faults(list(faults)))


def test_errors_hit_the_matching_calls_only(tmp_path: Path) -> None:
    s = faulty(tmp_path, {"kind": "enospc", "op": "write", "path": "c/*.values"},
               {"kind": "eio", "op": "read", "path": "c/x.ids"})
    s.write_bytes("c", "x.ids", b"ok")  # another path: written
    with pytest.raises(OSError) as full:
        s.write_array("c", "x.values", np.zeros(4, np.float32))
    assert full.value.errno == errno.ENOSPC and "injected" in str(full.value)
    assert not (tmp_path / "c" / "x.values").exists()
    with pytest.raises(OSError) as eio:
        s.read_bytes("c/x.ids")
    assert eio.value.errno == errno.EIO
    assert s.inner.read_bytes("c/x.ids") == b"ok"


def test_after_and_times_pick_which_calls(tmp_path: Path) -> None:
    s = faulty(tmp_path, {"kind": "eio", "op": "write", "after": 1, "times": 2})
    results = []
    for i in range(5):
        try:
            s.write_bytes("", f"f{i}", b"x")
            results.append("ok")
        except OSError:
            results.append("eio")
    assert results == ["ok", "eio", "eio", "ok", "ok"]
    # a second storage of the same faults goes on counting (a process opens several)
    again = faulty(tmp_path, {"kind": "eio", "op": "write", "after": 1, "times": 2})
    again.write_bytes("", "f5", b"x")


def test_slow_waits_then_goes_on(tmp_path: Path) -> None:
    s = faulty(tmp_path, {"kind": "slow", "seconds": 0.2, "op": "write", "path": "a"})
    started = time.monotonic()
    s.write_bytes("", "a", b"x")
    assert time.monotonic() - started >= 0.2
    assert (tmp_path / "a").read_bytes() == b"x"


def test_a_torn_write_reports_success_and_leaves_half(tmp_path: Path) -> None:
    s = faulty(tmp_path, {"kind": "torn", "op": "write", "path": "c/*"})
    arr = np.arange(100_000, dtype=np.float32)
    entry = s.write_array("c", "t.values", arr)
    whole = LocalStorage(tmp_path).write_array("d", "t.values", arr)
    assert (entry.size, entry.xxh3) == (whole.size, whole.xxh3)  # what the writer believes
    raw, good = (tmp_path / "c" / "t.values").read_bytes(), (tmp_path / "d" / "t.values")
    half = entry.size // 2
    assert raw[:half] == good.read_bytes()[:half]  # the first half made it ...
    assert raw[half:] != good.read_bytes()[half:]  # ... the rest did not
    assert s.inner.checksum("c/t.values") != (entry.size, entry.xxh3)
    small = s.write_bytes("c", "note", b"0123456789")
    assert small.size == 10 and (tmp_path / "c" / "note").read_bytes() == b"01234"


def test_damaged_reads_and_checksums(tmp_path: Path) -> None:
    s = faulty(tmp_path, {"kind": "damage", "op": "read", "path": "c/*"})
    entry = s.inner.write_array("c", "v", np.ones(16, np.float32))
    s.inner.write_bytes("c", "b", b"\x01\x02")
    assert s.read_bytes("c/b") != b"\x01\x02"
    assert not np.array_equal(s.read_array("c/v", mmap=True), np.ones(16, np.float32))
    assert s.checksum("c/v") != (entry.size, entry.xxh3)
    assert s.inner.checksum("c/v") == (entry.size, entry.xxh3)  # the file itself is whole


def test_a_vanished_directory_lists_nothing_for_a_while(tmp_path: Path) -> None:
    LocalStorage(tmp_path).write_bytes("checkpoint_0", "a", b"x")
    s = faulty(tmp_path, {"kind": "vanish", "seconds": 0.5})
    assert s.listdir("") == [] and s.sizes("checkpoint_0") == {} and not s.exists("checkpoint_0")
    assert s.missing() is not None
    with pytest.raises(FileNotFoundError):
        s.read_bytes("checkpoint_0/a")
    with pytest.raises(FileNotFoundError):
        s.write_bytes("checkpoint_1", "a", b"x")
    time.sleep(0.6)  # the window is over: the directory is back, as it was
    assert s.listdir("") == ["checkpoint_0"] and s.read_bytes("checkpoint_0/a") == b"x"


def test_a_checkpoint_written_through_faults_is_skipped(tmp_path: Path) -> None:
    """A torn shard and a damaged read both make a checkpoint incomplete to the reader."""
    live = shards(1)
    train(live, np.arange(5000, dtype=np.uint64), 0)
    plain = LocalStorage(tmp_path)
    torn = faulty(tmp_path, {"kind": "torn", "op": "write", "path": "checkpoint_1/*emb.values"})
    for serial, storage in ((0, plain), (1, torn)):
        part = persist.save_shard(live[0], storage, serial)
        dense = {n: v.value for n, v in live[0].dense.items()}
        trainer = writer.write_trainer(storage, serial, 0, 0, serial, {"global_step": 0},
                                       dense)
        writer.commit(storage, merge(serial, persist.job_facts(live[0]), [part, trainer]))
    assert reader.newest_complete(plain).serial == 0  # checkpoint_1 is torn: skipped
    damaged = faulty(tmp_path, {"kind": "damage", "op": "read",
                                "path": "checkpoint_0/*emb.values"})
    assert reader.newest_complete(damaged) is None


def test_faults_come_from_the_checkpoint_section() -> None:
    c = CheckpointConfig("d", faults=[{"kind": "slow", "seconds": 1}])
    assert isinstance(c.storage(), FaultyStorage)
    assert not isinstance(CheckpointConfig("d").storage(), FaultyStorage)
    for faults, problem in [
        ([{"kind": "melt"}], "fault 0: kind must be one of slow, enospc, eio, torn, damage, "
                             "vanish, got 'melt'"),
        ([{"kind": "slow"}], "fault 0: a slow fault needs seconds"),
        ([{"kind": "eio", "op": "rename"}], "fault 0: op must be one of"),
        ([{"kind": "eio", "when": 1}], "fault 0: unknown key 'when'"),
        ([{"kind": "eio", "times": -1}], "fault 0: times must be an integer >= 0"),
        ("eio", "expected a list of tables"),
    ]:
        with pytest.raises(ConfigError, match="^checkpoint.faults: " + problem[:40]):
            build_job({"checkpoint": {"checkpoint_dir": "d", "faults": faults}})
