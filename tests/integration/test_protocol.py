"""The checkpoint protocol under random faults (hypothesis' stateful testing): a coordinator
and its pserver's shard in this process, on a local checkpoint_dir, driven through random
training, saves, restarts (rollbacks), store outages (the directory moved away and back,
as a lost mount), damaged files and second runs. After every step: what a restore loads is
exactly some committed checkpoint, the newest complete one reachable; the newest committed
checkpoint is never deleted; no second run ever takes the lock."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ckpt import layout, lock, reader
from ckpt.local import LocalStorage
from ckpt.storage import Damaged
from pserver.config import JobConfig
from pserver.coord.coordinator import Coordinator
from pserver.tables import persist
from pserver.tables.shard import Shard
from tests.helpers import job
from tests.unit.shards import save, train


def state_of(shard: Shard) -> dict[str, bytes]:
    """Every row (by id) and dense value of a shard, as bytes."""
    out = {}
    for name, t in shard.tables.items():
        rows = t.export()
        order = np.argsort(rows["ids"])
        out.update({f"{name}/{k}": np.asarray(v)[order].tobytes() for k, v in rows.items()})
    for name, d in shard.dense.items():
        out[f"dense/{name}"] = d.value.tobytes()
        out.update({f"dense/{name}/{k}": a.tobytes() for k, a in d.state.items()})
    return out


def coordinator_config(root: Path, run: str = "run-a") -> JobConfig:
    config = job(1, mode="async", checkpoint={"checkpoint_dir": str(root),
                                             "max_num_checkpoints": 2},
                 recovery={"heartbeat_s": 0.2, "liveness_timeout_s": 60.0})
    return dataclasses.replace(config, run_id=run)


class Protocol(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="psrt-protocol-"))
        self.root, self.away = self.tmp / "ckpt", self.tmp / "away"
        config = coordinator_config(self.root)
        self.shard = Shard(config, 0)
        self.coord = Coordinator(config, config.checkpoint, persist.job_facts(self.shard),
                                 lambda _p, serial, base: persist.save_shard(
                                     self.shard, self.coord.storage, serial,
                                     base if base >= 0 else None), watch=False)
        self.coord.join_pserver(0, "in-process", "i0")
        self.coord.ready(0, -1)
        self.coord.join_trainer(0, 5)
        self.committed: dict[int, dict[str, bytes]] = {}  # serial -> the state it holds
        self.steps: dict[int, int] = {}
        self.damaged: set[int] = set()
        self.step, self.incarnation, self.pending = 0, 0, False

    def teardown(self) -> None:
        self.coord.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def reachable(self) -> bool:
        return self.root.exists()

    def restart(self) -> int:
        """A restart of the pserver: the job rolls back; returns the serial to restore."""
        self.incarnation += 1
        self.coord.join_pserver(0, "in-process", f"i{self.incarnation}")
        return self.coord.restore_serial

    def restore(self) -> None:
        """Load what the coordinator names (falling back past damaged files, as a pserver
        does), check it, and run again."""
        serial = self.coord.restore_serial
        for _ in range(len(self.committed) + 2):  # each damaged checkpoint once at most
            shard = Shard(self.shard.config, 0)
            if serial < 0:
                break
            try:
                persist.load_shard(shard, self.coord.storage,
                                   reader.load_manifest(self.coord.storage, serial))
                break
            except Damaged as e:
                assert serial in self.damaged, e
                self.coord.ready(0, serial, self.coord.generation, damaged=str(e))
                serial = self.coord.restore_serial
        else:
            raise AssertionError(f"the job keeps restoring damaged checkpoints ({serial})")
        on_disk = {s for s in self.committed
                   if (self.root / layout.checkpoint_name(s) / layout.SUCCESS).exists()}
        expected = max(on_disk - self.damaged, default=-1)
        assert serial == expected, f"restored checkpoint_{serial}, expected {expected}"
        if serial >= 0:
            assert state_of(shard) == self.committed[serial], f"checkpoint_{serial} differs"
        self.shard = shard  # what the coordinator saves from now on
        self.coord.ready(0, serial)
        self.coord.join_trainer(0, 5)
        self.step = self.steps[serial] if serial >= 0 else 0
        self.pending = False

    @precondition(lambda self: not self.pending)
    @rule(seed=st.integers(0, 2**16))
    def train(self, seed: int) -> None:
        train([self.shard], np.arange(seed % 50, seed % 50 + 20, dtype=np.uint64), seed)

    @precondition(lambda self: not self.pending)
    @rule()
    def checkpoint(self) -> None:
        self.step += 1
        before = state_of(self.shard)
        if not self.reachable:
            with pytest.raises(OSError):  # the trainer cannot write its part either
                save(self.coord, self.shard, self.step)
            self.rollback()  # it gives up its step: the job rolls back
            return
        serial = save(self.coord, self.shard, self.step)
        assert serial not in self.committed
        self.committed[serial], self.steps[serial] = before, self.step

    @precondition(lambda self: not self.pending)
    @rule()
    def kill(self) -> None:
        self.rollback()

    def rollback(self) -> None:
        serial = self.restart()
        if not self.reachable:  # never a fresh start (nor older) while the store is away
            known = max((s for s in self.committed if s not in self.damaged), default=-1)
            assert serial >= known, f"restores checkpoint_{serial} in an outage"
            self.pending = True
            return
        self.restore()

    @precondition(lambda self: self.reachable)
    @rule()
    def outage(self) -> None:
        self.root.rename(self.away)

    @precondition(lambda self: not self.reachable)
    @rule()
    def back(self) -> None:
        self.away.rename(self.root)
        if self.pending:
            self.restart()
            self.restore()

    @precondition(lambda self: self.reachable and self.committed and not self.pending)
    @rule(then_restart=st.booleans())
    def damage(self, then_restart: bool) -> None:
        newest = max(self.committed)
        if newest in self.damaged:
            return  # (a second flip would mend it)
        path = self.root / layout.checkpoint_name(newest) / layout.table_file(0, "emb",
                                                                         "vshards")
        if not path.exists():
            return
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x10
        path.write_bytes(bytes(raw))
        self.damaged.add(newest)
        if then_restart:
            self.rollback()

    @precondition(lambda self: self.reachable)
    @rule()
    def second_run(self) -> None:
        with pytest.raises(lock.LockedError, match="another run of this job"):
            Coordinator(coordinator_config(self.root, "run-b"), self.coord.ckpt, {},
                        lambda *_: None, watch=False)

    @invariant()
    def newest_commit_is_kept(self) -> None:
        if self.committed and hasattr(self, "root"):
            where = self.root if self.reachable else self.away
            newest = max(self.committed)
            assert (where / layout.checkpoint_name(newest) / layout.SUCCESS).exists()
            assert lock.holder(LocalStorage(where))["run"] == "run-a"


Protocol.TestCase.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow])
test_protocol = Protocol.TestCase
