"""A member's side of liveness: a thread that heartbeats to the coordinator.

Every `recovery.heartbeat_s` it tells the coordinator that this process is
alive (and, for a trainer, its step), and hears the job's generation. It calls
back, never blocking itself on the work:

- `on_change(reason)` when the process must join again: the generation moved
  on (a rollback), or the coordinator does not know it (the coordinator
  restarted), or the coordinator has not answered for
  `recovery.liveness_timeout_s`;
- `on_fatal(message)` when the job failed, or the coordinator has not answered
  for `recovery.rejoin_timeout_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pserver.config import RecoveryConfig
from pserver.errors import FailedPrecondition, JobFailed, PsrtError

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, coord: Any, role: str, member_id: int, incarnation: str,
                 cfg: RecoveryConfig, state: Callable[[], tuple[int, int, bool]],
                 on_change: Callable[[str], None], on_fatal: Callable[[str], None],
                 coordinator_name: str = "the coordinator") -> None:
        """`state()` is (generation served, 0 while recovering; step; finished)."""
        self.coord, self.role, self.id, self.incarnation = coord, role, member_id, incarnation
        self.cfg, self.state = cfg, state
        self.on_change, self.on_fatal = on_change, on_fatal
        self.coordinator_name = coordinator_name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{role}-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self, final: bool = False) -> None:
        """Stop; `final` sends one last heartbeat saying this member has finished."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.cfg.heartbeat_s * 2 + 1)
        if final:
            try:
                gen, step, _ = self.state()
                self.coord.heartbeat(self.role, self.id, self.incarnation, step, True, gen)
            except PsrtError as e:
                log.debug("%s[%d]: the last heartbeat failed: %s", self.role, self.id, e)

    def _run(self) -> None:
        last_ok = time.monotonic()
        lost = False
        wait = 0.0  # the first one at once
        while not self._stop.wait(wait):
            wait = self.cfg.heartbeat_s
            gen, step, finished = self.state()
            try:
                job_gen, _serial, _running = self.coord.heartbeat(
                    self.role, self.id, self.incarnation, step, finished, gen)
            except JobFailed as e:
                self.on_fatal(str(e))
                return
            except FailedPrecondition as e:  # unknown to this coordinator: join again
                last_ok = time.monotonic()
                if gen:
                    self.on_change(str(e))
                continue
            except PsrtError as e:  # no answer
                silent = time.monotonic() - last_ok
                if silent > self.cfg.rejoin_timeout_s:
                    self.on_fatal(f"{self.coordinator_name} has not answered for {silent:.0f}s "
                                  f"(recovery.rejoin_timeout_s): {e}")
                    return
                if silent > self.cfg.liveness_timeout_s and not lost:
                    lost = True
                    self.on_change(f"{self.coordinator_name} has not answered for "
                                   f"{silent:.1f}s: {e}")
                continue
            last_ok, lost = time.monotonic(), False
            gen = self.state()[0]  # anew: the member may have joined meanwhile
            if gen and job_gen != gen:
                self.on_change(f"the job rolled back to generation {job_gen}")
