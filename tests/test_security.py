"""TLS, mutual TLS and the shared token (pserver/security.py) on in-process pservers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pserver import config as cfg
from pserver.errors import Unauthenticated, Unavailable
from pserver.rpc import security
from pserver.rpc.client import PSClient
from pserver.rpc.coord import CoordinatorClient
from pserver.rpc.status import report
from tests.conftest import Cluster, job
from tests.security_fixtures import OTHER, TOKEN, client_with, pki, rpc

__all__ = ["pki"]  # a fixture


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


