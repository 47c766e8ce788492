"""A sparse table shard and a dense variable: numpy only, no gRPC.

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

A background save reads the rows out of the live table while pushes go on: a
`Snapshot` notes the row count and the save generation at the barrier, then
the writer copies the rows chunk by chunk, without the lock, and under it
only checks which of them were changed meanwhile (see `Snapshot.read`). A push
to a row the writer has not reached yet first appends the row's old values
to the snapshot's log (it has just read them for the optimizer anyway), and
the writer takes them from there: the table's memory is not needed twice,
only the rows changed during the write are kept aside.
"""

from __future__ import annotations

import mmap
import threading
import time

import numpy as np
import xxhash

from pserver import initializers, optimizers
from pserver.config import DenseSpec, TableSpec
from pserver.dedup import sum_duplicates
from pserver.idindex import IdIndex

_BLOCK_BYTES = 256 * 1024  # optimizer updates run in blocks that stay in cache
_RECENT = 8  # remembered id -> row lookups per table
PATCH_ROWS = 2048  # rows a snapshot patches per hold of the table's lock
MAP_AHEAD_ROWS = 65_536  # rows of the log a snapshot's writer maps before pushes fill them
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
        self._spare: dict[str, np.ndarray] = {}  # a snapshot's buffers, kept for the next
        self._mapped: dict[str, int] = {}  # rows of each log buffer written or mapped ahead
        self._gen = 1  # the save generation stamped on rows changed now
        self._marks: dict[int, int] = {}  # checkpoint serial -> the generation it saw
        self._stamps = np.zeros(0, dtype=np.uint32)
        self._cow: Snapshot | None = None  # the snapshot being written, if any
        self._alloc(max(16, capacity))

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "_arrays", None)
        arrays = {
            "ids": np.empty(capacity, dtype=np.uint64),
            "values": np.empty((capacity, self.dim), dtype=np.float32),
        }
        for name, (shape, dtype, _) in self._layout.items():
            arrays[name] = np.empty((capacity,) + shape, dtype=dtype)
        if old is not None:
            for name, arr in arrays.items():
                arr[: self._size] = old[name][: self._size]
        self._arrays = arrays
        stamps = np.zeros(capacity, dtype=np.uint32)
        stamps[: self._size] = self._stamps[: self._size]
        self._stamps = stamps

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return len(self._arrays["ids"])

    @property
    def payload_bytes(self) -> int:
        """Bytes of live rows: ids, values and optimizer state."""
        return sum(a[: self._size].nbytes for a in self._arrays.values())

    @property
    def allocated_bytes(self) -> int:
        """Bytes allocated: the arrays (grown by doubling) and the kept buffers of
        background saves (chunks, the log of rows kept aside, its index). Of the log, the
        rows ever written or mapped ahead: the rest is address space only."""
        cow = self._cow
        arrays = list(self._arrays.values()) + list(self._spare.values()) + \
            (list(cow._chunks.values()) if cow is not None else [])
        logs = [(buf, self._mapped.get(name, 0)) for name, buf in self._spare.items()
                if name.startswith("@log:")]
        return sum(a.nbytes for a in arrays) - \
            sum((len(buf) - min(len(buf), rows)) * buf.strides[0] for buf, rows in logs)

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
            a = self._arrays
            a["ids"][start:end] = new_ids
            s = self.spec
            a["values"][start:end] = initializers.sparse_rows(
                s.initializer, s.init_scale, s.seed, new_ids, self.dim
            )
            for name, (_, _, init) in self._layout.items():
                a[name][start:end] = init
            self._stamps[start:end] = self._gen
            self._size = end
        return rows

    def pull(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids` (float32, (len(ids), dim)) in request order; creates absent rows."""
        with self.lock:
            rows = self._rows_for(ids)
            return np.take(self._arrays["values"], rows, axis=0)

    def push(self, ids: np.ndarray, grads: np.ndarray) -> None:
        """Apply gradients; duplicate ids are summed first, in the order they appear."""
        with self.lock:
            rows, grads = sum_duplicates(self._rows_for(ids), grads)
            keep = self._cow.to_keep(rows) if self._cow is not None else None
            self._stamps[rows] = self._gen
            a = self._arrays
            values = a["values"]
            step = max(1, _BLOCK_BYTES // (4 * self.dim))
            for lo in range(0, len(rows), step):
                r = rows[lo:lo + step]
                w = np.take(values, r, axis=0)
                state = {name: np.take(a[name], r, axis=0) for name in self._layout}
                if keep is not None:  # the old values, for the snapshot being written
                    self._cow.keep(r, keep[lo:lo + step], {"values": w, **state})
                optimizers.apply(self.spec.optimizer, w, grads[lo:lo + step], state)
                values[r] = w
                for name, block in state.items():
                    a[name][r] = block

    def arrays(self) -> dict[str, np.ndarray]:
        """Views of the live rows (hold `lock` while using them)."""
        return {name: arr[: self._size] for name, arr in self._arrays.items()}

    def begin_snapshot(self, rows: np.ndarray | None = None, base: int | None = None,
                       duty: float = 1.0) -> Snapshot:
        """Start a snapshot of the live rows (hold `lock`, right after `begin_save`): all of
        them, or the ascending row numbers `rows` changed since checkpoint `base`. Read it
        with `Snapshot.read` (which works `duty` of the time, pausing the rest); one
        snapshot at a time (ValueError otherwise)."""
        if self._cow is not None:
            raise ValueError(f"table {self.spec.name!r} is writing a snapshot already")
        gen = self._gen - 1  # begin_save has moved on: rows stamped after this changed since
        low = None if base is None else self._marks[base]
        snap = Snapshot(self, self._arrays["ids"][: self._size], gen, low, rows, duty)
        if snap.count:  # (an empty one has nothing to keep)
            self._cow = snap
        return snap

    def _buffers(self, name: str, rows: int, like: np.ndarray, keep: int = 0) -> np.ndarray:
        """A kept, page-aligned buffer of at least `rows` rows shaped like `like` (fresh
        memory costs a page fault per 4 KiB; aligned rows are written to disk as they are).
        A buffer that grows keeps its first `keep` rows."""
        old = self._spare.get(name)
        buf = self._spare[name] = _fit(old, rows, like, keep)
        if buf is not old:
            self._mapped[name] = keep
        return buf

    def begin_save(self, serial: int, base: int | None) -> np.ndarray | None:
        """Mark checkpoint `serial` (hold `lock`): None for a full save, else the row numbers
        changed since checkpoint `base` (created or updated), ascending. ValueError when this
        table never saw `base` (it was neither saved nor restored here)."""
        rows = None
        if base is not None:
            if base not in self._marks:
                raise ValueError(f"table {self.spec.name!r} cannot write a delta of "
                                 f"checkpoint_{base}: this pserver did not save or restore it "
                                 f"(known: {sorted(self._marks)})")
            rows = np.flatnonzero(self._stamps[: self._size] > self._marks[base])
            # later deltas are of `base` or of a newer checkpoint: older marks are done
            self._marks = {s: g for s, g in self._marks.items() if s >= base}
        self._marks[serial] = self._gen
        while len(self._marks) > _MARKS:  # saves that never committed (all full)
            self._marks.pop(next(iter(self._marks)))
        self._gen += 1
        return rows

    def rows_of(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of some rows (hold `lock`), every array."""
        return {name: np.take(arr, rows, axis=0) for name, arr in self._arrays.items()}

    def upsert(self, arrays: dict[str, np.ndarray]) -> None:
        """Overwrite rows (creating absent ones) with saved arrays: a delta applied to a
        restored base. The rows count as restored (unchanged since the checkpoint)."""
        ids = np.ascontiguousarray(arrays["ids"], dtype=np.uint64)
        with self.lock:
            rows = self._lookup_or_create(ids)
            for name, arr in self._arrays.items():
                if name != "ids":
                    arr[rows] = arrays[name]
            self._stamps[rows] = 0
            self._recent.clear()

    def restored(self, serial: int) -> None:
        """The table now holds checkpoint `serial` exactly: later deltas may use it as base."""
        with self.lock:
            self._stamps[: self._size] = 0
            self._gen = 1
            self._marks = {serial: 0}

    def empty_arrays(self) -> dict[str, np.ndarray]:
        return {name: arr[:0] for name, arr in self._arrays.items()}

    def export(self) -> dict[str, np.ndarray]:
        """Copies of the live rows: ids, values and each optimizer state array."""
        with self.lock:
            return {name: arr[: self._size].copy() for name, arr in self._arrays.items()}

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
            self._arrays = adopted if n else {k: np.empty((16,) + v.shape[1:], v.dtype)
                                              for k, v in adopted.items()}
            self._stamps = np.zeros(len(self._arrays["ids"]), dtype=np.uint32)
            self._size = n
            self._gen, self._marks, self._cow = 1, {}, None


class Snapshot:
    """A table's rows as they were at a checkpoint's barrier, read out chunk by chunk
    while pushes go on (see the module's doc). Positions count the snapshot's rows:
    row numbers 0..n-1, or the given row numbers of a delta."""

    def __init__(self, table: SparseTable, ids: np.ndarray, gen: int, low: int | None,
                 rows: np.ndarray | None, duty: float = 1.0) -> None:
        self.table, self._ids, self.gen, self.low, self.rows = table, ids, gen, low, rows
        self.duty = duty  # share of the time `read` and the writing between reads may take
        self._resumed: float | None = None  # when the last pause ended
        self.n = len(ids)  # the table's rows at the barrier
        self.count = self.n if rows is None else len(rows)
        self.done = 0  # positions read out
        self.logged = 0  # rows kept in the log
        self._slot = table._buffers("@slot", self.n, np.empty(0, dtype=np.int64))
        # the chunk buffers are this snapshot's until it closes: a snapshot abandoned by a
        # reload may still be copying into them while the next one begins
        self._chunks = {name[len("@chunk:"):]: table._spare.pop(name)
                        for name in list(table._spare) if name.startswith("@chunk:")}
        self._reserved = self._reserve()

    def _reserve(self) -> bool:
        """Room in the log for every row of the snapshot, taken at the barrier (address
        space: a page is mapped on first use), so that no push grows the log, copying it
        under the table's lock. False where the system refuses that much address space:
        pushes then grow the log as they need it."""
        t = self.table
        try:
            for name, arr in t._arrays.items():
                if name != "ids":
                    t._buffers("@log:" + name, self.count, arr, keep=0)
        except OSError:  # ENOMEM: an overcommit policy that counts address space
            return False
        return True

    def _map_ahead(self) -> None:
        """Map the log's pages before the pushes that fill them, up to MAP_AHEAD_ROWS
        rows past those logged, and the slots' index once (in the writing thread, without
        the lock): a push that touches a fresh page takes a page fault while it holds the
        table's lock, a few microseconds per 4 KiB on a virtual machine. Where the kernel
        cannot (before Linux 5.14), the pushes map the pages as they go."""
        if not self._reserved or not _populating:
            return
        t = self.table
        want = min(self.count, self.logged + MAP_AHEAD_ROWS)  # (logged: read unlocked)
        with t.lock:
            if t._cow is not self:
                return
            todo = [(name, buf, t._mapped.get(name, 0)) for name, buf in t._spare.items()
                    if name.startswith("@log:") and t._mapped.get(name, 0) < want]
            if t._mapped.get("@slot", 0) < len(self._slot):
                todo.append(("@slot", self._slot, t._mapped.get("@slot", 0)))
        for name, buf, have in todo:
            _populate(buf, have, len(buf) if name == "@slot" else want)
        with t.lock:
            for name, buf, _ in todo:
                if t._spare.get(name) is buf:
                    t._mapped[name] = max(t._mapped.get(name, 0),
                                          len(buf) if name == "@slot" else want)

    @property
    def ids(self) -> np.ndarray:
        """The snapshot's ids, in position order (ids of rows never change)."""
        return self._ids if self.rows is None else np.take(self._ids, self.rows)

    def columns(self) -> dict[str, np.ndarray]:
        """An empty array per column (ids, values, optimizer state): names, dtypes, shapes."""
        return {name: arr[:0] for name, arr in self.table._arrays.items()}

    def _boundary(self) -> int:
        """The first row number not read out yet."""
        if self.rows is None:
            return self.done
        return int(self.rows[self.done]) if self.done < self.count else self.n

    def to_keep(self, rows: np.ndarray) -> np.ndarray | None:
        """Which of these rows (unique) a push must keep before changing them (hold the
        table's lock): rows of the snapshot not read out yet and not changed since."""
        b = self._boundary()
        if b >= self.n:
            return None
        stamps = self.table._stamps[rows]
        mask = (rows >= b) & (rows < self.n) & (stamps <= self.gen)
        if self.low is not None:
            mask &= stamps > self.low
        return mask if mask.any() else None

    def keep(self, rows: np.ndarray, mask: np.ndarray, old: dict[str, np.ndarray]) -> None:
        """Append the old values of rows[mask] to the log (hold the table's lock)."""
        chosen = rows[mask]
        k = len(chosen)
        if not k:
            return
        lo, hi = self.logged, self.logged + k
        t = self.table
        for name, block in old.items():
            log = t._buffers("@log:" + name, hi, block, keep=lo)  # reserved: as it is
            np.compress(mask, block, axis=0, out=log[lo:hi])
            if t._mapped.get("@log:" + name, 0) < hi:
                t._mapped["@log:" + name] = hi
        self._slot[chosen] = np.arange(lo, hi)
        self.logged = hi

    def read(self, hi: int) -> dict[str, np.ndarray]:
        """The next rows, up to position `hi`: every column as it was at the barrier, in
        buffers that the next read reuses. The rows are copied without the table's lock
        (pushes go on); then, PATCH_ROWS at a time under it, the rows changed since the
        barrier (stamped after it) get their old values back from the log. A push changes
        rows only under the lock, stamping them, and keeps the old values of rows at or
        past `done`, which moves on only in the patch, under the lock: whatever the copy
        saw of a changed row is replaced. The lock is held for the patch, not the copy, so
        pushes wait less for a writer that, at a low CPU priority, may lose its core
        while holding it. With `duty` < 1 it first pauses: the time since the last pause
        ended (this thread reading and writing) times 1/duty - 1."""
        t = self.table
        if self.duty < 1 and self._resumed is not None:  # pause, then go on
            time.sleep((time.perf_counter() - self._resumed) * (1 / self.duty - 1))
        self._resumed = time.perf_counter()
        self._map_ahead()
        lo = self.done
        k = hi - lo
        out = {"ids": self._ids[lo:hi] if self.rows is None else
               np.take(self._ids, self.rows[lo:hi])}
        self._check()  # (unlocked: a reloaded table is not read; the patch checks again)
        try:
            for name, arr in t._arrays.items():
                if name != "ids":
                    buf = out[name] = self._chunk(name, k, arr)
                    if self.rows is None:
                        np.copyto(buf, arr[lo:hi])
                    else:
                        np.take(arr, self.rows[lo:hi], axis=0, out=buf)
        except (ValueError, IndexError):
            self._check()  # the table was reloaded during the copy: say so
            raise
        for a in range(lo, hi, PATCH_ROWS):
            b = min(hi, a + PATCH_ROWS)
            with t.lock:
                self._patch(a, b, {name: buf[a - lo:b - lo] for name, buf in out.items()
                                   if name != "ids"})
        return out

    def _chunk(self, name: str, k: int, like: np.ndarray) -> np.ndarray:
        """This snapshot's page-aligned buffer of k rows shaped like column `like`."""
        buf = self._chunks[name] = _fit(self._chunks.get(name), k, like)
        return buf[:k]

    def _check(self) -> None:
        if self.table._cow is not self and self.done < self.count:
            raise RuntimeError(f"table {self.table.spec.name!r}: the snapshot was abandoned "
                               f"(the table was reloaded)")

    def _patch(self, lo: int, hi: int, out: dict[str, np.ndarray]) -> None:
        """Positions lo..hi, just copied into `out` (its columns but ids): the rows
        changed since the barrier get their old values from the log (hold the table's
        lock; lo is `done`)."""
        t = self.table
        self._check()
        if self.rows is None:
            changed = np.flatnonzero(t._stamps[lo:hi] > self.gen)
            changed_rows = lo + changed
        else:
            changed = np.flatnonzero(t._stamps[self.rows[lo:hi]] > self.gen)
            changed_rows = self.rows[lo:hi][changed]
        if len(changed):  # changed since the barrier: their old values are in the log
            slots = self._slot[changed_rows]
            for name, buf in out.items():
                buf[changed] = t._spare["@log:" + name][slots]
        self.done = hi
        if hi >= self.count:
            t._cow = None

    def close(self, locked: bool = False) -> None:
        """Stop (a save that failed, or is done): pushes no longer keep rows for it.
        `locked`: the caller holds the table's lock."""
        if not locked:
            with self.table.lock:
                self.close(locked=True)
            return
        if self.table._cow is self:
            self.table._cow = None
        for name, buf in self._chunks.items():  # kept for the next snapshot
            self.table._spare["@chunk:" + name] = buf
        self._chunks = {}


def _fit(buf: np.ndarray | None, rows: int, like: np.ndarray, keep: int = 0) -> np.ndarray:
    """`buf` if it holds `rows` rows shaped like `like`, else a page-aligned one with room
    for half as many again, holding `buf`'s first `keep` rows."""
    if buf is None or len(buf) < rows or buf.shape[1:] != like.shape[1:] \
            or buf.dtype != like.dtype:
        grown = _aligned_empty((rows + rows // 2,) + like.shape[1:], like.dtype)
        if keep:
            grown[:keep] = buf[:keep]
        return grown
    return buf


_POPULATE_WRITE = 23  # MADV_POPULATE_WRITE (Linux 5.14): map pages writable, not writing
_populating = hasattr(mmap.mmap, "madvise")  # until the kernel refuses it once


def _populate(buf: np.ndarray, lo: int, hi: int) -> None:
    """Map rows lo..hi of a buffer of `_aligned_empty` now, leaving what they hold as it
    is (pushes may be writing them meanwhile)."""
    global _populating
    mm: object = buf
    while not isinstance(mm, mmap.mmap):
        mm = mm.obj if isinstance(mm, memoryview) else mm.base  # type: ignore[attr-defined]
    start = lo * buf.strides[0] // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(hi * buf.strides[0], len(mm))
    if end > start:
        try:
            mm.madvise(_POPULATE_WRITE, start, end - start)
        except OSError:  # EINVAL: an older kernel
            _populating = False


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array at a page boundary (anonymous memory, mapped on first use)."""
    count = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class DenseVariable:
    """A dense variable with its optimizer state. Thread-safe."""

    def __init__(self, spec: DenseSpec) -> None:
        self.spec = spec
        self.shape = tuple(spec.shape)
        self.lock = threading.Lock()
        self.value = initializers.dense_value(
            spec.initializer, spec.init_scale, spec.seed, self.shape
        )
        layout = optimizers.state_layout(spec.optimizer, self.shape)
        self.state = {
            name: np.full(shape, init, dtype=dtype) for name, (shape, dtype, init) in layout.items()
        }

    def pull(self) -> np.ndarray:
        with self.lock:
            return self.value.copy()

    def push(self, grad: np.ndarray) -> None:
        with self.lock:
            optimizers.apply(self.spec.optimizer, self.value, grad, self.state)

    def load(self, value: np.ndarray, state: dict[str, np.ndarray]) -> None:
        if tuple(value.shape) != self.shape:
            raise ValueError(f"dense variable {self.spec.name!r} has shape {list(self.shape)}, "
                             f"the checkpoint holds {list(value.shape)}")
        with self.lock:
            self.value = np.array(value, dtype=np.float32)
            for k in self.state:
                self.state[k] = np.array(state[k], dtype=self.state[k].dtype)
