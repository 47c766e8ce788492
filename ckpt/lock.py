"""The lock that keeps a second job out of a `checkpoint_dir` (the guide's note 1).

`_LOCK` holds the owning job's name, host, pid and since when. Another job
is refused with an error naming the holder; the same job (same name)
restarting takes the lock back. `python -m ckpt unlock DIR` breaks a stale
lock.

The rule, on any store: a job that finds no `_LOCK` creates it with a
write-if-absent (`Storage.create`), then reads it back and goes on only if it
reads its own token. A job that finds its own name there rewrites it (one
atomic replace or PUT). Where the create is atomic (local and mounted file
systems through a hard link; S3 through `If-None-Match: *`, which AWS S3 and
S3-compatible servers that implement conditional writes honour; fsspec's memory
store) two jobs starting together cannot both win. Elsewhere fsspec's
`mode="create"` is asked for but not counted on: where it checks and then
writes, two jobs starting within the same moment could both see no lock, and
the read-back catches only the one whose write landed first. The lock keeps out
a second job started by mistake; it is not a lease, so a job that dies keeps
its lock until it is restarted or unlocked.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from ckpt import layout
from ckpt.storage import Storage


class LockedError(RuntimeError):
    """checkpoint_dir belongs to another job, or cannot be reached to take the lock."""


def holder(storage: Storage) -> dict | None:
    try:
        return json.loads(storage.read_bytes(layout.LOCK).decode())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"job": "?", "host": "?", "pid": "?", "since": "?", "unreadable": True}


def describe(h: dict) -> str:
    since = h.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) \
        if isinstance(since, int | float) else str(since)
    return f"job {h.get('job')!r} (host {h.get('host')}, pid {h.get('pid')}, since {when})"


def acquire(storage: Storage, job: str) -> dict:
    """Take the lock for `job`, or raise LockedError naming the job that holds it (or why
    the directory cannot be used: a missing bucket, a store that cannot be reached)."""
    try:
        return _acquire(storage, job)
    except (OSError, ValueError) as e:
        raise LockedError(f"{storage.root}: cannot take the lock: {type(e).__name__}: {e}") \
            from None


def _acquire(storage: Storage, job: str) -> dict:
    storage.check_root()
    mine = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "token": uuid.uuid4().hex}
    data = json.dumps(mine).encode()
    current = holder(storage)
    if current is None:
        try:
            storage.create(layout.LOCK, data)
        except FileExistsError:  # another process was quicker
            current = holder(storage)
    if current is not None:
        _refuse_other(storage, job, current)
        storage.replace(layout.LOCK, data)  # the same job, restarted: take it back
    now = holder(storage)  # read back: a check-then-write store may have let two in
    if now is None:
        raise LockedError(f"{storage.root}: {layout.LOCK} vanished right after it was written "
                          f"(unlocked by another process?)")
    if now.get("token") != mine["token"]:
        _refuse_other(storage, job, now)
    return mine


def _refuse_other(storage: Storage, job: str, current: dict) -> None:
    if current.get("job") != job:
        raise LockedError(
            f"{storage.root} is used by {describe(current)}; a checkpoint_dir serves one job. "
            f"If that job is gone, break the lock with: python -m ckpt unlock {storage.root}"
        )


def break_lock(storage: Storage) -> dict | None:
    """Remove the lock; returns who held it."""
    h = holder(storage)
    if h is not None:
        try:
            storage.remove(layout.LOCK)
        except FileNotFoundError:
            pass
    return h
