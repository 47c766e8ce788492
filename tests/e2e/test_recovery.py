"""Recovery without a human, as real processes: status while a job runs, a role that does
not come back fails the job, chaos.

The SIGKILL matrix (a process killed at a step or in a save, healed by the launcher,
ending bit-identical) is in tests/e2e/test_checkpoint.py; generations, heartbeats and
rollback on in-process pservers in tests/integration/test_recovery.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.jobs import launch, write_job
from tests.helpers import ROOT, python_env, wait_file

# ---- the launcher heals, status shows it, a lost role fails the job -----------

def test_status_lists_trainers_and_generation_while_a_job_runs(data_dir: Path,
                                                               tmp_path: Path) -> None:
    job_path = write_job(data_dir, tmp_path, tmp_path / "ck", epochs=30)
    p = launch(job_path)
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
