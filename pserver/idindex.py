"""A map from uint64 id to row number, in numpy arrays only.

Open addressing with linear probing over two flat arrays (`keys`, `rows`),
probed for a whole batch of ids at once, so a shard of millions of rows holds
no Python object per row. Row numbers are handed out densely in insertion
order; the table keeps its rows in arrays indexed by them.
"""

from __future__ import annotations

import numpy as np

from pserver.sharding import fmix64

_EMPTY = -1
_MAX_LOAD = 0.5


class IdIndex:
    """uint64 id -> int64 row number; rows are numbered 0, 1, 2, ... as ids arrive."""

    def __init__(self, capacity: int = 1024) -> None:
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._rows = np.full(cap, _EMPTY, dtype=np.int64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._rows.nbytes

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (fmix64(ids) & np.uint64(len(self._keys) - 1)).astype(np.int64)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Row number of every id, -1 where the id is absent."""
        return self._probe(ids)[0]

    def _probe(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row or -1, slot where found or first empty slot of its chain) per id."""
        n = len(ids)
        rows = np.full(n, _EMPTY, dtype=np.int64)
        slots = np.empty(n, dtype=np.int64)
        mask = len(self._keys) - 1
        todo = np.arange(n)
        slot = self._home(ids)
        want = ids
        while todo.size:
            found = self._rows[slot]
            empty = found == _EMPTY
            hit = ~empty & (self._keys[slot] == want)
            done = hit | empty
            rows[todo[hit]] = found[hit]
            slots[todo[done]] = slot[done]
            more = ~done
            todo, slot, want = todo[more], (slot[more] + 1) & mask, want[more]
        return rows, slots

    def get_or_insert(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row number of every id, inserting absent ones; also the inserted ids, in row order.

        Ids may repeat; an absent id gets one row, numbered in order of first appearance.
        """
        rows, _ = self._probe(ids)
        missing = rows == _EMPTY
        if not missing.any():
            return rows, ids[:0]
        miss = ids[missing]
        uniq, first = np.unique(miss, return_index=True)
        new_ids = uniq[np.argsort(first, kind="stable")]
        self._reserve(self._size + len(new_ids))
        new_rows = np.arange(self._size, self._size + len(new_ids), dtype=np.int64)
        self._claim(new_ids, new_rows, self._home(new_ids))
        self._size += len(new_ids)
        rows[missing] = self._probe(miss)[0]
        return rows, new_ids

    def insert_new(self, ids: np.ndarray) -> np.ndarray:
        """Insert ids known to be absent and distinct; returns their row numbers."""
        self._reserve(self._size + len(ids))
        rows = np.arange(self._size, self._size + len(ids), dtype=np.int64)
        self._claim(ids, rows, self._home(ids))
        self._size += len(ids)
        return rows

    def _claim(self, ids: np.ndarray, rows: np.ndarray, slot: np.ndarray) -> None:
        """Put distinct absent ids into the first free slot of their chains."""
        mask = len(self._keys) - 1
        todo = np.arange(len(ids))
        while todo.size:
            free = np.flatnonzero(self._rows[slot] == _EMPTY)
            won_slots, first = np.unique(slot[free], return_index=True)
            winners = free[first]
            self._keys[won_slots] = ids[todo[winners]]
            self._rows[won_slots] = rows[todo[winners]]
            left = np.ones(len(todo), dtype=bool)
            left[winners] = False
            todo, slot = todo[left], (slot[left] + 1) & mask

    def _reserve(self, size: int) -> None:
        cap = len(self._keys)
        if size <= cap * _MAX_LOAD:
            return
        while size > cap * _MAX_LOAD:
            cap *= 2
        used = self._rows != _EMPTY
        keys, rows = self._keys[used], self._rows[used]
        self._keys = np.zeros(cap, dtype=np.uint64)
        self._rows = np.full(cap, _EMPTY, dtype=np.int64)
        self._claim(keys, rows, self._home(keys))
