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
from typing import TYPE_CHECKING, Any

from ckpt import reader
from pserver import persist
from pserver.config import ConfigError
from pserver.errors import FailedPrecondition
from pserver.heartbeat import Heartbeat
from pserver.shard import Shard

if TYPE_CHECKING:
    from pserver.server import Pserver

log = logging.getLogger(__name__)


class PserverMember:
    def __init__(self, ps: Pserver, coord: Any) -> None:
        self.ps, self.coord = ps, coord
        self.config = ps.shard.config
        self.id = ps.shard.pserver_id
        self.role = f"pserver[{self.id}]"
        self.incarnation = uuid.uuid4().hex
        self.storage = self.config.checkpoint.storage()
        self._lock = threading.Lock()
        self._rejoining = False
        self.heartbeat = Heartbeat(coord, "pserver", self.id, self.incarnation,
                                   self.config.recovery, self._state, self.rejoin_soon,
                                   ps.fail, f"the coordinator (pserver[0] at "
                                   f"{self.config.pservers[0]})")

    def _state(self) -> tuple[int, int, bool]:
        return self.ps.servicer.generation or 0, 0, False

    def start(self) -> None:
        """Heartbeat (so a long restore is not taken for death), join and restore, the first
        time into the fresh shard. Raises if that fails past `recovery.rejoin_timeout_s`."""
        self._rejoining = True  # until restored: a lost coordinator starts no second restore
        self.heartbeat.start()
        self._rejoin_loop(first=self.ps.shard)
        if self.ps.error is not None:
            raise ConfigError("job.pservers[0]", self.ps.error)

    def stop(self) -> None:
        self.heartbeat.stop()
        if self.coord is not self.ps.coordinator:
            self.coord.close()  # a CoordinatorClient's channel

    def rejoin_soon(self, reason: str) -> None:
        """Fence the shard now; restore in the background (heartbeats go on meanwhile)."""
        with self._lock:
            if self._rejoining:
                return
            self._rejoining = True
        log.warning("%s: %s; restoring from the newest complete checkpoint", self.role, reason)
        self.ps.servicer.generation = None
        self.ps.shard.fence(f"{self.role} is rolling back: {reason}")
        threading.Thread(target=self._rejoin_loop, name=f"{self.role}-rejoin",
                         daemon=True).start()

    def _rejoin_loop(self, first: Shard | None = None) -> None:
        deadline = time.monotonic() + self.config.recovery.rejoin_timeout_s
        delay = 0.1
        while True:
            try:
                self._restore(first if first is not None else Shard(self.config, self.id))
                break
            except Exception as e:  # noqa: BLE001 - retried, then the job fails naming it
                if time.monotonic() > deadline:
                    self.ps.fail(f"{self.role} could not rejoin the job within "
                                 f"{self.config.recovery.rejoin_timeout_s:.0f}s: {e}")
                    return
                log.info("%s: rejoining failed (%s); trying again", self.role, e)
                first = None  # it may hold part of a checkpoint now
                time.sleep(delay)
                delay = min(2.0, delay * 2)
        with self._lock:
            self._rejoining = False

    def _restore(self, shard: Shard) -> None:
        started = time.perf_counter()
        serial = self.coord.join_pserver(self.id, self.ps.address, self.incarnation)
        generation = self.coord.generation
        if serial >= 0:
            persist.load_shard(shard, self.storage, reader.load_manifest(self.storage, serial))
        old = self.ps.shard
        self.ps.shard = self.ps.servicer.shard = shard
        if old is not shard:
            old.fence(f"{self.role} rolled back to generation {generation}")
            self.ps.metrics.use_shard(shard)
            self.ps.metrics.recovered()
        self.ps.servicer.generation = generation
        self.ps.metrics.set_generation(generation)
        try:
            self.coord.ready(self.id, serial, generation)
        except FailedPrecondition:
            self.ps.servicer.generation = None  # rolled back again meanwhile
            raise
        what = f"checkpoint_{serial}" if serial >= 0 else "nothing (a fresh start)"
        log.info("%s serving generation %d, restored %s in %.2fs", self.role, generation, what,
                 time.perf_counter() - started)
