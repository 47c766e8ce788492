"""`python -m pserver health` (in this process) against in-process pservers: the container
healthcheck of deploy/ (exit 0 iff SERVING)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pserver.__main__ import main
from pserver.rpc.health import check
from tests.helpers import Cluster, job
from tests.security import rpc


def test_health_is_0_while_serving_and_1_naming_the_pserver_once_it_is_gone(
        cluster_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cluster: Cluster = cluster_factory(job(num_pservers=2))
    addr = cluster.config.pservers[1]
    bound = "job.pservers=[" + ",".join(f'"{a}"' for a in cluster.config.pservers) + "]"
    assert main(["health", "--id", "1", "--set", bound]) == 0
    assert capsys.readouterr().out.strip() == f"pserver[1] at {addr}: SERVING"
    assert main(["health", "--id", "0", "--address", cluster.config.pservers[0]]) == 0
    cluster.servers[1].stop(0)
    assert main(["health", "--id", "1", "--set", bound, "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"pserver[0] at {cluster.config.pservers[0]}: SERVING")
    assert f"pserver[1] at {addr}: UNAVAILABLE" in out


def test_health_speaks_the_jobs_tls_and_plaintext_gets_no_answer(
        pki: Path, cluster_factory: Any) -> None:
    cluster: Cluster = cluster_factory(job(2, "async", rpc=rpc(pki, "mtls")))
    addr = cluster.config.pservers[1]
    assert check(addr, 2.0, cluster.config.rpc) == "SERVING"
    assert check(addr, 2.0).startswith("UNAVAILABLE: ")
