"""The training loop and the guide's Python API: `Trainer(...).train(num_epochs, handler)`.

A step pulls the rows of the batch's ids and the dense variables, runs the
model's forward and backward pass, and pushes the gradients, all through a
client (`pserver.rpc.api.Client`): `PSClient` (distributed) or `LocalClient`
(stand-alone), so the same code trains both ways. In sync mode the step number
travels with every pull and push, and gradients are scaled by 1/T so that an
update is the mean over the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpt import CheckpointConfig
from pserver import config as pscfg
from pserver.coord.local import standalone
from pserver.errors import CheckpointFailed, DeadlineExceeded, FailedPrecondition, Unavailable
from pserver.rpc.api import Client
from pserver.rpc.client import PSClient
from pserver.rpc.coord import CoordinatorClient
from pserver.rpc.local import LocalClient
from trainer import data as tdata
from trainer.checkpointing import Checkpointer
from trainer.config import TrainerSettings, model_for, settings
from trainer.metrics import auc, logloss
from trainer.metrics_export import TrainerExport
from trainer.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeginEpochEvent:
    epoch: int


@dataclass(frozen=True)
class EndEpochEvent:
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BeginStepEvent:
    epoch: int
    step: int


@dataclass(frozen=True)
class EndStepEvent:
    epoch: int
    step: int
    global_step: int
    loss: float


Event = BeginEpochEvent | EndEpochEvent | BeginStepEvent | EndStepEvent


class Trainer:
    """Trainer `trainer_id` of a job (or the only one, stand-alone).

    `job` is a JobConfig or a job file path. `checkpoint_config` overrides the
    job file's [checkpoint] section.
    """

    def __init__(self, job: pscfg.JobConfig | str | Path, trainer_id: int = 0, *,
                 standalone: bool = False, checkpoint_config: CheckpointConfig | None = None,
                 overrides: tuple[str, ...] = ()) -> None:
        self.job = job if isinstance(job, pscfg.JobConfig) else pscfg.load(job, overrides)
        if checkpoint_config is not None and not isinstance(checkpoint_config, CheckpointConfig):
            raise TypeError(f"checkpoint_config: expected a CheckpointConfig, "
                            f"got {type(checkpoint_config).__name__}")
        if standalone and self.job.num_trainers != 1:
            self.job = dataclasses.replace(self.job, num_trainers=1)
        t = self.job.num_trainers
        if not 0 <= trainer_id < t:
            raise pscfg.ConfigError("--id", f"trainer id {trainer_id} is out of range 0..{t - 1} "
                                    f"(job.num_trainers is {t})")
        self.trainer_id = trainer_id
        self.role = "trainer" if standalone else f"trainer[{trainer_id}]"
        self.standalone = standalone
        self.settings: TrainerSettings = settings(self.job)
        self.checkpoint_config = checkpoint_config or self.settings.checkpoint
        if not standalone and self.checkpoint_config != self.job.checkpoint:
            raise pscfg.ConfigError("checkpoint", "a distributed trainer checkpoints with the job "
                                    "file's [checkpoint] section, which the pservers read too; "
                                    f"got {checkpoint_config}, the job file has "
                                    f"{self.job.checkpoint}")
        self.model = model_for(self.job, self.settings.model_section)
        self.sync = self.job.mode == "sync"
        self.global_step = 0
        self.train_data, self.eval_data = self._load_data()
        self.reader = self._fresh_reader()
        self.client: Client | None = None
        self.checkpointer: Checkpointer | None = None
        self.finished = False
        self.rollbacks = 0
        self.lost_steps = 0  # steps redone because the job rolled back
        self._pending_push: Callable[[], int] | None = None  # the last step's push answers
        self.export = TrainerExport(self.job, trainer_id)  # metrics and training curves

    def _load_data(self) -> tuple[tdata.Dataset, tdata.Dataset | None]:
        s, d = self.settings, self.settings.data
        full = tdata.read_file(s.train_path, strict=d.strict, cache=d.cache)
        if s.eval_path is not None:
            return full, tdata.read_file(s.eval_path, strict=d.strict, cache=d.cache)
        if d.holdout_fraction > 0:
            return tdata.split_holdout(full, d.holdout_fraction, self.job.seed)
        return full, None

    def _fresh_reader(self) -> tdata.TrainerReader:
        return tdata.TrainerReader(self.train_data, self.trainer_id, self.job.num_trainers,
                                   self.settings.trainer.batch_size, self.job.seed)

    def connect(self) -> Client:
        if self.client is None:
            ckpt = self.checkpoint_config
            if self.standalone:
                local = self.client = LocalClient(self.job)
                coord = standalone(local.shard, ckpt) if ckpt is not None else None
            else:
                self.client = PSClient(self.job, self.trainer_id)
                log.info("%s waiting for %d pservers: %s", self.role, self.job.num_pservers,
                         ", ".join(self.job.pservers))
                self.client.wait_ready()
                coord = CoordinatorClient(self.job) if ckpt is not None else None
            if coord is not None:
                self.checkpointer = Checkpointer(
                    ckpt, coord, self.client, self, self.export, trainer_id=self.trainer_id,
                    role=self.role, sync=self.sync, timeout=self.job.rpc.checkpoint_timeout_s,
                    recovery=None if self.standalone else self.job.recovery,
                    coordinator_name=f"the coordinator (pserver[0] at {self.job.pservers[0]})")
                self.checkpointer.restore()
        return self.client

    # ---- the counters a checkpoint saves (trainer.checkpointing.Counters) ---------------

    def counters(self) -> dict:
        return {"reader": self.reader.state(), "global_step": self.global_step}

    def load_counters(self, state: dict | None) -> None:
        if state is None:  # back to the start of training (a rollback before any checkpoint)
            self.reader = self._fresh_reader()
            self.global_step = 0
            return
        self.reader.restore(state["reader"])
        self.global_step = int(state["global_step"])

    def close(self) -> None:
        self.export.close()
        if self.checkpointer is not None:
            self.checkpointer.close(finished=self.finished)
            self.checkpointer = None
        if self.client is not None:
            self.client.close()
            self.client = None

    # ---- one step -----------------------------------------------------------

    def _pull(self, batch: Any, step: int) -> tuple[dict, Any, dict, dict]:
        """(ids, plan, rows, dense values) of a batch: every pull in flight at once."""
        client = self.client
        ids = self.model.slot_ids(batch)
        plan = client.plan(ids)
        self.flush()
        flat, params = client.pull_all(plan, step=step)
        rows = {t: flat[t].reshape(x.shape + (client.dim(t),)) for t, x in ids.items()}
        return ids, plan, rows, params

    def step(self, batch: Any) -> float:
        """Train on one batch; returns its loss."""
        s = self.global_step if self.sync else 0
        ids, plan, rows, params = self._pull(batch, s)
        res = self.model.forward_backward(batch, rows, params)
        scale = np.float32(1.0 / self.job.num_trainers) if self.sync else np.float32(1.0)

        def scaled(g: np.ndarray) -> np.ndarray:
            return g * scale if scale != 1 else g

        sparse = {t: scaled(res.row_grads[t].reshape(x.size, -1)) for t, x in ids.items()}
        # the push is answered while the next batch is prepared; errors surface at the
        # next pull (or flush)
        self._pending_push = self.client.start_push_many(
            plan, sparse, {n: scaled(g) for n, g in res.dense_grads.items()}, step=s)
        self.global_step += 1
        return res.loss

    def flush(self) -> None:
        """Wait for the last step's push to be answered (raising its error, if any)."""
        pending, self._pending_push = self._pending_push, None
        if pending is not None:
            pending()

    # ---- evaluation ---------------------------------------------------------

    def evaluate(self, dataset: tdata.Dataset | None = None) -> dict[str, float]:
        """logloss and AUC of the current parameters on `dataset` (default: held-out data)."""
        data = self.eval_data if dataset is None else dataset
        if data is None or len(data) == 0:
            return {}
        self.connect()
        s = self.global_step if self.sync else 0
        probs = []
        bs = self.settings.trainer.eval_batch_size
        for lo in range(0, len(data), bs):
            batch = data.take(np.arange(lo, min(lo + bs, len(data))))
            _, _, rows, params = self._pull(batch, s)
            probs.append(self.model.predict(batch, rows, params))
        p = np.concatenate(probs)
        return {"logloss": logloss(data.labels, p), "auc": auc(data.labels, p),
                "examples": float(len(data))}

    # ---- the loop -----------------------------------------------------------

    def train(self, num_epochs: int | None = None,
              event_handler: Callable[[Event], None] | None = None) -> dict[str, float]:
        """Train `num_epochs` (default: trainer.epochs); returns the last epoch's metrics."""
        epochs = self.settings.trainer.epochs if num_epochs is None else num_epochs
        handler = event_handler or (lambda event: None)
        self.export.start()
        self.connect()
        while True:
            try:
                metrics = self._train(epochs, handler)
                self.finished = True
                return metrics
            except (FailedPrecondition, Unavailable, DeadlineExceeded) as e:
                if self.standalone or self.checkpointer is None \
                        or isinstance(e, CheckpointFailed):
                    raise
                self._rejoin(e)

    def _rejoin(self, error: Exception) -> None:
        """The job is rolling back (or a peer is gone): drop this step, join again, and go
        on from the checkpoint the job restores."""
        log.warning("%s: %s; joining the job again", self.role, error)
        self._pending_push = None
        before = self.global_step
        serial = self.checkpointer.restore()
        self.client.wait_ready()
        self.export.recovered(serial, self.global_step)
        self.rollbacks += 1
        self.lost_steps += max(0, before - self.global_step)
        log.warning("%s rolled back from global step %d to %d (checkpoint_%d, generation %d); "
                    "%d steps to redo", self.role, before, self.global_step, serial,
                    self.client.generation, max(0, before - self.global_step))

    def _train(self, epochs: int, handler: Callable[[Event], None]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        r = self.reader
        t = self.settings.trainer
        progress = Progress(self.role, t.progress, t.log_every, r.steps_per_epoch, t.batch_size)
        log.info("%s training %d epochs of %d steps (batch %d, %s mode, %d trainers)", self.role,
                 epochs, r.steps_per_epoch, t.batch_size, self.job.mode,
                 self.job.num_trainers)
        for epoch in range(r.epoch, epochs):
            if epoch != r.epoch or r.position == 0:
                r.start_epoch(epoch)
            handler(BeginEpochEvent(epoch))
            progress.start_epoch(epoch, r.position)
            started = time.perf_counter()
            while (batch := r.next_batch()) is not None:
                step_id = r.position - 1
                handler(BeginStepEvent(epoch, step_id))
                loss = self.step(batch)
                progress.update(loss)
                handler(EndStepEvent(epoch, step_id, self.global_step, loss))
                self.export.step(epoch, self.global_step, loss, len(batch))
                if self.checkpointer is not None:
                    last = epoch == epochs - 1 and r.position == r.steps_per_epoch
                    self.checkpointer.after_step(epoch, step_id, last)
            self.flush()
            progress.end_epoch()
            metrics = {"epoch": float(epoch),
                       "train_seconds": time.perf_counter() - started}
            if self.trainer_id == 0:
                metrics.update(self.evaluate())
                if "auc" in metrics:
                    log.info("%s epoch %d: held-out logloss %.5f, AUC %.5f (%d examples)",
                             self.role, epoch, metrics["logloss"], metrics["auc"],
                             metrics["examples"])
                self.export.evaluated(epoch, self.global_step, metrics)
            handler(EndEpochEvent(epoch, metrics))
        return metrics

    def parameters(self, ids_by_table: dict[str, np.ndarray] | None = None) -> dict:
        """Dense values and the rows of every id in the data (or given ids), for comparisons."""
        self.connect()
        s = self.global_step if self.sync else 0
        out = {f"dense/{n}": v for n, v in self.client.pull_dense(step=s).items()}
        if ids_by_table is None:
            ids_by_table = {t: np.unique(x) for t, x in self.model.slot_ids(
                self.train_data).items()}
        for t, ids in ids_by_table.items():
            out[f"table/{t}"] = self.client.pull(t, ids, step=s)
        return out
