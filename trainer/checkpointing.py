"""The trainer's side of checkpoints: restore at start, save at trigger steps.

Distributed, the coordinator runs on pserver 0 and is reached over gRPC;
stand-alone, the same `Coordinator` runs in this process over the in-process
shard, so both write the same layout through the same code.

Distributed, the trainer also heartbeats (`pserver.heartbeat`): when the job
rolls back, its client is fenced, its next call fails, and the training loop
calls `restore` again, which joins the new generation with backoff.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from ckpt import CheckpointConfig, reader, writer
from ckpt.manifest import Part
from pserver import persist
from pserver.coordinator import CheckpointFailed, Coordinator
from pserver.coordinator_rpc import CoordinatorClient
from pserver.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    JobFailed,
    Unavailable,
)
from pserver.heartbeat import Heartbeat

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

            def save(_pserver: int, serial: int, base: int) -> Part | None:
                delta_of = base if base >= 0 else None
                if not config.background:
                    return persist.save_shard(shard, self.storage, serial, delta_of)
                persist.save_shard_background(
                    shard, self.storage, serial,
                    lambda part, err: self.coord.report_part(0, serial, part, err), delta_of,
                    config.background_duty, config.background_priority)
                return None

            self.coord: Coordinator | CoordinatorClient = Coordinator(
                shard.config, config, persist.job_facts(shard), save, watch=False)
            manifest = self.coord.restore_manifest
            if manifest is not None:
                persist.load_shard(shard, self.storage, manifest)
            self.coord.join_pserver(0, "in-process")
            self.coord.ready(0, self.coord.restore_serial)
        else:
            self.coord = CoordinatorClient(trainer.job)
        self.timeout = trainer.job.rpc.checkpoint_timeout_s
        self.incarnation = uuid.uuid4().hex
        self.heartbeat: Heartbeat | None = None

    def close(self, finished: bool = False) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop(final=finished)
        self.coord.close()

    def _start_heartbeat(self) -> None:
        t, client = self.t, self.t.client
        if t.standalone or self.heartbeat is not None:
            return
        self.heartbeat = Heartbeat(
            self.coord, "trainer", t.trainer_id, self.incarnation, t.job.recovery,
            lambda: (client.generation, t.global_step, False),
            lambda reason: client.fence(FailedPrecondition(reason)),
            lambda message: client.fence(JobFailed(message)),
            f"the coordinator (pserver[0] at {t.job.pservers[0]})").start()

    def _join(self) -> int:
        """Join the job's current generation, waiting with backoff while it recovers."""
        t = self.t
        if t.standalone:
            return self.coord.join_trainer(t.trainer_id, self.timeout)
        limit = t.job.recovery.rejoin_timeout_s
        deadline, delay = time.monotonic() + limit, 0.1
        t.client.set_generation(0)
        while True:
            try:
                serial = self.coord.join_trainer(t.trainer_id, self.timeout, self.incarnation)
                t.client.set_generation(self.coord.generation)
                t.export.set_generation(self.coord.generation)
                return serial
            except (Unavailable, DeadlineExceeded) as e:
                if time.monotonic() > deadline:
                    raise JobFailed(f"{t.role} could not join the job within {limit:.0f}s "
                                    f"(recovery.rejoin_timeout_s): {e}") from None
                log.info("%s: the job is not running yet (%s); trying again", t.role, e)
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def restore(self) -> int:
        """Join the job; load this trainer's counters from the checkpoint it restores
        (or start its counters afresh). Returns the serial (-1: a fresh start)."""
        t = self.t
        self._start_heartbeat()  # already while waiting to join: the wait can be long
        serial = self._join()
        if serial < 0:
            t.reset_counters()
            self.last_saved_step = -1
            return serial
        epoch_id, step_id, state = reader.read_trainer(self.storage, serial, t.trainer_id)
        t.reader.restore(state["reader"])
        t.global_step = int(state["global_step"])
        self.last_saved_step = t.global_step
        t.export.restored(serial, t.global_step)
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
        except Exception as e:  # noqa: BLE001 - e.g. a store's own errors: fails this one only
            error = f"{type(e).__name__}: {e}"
            log.error("%s could not write its part of checkpoint_%d: %s", t.role, serial, error)
        try:
            self.coord.commit(t.trainer_id, serial, part, error, self.timeout)
        except CheckpointFailed as e:
            log.warning("%s: %s; training goes on", t.role, e)
            return None
        self.last_saved_step = t.global_step
        t.export.checkpointed(serial, t.global_step, time.perf_counter() - started)
        what = "committed" if final or not self.config.background else \
            "copied; committing in the background"
        log.info("%s checkpoint_%d %s at epoch %d step %d (%.2fs)", t.role, serial, what,
                 epoch_id, step_id, time.perf_counter() - started)
        return serial
