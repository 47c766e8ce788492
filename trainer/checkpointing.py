"""The trainer's side of checkpoints: restore at start, save at trigger steps.

A `Checkpointer` gets its collaborators explicitly: the coordinator (over gRPC,
`pserver.rpc.coord.CoordinatorClient`, or in this process for the
stand-alone trainer, `pserver.coord.local.standalone`: both write the same
layout through the same code), the client (trainer 0 pulls the dense values it
saves; a rollback fences it), and the trainer's counters (`Counters`).

Distributed, the trainer also heartbeats (`pserver.coord.heartbeat`): when the
job rolls back, its client is fenced, its next call fails, and the training
loop calls `restore` again, which joins the new generation with backoff.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Protocol

from ckpt import CheckpointConfig, reader, writer
from pserver.config import RecoveryConfig
from pserver.coord.heartbeat import Heartbeat
from pserver.errors import (
    CheckpointFailed,
    DeadlineExceeded,
    FailedPrecondition,
    JobFailed,
    Unavailable,
)
from pserver.retry import retry
from pserver.rpc.api import Client

log = logging.getLogger(__name__)


class Counters(Protocol):
    """What a checkpoint saves of a trainer, and gives back (the `Trainer`)."""

    global_step: int

    def counters(self) -> dict:
        """The reader's position and RNG state and the global step (JSON)."""

    def load_counters(self, state: dict | None) -> None:
        """Go on from saved counters (None: from the start of training)."""

    def flush(self) -> None:
        """Wait until the last step's push is answered."""


class Checkpointer:
    def __init__(self, config: CheckpointConfig, coord: Any, client: Client,
                 counters: Counters, export: Any, *, trainer_id: int, role: str, sync: bool,
                 timeout: float, recovery: RecoveryConfig | None = None,
                 coordinator_name: str = "the coordinator") -> None:
        """`coord`: a `Coordinator` or `CoordinatorClient`; `export`: the trainer's metrics
        (`trainer.metrics_export.TrainerExport`); `recovery`: heartbeat and rejoin with
        these settings (None: stand-alone, nothing to heartbeat to); `timeout`: the
        deadline of the barrier and the commit (`rpc.checkpoint_timeout_s`)."""
        self.config, self.coord, self.client = config, coord, client
        self.counters, self.export = counters, export
        self.trainer_id, self.role, self.sync = trainer_id, role, sync
        self.timeout, self.recovery = timeout, recovery
        self.coordinator_name = coordinator_name
        self.storage = config.storage()
        self.last_saved_step = -1
        self.incarnation = uuid.uuid4().hex
        self.heartbeat: Heartbeat | None = None

    def close(self, finished: bool = False) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop(final=finished)
        self.coord.close()

    def _start_heartbeat(self) -> None:
        if self.recovery is None or self.heartbeat is not None:
            return
        client, counters = self.client, self.counters
        self.heartbeat = Heartbeat(
            self.coord, "trainer", self.trainer_id, self.incarnation, self.recovery,
            lambda: (client.generation, counters.global_step, False),
            lambda reason: client.fence(FailedPrecondition(reason)),
            lambda message: client.fence(JobFailed(message)), self.coordinator_name).start()

    def _join(self) -> int:
        """Join the job's current generation, waiting with backoff while it recovers."""
        if self.recovery is None:
            return self.coord.join_trainer(self.trainer_id, self.timeout)
        limit = self.recovery.rejoin_timeout_s
        self.client.set_generation(0)
        try:
            serial = retry(
                lambda: self.coord.join_trainer(self.trainer_id, self.timeout, self.incarnation),
                seconds=limit, errors=(Unavailable, DeadlineExceeded),
                on_retry=lambda e: log.info("%s: the job is not running yet (%s); trying "
                                            "again", self.role, e))
        except (Unavailable, DeadlineExceeded) as e:
            raise JobFailed(f"{self.role} could not join the job within {limit:.0f}s "
                            f"(recovery.rejoin_timeout_s): {e}") from None
        self.client.set_generation(self.coord.generation)
        self.export.set_generation(self.coord.generation)
        return serial

    def restore(self) -> int:
        """Join the job; load this trainer's counters from the checkpoint it restores
        (or start its counters afresh). Returns the serial (-1: a fresh start)."""
        self._start_heartbeat()  # already while waiting to join: the wait can be long
        serial = self._join()
        if serial < 0:
            self.counters.load_counters(None)
            self.last_saved_step = -1
            return serial
        epoch_id, step_id, state = reader.read_trainer(self.storage, serial, self.trainer_id)
        self.counters.load_counters(state)
        step = self.counters.global_step
        self.last_saved_step = step
        self.export.restored(serial, step)
        log.info("%s restored checkpoint_%d: epoch %d, step %d (global step %d)", self.role,
                 serial, epoch_id, step_id, step)
        return serial

    def after_step(self, epoch_id: int, step_id: int, last: bool = False) -> None:
        """Save at the guide's trigger steps, and after the last step of training."""
        if last or self.config.should_save(epoch_id, step_id):
            self.save(epoch_id, step_id, final=last)

    def save(self, epoch_id: int, step_id: int, final: bool = False) -> int | None:
        """Enter the barrier, write this trainer's part, wait for the commit.

        A failed checkpoint is logged and training goes on: the next trigger tries again.
        """
        step = self.counters.global_step
        if self.last_saved_step == step:
            return None
        self.counters.flush()  # the barrier comes after this trainer's push for the step
        started = time.perf_counter()
        serial = self.coord.barrier(self.trainer_id, step, epoch_id, step_id, final,
                                    self.timeout)
        if serial < 0:
            log.info("%s skipped the checkpoint at epoch %d step %d: the last one is still "
                     "being written", self.role, epoch_id, step_id)
            return None
        part, error = None, None
        try:
            # under the save's deadline: a pserver may hold these while it writes its shard
            dense = self.client.pull_dense(step=step if self.sync else 0,
                                           deadline=self.timeout) \
                if self.trainer_id == 0 else None
            part = writer.write_trainer(self.storage, serial, self.trainer_id, epoch_id,
                                        step_id, self.counters.counters(), dense)
        except Exception as e:  # noqa: BLE001 - e.g. a store's own errors: fails this one only
            error = f"{type(e).__name__}: {e}"
            log.error("%s could not write its part of checkpoint_%d: %s", self.role, serial,
                      error)
        try:
            self.coord.commit(self.trainer_id, serial, part, error, self.timeout)
        except CheckpointFailed as e:
            if final:  # the job's result is not saved: the job has failed
                raise CheckpointFailed(f"the final checkpoint: {e}") from None
            log.warning("%s: %s; training goes on", self.role, e)
            return None
        self.last_saved_step = step
        self.export.checkpointed(serial, step, time.perf_counter() - started)
        what = "committed" if final or not self.config.background else \
            "copied; committing in the background"
        log.info("%s checkpoint_%d %s at epoch %d step %d (%.2fs)", self.role, serial, what,
                 epoch_id, step_id, time.perf_counter() - started)
        return serial
