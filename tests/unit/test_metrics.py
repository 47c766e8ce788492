"""Prometheus metrics without a server: the ports per role and id, the exported names the
dashboard and the README list, and a stand-alone trainer that opens no port by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pserver import config as cfg
from pserver.metrics import server_metrics as pmetrics
from pserver.metrics.exporter import port_for
from tests.helpers import generated_data, job
from tests.metrics import listening_ports
from trainer.demo import demo_job


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "mdata", 2000, seed=3)


def test_ports_per_role_and_id() -> None:
    c = cfg.build({"job": {"pservers": ["h:1", "h:2", "h:3"], "num_trainers": 2},
                   "metrics": {"port": 9100}})
    assert [port_for(c, "pserver", i) for i in range(3)] == [9100, 9101, 9102]
    assert [port_for(c, "trainer", j) for j in range(2)] == [9103, 9104]
    free = cfg.build({"metrics": {"port": 0}})
    assert port_for(free, "trainer", 1) == 0


class NoCheckpointYet:
    """What ServerMetrics reads of a coordinator that restored nothing."""

    restore_manifest = None
    restore_serial = -1
    failed_in_a_row = 0


def exported_names() -> dict[str, str]:
    """Every psrt_ family a pserver (hosting the coordinator) and a trainer export, by type."""
    from pserver.tables.shard import Shard
    from trainer.metrics_export import TrainerExport

    config = job(1)
    server = pmetrics.ServerMetrics(config, 0, Shard(config, 0))
    server.watch_coordinator(NoCheckpointYet())
    names = {}
    for registry in (server.registry, TrainerExport(config, 0).registry):
        for fam in registry.collect():
            if fam.name.startswith("psrt_"):
                names[fam.name + ("_total" if fam.type == "counter" else "")] = fam.type
    return names


def test_dashboard_and_readme_name_exactly_the_exported_metrics() -> None:
    import re

    names = exported_names()
    root = Path(__file__).resolve().parents[2]
    dashboard = (root / "deploy" / "grafana-dashboard.json").read_text()
    json.loads(dashboard)
    used = {re.sub(r"_(bucket|count|sum)$", "", n)
            for n in re.findall(r"psrt_[a-z_]+", dashboard) if n != "psrt_job"}
    assert used <= set(names), used - set(names)
    assert used == set(names), f"not on the dashboard: {set(names) - used}"
    readme = (root / "README.md").read_text()
    listed = dict(re.findall(r"^\| `(psrt_[a-z_]+)` \| (\w+) \|", readme, re.M))
    assert listed == names


def test_a_trainer_opens_no_port_and_writes_no_curves_by_default(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.loop import EndStepEvent, Trainer

    monkeypatch.chdir(tmp_path)  # where relative curves or targets would go

    doc = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), 1, 1, 1,
                   {"kind": "lr", "use_numeric": True})
    doc["trainer"].update(batch_size=256, progress="off")
    doc.pop("checkpoint")
    before = listening_ports()
    during: list[set[int]] = []

    def on_event(event: object) -> None:
        if isinstance(event, EndStepEvent) and not during:
            during.append(listening_ports())

    trainer = Trainer(cfg.build(doc), standalone=True)
    try:
        trainer.train(event_handler=on_event)
    finally:
        trainer.close()
    assert during == [before] and trainer.export.port is None
    assert trainer.export.global_step == 7 and not list(tmp_path.rglob("*.json*"))
