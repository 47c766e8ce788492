"""Training curves: what a trainer records, and `python -m trainer plot`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pserver import config as cfg
from tests.conftest import generated_data, python_env
from trainer.demo import demo_job
from trainer.loop import Trainer

PNG = b"\x89PNG\r\n\x1a\n"


def plot_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "plot", *args],
                          env=env or python_env(), capture_output=True, text=True, timeout=120)


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


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "curves/trainer_0.jsonl").read_text().splitlines()]


def test_a_trainer_records_steps_evaluations_checkpoints_and_restores(run_dir: Path) -> None:
    rs = records(run_dir)
    kinds = [r["kind"] for r in rs]
    assert kinds[0] == "start" and kinds.count("start") == 2
    steps = [r for r in rs if r["kind"] == "step"]
    per_epoch = len(steps) // 2
    assert per_epoch > 4 and [r["step"] for r in steps] == list(range(1, 2 * per_epoch + 1))
    assert all(r["loss"] > 0 and r["examples"] == 128 for r in steps)
    evals = [r for r in rs if r["kind"] == "eval"]
    assert {e["epoch"] for e in evals} == {0, 1} and all(0 < e["auc"] < 1 for e in evals)
    saved = [r for r in rs if r["kind"] == "checkpoint"]
    assert saved and [r["serial"] for r in saved] == sorted({r["serial"] for r in saved})
    # the second run restored the first run's final checkpoint, at its step
    restore = next(r for r in rs if r["kind"] == "restore")
    assert kinds.index("restore") == kinds.index("start", 1) + 1
    final = [r for r in saved if r["step"] == per_epoch]
    assert len(final) == 1 and (restore["serial"], restore["step"]) == (final[0]["serial"],
                                                                        per_epoch)


def test_plot_writes_a_png_from_a_recorded_run(run_dir: Path, tmp_path: Path) -> None:
    r = plot_cli(str(run_dir))
    out = run_dir / "curves" / "curves.png"
    assert r.returncode == 0 and f"plot: wrote {out}" in r.stdout, r.stderr
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    # --out, and a torn last line (a trainer killed mid-write) is skipped
    torn = tmp_path / "torn"
    torn.mkdir()
    text = (run_dir / "curves/trainer_0.jsonl").read_text()
    (torn / "trainer_0.jsonl").write_text(text + '{"kind": "step", "t": 1')
    r = plot_cli(str(torn), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG


def test_plot_errors_name_the_problem(tmp_path: Path, run_dir: Path) -> None:
    r = plot_cli(str(tmp_path / "missing"))
    assert r.returncode == 2 and f"plot: no such directory: {tmp_path / 'missing'}" in r.stderr
    r = plot_cli(str(tmp_path))
    assert r.returncode == 2 and f"plot: no training curves in {tmp_path}" in r.stderr
    assert "metrics.curves_dir" in r.stderr
    (tmp_path / "trainer_0.jsonl").write_text('{"kind": "start", "t": 1, "step": 0}\n')
    r = plot_cli(str(tmp_path))
    assert r.returncode == 2 and "hold no training step yet" in r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, run_dir: Path) -> None:
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = python_env()
    env["PYTHONPATH"] = f"{blocker.parent}:{env['PYTHONPATH']}"
    r = plot_cli(str(run_dir), "--out", str(tmp_path / "y.png"), env=env)
    assert r.returncode == 2 and "plot: needs matplotlib" in r.stderr
    assert "psrt[plot]" in r.stderr and not (tmp_path / "y.png").exists()
