"""Recovery rules on in-process pservers: generations fence old calls, heartbeats of
strangers are refused, a pserver that rejoins rolls the job back.

The same rules with real processes (the launcher heals, status shows it, a lost role fails
the job) are in tests/e2e/test_recovery.py; the SIGKILL matrix in tests/e2e/test_checkpoint.py.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pserver import config as cfg
from pserver.errors import FailedPrecondition, InvalidArgument, Unavailable
from pserver.rpc.client import PSClient
from pserver.rpc.coord import CoordinatorClient
from tests.helpers import job

FAST = {"heartbeat_s": 0.2, "liveness_timeout_s": 1.5}


def ckpt_job(tmp_path: Path, **recovery: float) -> cfg.JobConfig:
    return job(2, num_trainers=2, checkpoint={"checkpoint_dir": str(tmp_path / "ck")},
               recovery={**FAST, **recovery})


# ---- generations fence old calls ----------------------------------------------

def test_a_call_from_another_generation_is_refused_and_changes_nothing(
        tmp_path: Path, cluster_factory) -> None:  # noqa: ANN001
    cluster = cluster_factory(ckpt_job(tmp_path, liveness_timeout_s=60))
    gen = cluster.servers[0].coordinator.generation
    ids = np.arange(1, 40, dtype=np.uint64)
    client = PSClient(cluster.config)
    try:
        client.set_generation(gen)
        before = client.pull("emb", ids)
        rows = [len(s.shard.tables["emb"]) for s in cluster.servers]
        client.set_generation(gen - 1)
        new = np.arange(100, 140, dtype=np.uint64)  # a push of them would create rows
        for push_ids in (ids, new):
            with pytest.raises(FailedPrecondition, match=rf"generation {gen - 1}, "
                                                         rf"pserver\[\d\] serves generation {gen}"):
                client.push("emb", push_ids, np.ones((len(push_ids), 8), np.float32))
        assert [len(s.shard.tables["emb"]) for s in cluster.servers] == rows  # none created
        client.set_generation(gen)
        assert client.pull("emb", ids).tobytes() == before.tobytes()  # nothing was applied
    finally:
        client.close()


def test_heartbeats_of_strangers_and_bad_ids_are_refused(tmp_path: Path,
                                                         cluster_factory) -> None:  # noqa: ANN001
    cluster = cluster_factory(ckpt_job(tmp_path))
    coord = CoordinatorClient(cluster.config)
    try:
        with pytest.raises(FailedPrecondition, match=r"trainer\[0\].*has not joined this "
                                                     r"coordinator; join again"):
            coord.heartbeat("trainer", 0, "stranger")
        with pytest.raises(InvalidArgument, match=r"trainer id 7 is out of range 0..1"):
            coord.heartbeat("trainer", 7, "x")
        with pytest.raises(InvalidArgument, match=r"role must be 'pserver' or 'trainer'"):
            coord.heartbeat("worker", 0, "x")
        state = coord.describe()
        assert not state["running"] and state["rollbacks"] == 0  # refusals changed nothing
        assert set(state["members"]) == {"pserver[0]", "pserver[1]"}
    finally:
        coord.close()


def test_a_pserver_that_rejoins_rolls_the_job_back_and_fences_waiting_calls(
        tmp_path: Path, cluster_factory) -> None:  # noqa: ANN001
    cluster = cluster_factory(ckpt_job(tmp_path, liveness_timeout_s=60))
    c = cluster.servers[0].coordinator
    gen = c.generation
    # trainers join: the job runs at `gen`
    coords = [CoordinatorClient(cluster.config) for _ in range(2)]

    joined = []
    threads = [threading.Thread(target=lambda j=j: joined.append(
        coords[j].join_trainer(j, 10, f"t{j}"))) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert joined == [-1, -1] and c.members.running
    client = PSClient(cluster.config, 0)
    client.set_generation(gen)
    ids = np.arange(5, dtype=np.uint64)
    client.pull("emb", ids, step=0)
    # trainer 0 pushes step 0 and waits for trainer 1, which never comes: a pull at step 1
    # blocks; pserver 1 restarting rolls the job back and that pull fails at once
    client.push("emb", ids, np.ones((5, 8), np.float32), step=0)
    failed: list[Exception] = []

    def pull() -> None:
        try:
            client.pull("emb", ids, step=1)
        except (Unavailable, FailedPrecondition) as e:
            failed.append(e)

    waiting = threading.Thread(target=pull)
    waiting.start()
    time.sleep(0.5)  # the pull is now blocked on step 0, which trainer 1 never pushes
    started = time.monotonic()
    c.join_pserver(1, cluster.config.pservers[1], "a new incarnation")
    assert c.generation == gen + 1 and not c.members.running
    waiting.join(20)
    assert failed and re.search(r"rolling back|rolled back|restoring", str(failed[0])), failed
    assert time.monotonic() - started < 10  # released at once, not after the 60 s deadline
    for x in coords:
        x.close()
    client.close()
