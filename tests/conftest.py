"""Fixtures tests of more than one tier use: in-process clusters, certificates made at run
time, an S3 server in this process, a recorded stand-alone run.

The tiers are the folders: tests/unit, tests/integration, tests/e2e (each folder's
conftest.py marks its tests). Helpers to import are in tests/helpers.py and next to the
tests that share them (tests/security.py, tests/s3.py, tests/metrics.py, tests/e2e/jobs.py).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from pserver import config as cfg
from tests.helpers import Cluster, generated_data
from tests.s3 import options
from tests.security import OTHER, TOKEN
from trainer.demo import demo_job
from trainer.loop import Trainer


@pytest.fixture
def cluster_factory() -> Iterator[Any]:
    made: list[Cluster] = []

    def make(config: cfg.JobConfig) -> Cluster:
        c = Cluster(config)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


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
def endpoint() -> Iterator[str]:
    """A real S3-protocol server (moto) on 127.0.0.1, on a free port."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint: str) -> str:
    """A fresh, empty bucket on the S3 server."""
    s3fs = pytest.importorskip("s3fs")
    name = f"psrt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options(endpoint)).mkdir(name)
    return name


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recorded stand-alone run: 1 epoch, checkpointed, then resumed for a 2nd epoch."""
    data = generated_data(tmp_path_factory, "cdata", 1500, seed=4)
    run = tmp_path_factory.mktemp("run")
    raw = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), 1, 1, 1,
                   {"kind": "lr", "use_numeric": True})
    raw["trainer"].update(batch_size=128, progress="off")
    raw["checkpoint"].update(checkpoint_dir=str(run / "ck"), step_interval=4)
    raw["metrics"] = {"curves_dir": str(run / "curves")}
    for epochs in (1, 2):
        t = Trainer(cfg.build(raw), standalone=True)
        try:
            t.train(epochs)
        finally:
            t.close()
    return run
