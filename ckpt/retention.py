"""Rotation: keep `max_num_checkpoints` complete checkpoints, never the newest one less,
and never a base that a kept delta's chain needs."""

from __future__ import annotations

import logging

from ckpt import layout
from ckpt.reader import Entry, entries
from ckpt.storage import Storage

log = logging.getLogger(__name__)


def needed(by_serial: dict[int, Entry], serials: set[int]) -> set[int]:
    """`serials` and every checkpoint their chains go through (as far as they exist)."""
    out, todo = set(serials), list(serials)
    while todo:
        e = by_serial.get(todo.pop())
        m = e.manifest if e is not None else None
        if m is not None and m.kind == "delta" and m.base not in out:
            out.add(m.base)
            todo.append(m.base)
    return out


def _restorable(by_serial: dict[int, Entry], serial: int) -> bool:
    """Whether a checkpoint and every link of its chain are complete (sizes, not checksums)."""
    while True:
        e = by_serial.get(serial)
        if e is None or e.problem is not None or e.manifest is None:
            return False
        if e.manifest.kind != "delta":
            return True
        serial = e.manifest.base


def rotate(storage: Storage, keep: int) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep`, and incomplete leftovers older
    than the newest complete one; returns the deleted serials (`plan`, then `remove`)."""
    return remove(storage, plan(storage, keep))


def plan(storage: Storage, keep: int) -> list[int]:
    """The serials rotation deletes: complete checkpoints beyond the newest `keep`, and
    incomplete leftovers older than the newest complete one. The bases that the kept
    deltas (and the newest restorable checkpoint) need stay. Entries newer than the newest
    complete checkpoint are left alone (a save may be writing them)."""
    if keep < 1:
        raise ValueError(f"max_num_checkpoints: expected an integer >= 1, got {keep!r}")
    all_entries = entries(storage, deep=False)
    by_serial = {e.serial: e for e in all_entries}
    complete = [e.serial for e in all_entries if e.problem is None]
    if not complete:
        return []
    newest = max(complete)
    kept = set(sorted(complete)[-keep:])
    restorable = [s for s in complete if _restorable(by_serial, s)]
    if restorable:
        kept.add(max(restorable))
    kept = needed(by_serial, kept)
    return [e.serial for e in all_entries if e.serial < newest and e.serial not in kept]


def remove(storage: Storage, serials: list[int]) -> list[int]:
    """Delete these checkpoints (oldest first); returns them."""
    for serial in sorted(serials):
        storage.remove_tree(layout.checkpoint_name(serial))
        log.info("removed %s from %s", layout.checkpoint_name(serial), storage.root)
    return sorted(serials)
