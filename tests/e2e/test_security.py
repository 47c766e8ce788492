"""Security as real processes: the CLIs, a launched job, deploy/make-certs.sh and the
compose override (certificates made at run time)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pserver import config as cfg
from pserver.rpc.client import PSClient
from pserver.rpc.status import report
from tests.helpers import ROOT, Cluster, generated_data, job, python_env, wait_file
from tests.security import OTHER, TOKEN, client_with, rpc
from trainer.demo import demo_job, dump_toml


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "secure", 2000, seed=5)


def job_file(path: Path, data: Path, pservers: int, trainers: int, **sections: Any) -> Path:
    """A tiny training job (1 epoch of logistic regression) with checkpoints in path/../ckpt."""
    doc = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), pservers, trainers,
                   1, {"kind": "lr", "use_numeric": True})
    doc["trainer"].update(batch_size=128, progress="log", log_every=5)
    doc["checkpoint"].update(checkpoint_dir=str(path.parent / "ckpt"), step_interval=4)
    doc.update(sections)
    path.write_text(dump_toml(doc))
    return path


def test_pserver_cli_names_a_missing_certificate(pki: Path, tmp_path: Path) -> None:
    keys = {**rpc(pki, "tls", token=False), "tls_cert": str(tmp_path / "gone.pem")}
    path = tmp_path / "job.toml"
    path.write_text(dump_toml({"job": {"pservers": ["127.0.0.1:0"]}, "rpc": keys}))
    r = subprocess.run([sys.executable, "-m", "pserver", "--id", "0", "--config", str(path)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"pserver: config error: rpc.tls_cert: no such file: " \
                               f"{tmp_path / 'gone.pem'}"


def test_status_cli_names_a_missing_ca(pki: Path, tmp_path: Path) -> None:
    keys = {**rpc(pki, "tls", token=False), "tls_ca": str(tmp_path / "gone-ca.pem")}
    path = tmp_path / "job.toml"
    path.write_text(dump_toml({"job": {"pservers": ["127.0.0.1:1"]}, "rpc": keys}))
    r = subprocess.run([sys.executable, "-m", "pserver", "status", "--config", str(path)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"pserver status: config error: rpc.tls_ca: no such file: " \
                               f"{tmp_path / 'gone-ca.pem'}"


def test_trainer_cli_names_a_missing_client_certificate(pki: Path, tmp_path: Path,
                                                       data: Path) -> None:
    keys = {**rpc(pki, "mtls", token=False), "tls_client_key": str(tmp_path / "gone.key")}
    path = job_file(tmp_path / "job.toml", data, 1, 1, rpc=keys)
    r = subprocess.run([sys.executable, "-m", "trainer", "--id", "0", "--config", str(path)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"trainer[0]: config error: rpc.tls_client_key: no such file: {tmp_path}" in r.stderr


def test_a_job_runs_to_the_end_with_mtls_and_a_token(pki: Path, tmp_path: Path,
                                                     data: Path) -> None:
    path = job_file(tmp_path / "job.toml", data, 2, 2, rpc=rpc(pki, "mtls", token=False))
    env = {**python_env(), "PSRT_TOKEN": TOKEN}  # the token from the environment
    r = subprocess.run([sys.executable, "-m", "trainer", "launch", "--config", str(path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "every trainer finished" in r.stderr and "held-out logloss" in r.stdout
    done = sorted((tmp_path / "ckpt").glob("checkpoint_*/_SUCCESS"))
    assert len(done) >= 2, out  # barrier, SaveShard to pserver 1 and commit all went through
    for i in range(2):
        assert f"pserver[{i}] security: mtls, token check on" in out
    assert TOKEN not in out and "refused" not in out


def test_a_trainer_with_a_wrong_token_fails_naming_it_and_changes_nothing(
        pki: Path, tmp_path: Path, data: Path, spawn: Any) -> None:
    keys = {**rpc(pki, "tls", token=False), "connect_timeout_s": 5.0}
    path = job_file(tmp_path / "job.toml", data, 1, 1, rpc=keys)
    ready = tmp_path / "ready"
    ps = spawn("-m", "pserver", "--id", "0", "--config", str(path), "--port", "0",
               "--ready-file", str(ready), env={**python_env(), "PSRT_TOKEN": TOKEN})
    bound = f'job.pservers=["{wait_file(ready, ps)}"]'
    r = subprocess.run([sys.executable, "-m", "trainer", "--id", "0", "--config", str(path),
                        "--set", bound], cwd=tmp_path, env={**python_env(), "PSRT_TOKEN": OTHER},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "/psrt.v1.Coordinator/Join: wrong token" in r.stderr, r.stderr
    config = cfg.load(path, [bound], environ={})
    text, ok = report(config)  # no token: Info is refused
    assert not ok and "UNAUTHENTICATED: /psrt.v1.ParameterServer/Info: no token" in text, text
    with PSClient(cfg.load(path, [bound, f"rpc.token_file={str(pki / 'token')!r}"],
                           environ={})) as good:
        info = good.info(0)
    assert info.tables and all(t.rows == 0 for t in info.tables)  # nothing was created
    ps.send_signal(signal.SIGTERM)
    assert ps.wait(20) == 0
    out = ps.stdout.read()
    assert "pserver[0] refused /psrt.v1.Coordinator/Join from ipv4:127.0.0.1:" in out, out
    for text in (out, r.stdout, r.stderr):
        assert TOKEN not in text and OTHER not in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/make-certs.sh needs openssl")
def test_make_certs_script_gives_a_working_mtls_job(tmp_path: Path, cluster_factory: Any) -> None:
    d = tmp_path / "certs"
    script = str(ROOT / "deploy" / "make-certs.sh")
    r = subprocess.run(["sh", script, str(d), "pserver-0", "pserver-1"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    secure = {"tls": "mtls", "tls_cert": str(d / "server.pem"), "tls_key": str(d / "server.key"),
              "tls_ca": str(d / "ca.pem"), "token_file": str(d / "token")}
    cluster = cluster_factory(job(2, "async", rpc=secure))
    trainer = client_with(cluster, tls_cert="", tls_key="", tls_client_cert=str(d / "client.pem"),
                          tls_client_key=str(d / "client.key"), tls_server_name="pserver-1")
    assert trainer.pull("emb", np.arange(5, dtype=np.uint64)).shape == (5, 8)
    token = (d / "token").read_text().strip()
    assert len(token) == 64 and token not in r.stdout + r.stderr
    again = subprocess.run(["sh", script, str(d)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists; remove" in again.stderr  # never overwrites


@pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/make-certs.sh needs openssl")
@pytest.mark.parametrize("mode", ["mtls", "tls"])
def test_compose_override_gives_every_service_a_working_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """deploy/docker-compose.secure.yml's variables, over a job file, with the script's files
    where the containers mount them: each pserver serves, each trainer connects."""
    import yaml

    d = tmp_path / "certs"
    subprocess.run(["sh", str(ROOT / "deploy" / "make-certs.sh"), str(d)], check=True,
                   capture_output=True, timeout=60)
    doc = yaml.safe_load((ROOT / "deploy" / "docker-compose.secure.yml").read_text())
    assert set(doc["services"]) >= {"pserver-0", "pserver-1", "trainer-0", "trainer-1"}
    monkeypatch.setenv("PSRT_TLS_MODE", mode)
    configs = {}
    for name, service in doc["services"].items():
        env = {k: os.path.expandvars(v.replace(":-mtls}", "}")).replace("/etc/psrt/certs", str(d))
               for k, v in service["environment"].items()}
        mounted = {m.split(":")[1] for m in service["volumes"]}
        for key, value in env.items():
            if key.startswith("PSRT_RPC__") and value.startswith(str(d)):
                path = value.replace(str(d), "/etc/psrt/certs")
                assert any(path.startswith(m) for m in mounted), (name, path)
        configs[name] = cfg.load(None, ['job.pservers=["127.0.0.1:0", "127.0.0.1:0"]',
                                        "tables.emb.dim=8"],
                                 environ=env)
        assert configs[name].rpc.tls == mode
    cluster = Cluster(configs["pserver-0"])
    try:
        trainer = dataclasses.replace(configs["trainer-1"], pservers=cluster.config.pservers,
                                      rpc=dataclasses.replace(configs["trainer-1"].rpc,
                                                              tls_server_name="pserver-1"))
        with PSClient(trainer) as c:
            assert c.pull("emb", np.arange(4, dtype=np.uint64)).shape == (4, 8)
    finally:
        cluster.stop()
