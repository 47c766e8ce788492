"""Incremental checkpoints in process: deltas hold the changed rows, chains restore like a
full checkpoint (onto any number of pservers), rotation keeps bases, broken chains fall back."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ckpt import CheckpointConfig, reader, retention, writer
from ckpt import __main__ as ckpt_cli
from ckpt.backends import open_storage
from ckpt.local import LocalStorage
from ckpt.manifest import Part, merge
from ckpt.storage import HEADER_ALIGN
from pserver.config import build as build_job
from pserver.coord.coordinator import CheckpointFailed, Coordinator
from pserver.errors import FailedPrecondition
from pserver.tables import persist
from pserver.tables.shard import Shard
from tests.helpers import job
from tests.unit.shards import shards, train

ROWS = 2000


def save(storage: LocalStorage, group: list[Shard], serial: int, base: int = -1,
         commit: bool = True) -> None:
    parts = [persist.save_shard(s, storage, serial, None if base < 0 else base) for s in group]
    dense = {n: v.value for s in group for n, v in s.dense.items()}  # trainer 0 writes these
    parts.append(writer.write_trainer(storage, serial, 0, 0, serial, {"global_step": serial},
                                      dense))
    if commit:
        writer.commit(storage, merge(serial, persist.job_facts(group[0]), parts, base=base))


def restored(storage: LocalStorage, serial: int, num_pservers: int) -> dict:
    group = shards(num_pservers)
    for s in group:
        persist.load_shard(s, storage, reader.load_manifest(storage, serial))
    return state(group)


def state(group: list[Shard]) -> dict:
    rows = [s.tables["emb"].export() for s in group]
    merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    order = np.argsort(merged["ids"])
    out = {f"emb.{k}": v[order] for k, v in merged.items()}
    for s in group:
        for name, var in s.dense.items():
            out[f"{name}.value"] = var.value
            out.update({f"{name}.{k}": a for k, a in var.state.items()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_delta_chain_restores_bit_identical_to_a_full_checkpoint(tmp_path: Path,
                                                                  where: str) -> None:
    storage = LocalStorage(tmp_path) if where == "local" else \
        open_storage(f"memory://incr-{tmp_path.name}")
    live = shards(2)
    ids = np.arange(ROWS, dtype=np.uint64) * np.uint64(7919)
    train(live, ids, 0)
    save(storage, live, 0)
    train(live, ids[:20], 1)  # 1% of the rows
    save(storage, live, 1, base=0)
    m1 = reader.load_manifest(storage, 1)
    assert (m1.kind, m1.base) == ("delta", 0)
    assert sum(m1.pservers[p]["rows"]["emb"] for p in ("0", "1")) == 20
    # a save that is never committed: its rows must still be in the next delta of 1
    train(live, ids[100:110], 2)
    save(storage, live, 2, base=1, commit=False)
    extra = np.arange(ROWS, ROWS + 5, dtype=np.uint64)  # rows created since
    train(live, np.concatenate([ids[200:203], extra]), 3)
    save(storage, live, 3, base=1)
    m3 = reader.load_manifest(storage, 3)
    assert sum(m3.pservers[p]["rows"]["emb"] for p in ("0", "1")) == 10 + 3 + 5
    save(storage, live, 4)  # the same state, full
    def values_bytes(m: object) -> int:  # the rows' bytes, without the .npy headers
        return sum(f["size"] - HEADER_ALIGN for rel, f in m.files.items()
                   if rel.endswith("emb.values"))

    assert values_bytes(m3) < values_bytes(reader.load_manifest(storage, 4)) / 50
    assert [m.serial for m in reader.chain(storage, m3)] == [0, 1, 3]
    full = restored(storage, 4, 2)
    assert_same(full, state(live))
    for p in (2, 3, 1):  # and onto another number of pservers
        assert_same(restored(storage, 3, p), full)
    a, b = reader.read_all(storage, m3), reader.read_all(storage, reader.load_manifest(storage, 4))
    assert a.keys() == b.keys()
    for k in a:
        for name in a[k]:
            assert a[k][name].tobytes() == b[k][name].tobytes(), f"{k}/{name}"


def test_a_restored_chain_is_the_base_of_the_next_delta(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    live = shards(1)
    ids = np.arange(500, dtype=np.uint64)
    train(live, ids, 0)
    save(storage, live, 0)
    train(live, ids[:5], 1)
    save(storage, live, 1, base=0)
    again = shards(1)
    persist.load_shard(again[0], storage, reader.load_manifest(storage, 1))
    with pytest.raises(FailedPrecondition, match="did not save or restore it"):
        persist.save_shard(again[0], storage, 2, base=0)  # 0 is not what it restored
    train(again, ids[7:9], 2)
    save(storage, again, 3, base=1)
    assert sum(reader.load_manifest(storage, 3).pservers["0"]["rows"].values()) == 2


def test_rotation_keeps_the_bases_that_kept_deltas_need(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    live = shards(1)
    train(live, np.arange(50, dtype=np.uint64), 0)
    cfg = CheckpointConfig("d", full_every=3)
    last, deltas = -1, 0
    survivors = []
    for serial in range(8):
        base = cfg.next_base(last, deltas)
        save(storage, live, serial, base)
        last, deltas = serial, (deltas + 1 if base >= 0 else 0)
        retention.rotate(storage, 2)
        survivors.append([e.serial for e in reader.entries(storage)])
    # full 0, deltas 1 2, full 3, deltas 4 5, full 6, delta 7
    assert survivors[1] == [0, 1] and survivors[2] == [0, 1, 2]
    assert survivors[4] == [3, 4] and survivors[5] == [3, 4, 5] and survivors[7] == [6, 7]
    assert survivors[3] == [0, 1, 2, 3]  # 2 is kept and needs 1 and 0


def test_a_broken_chain_falls_back_to_an_older_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    storage = LocalStorage(tmp_path)
    live = shards(1)
    train(live, np.arange(50, dtype=np.uint64), 0)
    for serial, base in ((0, -1), (1, 0), (2, 1), (3, 2)):
        save(storage, live, serial, base)
    values = tmp_path / "checkpoint_2" / "__lockup_table__" / "table_pserver_0" / "emb.values"
    raw = bytearray(values.read_bytes())
    raw[-1] ^= 1
    values.write_bytes(bytes(raw))  # a damaged link: 3 needs 2
    with caplog.at_level(logging.WARNING):
        assert reader.newest_complete(storage).serial == 1
    assert "checkpoint_3 is a delta of checkpoint_2, which does not count" in caplog.text
    shutil.rmtree(tmp_path / "checkpoint_0")  # a missing root: nothing restores
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert reader.newest_complete(storage) is None
    assert "checkpoint_1 is a delta of checkpoint_0, which is missing" in caplog.text
    with pytest.raises(ValueError, match="which is missing"):
        reader.read_all(storage, reader.load_manifest(storage, 1))
    capsys.readouterr()
    assert ckpt_cli.main(["ls", str(tmp_path)]) == 0
    assert "not restorable: checkpoint_1 is a delta of checkpoint_0, which is missing" in \
        capsys.readouterr().out
    assert ckpt_cli.main(["verify", str(tmp_path), "1"]) == 1
    assert "checkpoint_1: DAMAGED" in capsys.readouterr().out


def test_a_part_of_the_wrong_kind_is_not_committed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    live = shards(1)
    train(live, np.arange(10, dtype=np.uint64), 0)
    part = persist.save_shard(live[0], storage, 0)
    with pytest.raises(ValueError, match="pserver 0 wrote a full part"):
        merge(0, persist.job_facts(live[0]), [part], base=3)
    assert Part.from_json(part.to_json()).facts["kind"] == "full"


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "3"])
def test_full_every_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(ValueError, match=f"^full_every: expected an integer >= 1, got {value!r}"):
        CheckpointConfig("d", full_every=value)
    with pytest.raises(ValueError, match="^checkpoint.full_every: expected an integer >= 1"):
        build_job({"checkpoint": {"checkpoint_dir": "d", "full_every": value}})


def test_every_kth_save_is_full() -> None:
    cfg = CheckpointConfig("d", full_every=3)
    last, deltas, kinds = -1, 0, []
    for serial in range(7):
        base = cfg.next_base(last, deltas)
        kinds.append(base)
        last, deltas = serial, (deltas + 1 if base >= 0 else 0)
    assert kinds == [-1, 0, 1, -1, 3, 4, -1]
    assert CheckpointConfig("d").next_base(5, 0) == -1  # the default: always full


def test_a_pserver_that_cannot_write_the_delta_makes_the_next_save_full(
        tmp_path: Path) -> None:
    config = job(1, checkpoint={"checkpoint_dir": str(tmp_path), "full_every": 5})
    current = [Shard(config, 0)]
    storage = LocalStorage(tmp_path)

    def save_shard(_pserver: int, serial: int, base: int) -> Part:
        return persist.save_shard(current[0], storage, serial, base if base >= 0 else None)

    coord = Coordinator(config, config.checkpoint, persist.job_facts(current[0]), save_shard)
    coord.join_pserver(0, "in-process")
    coord.ready(0, -1)
    coord.join_trainer(0, 5)

    def save(step: int) -> int:
        serial = coord.barrier(0, step, 0, step, False, 5)
        dense = {n: v.value for n, v in current[0].dense.items()}
        part = writer.write_trainer(storage, serial, 0, 0, step, {"global_step": step}, dense)
        return coord.commit(0, serial, part, None, 5)

    assert save(1) == 0
    current[0] = Shard(config, 0)  # a pserver that never saw checkpoint_0
    with pytest.raises(CheckpointFailed, match="cannot write a delta of checkpoint_0"):
        save(2)
    assert save(3) == 2 and reader.load_manifest(storage, 2).kind == "full"
    assert save(4) == 3 and reader.load_manifest(storage, 3).base == 2


@pytest.mark.parametrize("changed", [20, 1200])  # gathered at once / copied on write
def test_a_background_delta_holds_the_rows_at_the_barrier(tmp_path: Path,
                                                          changed: int) -> None:
    storage = LocalStorage(tmp_path)
    live = shards(1)
    ids = np.arange(2000, dtype=np.uint64)
    train(live, ids, 0)
    save(storage, live, 0)
    train(live, ids[:changed], 1)
    expected = state(live)
    done: list = []
    persist.save_shard_background(live[0], storage, 1, lambda part, err: done.append(
        (part, err)), base=0)
    train(live, ids[::3], 2)  # pushes while the delta is copied and written
    deadline = time.monotonic() + 30
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    part, err = done[0]
    assert err is None and part.facts["rows"]["emb"] == changed
    dense = {n: expected[f"{n}.value"] for n in live[0].dense}
    trainer = writer.write_trainer(storage, 1, 0, 0, 1, {"global_step": 1}, dense)
    writer.commit(storage, merge(1, persist.job_facts(live[0]), [part, trainer], base=0))
    got = restored(storage, 1, 1)
    for k in expected:
        if k.startswith("emb."):
            assert got[k].tobytes() == expected[k].tobytes(), k
