"""`python -m trainer plot RUN_DIR [--out FILE.png]`: a job's training curves as a PNG.

Reads the curves files the trainers appended (RUN_DIR/curves/trainer_J.jsonl,
or RUN_DIR/trainer_J.jsonl; see trainer.metrics_export) and draws, over the
global step: the loss (each trainer's, smoothed), the held-out AUC at each
evaluation, and examples/s per trainer (over the last 10 steps). Steps that a
restore or recovery rolled back (trained, then lost) are drawn faint.
Checkpoint commits are dotted grey lines, restores and recoveries dashed red
ones. Needs matplotlib (the `plot` extra); the default output is
CURVES_DIR/curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class PlotError(ValueError):
    """No curves to plot, or no matplotlib to plot them with."""


def curves_dir(run_dir: Path) -> Path:
    """RUN_DIR/curves if it has curves files, else RUN_DIR itself."""
    if not run_dir.is_dir():
        raise PlotError(f"plot: no such directory: {run_dir}")
    sub = run_dir / "curves"
    return sub if any(sub.glob("trainer_*.jsonl")) else run_dir


def load(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Every trainer's records, by trainer id; a torn last line (a killed trainer) is skipped."""
    d = curves_dir(run_dir)
    files = sorted(d.glob("trainer_*.jsonl"))
    if not files:
        raise PlotError(f"plot: no training curves in {run_dir} (expected "
                        f"{run_dir}/curves/trainer_J.jsonl, which trainers write when the job "
                        "file sets metrics.curves_dir; `python -m trainer launch` sets it)")
    out: dict[int, list[dict[str, Any]]] = {}
    for f in files:
        try:
            trainer_id = int(f.stem.split("_", 1)[1])
        except ValueError:
            continue
        records = []
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        out[trainer_id] = records
    if not any(r.get("kind") == "step" for rs in out.values() for r in rs):
        raise PlotError(f"plot: the curves in {d} hold no training step yet")
    return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot: needs matplotlib, which is not installed; install the `plot` "
                        "extra (pip install 'psrt[plot]') or `pip install matplotlib`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, s = [], None
    for v in values:
        s = v if s is None else weight * s + (1 - weight) * v
        out.append(s)
    return out


def _segments(records: list[dict[str, Any]]) -> list[tuple[list[dict], int | None]]:
    """The runs of step records between (re)starts, restores and recoveries, each with the
    step the next run resumed from (None: the last run); its steps after that were lost."""
    out: list[tuple[list[dict], int | None]] = []
    cur: list[dict] = []
    resumed: int | None = None
    for r in records:
        kind = r.get("kind")
        if kind in ("start", "restore", "recovery"):
            resumed = int(r.get("step", 0))
        elif kind == "step" and r.get("loss") is not None:
            if resumed is not None:
                if cur:
                    out.append((cur, resumed))
                cur, resumed = [], None
            cur.append(r)
    if cur:
        out.append((cur, None))
    return out


def _throughput(seg: list[dict[str, Any]], window: int = 10) -> list[float | None]:
    """Examples/s at each step of a run, over the last `window` steps (wall clock)."""
    out: list[float | None] = [None]
    for i in range(1, len(seg)):
        k = max(0, i - window)
        dt = seg[i]["t"] - seg[k]["t"]
        out.append(sum(x["examples"] for x in seg[k + 1:i + 1]) / dt if dt > 0 else None)
    return out


def _draw_run(axes: tuple, seg: list[dict], lost_after: int | None, color: str,
              label: str | None, first_lost: bool) -> bool:
    """One run of one trainer: loss (raw, smoothed) and examples/s; the steps a later
    restore rolled back are drawn faint. Returns whether a lost part was drawn."""
    ax_loss, ax_rate = axes
    smooth = _smooth([r["loss"] for r in seg])
    rates = _throughput(seg)
    cut = len(seg) if lost_after is None else \
        next((i for i, r in enumerate(seg) if r["step"] > lost_after), len(seg))
    xs = [r["step"] for r in seg]
    for lo, hi, alpha in ((0, cut, 1.0), (max(0, cut - 1), len(seg), 0.3)):
        if hi - lo < 1 or (alpha < 1 and cut == len(seg)):
            continue
        kept = alpha == 1.0
        ax_loss.plot(xs[lo:hi], [r["loss"] for r in seg[lo:hi]], alpha=0.2 * alpha, lw=0.6,
                     color=color)
        ax_loss.plot(xs[lo:hi], smooth[lo:hi], lw=1.4, alpha=alpha, color=color,
                     label=label if kept else ("rolled back" if first_lost else None))
        pts = [(x, y) for x, y in zip(xs[lo:hi], rates[lo:hi], strict=True) if y is not None]
        ax_rate.plot([x for x, _ in pts], [y for _, y in pts], lw=1.0, alpha=alpha,
                     color=color, label=label if kept else None)
    return cut < len(seg)


def plot(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the curves of `run_dir` into a PNG; returns its path."""
    data = load(run_dir)
    plt = _pyplot()
    out = out or curves_dir(run_dir) / "curves.png"
    fig, (ax_loss, ax_auc, ax_rate) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    first_lost = True
    for j, records in sorted(data.items()):
        for n, (seg, lost_after) in enumerate(_segments(records)):
            if _draw_run((ax_loss, ax_rate), seg, lost_after, f"C{j}",
                         f"trainer {j}" if n == 0 else None, first_lost):
                first_lost = False
        evals = [r for r in records if r.get("kind") == "eval"]
        if evals:
            ax_auc.plot([r["step"] for r in evals], [r["auc"] for r in evals], "o-",
                        color=f"C{j}", label=f"trainer {j}")
    _mark_events(data, (ax_loss, ax_auc, ax_rate))
    ax_loss.set_ylabel("loss")
    ax_auc.set_ylabel("held-out AUC")
    ax_rate.set_ylabel("examples/s")
    ax_rate.set_xlabel("global step")
    for ax in (ax_loss, ax_auc, ax_rate):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    where = curves_dir(run_dir).resolve()
    name = where.parent.name if where.name == "curves" else where.name
    ax_loss.set_title(f"training curves of {name}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _mark_events(data: dict[int, list[dict[str, Any]]], axes: tuple) -> None:
    """Checkpoints (once per serial) and restores or recoveries (once per step)."""
    checkpoints = {r["serial"]: r["step"] for rs in data.values() for r in rs
                   if r.get("kind") == "checkpoint"}
    restores = sorted({r["step"] for rs in data.values() for r in rs
                       if r.get("kind") in ("restore", "recovery")})
    for ax in axes:
        for i, step in enumerate(sorted(set(checkpoints.values()))):
            ax.axvline(step, color="grey", ls=":", lw=0.8,
                       label="checkpoint" if ax is axes[0] and i == 0 else None)
        for i, step in enumerate(restores):
            ax.axvline(step, color="red", ls="--", lw=1.2,
                       label="restore/recovery" if ax is axes[0] and i == 0 else None)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the launcher's --workdir, or the "
                   "metrics.curves_dir of a job")
    p.add_argument("--out", help="PNG to write (default: CURVES_DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        path = plot(Path(args.run_dir), Path(args.out) if args.out else None)
    except PlotError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"plot: wrote {path}")
    return 0


def after_launch(curves: str) -> str:
    """The launcher's last word on curves: where the plot went, or why there is none."""
    if not curves or not any(Path(curves).glob("trainer_*.jsonl")):
        return "no training curves were written"
    try:
        return f"training curves plotted to {plot(Path(curves))}"
    except PlotError as e:
        return f"training curves are in {curves}; no plot: {str(e).removeprefix('plot: ')}"
