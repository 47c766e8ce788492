"""Shared by the security tests: certificates made at run time (trustme), tokens, a tiny job."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trustme

from pserver.rpc.client import PSClient
from tests.conftest import Cluster, generated_data
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


