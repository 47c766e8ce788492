"""The trainer's side of checkpoints: restore at start, save at trigger steps.

Distributed, the coordinator runs on pserver 0 and is reached over gRPC;
stand-alone, the same `Coordinator` runs in this process over the in-process
shard, so both write the same layout through the same code.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ckpt import CheckpointConfig, reader, writer
from ckpt.manifest import Part
from pserver import persist
from pserver.coordinator import CheckpointFailed, Coordinator
from pserver.coordinator_rpc import CoordinatorClient
from pserver.errors import PsrtError

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, trainer: Trainer, config: CheckpointConfig) -> None:
        self.t = trainer
        self.config = config
        self.storage = config.storage()
        self.last_saved_step = -1
        if trainer.standalone:
            shard = trainer.client.shard

            def save(_pserver: int, serial: int) -> Part | None:
                if not config.background:
                    return persist.save_shard(shard, self.storage, serial)
                persist.save_shard_background(
                    shard, self.storage, serial,
                    lambda part, err: self.coord.report_part(0, serial, part, err))
                return None

            self.coord: Coordinator | CoordinatorClient = Coordinator(
                shard.config, config, persist.job_facts(shard), save)
            manifest = self.coord.restore_manifest
            if manifest is not None:
                persist.load_shard(shard, self.storage, manifest)
            self.coord.join_pserver(0, "in-process")
            self.coord.ready(0, self.coord.restore_serial)
        else:
            self.coord = CoordinatorClient(trainer.job)
        self.timeout = trainer.job.rpc.checkpoint_timeout_s

    def close(self) -> None:
        if isinstance(self.coord, CoordinatorClient):
            self.coord.close()

    def restore(self) -> int:
        """Join the job; load this trainer's counters from the checkpoint it restores.
        Returns the serial (-1: a fresh start)."""
        t = self.t
        serial = self.coord.join_trainer(t.trainer_id, self.timeout)
        if serial < 0:
            return serial
        epoch_id, step_id, state = reader.read_trainer(self.storage, serial, t.trainer_id)
        t.reader.restore(state["reader"])
        t.global_step = int(state["global_step"])
        self.last_saved_step = t.global_step
        log.info("%s restored checkpoint_%d: epoch %d, step %d (global step %d)", t.role,
                 serial, epoch_id, step_id, t.global_step)
        return serial

    def after_step(self, epoch_id: int, step_id: int, last: bool = False) -> None:
        """Save at the guide's trigger steps, and after the last step of training."""
        if last or self.config.should_save(epoch_id, step_id):
            self.save(epoch_id, step_id, final=last)

    def save(self, epoch_id: int, step_id: int, final: bool = False) -> int | None:
        """Enter the barrier, write this trainer's part, wait for the commit.

        A failed checkpoint is logged and training goes on: the next trigger tries again.
        """
        t = self.t
        if self.last_saved_step == t.global_step:
            return None
        t.flush()  # the barrier comes after this trainer's push for the step is answered
        started = time.perf_counter()
        serial = self.coord.barrier(t.trainer_id, t.global_step, epoch_id, step_id, final,
                                    self.timeout)
        if serial < 0:
            log.info("%s skipped the checkpoint at epoch %d step %d: the last one is still "
                     "being written", t.role, epoch_id, step_id)
            return None
        part, error = None, None
        try:
            dense = t.client.pull_dense(step=t.global_step if t.sync else 0) \
                if t.trainer_id == 0 else None
            state = {"reader": t.reader.state(), "global_step": t.global_step}
            part = writer.write_trainer(self.storage, serial, t.trainer_id, epoch_id, step_id,
                                        state, dense)
        except (OSError, PsrtError) as e:
            error = f"{type(e).__name__}: {e}"
            log.error("%s could not write its part of checkpoint_%d: %s", t.role, serial, error)
        try:
            self.coord.commit(t.trainer_id, serial, part, error, self.timeout)
        except CheckpointFailed as e:
            log.warning("%s: %s; training goes on", t.role, e)
            return None
        self.last_saved_step = t.global_step
        what = "committed" if final or not self.config.background else \
            "copied; committing in the background"
        log.info("%s checkpoint_%d %s at epoch %d step %d (%.2fs)", t.role, serial, what,
                 epoch_id, step_id, time.perf_counter() - started)
        return serial
