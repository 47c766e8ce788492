"""Progress of a trainer: a tqdm bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Shows examples/s and the running loss; `mode` is auto, bar, log or off."""

    def __init__(self, role: str, mode: str, log_every: int, steps_per_epoch: int,
                 batch_size: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.role, self.mode, self.log_every = role, mode, log_every
        self.steps, self.batch_size = steps_per_epoch, batch_size
        self.bar: tqdm | None = None
        self.loss = float("nan")

    def start_epoch(self, epoch: int, position: int) -> None:
        self.epoch, self.done, self.t0 = epoch, position, time.perf_counter()
        self.since = 0
        if self.mode == "bar":
            self.bar = tqdm(total=self.steps, initial=position, desc=f"{self.role} epoch {epoch}",
                            unit="step", dynamic_ncols=True, leave=True)

    def update(self, loss: float) -> None:
        self.loss = loss if self.loss != self.loss else 0.95 * self.loss + 0.05 * loss
        self.done += 1
        self.since += 1
        rate = self.since * self.batch_size / max(1e-9, time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.loss:.4f}", ex_per_s=f"{rate:,.0f}", refresh=False)
        elif self.mode == "log" and (self.done % self.log_every == 0 or self.done == self.steps):
            log.info("%s epoch %d step %d/%d loss %.4f examples/s %.0f", self.role, self.epoch,
                     self.done, self.steps, self.loss, rate)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
