"""The coordinator: membership, the restore point, and the checkpoint barrier.

Hosted by pserver 0. At start it takes the lock on `checkpoint_dir` and picks
the newest complete, intact checkpoint (or none). Pservers `join` (learning
the serial to restore) and report `ready` once restored; trainers `join`
once every pserver is ready. At a trigger step every trainer enters the
`barrier` after its push for that step: once all T are in, every pserver has
applied the step and nothing later, so the coordinator assigns the serial and
asks every pserver to write its shard, while the trainers write their parts
and `commit`. When every part is in, it writes MANIFEST.json and _SUCCESS,
rotates, and releases the trainers. A failed part fails that checkpoint only:
every trainer hears which process failed and why, and training goes on.

Membership, liveness and rollbacks to a new generation are in `membership`; a
rollback abandons the checkpoint being written and picks the restore point anew.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ckpt import CheckpointConfig, layout, lock, reader, retention, writer
from ckpt.manifest import Manifest, Part, merge
from ckpt.storage import shown
from pserver.config import JobConfig
from pserver.coord.membership import Membership
from pserver.errors import (
    CheckpointFailed,
    DeadlineExceeded,
    FailedPrecondition,
    JobFailed,
    MissingBase,
    Unavailable,
)
from pserver.metrics.hooks import NULL

log = logging.getLogger(__name__)
# (pserver_id, serial, base) -> its part; None for a background save, whose part comes later
# through `report_part`. base >= 0: a delta of that checkpoint (rows changed since), -1: full
SaveShard = Callable[[int, int, int], Part | None]


class Coordinator:
    def __init__(self, config: JobConfig, ckpt: CheckpointConfig, facts: dict,
                 save_shard: SaveShard, watch: bool = True) -> None:
        self.config, self.ckpt, self.facts = config, ckpt, facts
        self.metrics = NULL  # a pserver's ServerMetrics when it watches this coordinator
        self.storage = ckpt.storage()
        self.holder = lock.acquire(self.storage, config.name, config.run_id,
                                   ckpt.lock_lease_s)
        self._lease = threading.Lock()  # one renewal at a time (the keeper's, a commit's)
        self._lease_stop = threading.Event()
        self.lock_lost: str | None = None
        started = time.perf_counter()
        # the trainers' files are checked here, the pservers' while they load them
        self._damaged: dict[int, str] = {}  # serial -> the damaged file found restoring it
        found = list(reader.restorable(self.storage, deep=reader.PARTS))
        manifest = found[0] if found else None
        self.verify_seconds = time.perf_counter() - started
        self.restore_serial = manifest.serial if manifest is not None else -1
        self.restore_manifest = manifest
        # the checkpoints known restorable (at start, committed or restored since, less what
        # rotation removed): a listing without the newest (but damaged) is an outage
        self._known = {m.serial for m in found}
        self._closed = False
        self._decided: dict[int, str | None] = {}  # serial -> outcome, once committed or not
        self.failed_in_a_row = 0  # checkpoints failed since the last commit
        self.last_serial = max(reader.max_serial(self.storage), self.restore_serial)
        # the base of the next delta and how many deltas it is past a full checkpoint
        self._committed = self._restored_chain(manifest)
        self._save_shard = save_shard
        self._cond = threading.Condition()
        self.members = Membership(config.num_pservers, config.num_trainers, config.recovery,
                                  self._cond, self._on_rollback)
        self._addresses: dict[int, str] = {}
        self._round: dict[int, tuple] = {}  # trainer -> (global_step, epoch, step, final)
        self._serial: int | None = None
        self._parts: dict[tuple[str, int], Part] = {}
        self._failures: list[str] = []
        self._outcome: dict[int, str | None] = {}  # serial -> None (committed) or the error
        self.background = ckpt.background
        self._staged: set[int] = set()  # pservers whose shard is copied (or written)
        self._missing_base = False  # set while a delta fails for a pserver lacking its base
        self._skipped: set[tuple] = set()  # trigger points skipped while a save was in flight
        self._abandoned: set[int] = set()  # serials given up by a rollback
        self._pool = ThreadPoolExecutor(max(1, config.num_pservers), "coordinator-save")
        what = f"checkpoint_{self.restore_serial}" if manifest else "nothing (a fresh start)"
        log.info("coordinator: %s locked for job %r (run %s); restoring %s (verified in "
                 "%.2fs)", self.storage.root, config.name, self.holder["run"], what,
                 self.verify_seconds)
        threading.Thread(target=self._keep_lease, name="coordinator-lease", daemon=True).start()
        if watch:
            self.members.start_watch()

    @property
    def newest_known(self) -> int:
        """The newest checkpoint known complete and not found damaged (-1: none)."""
        return max(self._known - self._damaged.keys(), default=-1)

    @property
    def generation(self) -> int:
        return self.members.generation

    def close(self) -> None:
        self.members.stop()
        self._lease_stop.set()
        self._pool.shutdown(wait=False)
        with self._lease:
            if self.lock_lost is None and not self._closed:
                lock.release(self.storage, self.holder)
            self._closed = True  # a save still running commits nothing (nor renews)

    def fail(self, message: str) -> None:
        """The job has failed (its host cannot go on): every member hears `message`."""
        with self._cond:
            self.members.fatal = self.members.fatal or message
            self._cond.notify_all()

    # ---- the lock's lease ---------------------------------------------------

    def _keep_lease(self) -> None:
        every = self.ckpt.lock_lease_s / 3
        while not self._lease_stop.wait(every):
            try:
                self._renew()
            except lock.LockLost:
                return
            except Exception as e:  # noqa: BLE001 - an outage: the commits check it too
                log.warning("coordinator: cannot renew the lease of the lock on %s: %s",
                            self.storage.root, e)

    def _renew(self) -> None:
        """Renew the lease; LockLost (the job fails) if another run took the lock."""
        with self._lease:
            if self.lock_lost is not None:
                raise lock.LockLost(self.lock_lost)
            if self._closed:
                raise lock.LockLost("the coordinator has stopped")
            try:
                self.holder = lock.renew(self.storage, self.holder)
            except lock.LockLost as e:
                self.lock_lost = str(e)
            else:
                return
        with self._cond:
            m = self.members
            m.fatal = m.fatal or (f"{self.lock_lost}: this run no longer owns "
                                  f"{self.ckpt.checkpoint_dir}, writes nothing more there and "
                                  f"has failed")
            log.error("coordinator: %s", m.fatal)
            self._cond.notify_all()
        raise lock.LockLost(self.lock_lost)

    # ---- membership ---------------------------------------------------------

    def join_pserver(self, pserver_id: int, address: str, incarnation: str = "") -> int:
        """Returns the serial to restore (-1: none) for generation `self.generation`."""
        return self.join_pserver_at(pserver_id, address, incarnation)[0]

    def join_pserver_at(self, pserver_id: int, address: str,
                        incarnation: str = "") -> tuple[int, int]:
        """(serial to restore, generation), read together."""
        with self._cond:
            self.members.join("pserver", pserver_id, incarnation)
            self._addresses[pserver_id] = address
            return self.restore_serial, self.members.generation

    def address_of(self, pserver_id: int) -> str:
        with self._cond:
            if pserver_id not in self._addresses:
                raise Unavailable(f"pserver {pserver_id} has not joined")
            return self._addresses[pserver_id]

    def ready(self, pserver_id: int, serial: int, generation: int | None = None,
              damaged: str = "") -> None:
        """Pserver `pserver_id` restored `serial` for `generation`; or, `damaged` set, it
        cannot: that file is damaged, and the whole job falls back to the newest older
        complete checkpoint (a new generation)."""
        self.members.check_id("pserver", pserver_id)
        with self._cond:
            m = self.members
            gen = m.generation if generation is None else generation
            if damaged:
                if gen == m.generation and serial == self.restore_serial >= 0:
                    for bad in self._damaged_chain(serial, damaged):
                        self._damaged[bad] = damaged
                    log.warning("coordinator: pserver[%d] cannot restore checkpoint_%d: %s; "
                                "the job falls back to an older checkpoint", pserver_id,
                                serial, damaged)
                    m.rollback(f"checkpoint_{serial} is damaged")
                return
            if gen == m.generation and serial != self.restore_serial:
                raise FailedPrecondition(f"Ready: pserver {pserver_id} restored checkpoint "
                                         f"{serial}, the job restores {self.restore_serial}")
            m.mark_ready(pserver_id, gen)

    def _damaged_chain(self, serial: int, damaged: str) -> set[int]:
        """The checkpoints a damaged file of `serial`'s restore spoils: the one that holds
        it (a delta's base, maybe) and the deltas over it up to `serial`."""
        holder = layout.parse_serial(damaged.split("/", 1)[0])
        if holder is None or holder == serial:
            return {serial}
        try:
            links = reader.chain(self.storage, reader.load_manifest(self.storage, serial))
        except (OSError, ValueError):
            return {serial, holder}
        return {m.serial for m in links if m.serial >= holder} | {holder, serial}

    def join_trainer(self, trainer_id: int, timeout: float, incarnation: str = "") -> int:
        """Wait until every pserver has restored and every trainer has joined; returns the
        serial to restore (-1: none) for generation `self.generation`."""
        return self.join_trainer_at(trainer_id, timeout, incarnation)[0]

    def join_trainer_at(self, trainer_id: int, timeout: float,
                        incarnation: str = "") -> tuple[int, int]:
        """`join_trainer`, returning (serial to restore, generation), read together."""
        deadline = time.monotonic() + timeout
        m = self.members
        with self._cond:
            m.join("trainer", trainer_id, incarnation)
            while not m.running:
                gen = m.generation
                self._cond.wait_for(lambda gen=gen: m.running or m.fatal is not None
                                    or m.generation != gen, deadline - time.monotonic())
                if m.fatal is not None:
                    raise JobFailed(m.fatal)
                if m.generation != gen:  # rolled back while waiting: join the new one
                    m.joined.add(trainer_id)
                    m._maybe_run()
                elif not m.running:
                    missing = sorted(set(range(self.config.num_pservers)) - m.ready)
                    absent = sorted(set(range(self.config.num_trainers)) - m.joined)
                    raise Unavailable(f"Join: pservers {missing} have not restored checkpoint "
                                      f"{self.restore_serial} and trainers {absent} have not "
                                      f"joined within {timeout:.0f}s")
            return self.restore_serial, m.generation

    def heartbeat(self, role: str, i: int, incarnation: str, step: int = 0,
                  finished: bool = False, generation: int = 0) -> tuple[int, int, bool]:
        """(generation, its restore serial, running) for a member that is alive."""
        with self._cond:
            self.members.heartbeat(role, i, incarnation, step, finished, generation)
            return self.members.generation, self.restore_serial, self.members.running

    def describe(self) -> dict:
        """Membership, generation and the restore point, for `python -m pserver status`."""
        with self._cond:
            return {**self.members.describe(), "restore_serial": self.restore_serial,
                    "writing": self._serial}

    def _on_rollback(self, reason: str) -> None:
        """(Under the lock.) Abandon the checkpoint being written; restore the newest."""
        if self._serial is not None and self._serial in self._decided:
            self._settle(self._serial, self._decided[self._serial])  # committed (or not)
        elif self._serial is not None:
            self._outcome[self._serial] = f"checkpoint_{self._serial} abandoned: {reason}"
            self._abandoned.add(self._serial)
            self._serial = None
        self._round = {}  # trainers waiting in a barrier wake up and join again
        self._skipped = set()
        known = self.newest_known
        try:
            manifest = reader.newest_complete(self.storage, deep=reader.PARTS,
                                              damaged=self._damaged)
            if known >= 0 and (manifest is None or manifest.serial < known):
                newest = f"checkpoint_{manifest.serial}" if manifest else "nothing"
                raise FileNotFoundError(f"its newest complete checkpoint is {newest}, though "
                                        f"checkpoint_{known} was committed or restored")
        except (OSError, ValueError) as e:
            # never a fresh start (nor an older checkpoint) for a store that is away: its
            # processes retry the newest known until recovery.rejoin_timeout_s
            log.error("coordinator: %s looks unreachable (%s); generation %d restores "
                      "checkpoint_%d, the newest known", shown(self.ckpt.checkpoint_dir), e,
                      self.members.generation, known)
            if known >= 0 and self.restore_serial != known:
                self.restore_manifest = None
                self.restore_serial = known
            return
        self.restore_manifest = manifest
        self.restore_serial = manifest.serial if manifest is not None else -1
        self._known |= {self.restore_serial} - {-1}
        self._committed = self._restored_chain(manifest)
        log.info("coordinator: generation %d restores %s", self.members.generation,
                 f"checkpoint_{self.restore_serial}" if manifest else "nothing (a fresh start)")

    def _restored_chain(self, manifest: Manifest | None) -> tuple[int, int]:
        """(serial, deltas past a full checkpoint) of the checkpoint restored."""
        if manifest is None:
            return -1, 0
        return manifest.serial, len(reader.chain(self.storage, manifest)) - 1

    # ---- the barrier --------------------------------------------------------

    def barrier(self, trainer_id: int, global_step: int, epoch_id: int, step_id: int,
                final: bool, timeout: float) -> int:
        """Wait for every trainer at the same point; returns the serial to write into."""
        self.members.check_id("trainer", trainer_id)
        point = (epoch_id, step_id, final) if self.config.mode == "async" else \
            (global_step, epoch_id, step_id, final)
        t = self.config.num_trainers
        with self._cond:
            gen = self._check_running("Barrier", trainer_id)
            if point in self._skipped:
                return -1
            if self._serial is not None and len(self._round) == t:
                # a background save of an earlier point is still being written
                if not final:
                    self._skipped.add(point)
                    log.warning("coordinator: checkpoint_%d is still being written; skipping "
                                "the save at %s", self._serial, point)
                    return -1
                if not self._cond.wait_for(lambda: self._serial is None, timeout):
                    raise DeadlineExceeded(f"Barrier: checkpoint {self._serial} still being "
                                           f"written after {timeout:.0f}s")
            others = {v for k, v in self._round.items() if k != trainer_id}
            if others and others != {point}:
                raise FailedPrecondition(f"Barrier: trainer {trainer_id} is at {point}, other "
                                         f"trainers at {sorted(others)}")
            self._round[trainer_id] = point
            if len(self._round) == t:
                self._start_save()
            elif not self._cond.wait_for(lambda: self._serial is not None
                                         or self.members.generation != gen
                                         or self.members.fatal is not None, timeout):
                self._round.pop(trainer_id, None)
                missing = sorted(set(range(t)) - set(self._round))
                raise DeadlineExceeded(f"Barrier: trainers {missing} did not reach "
                                       f"epoch {epoch_id} step {step_id} within {timeout:.0f}s")
            self._check_running("Barrier", trainer_id, gen)
            return self._serial

    def _check_running(self, where: str, trainer_id: int, gen: int | None = None) -> int:
        m = self.members
        if m.fatal is not None:
            raise JobFailed(m.fatal)
        if not m.running or (gen is not None and m.generation != gen):
            raise FailedPrecondition(f"{where}: trainer {trainer_id}: the job is rolling back "
                                     f"(generation {m.generation}); join again")
        return m.generation

    def _start_save(self) -> None:
        """All trainers are in: assign the serial, start every pserver's save."""
        self.last_serial = max(self.last_serial, reader.max_serial(self.storage)) + 1
        serial = self.last_serial
        base = self._base = self.ckpt.next_base(*self._committed)
        self._serial, self._parts, self._failures = serial, {}, []
        self._staged = set()
        self._missing_base = False  # a pserver cannot write this delta: the next is full
        self._final = any(p[-1] for p in self._round.values())
        try:
            self._renew()  # a run that lost the lock writes nothing more
        except lock.LockLost:
            self._serial, self._round = None, {}
            return  # the job has failed: every trainer hears it
        except Exception as e:  # noqa: BLE001 - an outage: the commit checks again
            log.warning("coordinator: cannot check the lock on %s: %s", self.storage.root, e)
        try:
            self.storage.makedirs(f"checkpoint_{serial}")
        except Exception as e:  # noqa: BLE001 - the store is away: this checkpoint fails
            log.error("coordinator: cannot make checkpoint_%d: %s", serial, e)
            for p in range(self.config.num_pservers):  # no shard is written
                self._staged.add(p)
                self._failures.append(f"pserver[{p}]: checkpoint_{serial} cannot be made: {e}")
            self._cond.notify_all()
            return
        point = next(iter(self._round.values()))
        log.info("coordinator: every trainer at %s; writing checkpoint_%d%s", point, serial,
                 f" (delta of checkpoint_{base})" if base >= 0 else "")
        for p in range(self.config.num_pservers):
            self._pool.submit(self._save_one, p, serial, base)
        self._cond.notify_all()

    def _save_one(self, pserver_id: int, serial: int, base: int) -> None:
        try:
            part = self._save_shard(pserver_id, serial, base)
        except Exception as e:  # noqa: BLE001 - reported to every trainer
            log.exception("coordinator: pserver[%d] failed to save checkpoint_%d", pserver_id,
                          serial)
            if isinstance(e, MissingBase):
                with self._cond:
                    if serial == self._serial:
                        self._missing_base = True
            self._mark_staged(pserver_id, serial)
            self._add_part(serial, None, f"pserver[{pserver_id}]: {e}")
            return
        self._mark_staged(pserver_id, serial)
        if part is not None:
            self._add_part(serial, part, None)

    def _mark_staged(self, pserver_id: int, serial: int) -> None:
        with self._cond:
            if serial != self._serial:  # a save a rollback abandoned, answering late
                return
            self._staged.add(pserver_id)
            self._cond.notify_all()

    def report_part(self, pserver_id: int, serial: int, part: Part | None,
                    error: str | None) -> None:
        """A background save's part, written (or why it was not)."""
        self.members.check_id("pserver", pserver_id)
        self._add_part(serial, part, error and f"pserver[{pserver_id}]: {error}")

    def commit(self, trainer_id: int, serial: int, part: Part | None, error: str | None,
               timeout: float) -> int:
        """A trainer's part (or its failure); waits for the commit and returns the serial."""
        self.members.check_id("trainer", trainer_id)
        with self._cond:
            if serial != self._serial and serial not in self._outcome:
                raise FailedPrecondition(f"Commit: no checkpoint {serial} is being written "
                                         f"(current: {self._serial})")
        self._add_part(serial, part, error and f"trainer[{trainer_id}]: {error}")
        with self._cond:
            # background saves release the trainers once every shard is copied and trainer
            # 0 has the dense values of the cut (its part is in: no push can come between
            # the state the pservers copied and those values); the final checkpoint, and
            # blocking saves, once committed
            wait_commit = not self.background or self._final

            def released() -> bool:
                return serial in self._outcome or (
                    not wait_commit and len(self._staged) == self.config.num_pservers
                    and self._dense_taken(serial))

            if not self._cond.wait_for(released, timeout):
                raise DeadlineExceeded(f"Commit: checkpoint {serial} not committed within "
                                       f"{timeout:.0f}s")
            outcome = self._outcome.get(serial)
        if serial in self._abandoned:  # not a failure: the job rolls back, the trainer rejoins
            raise Unavailable(f"{outcome}; the job is rolling back")
        if outcome is not None:
            raise CheckpointFailed(outcome)
        return serial

    def _dense_taken(self, serial: int) -> bool:
        """(Under the lock.) Trainer 0's part of `serial` (or its failure) is in."""
        return serial != self._serial or ("trainer", 0) in self._parts or \
            any(f.startswith("trainer[0]:") for f in self._failures)

    def _add_part(self, serial: int, part: Part | None, error: str | None) -> None:
        with self._cond:
            if serial != self._serial or serial in self._decided:
                return  # (late, or repeated after the commit)
            if error is not None:
                self._failures.append(error)
            if part is not None:
                self._parts[(part.role, part.id)] = part
            self._cond.notify_all()  # trainer 0's part releases the others (background)
            done = len(self._parts) + len(self._failures)
            if done < self.config.num_pservers + self.config.num_trainers:
                return
            # the commit and the choice of what rotation deletes happen under the lock, so
            # that a rollback (which picks its checkpoint under it too) sees before or after
            outcome, doomed = self._commit(serial, list(self._parts.values()),
                                           list(self._failures))
            self._decided[serial] = outcome  # a rollback from here on settles it
        self._rotate(serial, doomed)  # before the trainers hear: done when the job ends
        self.metrics.checkpoint_outcome(serial, outcome)
        with self._cond:
            if serial == self._serial:  # (else a rollback abandoned it meanwhile)
                self._settle(serial, outcome)

    def _commit(self, serial: int, parts: list[Part],
                failures: list[str]) -> tuple[str | None, list[int]]:
        """(Under the lock.) Write the manifest and _SUCCESS; (None, the serials rotation
        deletes now), or (why the checkpoint failed, [])."""
        if failures:
            msg = f"checkpoint_{serial} failed and was not committed: " + "; ".join(failures)
            return self._failed(msg), []
        try:
            started = time.perf_counter()
            manifest = merge(serial, self.facts, parts, final=self._final, base=self._base)
            self._renew()  # the lock is still this run's: nobody else writes here
            writer.commit(self.storage, manifest)
            self._known.add(serial)
        except Exception as e:  # noqa: BLE001 - a failed commit fails this checkpoint only
            log.exception("coordinator: committing checkpoint_%d failed", serial)
            return self._failed(f"checkpoint_{serial} failed and was not committed: {e}"), []
        self.failed_in_a_row = 0
        log.info("coordinator: committed checkpoint_%d (step %d, %.1f MB, commit %.2fs)",
                 serial, manifest.global_step, manifest.total_bytes / 1e6,
                 time.perf_counter() - started)
        try:
            doomed = retention.plan(self.storage, self.ckpt.max_num_checkpoints)
            self._known -= set(doomed)
            return None, doomed
        except Exception as e:  # noqa: BLE001 - committed all the same
            log.warning("coordinator: checkpoint_%d is committed; its rotation failed: %s",
                        serial, e)
            return None, []

    def _failed(self, msg: str) -> str:
        self.failed_in_a_row += 1
        last = self.newest_known
        since = f"since checkpoint_{last}" if last >= 0 else "since the job started"
        log.error("coordinator: %s (%d in a row %s)", msg, self.failed_in_a_row, since)
        return msg

    def _settle(self, serial: int, outcome: str | None) -> None:
        """(Under the lock.) The save is over: the base of the next one, the outcome the
        trainers hear, and, for the final checkpoint, what a restarted process restores."""
        if outcome is None:  # the base of the next delta
            self._committed = (serial, self._committed[1] + 1 if self._base >= 0 else 0)
        elif self._missing_base:  # a pserver lacks the base: the next save is full
            self._committed = (self._committed[0], self.ckpt.full_every)
        self._outcome[serial] = outcome
        self._serial, self._round = None, {}
        if outcome is None and self._final:
            self.members.done = True  # and a process starting again restores this
            self.restore_serial = serial
        self._cond.notify_all()

    def _rotate(self, serial: int, doomed: list[int]) -> None:
        """Delete what rotation chose when `serial` was committed (outside the lock: they
        are older than the newest complete checkpoint, which a rollback restores)."""
        try:
            retention.remove(self.storage, doomed)
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed all the same
            log.warning("coordinator: checkpoint_%d is committed; its rotation failed: %s",
                        serial, e)
        return None
