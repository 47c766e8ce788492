"""A table's snapshot in process: the rows as they were at the barrier while pushes go on
(its log, reserved and mapped ahead), and background saves (their CPU priority, a save that
cannot begin, a snapshot abandoned by a reload)."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ckpt import writer
from ckpt.local import LocalStorage
from ckpt.manifest import Part
from pserver.tables import persist
from pserver.tables import snapshot as snapshot_mod
from pserver.tables.shard import Shard
from pserver.tables.snapshot import Snapshot
from pserver.tables.sparse import SparseTable
from tests.helpers import job
from tests.unit.shards import shards, train


def read_all(snap: object, first: int, chunk: int, between: object = None) -> dict:
    """Read a snapshot out: `first` rows, then (after `between()`) `chunk` rows at a time."""
    pieces = [{k: v.copy() for k, v in snap.read(first).items()}]
    if between is not None:
        between()
    while snap.done < snap.count:
        pieces.append({k: v.copy() for k, v in
                       snap.read(min(snap.count, snap.done + chunk)).items()})
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def trained_snapshot(rows: int = 3000
                     ) -> tuple[Shard, SparseTable, np.ndarray, dict, Snapshot]:
    """A pserver with `rows` trained rows: its table, the ids, the rows as they are, and
    a full snapshot begun."""
    shard = shards(1)[0]
    table = shard.tables["emb"]
    ids = np.arange(rows, dtype=np.uint64)
    train([shard], ids, 0)
    before = table.export()
    with table.lock:
        table.begin_save(0, None)
        snap = table.begin_snapshot()
    return shard, table, ids, before, snap


def changed_snapshot(rows: int, every: int, delta: bool
                     ) -> tuple[Shard, SparseTable, np.ndarray, dict, np.ndarray | None,
                                Snapshot]:
    """A pserver with `rows` trained rows, saved as checkpoint 0, then every `every`-th
    row (0, every, ...) trained again: its table, the ids, the rows as they are, and
    checkpoint 1's snapshot begun, a delta of checkpoint 0 (its row numbers) or full
    (None)."""
    shard = shards(1)[0]
    table = shard.tables["emb"]
    ids = np.arange(rows, dtype=np.uint64)
    train([shard], ids, 0)
    with table.lock:
        table.begin_save(0, None)
    train([shard], ids[::every], 1)
    before = table.export()
    base = 0 if delta else None
    with table.lock:
        changed = table.begin_save(1, base)
        snap = table.begin_snapshot(changed, base)
    return shard, table, ids, before, changed, snap


def test_a_snapshot_reads_the_rows_as_they_were_while_pushes_change_them() -> None:
    shard, table, ids, before, snap = trained_snapshot()
    with pytest.raises(ValueError, match="writing a snapshot already"):
        table.begin_snapshot()

    def pushes() -> None:  # to rows read already, rows not read yet, rows changed twice,
        changed = np.concatenate([ids[10:20], ids[2000:2010],  # and new rows
                                  np.arange(5000, 5003, dtype=np.uint64)])
        train([shard], changed, 1)
        train([shard], ids[2005:2015], 2)

    got = read_all(snap, 1000, 700, pushes)
    for name, arr in before.items():
        assert got[name].tobytes() == arr.tobytes(), name
    after = table.export()
    assert len(after["ids"]) == 3003 and snap.logged == 15  # 2000..2014 kept once each
    assert not np.array_equal(after["values"][2000:2015], before["values"][2000:2015])
    with table.lock:  # done: the next snapshot may begin
        table.begin_save(1, None)
        table.begin_snapshot().close(locked=True)


@pytest.mark.parametrize("delta", [False, True])
def test_pushes_while_the_rows_are_copied_do_not_reach_the_snapshot(
        monkeypatch: pytest.MonkeyPatch, delta: bool) -> None:
    """The writer copies rows without the table's lock: a push that lands during the copy
    (here: at the start of each column's copy, to rows of the chunk and beyond, so the
    copy sees some new values) is undone from the log under the lock."""
    shard, table, ids, before, rows, snap = changed_snapshot(2000, 2, delta)
    copy, take, seeds = np.copyto, np.take, iter(range(100, 10_000))
    order = rows if delta else np.arange(len(ids))  # position -> row number (= its id here)

    def push_first(real):  # the real copy of a column, after a push to rows being copied
        def copy(*args, **kwargs):  # (np.take copies a column only with out=)
            if not table.lock.locked() and (real is copy_ or "out" in kwargs):
                lo = snap.done
                train([shard], ids[order[lo:lo + 700:3]], next(seeds))
            return real(*args, **kwargs)
        return copy

    copy_ = copy
    monkeypatch.setattr(np, "copyto", push_first(copy))
    monkeypatch.setattr(np, "take", push_first(take))
    got = read_all(snap, 256, 512)
    monkeypatch.undo()
    want = {k: a[rows] if delta else a for k, a in before.items()}
    for name, arr in want.items():
        assert got[name].tobytes() == arr.tobytes(), name
    assert snap.logged > 0
    assert not np.array_equal(table.export()["values"], before["values"])


def test_a_snapshot_read_while_another_thread_pushes_is_the_barriers() -> None:
    shard, table, ids, before, snap = trained_snapshot(60_000)
    stop, pushed, errors = threading.Event(), [], []

    def pushes() -> None:
        rng = np.random.default_rng(7)
        try:
            while not stop.is_set():
                train([shard], np.unique(rng.integers(0, 60_000, 4096)).astype(np.uint64),
                      int(rng.integers(1 << 30)))
                pushed.append(1)
        except Exception as e:  # noqa: BLE001 - failed below
            errors.append(e)

    t = threading.Thread(target=pushes)
    t.start()
    pieces = []
    try:
        while snap.done < snap.count:
            seen = len(pushed)
            pieces.append({k: v.copy() for k, v in
                           snap.read(min(snap.count, snap.done + 2048)).items()})
            while len(pushed) == seen and t.is_alive():  # one push at least, between reads
                time.sleep(0.0005)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    for name, arr in before.items():
        got = np.concatenate([p[name] for p in pieces])
        assert got.tobytes() == arr.tobytes(), name
    assert snap.logged > 0  # pushes did change rows not read yet


def test_a_delta_snapshot_reads_the_changed_rows_as_they_were() -> None:
    shard, table, ids, before, rows, snap = changed_snapshot(3000, 3, delta=True)
    assert np.array_equal(rows, np.arange(0, 3000, 3)) and snap.count == 1000
    assert np.array_equal(snap.ids, ids[::3])
    got = read_all(snap, 300, 128, lambda: train([shard], ids[:2000], 2))
    for name, arr in before.items():
        assert got[name].tobytes() == arr[::3].tobytes(), name
    # rows 900.. of the delta (1..2 of every 3 not in it) were kept: 2000 // 3 - 300
    assert snap.logged == len(range(900, 2000, 3))


def needs_mapping_ahead() -> None:
    """Skip where the kernel cannot map pages ahead (MADV_POPULATE_WRITE)."""
    snapshot_mod._populate(snapshot_mod._aligned_empty((1,), np.dtype(np.uint8)), 0, 1)
    if not snapshot_mod._populating:
        pytest.skip("this kernel cannot map pages ahead (MADV_POPULATE_WRITE)")


def page_faults_of_a_push(populate: bool, monkeypatch: pytest.MonkeyPatch
                          ) -> tuple[int, SparseTable, Snapshot]:
    """Minor page faults of one push of 10,000 rows the snapshot has not read yet (all
    kept in its log), after the writer read the first chunk."""
    monkeypatch.setattr(snapshot_mod, "_populating", populate)
    config = job(1, mode="async", tables={"emb": {"dim": 64, "optimizer": "adagrad"}})
    shard = Shard(config, 0)
    table = shard.tables["emb"]
    ids = np.arange(50_000, dtype=np.uint64)
    grads = np.full((len(ids), 64), 1e-3, dtype=np.float32)
    shard.push("emb", ids, grads)
    with table.lock:
        table.begin_save(0, None)
        snap = table.begin_snapshot()
    snap.read(1000)
    logs = {n: b for n, b in table.kept.spare.items() if n.startswith("@log:")}
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    shard.push("emb", ids[10_000:30_000:2], grads[:10_000])
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
    assert snap.logged == 10_000
    assert all(table.kept.spare[n] is b for n, b in logs.items())  # not grown by the push
    return faults, table, snap


def log_bytes(table: SparseTable, snap: Snapshot, rows: int) -> int:
    """What `allocated_bytes` should be with `rows` rows of each log column in use."""
    logs = [b for n, b in table.kept.spare.items() if n.startswith("@log:")]
    whole = sum(a.nbytes for a in [*table.columns.values(), *table.kept.spare.values(),
                                   *snap.chunk_buffers])
    return whole - sum(b.nbytes for b in logs) + sum(rows * b.strides[0] for b in logs)


def test_the_log_has_room_for_every_row_and_its_pages_are_mapped_before_the_pushes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is reserved at the barrier (no push grows it, copying it under the lock)
    and the writer maps its pages ahead of the pushes that fill them."""
    needs_mapping_ahead()
    pages = 10_000 * 64 * 4 * 2 // 4096  # the kept rows' values and Adagrad accumulators
    unmapped, table, snap = page_faults_of_a_push(False, monkeypatch)
    if unmapped < pages // 2:
        pytest.skip(f"{unmapped} page faults for {pages} pages: huge pages here")
    # the reserved log counts as allocated only as far as rows were written into it
    assert all(len(b) >= snap.count for n, b in table.kept.spare.items() if n.startswith("@log:"))
    assert table.allocated_bytes == log_bytes(table, snap, 10_000)
    snap.close()
    mapped, table, snap = page_faults_of_a_push(True, monkeypatch)
    assert unmapped - mapped > pages // 2, (unmapped, mapped)
    ahead = min(snap.count, snapshot_mod.MAP_AHEAD_BYTES // (64 * 4 * 2))  # mapped at the read
    assert table.allocated_bytes == log_bytes(table, snap, max(ahead, 10_000))
    snap.close()


def test_the_writer_maps_the_log_a_window_ahead_of_the_rows_logged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    needs_mapping_ahead()
    monkeypatch.setattr(snapshot_mod, "MAP_AHEAD_BYTES", 100 * 8 * 4 * 2)  # 100 rows
    shard, table, ids, _, snap = trained_snapshot()
    snap.read(10)
    logs = [n for n in table.kept.spare if n.startswith("@log:")]
    assert {table.kept.mapped[n] for n in logs} == {100} and table.kept.mapped["@slot"] == 3000
    assert table.allocated_bytes == log_bytes(table, snap, 100)
    train([shard], ids[1000:1300], 1)  # 300 rows kept: written by the push
    assert {table.kept.mapped[n] for n in logs} == {300}
    snap.read(20)
    assert {table.kept.mapped[n] for n in logs} == {400}
    assert table.allocated_bytes == log_bytes(table, snap, 400)
    snap.close()


def test_the_writer_maps_every_tables_log_before_it_writes_the_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables are written one after another: pushes to the later ones find their logs
    mapped all the same."""
    needs_mapping_ahead()
    config = job(1, mode="async", tables={"a": {"dim": 8}, "c": {"dim": 8}})
    shard = Shard(config, 0)
    for name in ("a", "c"):
        shard.push(name, np.arange(1000, dtype=np.uint64), np.ones((1000, 8), np.float32))
    staged = persist._begin(shard, 0, None, "snapshot")
    seen = {}
    real = writer.write_shard

    def write_shard(*args: object, **kwargs: object) -> Part:
        seen.update({(n, k): t.kept.mapped.get(k, 0) for n, t in shard.tables.items()
                     for k in t.kept.spare if k.startswith("@log:")})
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "write_shard", write_shard)
    persist._write(shard, staged, LocalStorage(tmp_path), 0, time.perf_counter(), None)
    assert len(seen) == 4 and set(seen.values()) == {1000}, seen  # 2 tables x 2 columns


def test_a_log_that_cannot_be_reserved_grows_with_the_pushes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the system refuses the address space for the whole log at the barrier, the
    pushes grow it as they go, and the snapshot is still the barrier's rows."""
    real = snapshot_mod._aligned_empty

    def refuse(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if len(shape) > 1 and shape[0] >= 3000:  # the log, sized for the whole snapshot
            raise OSError(12, "Cannot allocate memory")
        return real(shape, dtype)

    monkeypatch.setattr(snapshot_mod, "_aligned_empty", refuse)
    shard, table, ids, before, snap = trained_snapshot()
    assert not snap._reserved

    def pushes() -> None:  # the second push grows the log, keeping the first one's rows
        train([shard], ids[1000:1600], 1)
        train([shard], ids[1600:2500], 2)
        assert table.allocated_bytes == log_bytes(table, snap, 1500)

    got = read_all(snap, 500, 700, pushes)
    for name, arr in before.items():
        assert got[name].tobytes() == arr.tobytes(), name
    assert snap.logged == 1500


def test_a_failed_save_stops_its_snapshot_and_a_reload_abandons_one() -> None:
    shard, table, ids, _, snap = trained_snapshot(100)
    snap.read(10)
    snap.close()  # what a failed save does: pushes keep nothing now
    train([shard], ids, 1)
    assert snap.logged == 0
    with table.lock:
        table.begin_save(1, None)
        snap = table.begin_snapshot()
    table.load(table.export())
    with pytest.raises(RuntimeError, match="abandoned"):
        snap.read(10)


def _can_idle() -> bool:
    """Whether a thread may enter SCHED_IDLE here (Linux with glibc; musl refuses)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    ok: list = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            ok.append(os.sched_getscheduler(0) == os.SCHED_IDLE)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return ok[0]


@pytest.mark.skipif(not _can_idle(), reason="no SCHED_IDLE for threads here")
@pytest.mark.parametrize("priority,idle,nice", [("idle", True, 19), ("low", False, 19),
                                               ("normal", False, None)])
def test_a_background_save_writes_at_its_cpu_priority(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        priority: str, idle: bool, nice: int | None) -> None:
    """The writing thread runs at the key's priority (seen from inside it); the thread
    serving the save and the one reporting the part (it opens gRPC channels, whose
    threads would inherit a low priority) do not; a long save logs how far it is (here:
    after every chunk)."""
    monkeypatch.setattr(persist, "PROGRESS_S", 0.0)
    monkeypatch.setattr(writer, "CHUNK_ROWS", 700)
    storage = LocalStorage(tmp_path)
    live = shards(1)
    train(live, np.arange(2000, dtype=np.uint64), 0)

    def now() -> tuple[int, int]:
        return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS,
                                                        threading.get_native_id())

    own, seen, done = now(), [], []
    real_write = persist._write

    def write(*args: object, **kwargs: object) -> object:
        seen.append(now())
        return real_write(*args, **kwargs)

    monkeypatch.setattr(persist, "_write", write)
    with caplog.at_level(logging.INFO, logger="pserver.tables.persist"):
        persist.save_shard_background(live[0], storage, 0,
                                      lambda part, err: done.append((part, err, now())),
                                      priority=priority)
        deadline = time.monotonic() + 60
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
    assert done, "the background save did not end within 60 s"
    part, err, reporting = done[0]
    assert err is None and part.facts["rows"]["emb"] == 2000
    assert seen == [(os.SCHED_IDLE if idle else own[0],
                     own[1] if nice is None else max(nice, own[1]))]
    assert now() == own and reporting == own
    shown = [r.getMessage() for r in caplog.records if "writing checkpoint_0:" in r.getMessage()]
    assert [m.split(": ")[1].split(" (")[0] for m in shown] == [
        "700 of 2000 rows", "1400 of 2000 rows", "2000 of 2000 rows"]


def test_a_background_save_that_cannot_begin_changes_nothing(tmp_path: Path) -> None:
    """A bad priority, or a store that cannot be reached, fails the save before the
    snapshot: pushes keep nothing aside afterwards."""
    live = shards(1)
    table = live[0].tables["emb"]
    train(live, np.arange(100, dtype=np.uint64), 0)

    class Unreachable(LocalStorage):
        def connect(self) -> None:
            raise ValueError("checkpoint_dir 's3://b/ck': cannot connect")

    with pytest.raises(ValueError, match="expected one of idle, low, normal, got 'high'"):
        persist.save_shard_background(live[0], LocalStorage(tmp_path), 0,
                                      lambda *a: None, priority="high")
    with pytest.raises(ValueError, match="cannot connect"):
        persist.save_shard_background(live[0], Unreachable(tmp_path), 0, lambda *a: None)
    assert table.writing is None
    with table.lock:  # a save may begin
        table.begin_save(0, None)
        table.begin_snapshot().close(locked=True)


def test_a_snapshot_abandoned_by_a_reload_keeps_its_own_buffers() -> None:
    """A reload abandons a snapshot whose writer may still be copying: the next snapshot
    reads into other buffers, and the abandoned one fails at its next read."""
    _, table, _, _, old = trained_snapshot()
    stale = old.read(1000)["values"]
    table.load(table.export())
    with table.lock:
        table.begin_save(1, None)
        new = table.begin_snapshot()
    assert not np.shares_memory(stale, new.read(1000)["values"])
    with pytest.raises(RuntimeError, match="abandoned"):
        old.read(2000)
    old.close()  # its buffers go back for later snapshots; the new one goes on
    got = read_all(new, 1700, 700)  # positions 1000.. (the first 1000 are read above)
    assert np.array_equal(got["values"], table.export()["values"][1000:])
