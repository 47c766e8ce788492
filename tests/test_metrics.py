"""Prometheus metrics: config, ports, what the counters count, and a real job scraped while
it trains."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pserver import config as cfg
from pserver.metrics import server_metrics as pmetrics
from pserver.metrics.exporter import port_for
from pserver.wire.methods import PARAMETER_SERVER as SERVICE
from tests.conftest import Cluster, generated_data, job, python_env
from trainer.demo import demo_job, dump_toml


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of http://127.0.0.1:PORT/metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    found = [v for (n, ls), v in samples.items()
             if n == name and set(labels.items()) <= set(ls)]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def listening_ports() -> set[int]:
    """TCP ports this process listens on (from /proc: sockets whose inode is one of our fds)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("section,key,problem", [
    ({"port": -2}, "metrics.port", "must be >= -1, got -2"),
    ({"port": "9100"}, "metrics.port", "expected int, got str '9100'"),
    ({"port": True}, "metrics.port", "expected int, got bool True"),
    ({"port": 65530}, "metrics.port", "65530 + P + T - 1 = 65536 is over 65535"),
    ({"host": " "}, "metrics.host", "must not be empty"),
    ({"targets_dir": 3}, "metrics.targets_dir", "expected str, got int 3"),
    ({"interval": 5}, "metrics.interval", "unknown key (known: port, host, targets_dir, "
                                          "curves_dir)"),
])
def test_bad_metrics_config_is_rejected_naming_the_key(section: dict, key: str,
                                                       problem: str) -> None:
    raw = {"job": {"pservers": ["127.0.0.1:1", "127.0.0.1:2"], "num_trainers": 5},
           "metrics": section}
    with pytest.raises(cfg.ConfigError) as e:
        cfg.build(raw)
    assert e.value.key == key and str(e.value) == f"{key}: {problem}"


def test_pserver_cli_exits_2_on_a_bad_metrics_key(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(dump_toml({"job": {"pservers": ["127.0.0.1:0"]}, "metrics": {"port": -5}}))
    r = subprocess.run([sys.executable, "-m", "pserver", "--id", "0", "--config", str(path)],
                       env=python_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "metrics.port: must be >= -1, got -5" in r.stderr


def test_ports_per_role_and_id() -> None:
    c = cfg.build({"job": {"pservers": ["h:1", "h:2", "h:3"], "num_trainers": 2},
                   "metrics": {"port": 9100}})
    assert [port_for(c, "pserver", i) for i in range(3)] == [9100, 9101, 9102]
    assert [port_for(c, "trainer", j) for j in range(2)] == [9103, 9104]
    free = cfg.build({"metrics": {"port": 0}})
    assert port_for(free, "trainer", 1) == 0


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


# ---- a real job, scraped while it trains ------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "mdata", 2000, seed=3)


def wait_for(what: str, check: Any, proc: subprocess.Popen, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited with {proc.returncode} before {what}: "
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s")


def _port(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())[0]["targets"][0].rsplit(":", 1)[1])
    except (OSError, ValueError):
        return None


@pytest.mark.e2e
def test_a_running_job_scraped_twice_shows_counters_rising(data: Path, tmp_path: Path) -> None:
    doc = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), 2, 1, 1000,
                   {"kind": "lr", "use_numeric": True})
    doc["trainer"].update(batch_size=64, progress="off")
    doc["checkpoint"].update(checkpoint_dir=str(tmp_path / "ck"), step_interval=5)
    doc["metrics"] = {"port": 0}
    path = tmp_path / "job.toml"
    path.write_text(dump_toml(doc))
    p = subprocess.Popen([sys.executable, "-m", "trainer", "launch", "--config", str(path)],
                         cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        ps0 = wait_for("pserver 0 target", lambda: _port(tmp_path / "targets/pserver_0.json"), p)
        tr0 = wait_for("trainer 0 target", lambda: _port(tmp_path / "targets/trainer_0.json"), p)

        def trained(at_least: float) -> Any:
            s = scrape(tr0)
            return s if value(s, "psrt_trainer_step") >= at_least else None

        first_t = wait_for("a step", lambda: trained(1), p)
        first = scrape(ps0)
        later_t = wait_for("more steps", lambda: trained(value(first_t, "psrt_trainer_step")
                                                           + 12), p)
        later = scrape(ps0)
    finally:
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    for name in ("psrt_pull_calls_total", "psrt_pull_rows_total", "psrt_push_bytes_total"):
        assert value(later, name, table="lr_w") > value(first, name, table="lr_w") > 0, name
    for method in ("PullBatch", "PushBatch"):
        n = value(later, "psrt_rpc_duration_seconds_count", method=method)
        assert n > value(first, "psrt_rpc_duration_seconds_count", method=method)
        assert value(later, "psrt_rpc_duration_seconds_bucket", method=method, le="+Inf") == n
    assert value(later, "psrt_table_rows", table="lr_w") > 0
    assert value(later, "psrt_checkpoint_save_duration_seconds_count") > 0
    assert value(later, "psrt_checkpoint_last_committed_serial") >= 0
    assert value(later_t, "psrt_trainer_examples_total") > \
        value(first_t, "psrt_trainer_examples_total")
    assert value(later_t, "psrt_trainer_step_duration_seconds_count") >= 12
    assert value(later_t, "psrt_trainer_loss") > 0
    # the launcher plotted the curves it had the trainers write, even when interrupted
    assert "training curves plotted to" in out
    assert (tmp_path / "curves" / "curves.png").stat().st_size > 0


class NoCheckpointYet:
    """What ServerMetrics reads of a coordinator that restored nothing."""

    restore_manifest = None
    restore_serial = -1


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
    root = Path(__file__).resolve().parents[1]
    dashboard = (root / "deploy" / "grafana-dashboard.json").read_text()
    json.loads(dashboard)
    used = {re.sub(r"_(bucket|count|sum)$", "", n)
            for n in re.findall(r"psrt_[a-z_]+", dashboard) if n != "psrt_job"}
    assert used <= set(names), used - set(names)
    assert used == set(names), f"not on the dashboard: {set(names) - used}"
    readme = (root / "README.md").read_text()
    listed = dict(re.findall(r"^\| `(psrt_[a-z_]+)` \| (\w+) \|", readme, re.M))
    assert listed == names


@pytest.mark.parametrize("role", ["pserver", "trainer"])
def test_a_metrics_port_in_use_exits_2_naming_the_key(role: str, data: Path,
                                                      tmp_path: Path) -> None:
    import socket

    doc = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), 1, 1, 1,
                   {"kind": "lr", "use_numeric": True})
    doc.pop("checkpoint")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        first = port if role == "pserver" else port - 1  # trainer 0 serves on port + P
        doc["metrics"] = {"port": first}
        path = tmp_path / "job.toml"
        path.write_text(dump_toml(doc))
        args = ["--id", "0", "--config", str(path)]
        if role == "pserver":
            args += ["--port", "0"]
        else:  # nothing listens there: the trainer fails on its metrics port first
            args += ["--set", "rpc.connect_timeout_s=1"]
        r = subprocess.run([sys.executable, "-m", role, *args], env=python_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"metrics.port: {role}[0] cannot serve metrics on 127.0.0.1:{port}" in r.stderr


def test_checkpoint_metrics_count_saves_commits_and_a_failure(
        data: Path, tmp_path: Path, cluster_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.loop import Trainer

    monkeypatch.setenv("PSRT_FAULT_SAVE_ENOSPC", "1")  # checkpoint_1 fails: a full disk
    doc = demo_job(str(data / "train.txt"), str(data / "train.holdout.txt"), 1, 1, 1,
                   {"kind": "lr", "use_numeric": True})
    doc["trainer"].update(batch_size=256, progress="off")
    doc["checkpoint"].update(checkpoint_dir=str(tmp_path / "ck"), step_interval=2,
                             max_num_checkpoints=100)
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
