"""TLS, mutual TLS and the shared token (pserver/rpc/security.py) on in-process pservers;
the certificates are the `pki` fixture's (tests/conftest.py)."""

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
from tests.helpers import Cluster, job
from tests.security import OTHER, TOKEN, client_with, rpc


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
