"""Training curves: what a stand-alone trainer records (steps, evaluations, checkpoints,
restores) in a recorded run (the `run_dir` fixture of tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path


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
