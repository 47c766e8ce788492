"""Rotation: keep `max_num_checkpoints` complete checkpoints, never the newest one less."""

from __future__ import annotations

import logging

from ckpt import layout
from ckpt.reader import entries
from ckpt.storage import Storage

log = logging.getLogger(__name__)


def rotate(storage: Storage, keep: int) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep`, and incomplete leftovers older
    than the newest complete one; returns the deleted serials. Entries newer than the
    newest complete checkpoint are left alone (a save may be writing them)."""
    if keep < 1:
        raise ValueError(f"max_num_checkpoints: expected an integer >= 1, got {keep!r}")
    all_entries = entries(storage, deep=False)
    complete = [e.serial for e in all_entries if e.problem is None]
    if not complete:
        return []
    newest = max(complete)
    kept = set(sorted(complete)[-keep:])
    doomed = [e.serial for e in all_entries
              if e.serial < newest and e.serial not in kept]
    for serial in doomed:
        storage.remove_tree(layout.checkpoint_name(serial))
        log.info("removed %s from %s", layout.checkpoint_name(serial), storage.root)
    return doomed
