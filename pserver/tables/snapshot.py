"""A table's rows as they were at a checkpoint's barrier, read out while pushes go on.

A background save reads the rows out of the live table while pushes go on: a
`Snapshot` notes the row count and the save generation at the barrier, then
the writer copies the rows chunk by chunk, without the lock, and under it
only checks which of them were changed meanwhile (see `Snapshot.read`). A push
to a row the writer has not reached yet first appends the row's old values
to the snapshot's log (it has just read them for the optimizer anyway), and
the writer takes them from there: the table's memory is not needed twice,
only the rows changed during the write are kept aside.

The log has room for every row of the snapshot from the barrier on (address
space), and the writer maps its pages ahead of the pushes that fill them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

PATCH_ROWS = 2048  # rows a snapshot patches per hold of the table's lock
MAP_AHEAD_BYTES = 32 << 20  # of the log, mapped by a snapshot's writer before pushes fill it


class Buffers:
    """A table's buffers for its background saves (each snapshot's chunks, the log of rows
    kept aside, its index), kept from one snapshot to the next: fresh memory costs a page
    fault per 4 KiB, and aligned rows are written to disk as they are. By name:
    "@chunk:COLUMN", "@log:COLUMN", "@slot"."""

    def __init__(self) -> None:
        self.spare: dict[str, np.ndarray] = {}
        self.mapped: dict[str, int] = {}  # rows of each log buffer written or mapped ahead

    def get(self, name: str, rows: int, like: np.ndarray, keep: int = 0) -> np.ndarray:
        """The kept, page-aligned buffer `name` with at least `rows` rows shaped like
        `like`; one that grows keeps its first `keep` rows."""
        old = self.spare.get(name)
        buf = self.spare[name] = fit_buffer(old, rows, like, keep)
        if buf is not old:
            self.mapped[name] = keep
        return buf


class Rows(Protocol):
    """What a snapshot reads of its table (`pserver.tables.sparse.SparseTable`)."""

    spec: Any  # its TableSpec (the name, for messages)
    lock: threading.Lock  # held by every change of a row
    columns: dict[str, np.ndarray]  # ids, values, optimizer state (rows 0..len-1 live)
    stamps: np.ndarray  # each row's save generation: when it last changed
    writing: Snapshot | None  # the snapshot pushes keep old rows for
    kept: Buffers


class Snapshot:
    """A table's rows as they were at a checkpoint's barrier, read out chunk by chunk
    while pushes go on (see the module's doc). Positions count the snapshot's rows:
    row numbers 0..n-1, or the given row numbers of a delta."""

    def __init__(self, table: Rows, ids: np.ndarray, gen: int, low: int | None,
                 rows: np.ndarray | None, duty: float = 1.0) -> None:
        self.table, self._ids, self.gen, self.low, self.rows = table, ids, gen, low, rows
        self.duty = duty  # share of the time `read` and the writing between reads may take
        self._resumed: float | None = None  # when the last pause ended
        self.n = len(ids)  # the table's rows at the barrier
        self.count = self.n if rows is None else len(rows)
        self.done = 0  # positions read out
        self.logged = 0  # rows kept in the log
        self._slot = table.kept.get("@slot", self.n, np.empty(0, dtype=np.int64))
        # the chunk buffers are this snapshot's until it closes: a snapshot abandoned by a
        # reload may still be copying into them while the next one begins
        self._chunks = {name[len("@chunk:"):]: table.kept.spare.pop(name)
                        for name in list(table.kept.spare) if name.startswith("@chunk:")}
        self._retired: list[np.ndarray] = []  # smaller logs replaced: freed by the writer
        self._ahead = 0  # rows of the log this snapshot has seen mapped
        self._reserved = self._reserve()

    def _reserve(self) -> bool:
        """Room in the log for every row of the snapshot, taken at the barrier (address
        space: a page is mapped on first use), so that no push grows the log, copying it
        under the table's lock. False where the system refuses that much address space:
        pushes then grow the log as they need it. A smaller log replaced here is
        unmapped by the writing thread, not at the barrier."""
        t = self.table
        try:
            for name, arr in t.columns.items():
                if name != "ids":
                    old = t.kept.spare.get("@log:" + name)
                    if t.kept.get("@log:" + name, self.count, arr) is not old \
                            and old is not None:
                        self._retired.append(old)
        except OSError:  # ENOMEM: an overcommit policy that counts address space
            return False
        return True

    def map_ahead(self) -> None:
        """Map the log's pages before the pushes that fill them, MAP_AHEAD_BYTES (all
        columns) past the rows logged, and the slots' index once (in the writing thread,
        without the table's lock, and without the GIL): a push that touches a fresh page
        takes a page fault while it holds the table's lock, a few microseconds per 4 KiB
        on a virtual machine. Where the kernel cannot (before Linux 5.14), the pushes map
        the pages as they go. Each `read` calls it; the writer calls it for every table
        when it starts, as tables are written one after another."""
        if not self._reserved or not _populating:
            return
        t = self.table
        row_bytes = sum(a[:1].nbytes for name, a in t.columns.items() if name != "ids")
        want = min(self.count, self.logged + max(1, MAP_AHEAD_BYTES // max(1, row_bytes)))
        if want <= self._ahead:  # (logged is read without the lock: pushes only add)
            return
        with t.lock:
            if t.writing is not self:
                return
            todo = [(name, buf, t.kept.mapped.get(name, 0), want)
                    for name, buf in t.kept.spare.items()
                    if name.startswith("@log:") and t.kept.mapped.get(name, 0) < want]
            if t.kept.mapped.get("@slot", 0) < self.n:
                todo.append(("@slot", self._slot, t.kept.mapped.get("@slot", 0), self.n))
        for _, buf, have, upto in todo:
            _populate(buf, have, upto)
        if todo:
            with t.lock:
                for name, buf, _, upto in todo:
                    if t.kept.spare.get(name) is buf:
                        t.kept.mapped[name] = max(t.kept.mapped.get(name, 0), upto)
        self._ahead = want

    @property
    def chunk_buffers(self) -> list[np.ndarray]:
        """The buffers this snapshot reads its chunks into (its own until it closes)."""
        return list(self._chunks.values())

    @property
    def ids(self) -> np.ndarray:
        """The snapshot's ids, in position order (ids of rows never change)."""
        return self._ids if self.rows is None else np.take(self._ids, self.rows)

    def columns(self) -> dict[str, np.ndarray]:
        """An empty array per column (ids, values, optimizer state): names, dtypes, shapes."""
        return {name: arr[:0] for name, arr in self.table.columns.items()}

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
        stamps = self.table.stamps[rows]
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
            log = t.kept.get("@log:" + name, hi, block, keep=lo)  # reserved: as it is
            np.compress(mask, block, axis=0, out=log[lo:hi])
            if t.kept.mapped.get("@log:" + name, 0) < hi:
                t.kept.mapped["@log:" + name] = hi
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
        self._retired = []
        self.map_ahead()
        lo = self.done
        k = hi - lo
        out = {"ids": self._ids[lo:hi] if self.rows is None else
               np.take(self._ids, self.rows[lo:hi])}
        self._check()  # (unlocked: a reloaded table is not read; the patch checks again)
        try:
            for name, arr in t.columns.items():
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
        buf = self._chunks[name] = fit_buffer(self._chunks.get(name), k, like)
        return buf[:k]

    def _check(self) -> None:
        if self.table.writing is not self and self.done < self.count:
            raise RuntimeError(f"table {self.table.spec.name!r}: the snapshot was abandoned "
                               f"(the table was reloaded)")

    def _patch(self, lo: int, hi: int, out: dict[str, np.ndarray]) -> None:
        """Positions lo..hi, just copied into `out` (its columns but ids): the rows
        changed since the barrier get their old values from the log (hold the table's
        lock; lo is `done`)."""
        t = self.table
        self._check()
        if self.rows is None:
            changed = np.flatnonzero(t.stamps[lo:hi] > self.gen)
            changed_rows = lo + changed
        else:
            changed = np.flatnonzero(t.stamps[self.rows[lo:hi]] > self.gen)
            changed_rows = self.rows[lo:hi][changed]
        if len(changed):  # changed since the barrier: their old values are in the log
            slots = self._slot[changed_rows]
            for name, buf in out.items():
                buf[changed] = t.kept.spare["@log:" + name][slots]
        self.done = hi
        if hi >= self.count:
            t.writing = None

    def close(self, locked: bool = False) -> None:
        """Stop (a save that failed, or is done): pushes no longer keep rows for it.
        `locked`: the caller holds the table's lock."""
        if not locked:
            with self.table.lock:
                self.close(locked=True)
            return
        if self.table.writing is self:
            self.table.writing = None
        for name, buf in self._chunks.items():  # kept for the next snapshot
            self.table.kept.spare["@chunk:" + name] = buf
        self._chunks = {}


def fit_buffer(buf: np.ndarray | None, rows: int, like: np.ndarray, keep: int = 0) -> np.ndarray:
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


def _madvise() -> Callable[..., int] | None:
    """libc's madvise, called without the GIL (ctypes releases it; mmap.madvise holds
    it); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


_madvise_fn = _madvise()
_populating = _madvise_fn is not None  # until the kernel says it cannot (EINVAL)


def _populate(buf: np.ndarray, lo: int, hi: int) -> None:
    """Map rows lo..hi of a buffer of `_aligned_empty` (it starts at a page) now,
    leaving what they hold as it is: pushes may be writing them meanwhile."""
    global _populating
    hi = min(hi, len(buf))
    base = buf.__array_interface__["data"][0]
    start = (base + lo * buf.strides[0]) // mmap.PAGESIZE * mmap.PAGESIZE
    end = base + hi * buf.strides[0]
    if _madvise_fn is not None and end > start and \
            _madvise_fn(start, end - start, _POPULATE_WRITE) != 0 and \
            ctypes.get_errno() == errno.EINVAL:  # an older kernel: the pushes map them
        _populating = False


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array at a page boundary (anonymous memory, mapped on first use)."""
    count = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)
