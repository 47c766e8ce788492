"""Prometheus metrics as real processes: a bad metrics key or a port in use exits 2 naming
the key, and a real job scraped while it trains."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import generated_data, python_env
from tests.metrics import scrape, value
from trainer.demo import demo_job, dump_toml


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generated_data(tmp_path_factory, "mdata", 2000, seed=3)


def test_pserver_cli_exits_2_on_a_bad_metrics_key(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(dump_toml({"job": {"pservers": ["127.0.0.1:0"]}, "metrics": {"port": -5}}))
    r = subprocess.run([sys.executable, "-m", "pserver", "--id", "0", "--config", str(path)],
                       env=python_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "metrics.port: must be >= -1, got -5" in r.stderr


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


# ---- a real job, scraped while it trains ------------------------------------------------


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
