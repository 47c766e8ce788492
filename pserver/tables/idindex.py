"""A map from uint64 id to row number, in numpy arrays only.

Open addressing with linear probing over one flat (capacity, 2) uint64 array
of (id, row + 1) pairs, 0 marking an empty slot, probed for a whole batch of
ids at once: a shard of millions of rows holds no Python object per row, and
one probe reads one cache line. Row numbers are handed out densely in
insertion order; the table keeps its rows in arrays indexed by them.
"""

from __future__ import annotations

import numpy as np

from pserver.tables.sharding import fmix64

_MAX_LOAD = 0.5
_ONE = np.uint64(1)


class IdIndex:
    """uint64 id -> int64 row number; rows are numbered 0, 1, 2, ... as ids arrive."""

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._slots = np.zeros((cap, 2), dtype=np.uint64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._slots.nbytes

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (fmix64(ids) & np.uint64(len(self._slots) - 1)).astype(np.int64)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Row number of every id, -1 where the id is absent."""
        out = np.empty(len(ids), dtype=np.int64)
        mask = len(self._slots) - 1
        todo: np.ndarray | None = None
        slot, want = self._home(ids), ids
        while True:
            pair = np.take(self._slots, slot, axis=0)
            key, row = pair[:, 0], pair[:, 1]
            go_on = (key != want) & (row != 0)
            found = row.view(np.int64) - 1  # -1 where the slot is empty
            if todo is None:
                out[:] = found
            else:
                out[todo] = found
            if not go_on.any():
                return out
            more = np.flatnonzero(go_on)
            todo = more if todo is None else todo[more]
            slot, want = (slot[more] + 1) & mask, want[more]

    def get_or_insert(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row number of every id, inserting absent ones; also the inserted ids, in row order.

        Ids may repeat; an absent id gets one row, numbered in order of first appearance.
        """
        rows = self.lookup(ids)
        missing = rows < 0
        if not missing.any():
            return rows, ids[:0]
        miss = ids[missing]
        uniq, first, inverse = np.unique(miss, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # new ids in order of first appearance
        rank = np.empty(len(uniq), dtype=np.int64)
        rank[order] = np.arange(len(uniq))
        rows[missing] = self.insert_new(uniq[order])[rank[inverse]]
        return rows, uniq[order]

    def insert_new(self, ids: np.ndarray) -> np.ndarray:
        """Insert ids known to be absent and distinct; returns their row numbers."""
        self._reserve(self._size + len(ids))
        rows = np.arange(self._size, self._size + len(ids), dtype=np.int64)
        self._claim(ids, rows.astype(np.uint64) + _ONE, self._home(ids))
        self._size += len(ids)
        return rows

    def _claim(self, ids: np.ndarray, tags: np.ndarray, slot: np.ndarray) -> None:
        """Put distinct absent ids (with row + 1 tags) into the first free slot of their chain."""
        mask = len(self._slots) - 1
        todo = np.arange(len(ids))
        while todo.size:
            free = np.flatnonzero(self._slots[slot, 1] == 0)
            where, tag = slot[free], tags[todo[free]]
            # every candidate writes its tag into its free slot; one write per slot stays,
            # and reading back tells who got it (tags are distinct)
            self._slots[where, 1] = tag
            won = free[self._slots[where, 1] == tag]
            self._slots[slot[won], 0] = ids[todo[won]]
            left = np.ones(len(todo), dtype=bool)
            left[won] = False
            todo, slot = todo[left], (slot[left] + 1) & mask

    def _reserve(self, size: int) -> None:
        cap = len(self._slots)
        if size <= cap * _MAX_LOAD:
            return
        while size > cap * _MAX_LOAD:
            cap *= 2
        used = self._slots[self._slots[:, 1] != 0]
        self._slots = np.zeros((cap, 2), dtype=np.uint64)
        self._claim(used[:, 0], used[:, 1], self._home(used[:, 0]))
