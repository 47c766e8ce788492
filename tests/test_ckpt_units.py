"""ckpt on its own: names, rotation, the lock, and reading a directory with other things in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ckpt import CheckpointConfig, layout, lock, reader, retention, writer
from ckpt.config import from_section
from ckpt.manifest import merge
from ckpt.storage import LocalStorage

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
                                         ("step_interval", 1.5), ("checkpoint_dir", "")])
def test_config_names_the_bad_field(field: str, value: object) -> None:
    args = {"checkpoint_dir": "d", field: value}
    with pytest.raises(ValueError, match=f"^{field}: "):
        CheckpointConfig(**args)
    with pytest.raises(ValueError, match=f"^checkpoint.{field}: "):
        from_section(args)
    with pytest.raises(ValueError, match="^checkpoint.colour: unknown key"):
        from_section({"colour": 1})


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
