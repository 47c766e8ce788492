"""Commits are durable and atomic: every directory that gained an entry is synced before
_SUCCESS, a rollback never picks a checkpoint that rotation is deleting, and a rotation
that fails after _SUCCESS leaves a committed checkpoint (a coordinator in this process, a
store with faults)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckpt import layout, reader, writer
from ckpt.faulty import reset
from ckpt.local import LocalStorage
from ckpt.manifest import merge
from ckpt.storage import Damaged, FileEntry
from pserver.coord.local import standalone
from pserver.errors import Unavailable
from pserver.tables import persist
from pserver.tables.shard import Shard
from tests.helpers import job
from tests.unit.shards import coordinator, save, train


@pytest.fixture(autouse=True)
def fresh_counts() -> Iterator[None]:
    reset()
    yield
    reset()


class Recording(LocalStorage):
    """A local directory that records every write and directory sync, in order."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.events: list[tuple[str, str]] = []

    def write_bytes(self, base: str, rel: str, data: bytes) -> FileEntry:
        self.events.append(("write", f"{base}/{rel}" if base else rel))
        return super().write_bytes(base, rel, data)

    def open_array(self, base: str, rel: str, *args, **kw):  # noqa: ANN002, ANN003, ANN201
        self.events.append(("write", f"{base}/{rel}"))
        return super().open_array(base, rel, *args, **kw)

    def fsync_dir(self, rel: str) -> None:
        self.events.append(("fsync_dir", rel))
        super().fsync_dir(rel)


def test_every_directory_that_gained_an_entry_is_synced_before_success(
        tmp_path: Path) -> None:
    config = job(1, mode="async", num_trainers=2)
    shard = Shard(config, 0)
    train([shard], np.arange(3000, dtype=np.uint64), 0)
    storage = Recording(tmp_path)
    pserver = persist.save_shard(shard, storage, 5)
    dense = {n: v.value for n, v in shard.dense.items()}
    trainers = [writer.write_trainer(storage, 5, j, 0, 3, {"global_step": 3},
                                     dense if j == 0 else None) for j in range(2)]
    manifest = merge(5, persist.job_facts(shard), [pserver, *trainers])
    writer.commit(storage, manifest)
    events = storage.events
    success = events.index(("write", "checkpoint_5/_SUCCESS"))
    paths = [f"checkpoint_5/{p}" for p in manifest.files] + ["checkpoint_5/MANIFEST.json"]
    for path in paths:  # every ancestor directory, checkpoint_dir ("") included
        parts = path.split("/")
        for depth in range(len(parts) - 1, -1, -1):
            directory, child = "/".join(parts[:depth]), "/".join(parts[:depth + 1])
            made = next(i for i, (kind, p) in enumerate(events)
                        if kind == "write" and (p == child or p.startswith(child + "/")))
            synced = [i for i, e in enumerate(events) if e == ("fsync_dir", directory)]
            assert any(made < i < success for i in synced), \
                f"{directory or '.'} gained {child} but was not synced before _SUCCESS"
    assert ("fsync_dir", "checkpoint_5") in events[success:]  # _SUCCESS's own entry
    assert ("fsync_dir", "") in events[success:]


def test_a_failed_rotation_leaves_a_committed_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coord, shard = coordinator(tmp_path, [{"kind": "eio", "op": "remove"}], keep=1)
    try:
        assert save(coord, shard, 1) == 0
        with caplog.at_level(logging.WARNING, logger="pserver.coord.coordinator"):
            assert save(coord, shard, 2) == 1  # committed, though checkpoint_0 stays
        assert "checkpoint_1 is committed; its rotation failed" in caplog.text
        assert reader.newest_complete(LocalStorage(tmp_path)).serial == 1
        assert (tmp_path / "checkpoint_0").exists()
    finally:
        coord.close()


def test_a_rollback_during_a_commit_restores_what_the_commit_leaves(tmp_path: Path) -> None:
    """max_num_checkpoints = 1: the commit of checkpoint_1 deletes checkpoint_0. A rollback
    that comes while _SUCCESS is being written must not pick checkpoint_0."""
    slow = {"kind": "slow", "seconds": 1.0, "op": "write", "path": "checkpoint_1/_SUCCESS"}
    coord, shard = coordinator(tmp_path, [slow], keep=1)
    try:
        assert save(coord, shard, 1) == 0
        serial = coord.barrier(0, 2, 0, 2, False, 5)
        dense = {n: v.value for n, v in shard.dense.items()}
        part = writer.write_trainer(coord.storage, serial, 0, 0, 2, {"global_step": 2}, dense)
        deadline = time.monotonic() + 10
        while ("pserver", 0) not in coord._parts and time.monotonic() < deadline:
            time.sleep(0.01)  # the trainer's part comes last: its thread commits and rotates
        heard: list = []

        def commit() -> None:
            try:
                heard.append(coord.commit(0, serial, part, None, 30))
            except Unavailable as e:  # the rollback came before the trainer was told
                heard.append(e)

        committing = threading.Thread(target=commit)
        committing.start()
        deadline = time.monotonic() + 10
        while len(coord._parts) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # every part is in: the commit holds the lock from here on
        time.sleep(0.2)  # in the middle of writing _SUCCESS
        coord.join_pserver(0, "in-process", "restarted")  # the pserver restarted: roll back
        committing.join(30)
        restore = coord.restore_serial
        assert restore == 1, f"the rollback picked checkpoint_{restore}"
        assert heard and (heard[0] == 1 or "rolling back" in str(heard[0]))
        assert reader.newest_complete(LocalStorage(tmp_path)).serial == 1
        assert not (tmp_path / layout.checkpoint_name(0)).exists()
    finally:
        coord.close()


def test_a_store_away_during_a_rollback_is_never_a_fresh_start(tmp_path: Path) -> None:
    """The checkpoint_dir vanishes (a lost mount) after checkpoint_1 committed: a rollback
    then still restores checkpoint_1, a save fails without making the directory again, and
    once the store is back the job saves on from there."""
    root = tmp_path / "ckpt"
    coord, shard = coordinator(root, [])
    try:
        assert save(coord, shard, 1) == 0 and save(coord, shard, 2) == 1
        away = tmp_path / "away"
        root.rename(away)
        coord.join_pserver(0, "in-process", "restarted")  # roll back while it is away
        assert coord.restore_serial == 1
        coord.ready(0, 1)
        coord.join_trainer(0, 5)
        with pytest.raises(Exception, match="is gone|No such file"):
            save(coord, shard, 3)
        assert not root.exists()  # not made again, nothing written elsewhere
        root.mkdir()  # an empty directory where the old one was (a fresh mount)
        coord.join_pserver(0, "in-process", "again")
        assert coord.restore_serial == 1  # an empty listing is not a fresh start either
        root.rmdir()
        away.rename(root)  # back
        coord.join_pserver(0, "in-process", "back")
        assert coord.restore_serial == 1
        coord.ready(0, 1)
        coord.join_trainer(0, 5)
        assert save(coord, shard, 3) > 1
        assert reader.newest_complete(LocalStorage(root)).serial > 1
    finally:
        coord.close()


def test_an_async_background_save_writes_the_dense_values_of_its_cut(tmp_path: Path) -> None:
    """Async mode, background saves: trainer 1 is released once the shard is copied, and
    pushes at once; trainer 0 pulls the dense values late. The checkpoint must still hold
    the values at the cut, agreeing with the optimizer state and counters written with
    them (trainer 1 waits until trainer 0 has them)."""
    config = job(1, mode="async", num_trainers=2,
                 checkpoint={"checkpoint_dir": str(tmp_path), "background": True},
                 recovery={"heartbeat_s": 0.2, "liveness_timeout_s": 60.0})
    shard = Shard(config, 0)
    coord = standalone(shard, config.checkpoint)
    try:
        joins = [threading.Thread(target=coord.join_trainer, args=(j, 10)) for j in (0, 1)]
        for t in joins:
            t.start()
        for t in joins:
            t.join(10)
        train([shard], np.arange(100, dtype=np.uint64), 0)
        serials: dict[int, int] = {}
        barriers = [threading.Thread(target=lambda j=j: serials.update(
            {j: coord.barrier(j, 1, 0, 1, False, 10)})) for j in (0, 1)]
        for t in barriers:
            t.start()
        for t in barriers:
            t.join(10)
        serial = serials[0]
        cut = {n: v.value.copy() for n, v in shard.dense.items()}
        state = {n: {k: a.copy() for k, a in v.state.items()} for n, v in shard.dense.items()}

        def trainer1() -> None:
            part = writer.write_trainer(coord.storage, serial, 1, 0, 1, {"global_step": 1})
            coord.commit(1, serial, part, None, 30)
            train([shard], np.arange(10, dtype=np.uint64), 1)  # pushes once released

        one = threading.Thread(target=trainer1)
        one.start()
        time.sleep(0.5)  # trainer 0 is slow to pull
        dense = {n: v.value.copy() for n, v in shard.dense.items()}
        part = writer.write_trainer(coord.storage, serial, 0, 0, 1, {"global_step": 1}, dense)
        assert coord.commit(0, serial, part, None, 30) == serial
        one.join(30)
        deadline = time.monotonic() + 30
        while reader.newest_complete(LocalStorage(tmp_path)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        saved = reader.read_all(LocalStorage(tmp_path), reader.load_manifest(
            LocalStorage(tmp_path), serial))
        for n in cut:
            assert saved[f"dense/{n}"]["value"].tobytes() == cut[n].tobytes(), n
            for k, a in state[n].items():
                assert saved[f"dense/{n}"][k].tobytes() == a.tobytes(), (n, k)
        assert any(shard.dense[n].value.tobytes() != cut[n].tobytes() for n in cut)
    finally:
        coord.close()


def test_a_checkpoint_skipped_at_start_is_not_taken_for_the_newest_known(
        tmp_path: Path) -> None:
    """checkpoint_1's trainer file is damaged: the start restores checkpoint_0, and so does a
    rollback (the listing is not taken for an outage that hides checkpoint_1)."""
    coord, shard = coordinator(tmp_path, [])
    assert save(coord, shard, 1) == 0 and save(coord, shard, 2) == 1
    coord.close()
    state = tmp_path / "checkpoint_1" / layout.trainer_file(0, "reader_state")
    state.write_bytes(state.read_bytes().replace(b"2", b"7"))
    again, _ = coordinator(tmp_path, [])
    try:
        assert again.restore_serial == 0 and again.newest_known == 0
        again.join_pserver(0, "in-process", "restarted")
        assert again.restore_serial == 0
    finally:
        again.close()


def test_a_rollback_while_a_committed_checkpoint_is_rotated_keeps_it_committed(
        tmp_path: Path) -> None:
    """Rotation after checkpoint_1's commit is slow; a rollback in that gap settles the
    checkpoint as committed (the trainer hears so), and a repeated part changes nothing."""
    slow = {"kind": "slow", "seconds": 1.0, "op": "remove"}
    coord, shard = coordinator(tmp_path, [slow], keep=1)
    try:
        assert save(coord, shard, 1) == 0  # (nothing to rotate yet)
        serial = coord.barrier(0, 2, 0, 2, False, 5)
        dense = {n: v.value for n, v in shard.dense.items()}
        part = writer.write_trainer(coord.storage, serial, 0, 0, 2, {"global_step": 2}, dense)
        heard: list = []
        committing = threading.Thread(
            target=lambda: heard.append(coord.commit(0, serial, part, None, 30)))
        committing.start()
        deadline = time.monotonic() + 10
        while serial not in coord._decided and time.monotonic() < deadline:
            time.sleep(0.01)
        coord.report_part(0, serial, part, None)  # a repeated part: ignored
        coord.join_pserver(0, "in-process", "restarted")  # in the middle of rotation
        committing.join(30)
        assert heard == [serial] and coord.restore_serial == serial
        assert reader.load_manifest(LocalStorage(tmp_path), serial).serial == serial
        while (tmp_path / "checkpoint_0").exists():  # rotation goes on, and ends
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
    finally:
        coord.close()


def test_a_damaged_base_rolls_the_job_back_once(tmp_path: Path) -> None:
    """A delta chain 0 <- 1 <- 2 whose full checkpoint holds the damaged file: one report
    skips the whole chain (not one rollback per delta)."""
    coord, shard = coordinator(tmp_path, [], full_every=3)
    try:
        train([shard], np.arange(30, dtype=np.uint64), 0)
        for step in (1, 2, 3):  # a full checkpoint, then two deltas over it
            save(coord, shard, step)
        values = tmp_path / "checkpoint_0" / layout.table_file(0, "emb", "values")
        raw = bytearray(values.read_bytes())
        raw[-1] ^= 1
        values.write_bytes(bytes(raw))
        serial = coord.join_pserver(0, "in-process", "restarted")
        assert serial == 2
        with pytest.raises(Damaged, match="^checkpoint_0/") as e:
            persist.load_shard(Shard(shard.config, 0), coord.storage,
                               reader.load_manifest(coord.storage, serial))
        rollbacks = coord.members.rollbacks
        coord.ready(0, serial, coord.generation, damaged=str(e.value))
        assert coord.members.rollbacks == rollbacks + 1 and coord.restore_serial == -1
    finally:
        coord.close()
