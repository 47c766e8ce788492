"""Prometheus metrics on in-process pservers and trainers: off by default, what the
counters, histograms and gauges count, checkpoint metrics.

Config and exported names: tests/unit/test_metrics.py; a real job scraped while it trains:
tests/e2e/test_metrics.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from pserver import config as cfg
from pserver.metrics import server_metrics as pmetrics
from pserver.wire.methods import PARAMETER_SERVER as SERVICE
from tests.helpers import Cluster, generated_data, job
from tests.metrics import listening_ports, scrape, value
from trainer.demo import demo_job


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "mdata", 2000, seed=3)


def test_metrics_are_off_by_default_and_open_no_port(cluster_factory: Any) -> None:
    assert cfg.build({}).metrics.port == -1
    before = listening_ports()
    cluster = cluster_factory(job(1))
    opened = listening_ports() - before
    assert opened == {cluster.servers[0].port}  # gRPC only
    assert cluster.servers[0].metrics is pmetrics.NULL


def test_counters_histograms_and_table_gauges(cluster_factory: Any, tmp_path: Path) -> None:
    before = listening_ports()
    cluster: Cluster = cluster_factory(job(2, metrics={"port": 0,
                                                        "targets_dir": str(tmp_path / "t")}))
    ports = [s.metrics.port for s in cluster.servers]
    assert listening_ports() - before == {s.port for s in cluster.servers} | set(ports)
    targets = json.loads((tmp_path / "t" / "pserver_1.json").read_text())
    assert targets[0]["targets"] == [f"127.0.0.1:{ports[1]}"]
    client = cluster.client()
    ids = np.arange(1000, dtype=np.uint64)
    client.pull("emb", ids)
    client.push("emb", ids, np.full((1000, 8), 0.01, np.float32))
    samples = [scrape(p) for p in ports]
    rows = [value(s, "psrt_table_rows", table="emb") for s in samples]
    assert sum(rows) == 1000 and min(rows) > 0
    for s, n in zip(samples, rows, strict=True):
        assert value(s, "psrt_pull_calls_total", table="emb") == 1
        assert value(s, "psrt_pull_rows_total", table="emb") == n
        assert value(s, "psrt_pull_bytes_total", table="emb") == n * 8 * 4
        assert value(s, "psrt_push_bytes_total", table="emb") == n * 8 * 4
        assert value(s, "psrt_rpc_duration_seconds_count", method="Push") == 1
        assert value(s, "psrt_rpc_duration_seconds_bucket", method="Pull", le="+Inf") == 1
        assert value(s, "psrt_table_memory_bytes", table="emb") >= \
            value(s, "psrt_table_bytes", table="emb") > 0
    # a rejected call is counted as an error, and as no traffic
    with grpc.insecure_channel(cluster.config.pservers[0]) as ch, \
            pytest.raises(grpc.RpcError) as e:
        ch.unary_unary(f"/{SERVICE}/Pull")(b"\xff\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(ports[0])
    assert value(after, "psrt_rpc_errors_total", method="Pull") == 1
    assert value(after, "psrt_pull_calls_total", table="emb") == 1
    cluster.servers[1].stop(0)
    assert not (tmp_path / "t" / "pserver_1.json").exists()


def test_generation_and_recoveries_can_be_set(cluster_factory: Any) -> None:
    cluster = cluster_factory(job(1, metrics={"port": 0}))
    m = cluster.servers[0].metrics
    assert value(scrape(m.port), "psrt_generation") == 0
    m.set_generation(3)
    m.recovered()
    s = scrape(m.port)
    assert value(s, "psrt_generation", role="pserver", id="0") == 3
    assert value(s, "psrt_recoveries_total") == 1


def test_checkpoint_metrics_count_saves_commits_and_a_failure(
        data: Path, tmp_path: Path, cluster_factory: Any) -> None:
    from trainer.loop import Trainer

    doc = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), 1, 1, 1,
                   {"kind": "lr", "use_numeric": True})
    doc["trainer"].update(batch_size=256, progress="off")
    doc["checkpoint"].update(checkpoint_dir=str(tmp_path / "ck"), step_interval=2,
                             max_num_checkpoints=100,  # checkpoint_1 fails: a full disk
                             faults=[{"kind": "enospc", "op": "write",
                                      "path": "checkpoint_1/__lockup_table__/*"}])
    doc["metrics"] = {"port": 0, "curves_dir": str(tmp_path / "curves")}
    cluster = cluster_factory(cfg.build(doc))
    trainer = Trainer(cluster.config, 0)
    try:
        trainer.train()
        s = scrape(cluster.servers[0].metrics.port)
        t = scrape(trainer.export.port)
    finally:
        trainer.close()
    # 7 steps of 256 of 1,800 examples: saves after steps 0, 2 (fails), 4, 6 (final)
    assert value(s, "psrt_checkpoint_save_failures_total") == 1
    assert value(s, "psrt_checkpoints_failed_total") == 1
    assert value(s, "psrt_checkpoints_committed_total") == 3
    assert value(s, "psrt_checkpoint_last_committed_serial") == 3
    assert value(s, "psrt_checkpoint_save_duration_seconds_count") == 3
    assert value(s, "psrt_checkpoint_stall_seconds_count") == 3  # blocking saves
    assert value(s, "psrt_checkpoint_written_bytes_total") > \
        value(s, "psrt_checkpoint_last_save_bytes") > 0
    assert value(t, "psrt_trainer_checkpoint_stall_seconds_count") == 3
    assert value(t, "psrt_trainer_last_checkpoint_serial") == 3
    assert value(t, "psrt_trainer_step") == 7 and value(t, "psrt_trainer_eval_auc") > 0
    assert value(t, "psrt_trainer_examples_total") == 7 * 256
    saved = [json.loads(line) for line in (tmp_path / "curves/trainer_0.jsonl").open()
             if '"checkpoint"' in line]
    assert [(r["serial"], r["step"]) for r in saved] == [(0, 1), (2, 5), (3, 7)]
