"""The lock that keeps a second run out of a `checkpoint_dir` (the guide's note 1).

`_LOCK` names the run that holds it: its run id (made once per launch and
handed to every process of it, `job.run_id`), the job's name, host, pid, since
when, and a lease: the coordinator renews `renewed` every third of
`checkpoint.lock_lease_s` and checks the lock is still its own before every
commit. It is released (kept, marked `released`) when the coordinator stops.

Who may take it:

- the same run (a restarted process of it): at once;
- another run of the same job, once the holder's lease is released or has
  expired, or at once when the holder ran on this host and its pid is gone;
- another job (name): never; `python -m ckpt unlock DIR` breaks the lock.

Everyone else is refused with LockedError naming the holder and how long ago
its lease was renewed. A holder that finds its lock taken or removed has lost
it (LockLost): it must stop writing.

On any store, a run that finds no `_LOCK` creates it with a write-if-absent
(`Storage.create`), then reads it back and goes on only if it reads its own
token. Where the create is atomic (local and mounted file systems through a
hard link; S3 through `If-None-Match: *`; fsspec's memory store) two runs
starting together cannot both win. Elsewhere fsspec's `mode="create"` is asked
for but not counted on: the read-back catches only the one whose write landed
first. Taking over a lease and renewing are a read, then a replace (and a
read back): a lease is only taken over after it expired or was released, so a
holder and a taker race only if the holder stalls for longer than its lease
(its next renewal or commit then finds the lock lost). Two runs taking over the
same expired or released lease at the same moment can both pass the read back;
the loser finds out at its first renewal or save (exit 3), before it commits.
Leases compare wall clocks of different hosts: keep them in sync to well
within the lease.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from ckpt import layout
from ckpt.storage import Storage

LEASE_S = 30.0
# the run of a process that names none (job.run_id empty): every coordinator made in this
# process is the same run; a restarted process is another one
PROCESS_RUN = f"p{uuid.uuid4().hex[:12]}"


class LockedError(RuntimeError):
    """checkpoint_dir belongs to another run, or cannot be reached to take the lock."""


class LockLost(RuntimeError):
    """The lock this run held was taken by another run or removed."""


def holder(storage: Storage) -> dict | None:
    try:
        return json.loads(storage.read_bytes(layout.LOCK).decode())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"job": "?", "host": "?", "pid": "?", "since": "?", "unreadable": True}


def _when(t: object) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) \
        if isinstance(t, int | float) else str(t)


def describe(h: dict, now: float | None = None) -> str:
    """`job 'ctr' (run R, host H, pid P, since ...; lease renewed 3s ago)`."""
    now = time.time() if now is None else now
    run = f"run {h['run']}, " if h.get("run") else ""
    text = f"job {h.get('job')!r} ({run}host {h.get('host')}, pid {h.get('pid')}, " \
           f"since {_when(h.get('since'))}"
    renewed = h.get("renewed")
    if h.get("released"):
        text += "; released"
    elif isinstance(renewed, int | float):
        text += f"; lease renewed {max(0.0, now - renewed):.0f}s ago"
    return text + ")"


def live(h: dict, now: float) -> bool:
    """The holder's lease is held: renewed within its lease and not released."""
    renewed = h.get("renewed")
    if h.get("released") or not isinstance(renewed, int | float):
        return False  # released, or a lock of a version without leases
    return now - renewed <= float(h.get("lease_s", LEASE_S))


def _gone(h: dict) -> bool:
    """The holder ran on this host and its process no longer exists."""
    pid = h.get("pid")
    if h.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists
        return False
    try:  # a zombie (killed, not yet reaped) is gone too
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def acquire(storage: Storage, job: str, run: str = "", lease_s: float = LEASE_S) -> dict:
    """Take the lock for run `run` of `job`, or raise LockedError naming the holder (or why
    the directory cannot be used: a missing bucket, a store that cannot be reached)."""
    try:
        return _acquire(storage, job, run or PROCESS_RUN, lease_s)
    except (OSError, ValueError) as e:
        raise LockedError(f"{storage.root}: cannot take the lock: {type(e).__name__}: {e}") \
            from None


def _acquire(storage: Storage, job: str, run: str, lease_s: float) -> dict:
    storage.check_root()
    now = time.time()
    mine = {"job": job, "run": run, "host": socket.gethostname(), "pid": os.getpid(),
            "since": now, "renewed": now, "lease_s": lease_s, "token": uuid.uuid4().hex}
    data = json.dumps(mine).encode()
    current = holder(storage)
    if current is None:
        try:
            storage.create(layout.LOCK, data)
        except FileExistsError:  # another process was quicker
            current = holder(storage)
    if current is not None:
        _refuse(storage, mine, current)
        storage.replace(layout.LOCK, data)
    back = holder(storage)  # read back: a check-then-write store may have let two in
    if back is None:
        raise LockedError(f"{storage.root}: {layout.LOCK} vanished right after it was written "
                          f"(unlocked by another process?)")
    if back.get("token") != mine["token"]:
        _refuse(storage, mine, back, raced=True)
    return mine


def _refuse(storage: Storage, mine: dict, current: dict, raced: bool = False) -> None:
    """Raise LockedError unless `mine` may take the lock from `current`."""
    unlock = f"python -m ckpt unlock {storage.root}"
    if current.get("job") != mine["job"]:
        raise LockedError(f"{storage.root} is used by {describe(current)}; a checkpoint_dir "
                          f"serves one job. If that job is gone, break the lock with: {unlock}")
    if current.get("run") == mine["run"] and not raced:
        return  # a restarted process of the same run takes it back
    if raced or (live(current, time.time()) and not _gone(current)):
        lease = float(current.get("lease_s", LEASE_S))
        raise LockedError(
            f"{storage.root} is held by {describe(current)}: another run of this job is using "
            f"it (its lease of {lease:.0f}s, checkpoint.lock_lease_s, must expire first). If "
            f"that run is gone, wait or break the lock with: {unlock}")


def renew(storage: Storage, mine: dict) -> dict:
    """Renew the lease of `mine` (from `acquire`); LockLost if the lock is no longer its
    own. OSError: the store cannot be reached (the lease is not renewed)."""
    current = holder(storage)
    if current is None and (why := storage.missing()):
        raise FileNotFoundError(f"{storage.root} {why}")  # the store is away, not the lock
    if current is None or current.get("token") != mine["token"]:
        who = describe(current) if current else "nobody (it was removed)"
        raise LockLost(f"the lock on {storage.root} is now held by {who}")
    mine = {**mine, "renewed": time.time()}
    storage.replace(layout.LOCK, json.dumps(mine).encode())
    return mine


def release(storage: Storage, mine: dict) -> None:
    """Mark the lease of `mine` released (the job stays the directory's owner), if the lock
    is still its own; a store that cannot be reached leaves it to expire."""
    try:
        current = holder(storage)
        if current is not None and current.get("token") == mine["token"]:
            storage.replace(layout.LOCK, json.dumps({**mine, "released": True}).encode())
    except OSError:
        pass


def break_lock(storage: Storage) -> dict | None:
    """Remove the lock; returns who held it."""
    h = holder(storage)
    if h is not None:
        try:
            storage.remove(layout.LOCK)
        except FileNotFoundError:
            pass
    return h
