"""TLS, mutual TLS and the shared token (pserver/security.py), with certificates made here."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pserver import config as cfg
from pserver import security
from pserver.client import PSClient
from pserver.coordinator_rpc import CoordinatorClient
from pserver.errors import Unauthenticated, Unavailable
from pserver.status import report
from tests.conftest import ROOT, Cluster, generated_data, job, python_env, wait_file
from trainer.demo import demo_job, dump_toml

TOKEN = "s3cret-token-" + "7f" * 16
OTHER = "other-token-" + "a1" * 16


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; server.{pem,key} for 127.0.0.1; client.{pem,key}; rogue.{pem,key} from another
    CA (rogue-ca.pem); token and other.token."""
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    rogue_ca.cert_pem.write_to_path(str(d / "rogue-ca.pem"))
    for name, cert in [("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("client", ca.issue_cert("trainer.psrt")),
                       ("rogue", rogue_ca.issue_cert("127.0.0.1", "trainer.psrt"))]:
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
    (d / "token").write_text(TOKEN + "\n")
    (d / "other.token").write_text(OTHER)
    return d


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


def rpc(pki: Path, mode: str = "mtls", token: bool = True, **more: str) -> dict[str, Any]:
    out: dict[str, Any] = {"tls": mode}
    if mode != "off":
        out.update(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                   tls_ca=str(pki / "ca.pem"))
    if mode == "mtls":
        out.update(tls_client_cert=str(pki / "client.pem"), tls_client_key=str(pki / "client.key"))
    if token:
        out["token_file"] = str(pki / "token")
    return {**out, **more}


def client_with(cluster: Cluster, **rpc_keys: str) -> PSClient:
    """A client of `cluster` whose [rpc] keys differ (the pservers keep theirs)."""
    config = dataclasses.replace(cluster.config,
                                 rpc=dataclasses.replace(cluster.config.rpc, **rpc_keys))
    c = PSClient(config)
    cluster.clients.append(c)
    return c


def assert_refused(cluster: Cluster, bad: PSClient, error: type, *words: str) -> None:
    """`bad` can neither push nor pull (not even create rows), and the table is unchanged."""
    good = cluster.client()
    ids = np.arange(20, dtype=np.uint64)
    before, rows = good.pull("emb", ids), good.info(0).tables[0].rows
    with pytest.raises(error) as e:
        bad.push("emb", ids, np.ones((20, 8), np.float32))
    for w in words:
        assert w in str(e.value)
    assert TOKEN not in str(e.value) and OTHER not in str(e.value)
    with pytest.raises(error):
        bad.pull("emb", np.arange(1000, 1100, dtype=np.uint64))
    np.testing.assert_array_equal(good.pull("emb", ids), before)
    assert good.info(0).tables[0].rows == rows
    good.push("emb", ids, np.ones((20, 8), np.float32))  # the control: a good push does change it
    assert not np.array_equal(good.pull("emb", ids), before)


@pytest.mark.parametrize("keys,error", [
    ({"tls_cert": "a.pem"}, "rpc.tls_cert: is set but rpc.tls is 'off'"),
    ({"tls_server_name": "x"}, "rpc.tls_server_name: is set but rpc.tls is 'off'"),
    ({"tls": "tls", "tls_cert": "a.pem"}, "rpc.tls_key: required because rpc.tls_cert is set"),
    ({"tls": "tls", "tls_key": "a.key"}, "rpc.tls_cert: required because rpc.tls_key is set"),
    ({"tls": "mtls", "tls_cert": "a.pem", "tls_key": "a.key"}, "rpc.tls_ca: required when "
     "rpc.tls is 'mtls'"),
    ({"tls": "tls", "tls_cert": "a", "tls_key": "b", "tls_client_cert": "c"},
     "rpc.tls_client_cert: only used when rpc.tls is 'mtls', got 'tls'"),
    ({"tls": "mtls", "tls_cert": "a", "tls_key": "b", "tls_ca": "c", "tls_client_key": "d"},
     "rpc.tls_client_cert: required because rpc.tls_client_key is set"),
    ({"tls": "ssl"}, "rpc.tls: must be one of off, tls, mtls; got 'ssl'"),
    ({"token_file": 7}, "rpc.token_file: expected str, got int 7"),
])
def test_keys_that_do_not_fit_together_are_named(keys: dict, error: str) -> None:
    with pytest.raises(cfg.ConfigError) as e:
        cfg.build({"rpc": keys})
    assert str(e.value).startswith(error), e.value


def test_each_role_needs_only_its_own_certificate(pki: Path) -> None:
    ca = str(pki / "ca.pem")
    trainer = cfg.build({"rpc": {"tls": "tls", "tls_ca": ca}}).rpc  # no server files at all
    assert security.channel_credentials(trainer) is not None
    with pytest.raises(cfg.ConfigError, match="rpc.tls_cert: a pserver needs its certificate "
                       "when rpc.tls is 'tls'"):
        security.server_credentials(trainer)
    with pytest.raises(cfg.ConfigError, match="rpc.tls_client_cert: a client needs a "
                       "certificate when rpc.tls is 'mtls'"):
        security.channel_credentials(cfg.build({"rpc": {"tls": "mtls", "tls_ca": ca}}).rpc)
    client_only = {"tls": "mtls", "tls_ca": ca, "tls_client_cert": str(pki / "client.pem"),
                   "tls_client_key": str(pki / "client.key")}
    assert security.channel_credentials(cfg.build({"rpc": client_only}).rpc) is not None


@pytest.mark.parametrize("edit,error", [
    ({"tls_cert": "missing.pem"}, "rpc.tls_cert: no such file: missing.pem"),
    ({"tls_key": "."}, "rpc.tls_key: . is a directory, expected a file"),
    ({"tls_ca": "empty.pem"}, "rpc.tls_ca: empty.pem is empty"),
    ({"tls_cert": "token"}, "rpc.tls_cert: token holds no PEM certificate"),
    ({"tls_key": "server.pem"}, "rpc.tls_key: server.pem holds no PEM private key"),
    ({"tls_key": "rogue.key"}, "rpc.tls_key: rogue.key is not the private key of the "
     "certificate in rpc.tls_cert (server.pem)"),
    ({"tls_client_key": "server.key"}, "rpc.tls_client_key: server.key is not the private key "
     "of the certificate in rpc.tls_client_cert (client.pem)"),
])
def test_bad_certificate_files_are_named(pki: Path, monkeypatch: pytest.MonkeyPatch,
                                         edit: dict, error: str) -> None:
    monkeypatch.chdir(pki)
    (pki / "empty.pem").write_text("\n")
    keys = {k: Path(v).name for k, v in rpc(pki, token=False).items() if k != "tls"}
    config = cfg.build({"rpc": {"tls": "mtls", **keys, **edit}})
    with pytest.raises(cfg.ConfigError) as e:
        security.server_credentials(config.rpc)
        security.channel_credentials(config.rpc)
    assert str(e.value).startswith(error), e.value
    if "tls_client_key" not in edit:  # a pserver does not start with it
        with pytest.raises(cfg.ConfigError, match=error.split(":")[0]):
            Cluster(job(1, rpc={"tls": "mtls", **keys, **edit}))


@pytest.mark.parametrize("text,env,error", [
    ("short", None, "rpc.token_file: the token must have at least 16 characters, it has 5"),
    ("has a space in it ......", None, "rpc.token_file: the token must be printable ASCII"),
    (None, "tab\tin-the-token-value", "PSRT_TOKEN: the token must be printable ASCII"),
    (TOKEN, OTHER, "rpc.token_file: is set and so is the PSRT_TOKEN environment variable"),
])
def test_bad_tokens_are_named_and_never_shown(tmp_path: Path, text: str | None, env: str | None,
                                              error: str) -> None:
    keys = {}
    if text is not None:
        (tmp_path / "t").write_text(text)
        keys["token_file"] = str(tmp_path / "t")
    config = cfg.build({"rpc": keys})
    with pytest.raises(cfg.ConfigError) as e:
        security.token(config.rpc, {} if env is None else {"PSRT_TOKEN": env})
    assert str(e.value).startswith(error), e.value
    assert all(s not in str(e.value) for s in (text, env) if s and len(s) > 5)
    missing = cfg.build({"rpc": {"token_file": str(tmp_path / "nope")}})
    with pytest.raises(cfg.ConfigError, match="rpc.token_file: no such file: .*nope"):
        security.token(missing.rpc, {})
    assert security.token(cfg.build({}).rpc, {"PSRT_TOKEN": f"  {TOKEN}\n"}) == TOKEN


def test_tls_refuses_plaintext_and_an_unknown_ca(pki: Path, cluster_factory: Any) -> None:
    cluster = cluster_factory(job(1, "async", rpc=rpc(pki, "tls", token=False)))
    assert_refused(cluster, client_with(cluster, tls="off", tls_cert="", tls_key="", tls_ca=""),
                   Unavailable, "pserver[0]")
    assert_refused(cluster, client_with(cluster, tls_ca=str(pki / "rogue-ca.pem")), Unavailable)
    assert_refused(cluster, client_with(cluster, tls_server_name="psrt.invalid"), Unavailable)
    named = client_with(cluster, tls_server_name="localhost")  # a name the certificate has
    assert named.pull("emb", np.arange(3, dtype=np.uint64)).shape == (3, 8)


def test_mtls_refuses_a_client_without_a_certificate_or_with_a_foreign_one(
        pki: Path, cluster_factory: Any) -> None:
    cluster = cluster_factory(job(2, "async", rpc=rpc(pki, "mtls", token=False)))
    no_cert = client_with(cluster, tls="tls", tls_client_cert="", tls_client_key="")
    assert_refused(cluster, no_cert, Unavailable)
    rogue = client_with(cluster, tls_client_cert=str(pki / "rogue.pem"),
                        tls_client_key=str(pki / "rogue.key"))
    assert_refused(cluster, rogue, Unavailable)
    with pytest.raises(Unavailable) as e:  # waiting says why, not only that it timed out
        client_with(cluster, tls_ca=str(pki / "rogue-ca.pem")).wait_ready(1)
    assert "did not answer within 1s (rpc.connect_timeout_s); with rpc.tls = 'mtls': " \
           "failed to connect" in str(e.value) and "CERTIFICATE_VERIFY_FAILED" in str(e.value)
    # without tls_client_*, clients present tls_cert (the server's certificate, same CA)
    shared = client_with(cluster, tls_client_cert="", tls_client_key="")
    assert shared.pull("emb", np.arange(3, dtype=np.uint64)).shape == (3, 8)


def test_token_missing_or_wrong_is_unauthenticated_and_changes_nothing(
        pki: Path, cluster_factory: Any, tmp_path: Path) -> None:
    ckpt = {"checkpoint_dir": str(tmp_path / "ckpt"), "step_interval": 1000}
    cluster = cluster_factory(job(1, "async", rpc=rpc(pki, "tls"), checkpoint=ckpt))
    assert_refused(cluster, client_with(cluster, token_file=""), Unauthenticated,
                   "Push: no token (rpc.token_file or PSRT_TOKEN)", "pserver[0] at 127.0.0.1:")
    assert_refused(cluster, client_with(cluster, token_file=str(pki / "other.token")),
                   Unauthenticated, "Push: wrong token")
    no_token = dataclasses.replace(cluster.config, rpc=dataclasses.replace(cluster.config.rpc,
                                                                          token_file=""))
    coord = CoordinatorClient(no_token)
    with pytest.raises(Unauthenticated, match="Coordinator/Join: no token"):
        coord.join_trainer(0)
    coord.close()
    with security.open_channel(cluster.config.pservers[0], no_token.rpc) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open
        refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        with pytest.raises(grpc.RpcError) as e:
            list(refl)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_status_uses_the_job_security_and_never_shows_the_token(
        pki: Path, cluster_factory: Any) -> None:
    cluster = cluster_factory(job(2, "async", rpc=rpc(pki, "mtls")))
    text, ok = report(cluster.config)
    assert ok and text.count("SERVING") == 2, text
    other = dataclasses.replace(cluster.config, rpc=dataclasses.replace(
        cluster.config.rpc, token_file=str(pki / "other.token")))
    text, ok = report(other)
    assert not ok and text.count("UNAUTHENTICATED: /psrt.v1.ParameterServer/Info: wrong "
                                 "token") == 2, text
    assert TOKEN not in text and OTHER not in text


def test_pserver_cli_names_a_missing_certificate(pki: Path, tmp_path: Path) -> None:
    keys = {**rpc(pki, "tls", token=False), "tls_cert": str(tmp_path / "gone.pem")}
    path = tmp_path / "job.toml"
    path.write_text(dump_toml({"job": {"pservers": ["127.0.0.1:0"]}, "rpc": keys}))
    r = subprocess.run([sys.executable, "-m", "pserver", "--id", "0", "--config", str(path)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"pserver: config error: rpc.tls_cert: no such file: " \
                               f"{tmp_path / 'gone.pem'}"


def test_trainer_cli_names_a_missing_client_certificate(pki: Path, tmp_path: Path,
                                                       data: Path) -> None:
    keys = {**rpc(pki, "mtls", token=False), "tls_client_key": str(tmp_path / "gone.key")}
    path = job_file(tmp_path / "job.toml", data, 1, 1, rpc=keys)
    r = subprocess.run([sys.executable, "-m", "trainer", "--id", "0", "--config", str(path)],
                       cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"trainer[0]: config error: rpc.tls_client_key: no such file: {tmp_path}" in r.stderr


@pytest.mark.e2e
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


@pytest.mark.e2e
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
