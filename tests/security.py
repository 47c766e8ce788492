"""Shared by the security tests: the tokens, a job's [rpc] keys for the certificates of the
`pki` fixture (tests/conftest.py), and a client whose [rpc] keys differ from the pservers'."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pserver.rpc.client import PSClient
from tests.helpers import Cluster

TOKEN = "s3cret-token-" + "7f" * 16
OTHER = "other-token-" + "a1" * 16


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
