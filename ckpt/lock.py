"""The lock that keeps a second job out of a `checkpoint_dir` (the guide's note 1).

`_LOCK` holds the owning job's name, host, pid and since when. Another job
is refused with an error naming the holder; the same job (same name)
restarting takes the lock back. `python -m ckpt unlock DIR` breaks a stale
lock.
"""

from __future__ import annotations

import json
import os
import socket
import time

from ckpt import layout
from ckpt.storage import LocalStorage


class LockedError(RuntimeError):
    """checkpoint_dir belongs to another job."""


def holder(storage: LocalStorage) -> dict | None:
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


def acquire(storage: LocalStorage, job: str) -> dict:
    """Take the lock for `job`, or raise LockedError naming the job that holds it."""
    storage.makedirs("")
    current = holder(storage)
    if current is not None and current.get("job") != job:
        raise LockedError(
            f"{storage.root} is used by {describe(current)}; a checkpoint_dir serves one job. "
            f"If that job is gone, break the lock with: python -m ckpt unlock {storage.root}"
        )
    mine = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    tmp = f"{layout.LOCK}.{os.getpid()}.tmp"
    storage.write_bytes("", tmp, json.dumps(mine).encode())
    os.replace(storage.path(tmp), storage.path(layout.LOCK))
    return mine


def break_lock(storage: LocalStorage) -> dict | None:
    """Remove the lock; returns who held it."""
    h = holder(storage)
    if h is not None:
        os.remove(storage.path(layout.LOCK))
    return h
