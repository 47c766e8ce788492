"""A trainer's Prometheus metrics and its training curves file.

`TrainerExport` is what the training loop calls, once per event: `step`,
`evaluated`, `checkpointed`, `restored`, `recovered`. It keeps the trainer's
gauges and counters (served over HTTP when `metrics.port` is not -1, see
`pserver.metrics.server_metrics`) and, when `metrics.curves_dir` is set, appends one JSON line
per event to CURVES_DIR/trainer_J.jsonl:

    {"kind": "start", "t": ..., "step": 0, "pid": 123}
    {"kind": "step", "t": ..., "epoch": 0, "step": 1, "loss": 0.69, "examples": 512,
     "examples_per_s": 20480.0}
    {"kind": "eval", "t": ..., "epoch": 0, "step": 40, "auc": 0.71, "logloss": 0.52}
    {"kind": "checkpoint", "t": ..., "step": 40, "serial": 3, "seconds": 0.2}
    {"kind": "restore" | "recovery", "t": ..., "step": 40, "serial": 3}

`t` is the wall clock (seconds since the epoch), `step` the trainer's global
step, `examples_per_s` the rate over the last second or more (null before
that). The file is line-buffered: a killed trainer loses at most the line it
was writing. `python -m trainer plot RUN_DIR` draws it (trainer.plot).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import IO, Any

from pserver.config import JobConfig
from pserver.metrics.exporter import SAVE_BUCKETS, Exporter

log = logging.getLogger(__name__)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)
RATE_WINDOW_S = 1.0


def curves_path(curves_dir: str | Path, trainer_id: int) -> Path:
    return Path(curves_dir) / f"trainer_{trainer_id}.jsonl"


class TrainerExport(Exporter):
    """Trainer `trainer_id`'s metrics and curves."""

    def __init__(self, job: JobConfig, trainer_id: int) -> None:
        super().__init__(job, "trainer", trainer_id)
        self._step = self.gauge("psrt_trainer_step", "global step (steps this trainer ran, "
                                "restored ones included)")
        self._epoch = self.gauge("psrt_trainer_epoch", "current epoch")
        self._loss = self.gauge("psrt_trainer_loss", "loss of the last batch")
        self._rate = self.gauge("psrt_trainer_examples_per_second", "examples trained per "
                                "second over the last second or more")
        self._examples = self.counter("psrt_trainer_examples", "examples trained by this "
                                      "process")
        self._step_s = self.histogram("psrt_trainer_step_duration_seconds", "time between "
                                      "the ends of two steps (pull, compute, push)", STEP_BUCKETS)
        self._auc = self.gauge("psrt_trainer_eval_auc", "held-out AUC at the last evaluation")
        self._logloss = self.gauge("psrt_trainer_eval_logloss", "held-out logloss at the last "
                                   "evaluation")
        self._ckpt_s = self.histogram("psrt_trainer_checkpoint_stall_seconds", "time this "
                                      "trainer waited for a checkpoint (barrier to commit)",
                                      SAVE_BUCKETS)
        self._ckpt_serial = self.gauge("psrt_trainer_last_checkpoint_serial", "serial of the "
                                       "last checkpoint this trainer saved or restored (-1: "
                                       "none)")
        self._ckpt_serial.set(-1)
        self._file: IO[str] | None = None
        self._last = time.perf_counter()
        self._win_t0, self._win_examples, self._win_rate = self._last, 0, math.nan
        self.global_step = 0
        self._started = False

    # ---- events -----------------------------------------------------------------

    def start(self) -> int | None:
        """Serve metrics (if configured) and mark a start in the curves file."""
        port = super().start()
        self._last = self._win_t0 = time.perf_counter()
        self._mark_start()
        return port

    def _mark_start(self) -> None:
        if not self._started:
            self._started = True
            self._write({"kind": "start", "step": self.global_step, "pid": os.getpid()})

    def step(self, epoch: int, global_step: int, loss: float, examples: int) -> None:
        now = time.perf_counter()
        self._step_s.observe(now - self._last)
        self._last = now
        self.global_step = global_step
        self._step.set(global_step)
        self._epoch.set(epoch)
        self._loss.set(loss)
        self._examples.inc(examples)
        self._win_examples += examples
        if now - self._win_t0 >= RATE_WINDOW_S:
            self._win_rate = self._win_examples / (now - self._win_t0)
            self._rate.set(self._win_rate)
            self._win_t0, self._win_examples = now, 0
        if self.config.metrics.curves_dir:
            self._write({"kind": "step", "epoch": epoch, "step": global_step,
                         "loss": _num(loss), "examples": examples,
                         "examples_per_s": _num(self._win_rate)})

    def evaluated(self, epoch: int, global_step: int, metrics: dict[str, float]) -> None:
        if "auc" not in metrics:
            return
        self._auc.set(metrics["auc"])
        self._logloss.set(metrics["logloss"])
        self._write({"kind": "eval", "epoch": epoch, "step": global_step,
                     "auc": _num(metrics["auc"]), "logloss": _num(metrics["logloss"])})

    def checkpointed(self, serial: int, global_step: int, seconds: float) -> None:
        self._ckpt_s.observe(seconds)
        self._ckpt_serial.set(serial)
        self._write({"kind": "checkpoint", "step": global_step, "serial": serial,
                     "seconds": round(seconds, 4)})

    def restored(self, serial: int, global_step: int) -> None:
        self._mark_start()
        self._ckpt_serial.set(serial)
        self.global_step = global_step
        self._step.set(global_step)
        self._write({"kind": "restore", "step": global_step, "serial": serial})

    def recovered(self, serial: int = -1, global_step: int | None = None) -> None:
        """A rollback to checkpoint `serial` while running (the recovery protocol calls it)."""
        super().recovered()
        if global_step is not None:
            self.global_step = global_step
            self._step.set(global_step)
        self._write({"kind": "recovery", "step": self.global_step, "serial": serial})

    def close(self) -> None:
        self.stop()
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- the curves file ----------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        curves_dir = self.config.metrics.curves_dir
        if not curves_dir:
            return
        if self._file is None:
            path = curves_path(curves_dir, self.index)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            except OSError as e:
                log.warning("%s cannot write training curves to %s: %s; curves are off",
                            self.name, path, e)
                self.config = _without_curves(self.config)
                return
            log.info("%s appending training curves to %s", self.name, path)
        self._file.write(json.dumps({"kind": record.pop("kind"), "t": round(time.time(), 3),
                                     **record}, allow_nan=False) + "\n")


def _num(x: float) -> float | None:
    return None if x != x or x in (math.inf, -math.inf) else round(float(x), 6)


def _without_curves(config: JobConfig) -> JobConfig:
    return dataclasses.replace(config, metrics=dataclasses.replace(config.metrics,
                                                                   curves_dir=""))


def launch_overrides(job: JobConfig, workdir: Path) -> list[str]:
    """--set flags the local launcher adds: curves in WORKDIR/curves and, with metrics on,
    file_sd targets in WORKDIR/targets, unless the job file names other directories."""
    out = []
    if not job.metrics.curves_dir:
        out.append(f"metrics.curves_dir={json.dumps(str((workdir / 'curves').resolve()))}")
    if job.metrics.port >= 0 and not job.metrics.targets_dir:
        out.append(f"metrics.targets_dir={json.dumps(str((workdir / 'targets').resolve()))}")
    return out
