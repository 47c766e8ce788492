"""ckpt on its own: names, rotation, the lock, and reading a directory with other things in it."""

from __future__ import annotations

import json
import mmap
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ckpt import CheckpointConfig, layout, lock, reader, retention, writer
from ckpt.backends import open_storage
from ckpt.faulty import FaultyStorage, parse_faults
from ckpt.local import DirectFile, LocalStorage
from ckpt.manifest import merge
from ckpt.storage import HEADER_ALIGN, ArrayWriter, Damaged, npy_header
from pserver.config import build as build_job

JOB = {"name": "j", "mode": "sync", "num_pservers": 1, "num_trainers": 1,
       "virtual_shards": 4, "tables": {"t": {"dim": 2, "optimizer": "sgd", "state": []}},
       "dense": {}}


def save(storage: LocalStorage, serial: int, step: int = 0) -> None:
    ids = np.arange(5, dtype=np.uint64)
    shard = writer.write_shard(storage, serial, 0,
                               {"t": {"ids": ids, "values": np.ones((5, 2), np.float32)}},
                               {"t": ids.astype(np.int64) % 4}, 4, {})
    part = writer.write_trainer(storage, serial, 0, 0, step, {"global_step": step + 1})
    writer.commit(storage, merge(serial, JOB, [shard, part]))


def test_parse_serial_ignores_everything_else() -> None:
    assert layout.parse_serial("checkpoint_0") == 0
    assert layout.parse_serial("checkpoint_12") == 12
    for name in ("checkpoint_x", "checkpoint_3.tmp", "checkpoint_", "checkpoint_01",
                 "notes.txt", "checkpoint_-1", "_LOCK"):
        assert layout.parse_serial(name) is None, name


@pytest.mark.parametrize("field,value", [("max_num_checkpoints", 0), ("epoch_interval", -1),
                                         ("step_interval", 1.5), ("checkpoint_dir", ""),
                                         ("background_duty", 0), ("background_duty", 1.5),
                                         ("background_duty", True),
                                         ("background_duty", "half"),
                                         ("background_priority", "high"),
                                         ("background_priority", 19),
                                         ("background_priority", None)])
def test_config_names_the_bad_field(field: str, value: object) -> None:
    args = {"checkpoint_dir": "d", field: value}
    with pytest.raises(ValueError, match=f"^{field}: "):
        CheckpointConfig(**args)
    with pytest.raises(ValueError, match=f"^checkpoint.{field}: "):
        build_job({"checkpoint": args})
    with pytest.raises(ValueError, match="^checkpoint.colour: unknown key"):
        build_job({"checkpoint": {"colour": 1}})


def test_trigger_is_the_guides() -> None:
    c = CheckpointConfig("d", epoch_interval=2, step_interval=10)
    saved = [(e, s) for e in range(4) for s in range(25) if c.should_save(e, s)]
    assert saved == [(0, 0), (0, 10), (0, 20), (2, 0), (2, 10), (2, 20)]


def test_rotation_over_many_saves_keeps_the_newest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for serial in range(12):
        save(storage, serial, serial)
        retention.rotate(storage, 3)
        kept = [e.serial for e in reader.entries(storage)]
        assert kept == list(range(max(0, serial - 2), serial + 1))
    # an incomplete leftover older than the newest complete one goes, a newer one stays
    (tmp_path / "checkpoint_10" / layout.SUCCESS).unlink()
    (tmp_path / "checkpoint_13").mkdir()
    retention.rotate(storage, 3)
    assert [e.serial for e in reader.entries(storage)] == [9, 11, 13]


def test_rotation_never_deletes_the_newest_complete_one(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 0)
    save(storage, 1)
    (tmp_path / "checkpoint_1" / layout.SUCCESS).unlink()  # torn
    retention.rotate(storage, 1)
    assert reader.newest_complete(storage).serial == 0


def test_reading_ignores_unrelated_entries_and_creates_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "ckpt")
    assert reader.entries(storage) == [] and reader.newest_complete(storage) is None
    assert not (tmp_path / "ckpt").exists()
    storage.check_root()  # as the coordinator does at start: writes never make the root
    save(storage, 3)
    (tmp_path / "ckpt" / "notes.txt").write_text("hello")
    (tmp_path / "ckpt" / "checkpoint_x").mkdir()
    (tmp_path / "ckpt" / "checkpoint_3.tmp").mkdir()
    assert [e.serial for e in reader.entries(storage)] == [3]
    assert reader.newest_complete(storage).serial == 3
    assert reader.max_serial(storage) == 3


def test_a_checkpoint_restores_rows_of_any_virtual_shard_range(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 0)
    m = reader.load_manifest(storage, 0)
    both = [reader.read_table(storage, m, "t", ["ids"], lo, hi) for lo, hi in ((0, 2), (2, 4))]
    ids = sorted(int(i) for part in both if part for i in part["ids"])
    assert ids == [0, 1, 2, 3, 4]
    assert all(int(i) % 4 < 2 for i in both[0]["ids"])


def test_lock_refuses_another_job_and_lets_the_same_job_back(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = lock.acquire(storage, "ctr")
    with pytest.raises(lock.LockedError) as e:
        lock.acquire(storage, "other")
    msg = str(e.value)
    assert "job 'ctr'" in msg and f"pid {first['pid']}" in msg and "host" in msg
    assert "python -m ckpt unlock" in msg
    again = lock.acquire(storage, "ctr")  # the same job restarting takes it back
    assert again["job"] == "ctr"
    assert lock.break_lock(storage)["job"] == "ctr"
    assert lock.acquire(storage, "other")["job"] == "other"
    assert json.loads((tmp_path / layout.LOCK).read_text())["job"] == "other"


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_direct_writes_keep_every_byte_aligned_or_not(tmp_path: Path, where: str) -> None:
    """Whole aligned blocks go to the disk as they are, the rest through the buffer, the
    tail without O_DIRECT; tmpfs refuses O_DIRECT and gets plain writes."""
    if where == "tmpfs":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm here")
        tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm"))
    rng = np.random.default_rng(0)
    aligned = np.frombuffer(mmap.mmap(-1, 3 * 4096), dtype=np.uint8)
    aligned[:] = rng.integers(0, 255, len(aligned), dtype=np.uint8)
    pieces = [rng.integers(0, 255, 100, dtype=np.uint8), aligned,  # after 100 bytes
              rng.integers(0, 255, 9 << 20, dtype=np.uint8),  # more than the buffer
              aligned[:4096], rng.integers(0, 255, 5000, dtype=np.uint8)]
    try:
        with DirectFile(tmp_path / "f") as f:
            f.write(pieces[0])
            f.write(pieces[1])
            f.write(pieces[2])
            f.fsync()  # a tail now, then more
            f.write(aligned[:4096])
            f.write(pieces[4])
        assert (tmp_path / "f").read_bytes() == b"".join(p.tobytes() for p in pieces)
        assert where == "disk" or not f.direct
    finally:
        if where == "tmpfs":
            shutil.rmtree(tmp_path)


def test_npy_data_starts_on_a_block_boundary_and_numpy_reads_it(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    header = npy_header(arr.dtype, arr.shape)
    assert len(header) == HEADER_ALIGN
    entry = LocalStorage(tmp_path).write_array("", "a.npy", arr)
    assert entry.size == HEADER_ALIGN + arr.nbytes
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)
    assert np.array_equal(np.load(tmp_path / "a.npy", mmap_mode="r"), arr)


def test_an_array_file_with_too_few_rows_is_refused(tmp_path: Path) -> None:
    with DirectFile(tmp_path / "short") as f:
        w = ArrayWriter(f, "short", np.dtype(np.float32), (4, 2))
        w.write(np.zeros((3, 2), dtype=np.float32))
        with pytest.raises(TypeError, match="rows of float64"):
            w.write(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="wrote 4120 bytes, its header promises 4128"):
        w.entry()


def test_a_file_system_that_refuses_direct_writes_gets_plain_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems open a file O_DIRECT and then refuse the writes (EINVAL): the
    bytes gathered so far and everything after go through plain writes, in order."""
    import errno as errno_
    import fcntl
    import os

    real_write = os.write

    def write(fd: int, data: object) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno_.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    rng = np.random.default_rng(1)
    aligned = np.frombuffer(mmap.mmap(-1, 2 * 4096), dtype=np.uint8)
    aligned[:] = rng.integers(0, 255, len(aligned), dtype=np.uint8)
    pieces = [rng.integers(0, 255, 4096, dtype=np.uint8), aligned,
              rng.integers(0, 255, 10_000, dtype=np.uint8), aligned]
    with DirectFile(tmp_path / "f") as f:
        for p in pieces:
            f.write(p)
    assert not f.direct
    assert (tmp_path / "f").read_bytes() == b"".join(p.tobytes() for p in pieces)


@pytest.mark.parametrize("kind", ["local", "faulty", "memory"])
def test_a_verified_read_is_the_array_and_names_a_damaged_file(tmp_path: Path,
                                                               kind: str) -> None:
    """read_verified checks a file's size and checksum in the one read that loads it, on
    every backend: the array np.load gives (writable), or Damaged naming the file."""
    storage = LocalStorage(tmp_path) if kind != "memory" else \
        open_storage(f"memory://verified-{tmp_path.name}")
    storage.check_root()
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(0, np.int64),
              "c": np.array(7, np.uint64), "d": np.ones((2, 3, 5), np.float64)}
    entries = {rel: storage.write_array("ck", rel, arr) for rel, arr in arrays.items()}
    if kind == "faulty":
        storage = FaultyStorage(storage, parse_faults([{"kind": "damage", "path": "ck/d"}]))
    for rel, arr in arrays.items():
        e = entries[rel]
        if kind == "faulty" and rel == "d":
            with pytest.raises(Damaged, match="^ck/d: checksum xxh3 [0-9a-f]{16}, manifest"):
                storage.read_verified(f"ck/{rel}", e.size, e.xxh3)
            continue
        got = storage.read_verified(f"ck/{rel}", e.size, e.xxh3)
        assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
        assert got.flags.writeable
        with pytest.raises(Damaged, match=f"^ck/{rel}: checksum xxh3"):
            storage.read_verified(f"ck/{rel}", e.size, e.xxh3 ^ 1)
        with pytest.raises(Damaged, match=f"^ck/{rel}: size {e.size}, manifest says "
                                          f"{e.size + 1}"):
            storage.read_verified(f"ck/{rel}", e.size + 1, e.xxh3)
    if kind == "local":
        path = tmp_path / "ck" / "a"
        path.write_bytes(path.read_bytes() + b"x")  # one byte too many
        with pytest.raises(Damaged, match=f"size {entries['a'].size + 1}, manifest says"):
            storage.read_verified("ck/a", entries["a"].size, entries["a"].xxh3)


def test_every_read_of_a_restore_is_checked_whole_shard_or_resharded(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    save(storage, 0)
    m = reader.load_manifest(storage, 0)
    whole = reader.read_table(storage, m, "t", ["ids", "values"], 0, 4)
    assert sorted(whole["ids"].tolist()) == [0, 1, 2, 3, 4]
    values = tmp_path / "checkpoint_0" / layout.table_file(0, "t", "values")
    raw = bytearray(values.read_bytes())
    raw[-1] ^= 1
    values.write_bytes(bytes(raw))
    for lo, hi in ((0, 4), (0, 2)):  # the whole shard read once; a part memory-mapped
        with pytest.raises(Damaged, match="table_pserver_0/t.values: checksum xxh3"):
            reader.read_table(storage, m, "t", ["ids", "values"], lo, hi)
    assert reader.read_table(storage, m, "t", ["ids"], 0, 2)["ids"].size  # ids are intact
