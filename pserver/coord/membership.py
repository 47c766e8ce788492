"""Who is in the job, who is alive, and the generation: the coordinator's side of recovery.

Every pserver and trainer joins with an incarnation (random per process start),
then heartbeats every `recovery.heartbeat_s`. The job runs at generation G
once every pserver has restored G's checkpoint and every trainer has joined G.
A lost process rolls the whole job back to the newest complete checkpoint at
generation G+1: a restart (a new incarnation joins), silence for longer than
`recovery.liveness_timeout_s`, or a trainer that gave up its step and joins
again. Data calls carry the generation, so a request from before a rollback is
refused. A process lost for longer than `recovery.rejoin_timeout_s` fails the
job, and every other process hears which one.

Generations start from the wall clock in milliseconds, so a restarted
coordinator never hands out a generation an older one used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pserver.config import RecoveryConfig
from pserver.errors import FailedPrecondition, InvalidArgument, JobFailed

log = logging.getLogger(__name__)


@dataclass
class Member:
    incarnation: str
    last_seen: float
    watched: bool = False  # for liveness: from its join (or first heartbeat, if it joined
    # without an incarnation, as tools and the stand-alone trainer do)
    step: int = 0
    finished: bool = False
    generation: int = 0  # the one it serves, as its last heartbeat said (0: restoring)


class Membership:
    """Call every method with `cond` held; `on_rollback(reason)` runs under it too."""

    def __init__(self, num_pservers: int, num_trainers: int, recovery: RecoveryConfig,
                 cond: threading.Condition, on_rollback: Callable[[str], None]) -> None:
        self.p, self.t, self.cfg = num_pservers, num_trainers, recovery
        self.cond, self.on_rollback = cond, on_rollback
        self.generation = int(time.time() * 1000)
        self.running = False
        self.done = False  # the final checkpoint is committed: nothing rolls back any more
        self.fatal: str | None = None
        self.rollbacks = 0
        self.members: dict[tuple[str, int], Member] = {}
        self.ready: set[int] = set()  # pservers restored for this generation
        self.joined: set[int] = set()  # trainers joined this generation
        self.lost: dict[tuple[str, int], float] = {}  # -> since when
        self._stop = threading.Event()

    # ---- events -------------------------------------------------------------

    def join(self, role: str, i: int, incarnation: str) -> None:
        self.check_id(role, i)
        key = (role, i)
        old = self.members.get(key)
        restarted = old is not None and old.incarnation != incarnation
        self.members[key] = Member(incarnation, time.monotonic(), watched=bool(incarnation))
        self.lost.pop(key, None)
        if role == "pserver":
            self.ready.discard(i)
        if self.running and not self.done:
            why = "restarted" if restarted else "joined again"
            self.rollback(f"{role}[{i}] {why}")
        if role == "trainer":
            self.joined.add(i)
        self._maybe_run()

    def mark_ready(self, i: int, generation: int) -> None:
        if generation != self.generation:
            raise FailedPrecondition(f"Ready: pserver {i} restored for generation {generation}, "
                                     f"the job is at generation {self.generation}; join again")
        self.ready.add(i)
        self._maybe_run()

    def heartbeat(self, role: str, i: int, incarnation: str, step: int, finished: bool,
                  generation: int = 0) -> None:
        self.check_id(role, i)
        if self.fatal is not None:
            raise JobFailed(self.fatal)
        m = self.members.get((role, i))
        if m is None or m.incarnation != incarnation:
            raise FailedPrecondition(f"Heartbeat: {role}[{i}] (incarnation {incarnation!r}) has "
                                     f"not joined this coordinator; join again")
        m.last_seen, m.watched, m.step, m.finished = time.monotonic(), True, step, finished
        m.generation = generation

    def rollback(self, reason: str) -> None:
        self.generation += 1
        self.rollbacks += 1
        self.running = False
        self.ready.clear()
        self.joined.clear()
        log.warning("coordinator: %s; rolling the job back (generation %d)", reason,
                    self.generation)
        self.on_rollback(reason)
        self.cond.notify_all()

    def _maybe_run(self) -> None:
        if self.running or self.fatal is not None:
            return
        if len(self.ready) == self.p and len(self.joined) == self.t:
            self.running = True
            self.cond.notify_all()

    def check_id(self, role: str, i: int) -> None:
        n = {"pserver": self.p, "trainer": self.t}.get(role)
        if n is None:
            raise InvalidArgument(f"role must be 'pserver' or 'trainer', got {role!r}")
        if not 0 <= i < n:
            raise InvalidArgument(f"{role} id {i} is out of range 0..{n - 1}")

    # ---- liveness -----------------------------------------------------------

    def start_watch(self) -> None:
        threading.Thread(target=self._watch, name="coordinator-liveness", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.5, self.cfg.heartbeat_s / 2)):
            try:
                with self.cond:
                    self.check_liveness(time.monotonic())
            except Exception:  # keep watching: a dead watcher would never notice a loss
                log.exception("coordinator: checking liveness failed")

    def check_liveness(self, now: float) -> None:
        if self.done or self.fatal is not None:
            return
        for key, m in list(self.members.items()):
            silent = now - m.last_seen
            if m.watched and not m.finished and silent > self.cfg.liveness_timeout_s:
                del self.members[key]
                self.lost[key] = now
                role, i = key
                (self.ready if role == "pserver" else self.joined).discard(i)
                if self.running:
                    self.rollback(f"{role}[{i}] sent no heartbeat for {silent:.1f}s "
                                  f"(recovery.liveness_timeout_s)")
        gone = sorted(k for k, since in self.lost.items()
                      if now - since > self.cfg.rejoin_timeout_s)
        if gone:
            names = ", ".join(f"{r}[{i}]" for r, i in gone)
            self.fatal = (f"{names} did not come back within {self.cfg.rejoin_timeout_s:.0f}s "
                          f"(recovery.rejoin_timeout_s); the job has failed")
            log.error("coordinator: %s", self.fatal)
            self.cond.notify_all()

    def describe(self) -> dict:
        """A snapshot for status: every member, its step and how long it has been silent."""
        now = time.monotonic()
        return {"generation": self.generation, "running": self.running,
                "rollbacks": self.rollbacks, "fatal": self.fatal,
                "members": {f"{r}[{i}]": {"step": m.step, "silent_s": round(now - m.last_seen, 2),
                                          "finished": m.finished, "generation": m.generation,
                                          "ready": r == "trainer" and i in self.joined
                                          or r == "pserver" and i in self.ready}
                            for (r, i), m in sorted(self.members.items())},
                "lost": sorted(f"{r}[{i}]" for r, i in self.lost)}
