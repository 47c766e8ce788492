"""A sparse table shard: numpy only, no gRPC.

A `SparseTable` keeps its rows in contiguous arrays that grow by doubling:
`ids` (uint64), `values` (rows x dim float32) and the optimizer's per-row
state, all indexed by the row number an `IdIndex` hands out. A row is created
on first pull (or push) with its deterministic initial value.

For incremental checkpoints every row slot also has a save stamp: the table's
save generation when the row was last created or changed. Each checkpoint
marks the generation it saw (`begin_save`), so the rows changed since any
checkpoint this table saved or restored are those stamped after its mark.
Nothing is cleared when a save is taken: a save that fails or is never
committed leaves the next delta (against the last committed base) complete.

A background save reads the rows out of the live table while pushes go on
(`pserver.tables.snapshot`).
"""

from __future__ import annotations

import threading

import numpy as np
import xxhash

from pserver.config import TableSpec
from pserver.errors import MissingBase
from pserver.tables import initializers, optimizers
from pserver.tables.dedup import sum_duplicates
from pserver.tables.idindex import IdIndex
from pserver.tables.snapshot import Buffers, Snapshot

_BLOCK_BYTES = 256 * 1024  # optimizer updates run in blocks that stay in cache
_RECENT = 8  # remembered id -> row lookups per table
_MARKS = 64  # checkpoints a delta can be taken against (the newest committed is one)


class SparseTable:
    """One pserver's shard of a sparse table. Thread-safe."""

    def __init__(self, spec: TableSpec, capacity: int = 1024) -> None:
        self.spec = spec
        self.dim = spec.dim
        self.lock = threading.Lock()
        self._index = IdIndex(capacity * 2)
        self._layout = optimizers.state_layout(spec.optimizer, (spec.dim,))
        self._size = 0
        self._recent: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.kept = Buffers()  # background saves' buffers, kept from one to the next
        self._gen = 1  # the save generation stamped on rows changed now
        self._marks: dict[int, int] = {}  # checkpoint serial -> the generation it saw
        # what a snapshot reads (pserver.tables.snapshot.Rows): the columns (ids, values,
        # optimizer state; full capacity, rows 0..len-1 live), each row's save stamp, and
        # the snapshot pushes keep old rows for
        self.columns: dict[str, np.ndarray] = {}
        self.stamps = np.zeros(0, dtype=np.uint32)
        self.writing: Snapshot | None = None
        self._alloc(max(16, capacity))

    def _alloc(self, capacity: int) -> None:
        old = self.columns or None
        arrays = {
            "ids": np.empty(capacity, dtype=np.uint64),
            "values": np.empty((capacity, self.dim), dtype=np.float32),
        }
        for name, (shape, dtype, _) in self._layout.items():
            arrays[name] = np.empty((capacity,) + shape, dtype=dtype)
        if old is not None:
            for name, arr in arrays.items():
                arr[: self._size] = old[name][: self._size]
        self.columns = arrays
        stamps = np.zeros(capacity, dtype=np.uint32)
        stamps[: self._size] = self.stamps[: self._size]
        self.stamps = stamps

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return len(self.columns["ids"])

    @property
    def payload_bytes(self) -> int:
        """Bytes of live rows: ids, values and optimizer state."""
        return sum(a[: self._size].nbytes for a in self.columns.values())

    @property
    def allocated_bytes(self) -> int:
        """Bytes allocated: the arrays (grown by doubling) and the kept buffers of
        background saves (chunks, the log of rows kept aside, its index). Of the log, the
        rows ever written or mapped ahead: the rest is address space only."""
        cow = self.writing  # (read without the lock: each copy below is taken at once)
        spare, mapped = list(self.kept.spare.items()), dict(self.kept.mapped)
        arrays = list(self.columns.values()) + [buf for _, buf in spare] + \
            (cow.chunk_buffers if cow is not None else [])
        unused = sum((len(buf) - min(len(buf), mapped.get(name, 0))) * buf.strides[0]
                     for name, buf in spare if name.startswith("@log:"))
        return sum(a.nbytes for a in arrays) - unused

    def _rows_for(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of `ids`, creating absent rows with their initial values.

        The last few answers are remembered by the ids' checksum: a trainer pushes the very
        ids it pulled, so the push's lookup is usually one comparison. Row numbers never
        change (rows are only appended) until `load` clears the memory.
        """
        key = xxhash.xxh3_64_intdigest(memoryview(np.ascontiguousarray(ids)).cast("B"))
        hit = self._recent.get(key)
        if hit is not None and np.array_equal(hit[0], ids):
            return hit[1]
        rows = self._lookup_or_create(ids)
        if len(self._recent) >= _RECENT:
            self._recent.pop(next(iter(self._recent)))
        self._recent[key] = (ids.copy(), rows)
        return rows

    def _lookup_or_create(self, ids: np.ndarray) -> np.ndarray:
        rows, new_ids = self._index.get_or_insert(ids)
        if len(new_ids):
            start, end = self._size, self._size + len(new_ids)
            if end > self.capacity:
                cap = self.capacity
                while cap < end:
                    cap *= 2
                self._alloc(cap)
            a = self.columns
            a["ids"][start:end] = new_ids
            s = self.spec
            a["values"][start:end] = initializers.sparse_rows(
                s.initializer, s.init_scale, s.seed, new_ids, self.dim
            )
            for name, (_, _, init) in self._layout.items():
                a[name][start:end] = init
            self.stamps[start:end] = self._gen
            self._size = end
        return rows

    def pull(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (float32, (len(ids), dim)) in request order; creates absent rows."""
        with self.lock:
            rows = self._rows_for(ids)
            return np.take(self.columns["values"], rows, axis=0)

    def push(self, ids: np.ndarray, grads: np.ndarray) -> None:
        """Apply gradients; duplicate ids are summed first, in the order they appear."""
        with self.lock:
            rows, grads = sum_duplicates(self._rows_for(ids), grads)
            keep = self.writing.to_keep(rows) if self.writing is not None else None
            self.stamps[rows] = self._gen
            a = self.columns
            values = a["values"]
            step = max(1, _BLOCK_BYTES // (4 * self.dim))
            for lo in range(0, len(rows), step):
                r = rows[lo:lo + step]
                w = np.take(values, r, axis=0)
                state = {name: np.take(a[name], r, axis=0) for name in self._layout}
                if keep is not None:  # the old values, for the snapshot being written
                    self.writing.keep(r, keep[lo:lo + step], {"values": w, **state})
                optimizers.apply(self.spec.optimizer, w, grads[lo:lo + step], state)
                values[r] = w
                for name, block in state.items():
                    a[name][r] = block

    def arrays(self) -> dict[str, np.ndarray]:
        """Views of the live rows (hold `lock` while using them)."""
        return {name: arr[: self._size] for name, arr in self.columns.items()}

    def begin_snapshot(self, rows: np.ndarray | None = None, base: int | None = None,
                       duty: float = 1.0) -> Snapshot:
        """Start a snapshot of the live rows (hold `lock`, right after `begin_save`): all of
        them, or the ascending row numbers `rows` changed since checkpoint `base`. Read it
        with `Snapshot.read` (which works `duty` of the time, pausing the rest); one
        snapshot at a time (ValueError otherwise)."""
        if self.writing is not None:
            raise ValueError(f"table {self.spec.name!r} is writing a snapshot already")
        gen = self._gen - 1  # begin_save has moved on: rows stamped after this changed since
        low = None if base is None else self._marks[base]
        snap = Snapshot(self, self.columns["ids"][: self._size], gen, low, rows, duty)
        if snap.count:  # (an empty one has nothing to keep)
            self.writing = snap
        return snap

    def begin_save(self, serial: int, base: int | None) -> np.ndarray | None:
        """Mark checkpoint `serial` (hold `lock`): None for a full save, else the row numbers
        changed since checkpoint `base` (created or updated), ascending. MissingBase when this
        table never saw `base` (it was neither saved nor restored here)."""
        rows = None
        if base is not None:
            if base not in self._marks:
                raise MissingBase(f"table {self.spec.name!r} cannot write a delta of "
                                 f"checkpoint_{base}: this pserver did not save or restore it "
                                 f"(known: {sorted(self._marks)})")
            rows = np.flatnonzero(self.stamps[: self._size] > self._marks[base])
            # later deltas are of `base` or of a newer checkpoint: older marks are done
            self._marks = {s: g for s, g in self._marks.items() if s >= base}
        self._marks[serial] = self._gen
        while len(self._marks) > _MARKS:  # saves that never committed (all full)
            self._marks.pop(next(iter(self._marks)))
        self._gen += 1
        return rows

    def rows_of(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of some rows (hold `lock`), every array."""
        return {name: np.take(arr, rows, axis=0) for name, arr in self.columns.items()}

    def upsert(self, arrays: dict[str, np.ndarray]) -> None:
        """Overwrite rows (creating absent ones) with saved arrays: a delta applied to a
        restored base. The rows count as restored (unchanged since the checkpoint)."""
        ids = np.ascontiguousarray(arrays["ids"], dtype=np.uint64)
        with self.lock:
            rows = self._lookup_or_create(ids)
            for name, arr in self.columns.items():
                if name != "ids":
                    arr[rows] = arrays[name]
            self.stamps[rows] = 0
            self._recent.clear()

    def restored(self, serial: int) -> None:
        """The table now holds checkpoint `serial` exactly: later deltas may use it as base."""
        with self.lock:
            self.stamps[: self._size] = 0
            self._gen = 1
            self._marks = {serial: 0}

    def empty_arrays(self) -> dict[str, np.ndarray]:
        return {name: arr[:0] for name, arr in self.columns.items()}

    def export(self) -> dict[str, np.ndarray]:
        """Copies of the live rows: ids, values and each optimizer state array."""
        with self.lock:
            return {name: arr[: self._size].copy() for name, arr in self.columns.items()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the contents with exported arrays (same names as `export`). Arrays that
        are already contiguous and of the right type become the storage as they are (no
        copy: a checkpoint's rows are page-faulted in once, by the read)."""
        ids = np.ascontiguousarray(arrays["ids"], dtype=np.uint64)
        n = len(ids)
        with self.lock:
            adopted = {}
            for name, like in self.empty_arrays().items():
                arr = arrays[name]
                if arr.shape[1:] != like.shape[1:]:
                    raise ValueError(f"table {self.spec.name!r}: {name} has shape "
                                     f"{list(arr.shape)}, expected [{n}, "
                                     f"{', '.join(map(str, like.shape[1:]))}]")
                adopted[name] = np.require(arr, dtype=like.dtype, requirements=["C", "W"])
            adopted["ids"] = np.require(ids, requirements=["C", "W"])
            self._index = IdIndex(2 * n)
            self._index.insert_new(ids)
            self._recent.clear()
            self.columns = adopted if n else {k: np.empty((16,) + v.shape[1:], v.dtype)
                                              for k, v in adopted.items()}
            self.stamps = np.zeros(len(self.columns["ids"]), dtype=np.uint32)
            self._size = n
            self._gen, self._marks, self.writing = 1, {}, None
