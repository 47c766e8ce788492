"""End to end: `python -m pserver`, `python -m trainer` and the launcher as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pserver.config import SECTIONS
from pserver.config.schema import keys
from tests.helpers import generated_data, python_env, wait_file
from trainer.demo import demo_job, dump_toml

TINY_MODEL = {"kind": "lr", "use_numeric": True}


def run(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=python_env(), text=True,
                          capture_output=True, timeout=timeout)


def pserver_job(path: Path, **sections: Any) -> Path:
    """A job file with one table for pservers alone (no data, no model)."""
    doc = {"job": {"pservers": ["127.0.0.1:0"]}, "tables": {"emb": {"dim": 4}}}
    doc.update(sections)
    path.write_text(dump_toml(doc))
    return path


@pytest.mark.parametrize("body,key", [
    ({"job": {"pservers": ["127.0.0.1:0"], "colour": 1}}, "job.colour: unknown key"),
    ({"job": {"pservers": ["127.0.0.1:0"], "num_trainers": "two"}},
     "job.num_trainers: expected int"),
    ({"job": {"pservers": ["127.0.0.1:0"]}, "tables": {"emb": {"dim": -1}}},
     "tables.emb.dim: must be > 0"),
    ({"job": {"pservers": ["nohost"]}}, "job.pservers: 'nohost' is not HOST:PORT"),
])
def test_pserver_config_errors_exit_2_naming_the_key(tmp_path: Path, body: dict,
                                                     key: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(dump_toml(body))
    r = run("-m", "pserver", "--id", "0", "--config", str(job), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], r.stderr


def test_pserver_id_out_of_range_and_port_in_use(tmp_path: Path) -> None:
    job = pserver_job(tmp_path / "job.toml")
    r = run("-m", "pserver", "--id", "1", "--config", str(job), cwd=tmp_path)
    assert r.returncode == 2 and "--id: pserver id 1 is out of range 0..0" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("-m", "pserver", "--id", "0", "--config", str(job), "--port", str(port),
                cwd=tmp_path)
    assert r.returncode == 2 and "job.pservers[0]: cannot listen on 127.0.0.1:" in r.stderr


def test_pserver_help_documents_every_key(tmp_path: Path) -> None:
    r = run("-m", "pserver", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for _, section in SECTIONS:
        for key in keys(section):
            assert f"  {key.name} (" in r.stdout, key.name


def test_pserver_serves_health_and_reflection_and_drains_on_sigterm(tmp_path: Path,
                                                                   spawn: Any) -> None:
    job = pserver_job(tmp_path / "job.toml")
    ready = tmp_path / "ready"
    p = spawn("-m", "pserver", "--id", "0", "--config", str(job), "--port", "0",
              "--ready-file", str(ready))
    addr = wait_file(ready, p)
    with grpc.insecure_channel(addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "psrt.v1.ParameterServer"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert "psrt.v1.ParameterServer" in names
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    out = p.stdout.read()
    assert "listening on 127.0.0.1:" in out and "draining in-flight calls" in out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "tiny", 3000, seed=3)


def tiny_job(data_dir: Path, path: Path, num_pservers: int = 2, num_trainers: int = 2,
             **edits: Any) -> Path:
    doc = demo_job(str(data_dir / "train.txt"), str(data_dir / "train.holdout.txt"),
                   num_pservers, num_trainers, 1, TINY_MODEL)
    doc["trainer"].update(batch_size=128, progress="log", log_every=5)
    doc.pop("checkpoint")
    for section, values in edits.items():
        doc.setdefault(section, {}).update(values)
    path.write_text(dump_toml(doc))
    return path


@pytest.mark.parametrize("edit,key", [
    ({"trainer": {"epoch": 1}}, "trainer.epoch: unknown key"),
    ({"trainer": {"batch_size": "big"}}, "trainer.batch_size: expected int"),
    ({"data": {"train_path": "missing.txt"}}, "data.train_path: no such file"),
    ({"model": {"kind": "gbdt"}}, "model.kind:"),
])
def test_trainer_config_errors_exit_2(tiny_data: Path, tmp_path: Path, edit: dict,
                                      key: str) -> None:
    job = tiny_job(tiny_data, tmp_path / "job.toml", **edit)
    r = run("-m", "trainer", "--id", "0", "--config", str(job), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and key in r.stderr, r.stderr


def test_trainer_id_out_of_range_exits_2(tiny_data: Path, tmp_path: Path) -> None:
    job = tiny_job(tiny_data, tmp_path / "job.toml")
    r = run("-m", "trainer", "--id", "2", "--config", str(job), cwd=tmp_path)
    assert r.returncode == 2 and "--id: trainer id 2 is out of range 0..1" in r.stderr


def test_trainer_names_the_pserver_it_cannot_reach(tiny_data: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    job = tiny_job(tiny_data, tmp_path / "job.toml", num_pservers=1, num_trainers=1,
                   rpc={"connect_timeout_s": 1.0})
    r = run("-m", "trainer", "--id", "0", "--config", str(job), "--set",
            f'job.pservers=["127.0.0.1:{port}"]', cwd=tmp_path)
    assert r.returncode == 1
    assert f"pserver[0] at 127.0.0.1:{port} did not answer within 1s" in r.stderr


def test_launcher_runs_a_job_to_the_end(tiny_data: Path, tmp_path: Path) -> None:
    job = tiny_job(tiny_data, tmp_path / "job.toml")
    r = run("-m", "trainer", "launch", "--config", str(job), cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    for role in ("pserver[0] |", "pserver[1] |", "trainer[0] |", "trainer[1] |"):
        assert role in r.stdout
    assert "held-out logloss" in r.stdout
    assert "every trainer finished" in r.stderr


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_launcher_stops_everything_when_a_role_fails(tiny_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text((tiny_data / "train.txt").read_text() + "oops\n")
    job = tiny_job(tiny_data, tmp_path / "job.toml",
                   data={"train_path": str(bad), "strict": True})
    r = run("-m", "trainer", "launch", "--config", str(job), cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "trainer[" in r.stderr and "exited with code 2; stopping the job" in r.stderr
    assert "bad.txt:" in r.stdout  # the trainer's own error names file:line
    assert _processes_mentioning(str(job)) == []


def test_launcher_ctrl_c_leaves_no_process(tiny_data: Path, tmp_path: Path) -> None:
    job = tiny_job(tiny_data, tmp_path / "job.toml", trainer={"epochs": 1000})
    p = subprocess.Popen([sys.executable, "-m", "trainer", "launch", "--config", str(job)],
                         cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:
            if "examples/s" in line:
                break
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(job)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(job)) == []


def test_status_lists_every_pserver_and_a_killed_one_as_not_answering(tmp_path: Path,
                                                                      spawn: Any) -> None:
    job = pserver_job(tmp_path / "job.toml", job={"pservers": ["127.0.0.1:0", "127.0.0.1:0"]})
    procs, addrs = [], []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        procs.append(spawn("-m", "pserver", "--id", str(i), "--config", str(job), "--port", "0",
                           "--ready-file", str(ready)))
        addrs.append(wait_file(ready, procs[-1]))
    bound = "job.pservers=[" + ",".join(f'"{a}"' for a in addrs) + "]"
    r = run("-m", "pserver", "status", "--config", str(job), "--set", bound, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SERVING") == 2 and "emb=0" in r.stdout
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    r = run("-m", "pserver", "status", "--config", str(job), "--set", bound, cwd=tmp_path)
    assert r.returncode == 1
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("pserver[1]")]
    assert lines and "NOT ANSWERING" in lines[0] and "UNAVAILABLE" in lines[0]
    assert "pserver[0]" in r.stdout and "SERVING" in r.stdout
