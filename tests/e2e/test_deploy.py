"""deploy/ for real: the image built by deploy/build-image.sh, deploy/docker-compose.yml up.

Each test brings up its own compose project (unique name, `down -v` afterwards) with a
small job: the job runs to the end and leaves a committed, verified checkpoint; a pserver
that crashes is restarted by compose, the job rolls back to the newest complete checkpoint
and finishes; a trainer cut off the network fails within its deadline naming the peer.
Where no Docker engine runs, these tests skip saying so; PSRT_REQUIRE_DOCKER=1 (set by
.ci/run) turns that into a failure.
The image's base is PSRT_TEST_BASE (default psrt-base:local, made by
deploy/build-base-image.sh from the OS's package mirror, since no registry may be reachable).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.dockerstack import ROOT, Stack, build_image, docker_missing

pytestmark = pytest.mark.timeout(900)

IMAGE = "psrt:test"
DEADLINE_S = 4.0
# The test job: 12,000 examples (10,800 to train), 1 epoch of 84 steps of 64 per trainer,
# a checkpoint every 10 steps, short deadlines so that a dead peer shows within seconds.
JOB_ENV = {
    "PSRT_TRAINER__EPOCHS": "1",
    "PSRT_TRAINER__BATCH_SIZE": "64",
    "PSRT_TRAINER__LOG_EVERY": "20",
    "PSRT_CHECKPOINT__STEP_INTERVAL": "10",
    "PSRT_RPC__DEADLINE_S": str(DEADLINE_S),
    "PSRT_RPC__CONNECT_TIMEOUT_S": "30",
    "PSRT_RPC__CHECKPOINT_TIMEOUT_S": str(DEADLINE_S),
    "PSRT_RPC__GRACE_S": "1",
}
VARIABLES = {"PSRT_DEMO_EXAMPLES": "12000"}
PEER = r"(pserver\[\d\]|the coordinator) at pserver-\d:7070"


@pytest.fixture(scope="module")
def image() -> str:
    why = docker_missing()
    if why is not None:
        if os.environ.get("PSRT_REQUIRE_DOCKER") == "1":
            pytest.fail(f"PSRT_REQUIRE_DOCKER=1 but {why}")
        pytest.skip(why)
    build_image(IMAGE, os.environ.get("PSRT_TEST_BASE", "psrt-base:local"))
    return IMAGE


@pytest.fixture
def stack(image: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, image, JOB_ENV, VARIABLES)
    try:
        s.up()
        yield s
    finally:
        s.down()


def newest_committed(stack: Stack) -> int:
    r = stack.exec("pserver-0", "sh", "-c", "ls -d /checkpoints/checkpoint_*/_SUCCESS")
    serials = [int(m) for m in re.findall(r"checkpoint_(\d+)/_SUCCESS", r.stdout)]
    assert serials, f"no committed checkpoint in the volume: {r.stdout}{r.stderr}"
    return max(serials)


def assert_finished(stack: Stack, timeout: float, epochs: int = 1) -> int:
    """Both trainers exit 0, the checkpoints verify, and the newest one is the final one
    (10,800 // 2 // 64 = 84 steps an epoch: step ids 0..83); returns its serial."""
    for t in ("trainer-0", "trainer-1"):
        stack.wait_done(t, timeout)
    verify = stack.exec("pserver-0", "python", "-m", "ckpt", "verify", "/checkpoints")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    serial = newest_committed(stack)
    assert f"checkpoint_{serial}: ok" in verify.stdout
    trainer_1 = f"/checkpoints/checkpoint_{serial}/trainer_1"
    counters = stack.exec("pserver-0", "cat", f"{trainer_1}/epoch_id", f"{trainer_1}/step_id")
    assert counters.stdout.split() == [str(epochs - 1), "83"], counters.stdout + counters.stderr
    return serial


def test_compose_job_runs_to_the_end_and_commits_a_verified_checkpoint(stack: Stack) -> None:
    serial = assert_finished(stack, timeout=180)
    for t in ("trainer-0", "trainer-1"):
        assert stack.state(t)["RestartCount"] == 0, stack.logs(t)
    assert "held-out logloss" in stack.logs("trainer-0")
    for p in ("pserver-0", "pserver-1"):
        assert stack.state(p)["Health"]["Status"] == "healthy"
    layout = stack.exec("pserver-0", "ls", f"/checkpoints/checkpoint_{serial}",
                        f"/checkpoints/checkpoint_{serial}/__lockup_table__")
    for name in ("MANIFEST.json", "_SUCCESS", "__model__", "trainer_0", "trainer_1",
                 "table_pserver_0", "table_pserver_1"):
        assert name in layout.stdout.split(), layout.stdout


def test_crashed_pserver_is_restarted_and_the_job_finishes_from_a_checkpoint(
        image: str, tmp_path: Path) -> None:
    # 2 epochs: the crash lands well before the end
    stack = Stack(tmp_path, image, {**JOB_ENV, "PSRT_TRAINER__EPOCHS": "2"}, VARIABLES)
    try:
        stack.up()
        stack.wait_log("trainer-0", r"checkpoint_1 committed", timeout=120)
        stack.crash("pserver-1")  # at once: nothing slow between the log line and the crash
        restored = stack.wait_log("pserver-1", r"restored checkpoint_(\d+)", timeout=60)
        serial = int(restored.group(1))
        assert serial >= 1
        stack.wait_log("pserver-0", rf"pserver\[0\] restored checkpoint_{serial}\b",
                       timeout=60)
        assert assert_finished(stack, timeout=180, epochs=2) > serial
        assert stack.state("pserver-1")["RestartCount"] >= 1
    finally:
        stack.down()


def test_trainer_cut_off_the_network_fails_naming_the_peer_within_its_deadline(
        stack: Stack) -> None:
    stack.wait_log("trainer-1", r"checkpoint_0 committed", timeout=120)
    cid = stack.container("trainer-1")
    cut = time.monotonic()
    subprocess.run(["docker", "network", "disconnect", "-f", stack.network, cid], check=True,
                   capture_output=True, timeout=60)
    # trainer 1 names the peer it lost, and goes on trying to rejoin (with backoff)
    lost = stack.wait_log("trainer-1", rf"trainer\[1\]: .*{PEER}: .*", timeout=60)
    took = time.monotonic() - cut
    # the call in flight runs out at its deadline (rpc.deadline_s; rpc.checkpoint_timeout_s,
    # as short here, in a checkpoint call): not a hang
    assert took < DEADLINE_S + 10, f"took {took:.1f}s: {lost.group(0)}"
    assert re.search(r"Deadline Exceeded|UNAVAILABLE|failed to connect|DNS", lost.group(0),
                     re.IGNORECASE), lost.group(0)
    # and trainer 0 names trainer 1, the one that stopped pushing
    stack.wait_log("trainer-0", r"trainers \[[0-9, ]*\b1\]", timeout=DEADLINE_S + 10)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/make-certs.sh needs openssl")
def test_the_secure_override_runs_the_job_with_mutual_tls_and_healthy_pservers(
        image: str, tmp_path: Path) -> None:
    """deploy/docker-compose.secure.yml over the compose file, with deploy/make-certs.sh's
    files (made here, mounted where the override mounts ./certs)."""
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(ROOT / "deploy" / "make-certs.sh"), str(certs)], check=True,
                   capture_output=True, timeout=60)
    secure = ROOT / "deploy" / "docker-compose.secure.yml"
    doc = yaml.safe_load(secure.read_text())
    volumes = {name: [v.replace("./certs", str(certs), 1) for v in service["volumes"]]
               for name, service in doc["services"].items()}
    stack = Stack(tmp_path, image, JOB_ENV, VARIABLES, (secure,), volumes)
    try:
        stack.up()
        assert_finished(stack, timeout=180)
        for p in ("pserver-0", "pserver-1"):
            assert stack.state(p)["Health"]["Status"] == "healthy"
            assert re.search(r"security: mtls, token check on", stack.logs(p))
    finally:
        stack.down()
