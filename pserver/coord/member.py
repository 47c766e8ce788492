"""A pserver as a member of its job: join, restore, serve a generation, roll back.

At start the pserver joins the coordinator, restores the checkpoint it names
and reports ready. Then it heartbeats. When the job rolls back (another
process died, or the coordinator restarted), it stops serving (data calls get
UNAVAILABLE), builds a fresh shard restored from the checkpoint of the new
generation, swaps it in, and reports ready again, while the old shard's
waiting calls are released with UNAVAILABLE. The other processes are not
restarted.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Protocol

from ckpt import reader
from ckpt.storage import Damaged
from pserver.config import ConfigError, JobConfig
from pserver.coord.heartbeat import Heartbeat
from pserver.errors import FailedPrecondition
from pserver.retry import retry
from pserver.tables import persist
from pserver.tables.shard import Shard

log = logging.getLogger(__name__)


class Host(Protocol):
    """What a member needs of the pserver it runs in (`pserver.rpc.server.Pserver`)."""

    shard: Shard  # the shard serving now
    address: str  # where the other processes reach it
    error: str | None  # why the job failed, once it has

    @property
    def generation(self) -> int | None:
        """The generation served (None: restoring, nothing is served)."""

    def serve(self, shard: Shard, generation: int, reason: str) -> None:
        """Serve `generation` from `shard`; a shard it replaces is fenced with `reason`."""

    def pause(self, reason: str | None) -> None:
        """Serve nothing (data calls get UNAVAILABLE); with a reason, release the calls
        waiting on the shard with it."""

    def fail(self, message: str) -> None:
        """The job cannot go on."""


class PserverMember:
    def __init__(self, host: Host, coord: Any, config: JobConfig) -> None:
        """`coord`: the coordinator, in-process (pserver 0) or a `CoordinatorClient`."""
        self.host, self.coord, self.config = host, coord, config
        self.id = host.shard.pserver_id
        self.role = f"pserver[{self.id}]"
        self.incarnation = uuid.uuid4().hex
        self.storage = self.config.checkpoint.storage()
        self._lock = threading.Lock()
        self._rejoining = False
        self.heartbeat = Heartbeat(coord, "pserver", self.id, self.incarnation,
                                   self.config.recovery, self._state, self.rejoin_soon,
                                   host.fail, f"the coordinator (pserver[0] at "
                                   f"{self.config.pservers[0]})")

    def _state(self) -> tuple[int, int, bool]:
        return self.host.generation or 0, 0, False

    def start(self) -> None:
        """Heartbeat (so a long restore is not taken for death), join and restore, the first
        time into the fresh shard. Raises if that fails past `recovery.rejoin_timeout_s`."""
        self._rejoining = True  # until restored: a lost coordinator starts no second restore
        self.heartbeat.start()
        self._rejoin_loop(first=self.host.shard)
        if self.host.error is not None:
            raise ConfigError("job.pservers[0]", self.host.error)

    def stop(self) -> None:
        self.heartbeat.stop()

    def rejoin_soon(self, reason: str) -> None:
        """Fence the shard now; restore in the background (heartbeats go on meanwhile)."""
        with self._lock:
            if self._rejoining:
                return
            self._rejoining = True
        log.warning("%s: %s; restoring from the newest complete checkpoint", self.role, reason)
        self.host.pause(f"{self.role} is rolling back: {reason}")
        threading.Thread(target=self._rejoin_loop, name=f"{self.role}-rejoin",
                         daemon=True).start()

    def _rejoin_loop(self, first: Shard | None = None) -> None:
        """Restore (into `first`, then into fresh shards: a failed one may hold part of a
        checkpoint) until it works, or fail the job after `recovery.rejoin_timeout_s`."""
        shards = iter([first] if first is not None else [])
        limit = self.config.recovery.rejoin_timeout_s
        try:
            retry(lambda: self._restore(next(shards, None) or Shard(self.config, self.id)),
                  seconds=limit, errors=(Exception,),
                  on_retry=lambda e: log.info("%s: rejoining failed (%s); trying again",
                                              self.role, e))
        except Exception as e:  # noqa: BLE001 - the job fails naming it
            self.host.fail(f"{self.role} could not rejoin the job within {limit:.0f}s: {e}")
            return
        with self._lock:
            self._rejoining = False

    def _restore(self, shard: Shard) -> None:
        started = time.perf_counter()
        serial = self.coord.join_pserver(self.id, self.host.address, self.incarnation)
        generation = self.coord.generation
        if serial >= 0:
            try:
                persist.load_shard(shard, self.storage,
                                   reader.load_manifest(self.storage, serial))
            except Damaged as e:  # the job falls back together; this pserver rejoins
                self.coord.ready(self.id, serial, generation, damaged=str(e))
                raise
        self.host.serve(shard, generation, f"{self.role} rolled back to generation {generation}")
        try:
            self.coord.ready(self.id, serial, generation)
        except FailedPrecondition:
            self.host.pause(None)  # rolled back again meanwhile
            raise
        what = f"checkpoint_{serial}" if serial >= 0 else "nothing (a fresh start)"
        log.info("%s serving generation %d, restored %s in %.2fs", self.role, generation, what,
                 time.perf_counter() - started)
