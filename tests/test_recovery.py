"""Recovery without a human: generations, heartbeats, liveness, rollback, status, chaos.

The SIGKILL matrix (a process killed at a step or in a save, healed by the launcher,
ending bit-identical) is in test_checkpoint.py; here the rules around it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pserver import config as cfg
from pserver.errors import FailedPrecondition, InvalidArgument, Unavailable
from pserver.rpc.client import PSClient
from pserver.rpc.coord import CoordinatorClient
from tests.conftest import ROOT, generated_data, job, python_env, wait_file
from tests.test_checkpoint import write_job

FAST = {"heartbeat_s": 0.2, "liveness_timeout_s": 1.5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "recdata", 3000, seed=5)


def ckpt_job(tmp_path: Path, **recovery: float) -> cfg.JobConfig:
    return job(2, num_trainers=2, checkpoint={"checkpoint_dir": str(tmp_path / "ck")},
               recovery={**FAST, **recovery})


# ---- config -----------------------------------------------------------------

@pytest.mark.parametrize("recovery,message", [
    ({"heartbeat_s": 0}, "recovery.heartbeat_s: must be > 0"),
    ({"liveness_timeout_s": 1.0}, "recovery.liveness_timeout_s: must be over twice"),
    ({"rejoin_timeout_s": -1}, "recovery.rejoin_timeout_s: must be > 0"),
    ({"max_restarts": -1}, "recovery.max_restarts: must be >= 0"),
    ({"max_restarts": "many"}, "recovery.max_restarts: expected int"),
    ({"heartbeats": 1}, "recovery.heartbeats: unknown key"),
])
def test_bad_recovery_keys_are_refused_naming_them(recovery: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        job(1, recovery=recovery)


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


# ---- the launcher heals, status shows it, a lost role fails the job -----------

def _launch(job_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "launch", "--config",
                             str(job_path)], cwd=job_path.parent, env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_status_lists_trainers_and_generation_while_a_job_runs(data_dir: Path,
                                                               tmp_path: Path) -> None:
    job_path = write_job(data_dir, tmp_path, tmp_path / "ck", epochs=30)
    p = _launch(job_path)
    try:
        for line in p.stdout:
            if "trainer[1] epoch 0 step 3/" in line:
                break
        addrs = [(tmp_path / f"pserver{i}.ready").read_text().strip() for i in range(2)]
        bound = "job.pservers=[" + ",".join(f'"{a}"' for a in addrs) + "]"
        r = subprocess.run([sys.executable, "-m", "pserver", "status", "--config",
                            str(job_path), "--set", bound], env=python_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith(("p", "t"))}
        assert "SERVING" in rows["pserver[0]"] and "SERVING" in rows["pserver[1]"]
        assert "ALIVE" in rows["trainer[0]"] and "ALIVE" in rows["trainer[1]"]
        assert re.search(r"job: generation \d+, running, 0 rollbacks", r.stdout)
        pids = json.loads((tmp_path / "pids.json").read_text())
        os.kill(pids["trainer[1]"], signal.SIGKILL)
    finally:
        p.kill()
        p.communicate()


def test_a_role_that_does_not_come_back_fails_the_job_naming_it(data_dir: Path,
                                                                tmp_path: Path) -> None:
    """Without a launcher to restart it, a killed trainer is noticed within the liveness
    timeout and, once the rejoin deadline passes, every other process exits naming it."""
    job_path = write_job(data_dir, tmp_path, tmp_path / "ck", epochs=50,
                         recovery={"rejoin_timeout_s": 3.0})
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")  # files: nobody reads a pipe meanwhile
        procs.append(subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=python_env(),
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
        return procs[-1]

    try:
        addrs: list[str] = []
        for i in range(2):
            ready = tmp_path / f"ready{i}"
            known = f'job.pservers=["{addrs[0] if addrs else "127.0.0.1:0"}","127.0.0.1:0"]'
            p = start(f"pserver{i}", "-m", "pserver", "--id", str(i), "--config",
                      str(job_path), "--port", "0", "--ready-file", str(ready), "--set", known)
            addrs.append(wait_file(ready, p))
        bound = "job.pservers=[" + ",".join(f'"{a}"' for a in addrs) + "]"
        trainers = [start(f"trainer{j}", "-m", "trainer", "--id", str(j), "--config",
                          str(job_path), "--set", bound) for j in range(2)]
        deadline = time.monotonic() + 120
        while "epoch 0 step 3/" not in (tmp_path / "trainer0.log").read_text():
            assert time.monotonic() < deadline and trainers[0].poll() is None
            time.sleep(0.1)
        trainers[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for p in (trainers[0], *procs[:2]):
            p.wait(90)
        assert time.monotonic() - killed < 60
        logs = {n: (tmp_path / f"{n}.log").read_text() for n in ("trainer0", "pserver0",
                                                                 "pserver1")}
        for name, text in logs.items():  # every other process stops, saying why
            assert "trainer[1] did not come back within 3s (recovery.rejoin_timeout_s); the " \
                   "job has failed" in text, (name, text[-2000:])
        assert trainers[0].returncode == 3 and procs[0].returncode == 3 \
            and procs[1].returncode == 3  # JOB_FAILED: a launcher does not restart these
        # the coordinator noticed the silence within the liveness timeout (1.5 s, with
        # heartbeats every 0.2 s), before the rejoin deadline
        silent = re.search(r"trainer\[1\] sent no heartbeat for ([\d.]+)s", logs["pserver0"])
        assert silent and float(silent.group(1)) < 3.0, logs["pserver0"][-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_chaos_short(tmp_path: Path) -> None:
    """benchmarks/chaos.py with N=5 kills: identical to the uninterrupted run."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--kills", "5",
                        "--seed", "3", "--workdir", str(tmp_path)], env=python_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["kills"] == 5 and result["identical"] is True, result
    assert result["recoveries"] >= 5
