"""Training curves: `python -m trainer plot` on a recorded run (the `run_dir` fixture of
tests/conftest.py; what a trainer records is checked in tests/unit/test_curves.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import python_env

PNG = b"\x89PNG\r\n\x1a\n"


def plot_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "plot", *args],
                          env=env or python_env(), capture_output=True, text=True, timeout=120)


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
