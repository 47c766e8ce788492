"""A sparse table shard and a dense variable: numpy only, no gRPC.

A `SparseTable` keeps its rows in contiguous arrays that grow by doubling:
`ids` (uint64), `values` (rows x dim float32) and the optimizer's per-row
state, all indexed by the row number an `IdIndex` hands out. A row is created
on first pull (or push) with its deterministic initial value.
"""

from __future__ import annotations

import threading

import numpy as np
import xxhash

from pserver import initializers, optimizers
from pserver.config import DenseSpec, TableSpec
from pserver.dedup import sum_duplicates
from pserver.idindex import IdIndex

_BLOCK_BYTES = 256 * 1024  # optimizer updates run in blocks that stay in cache
_RECENT = 8  # remembered id -> row lookups per table


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
        self._snapshots: dict[str, np.ndarray] = {}
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
        """Bytes allocated: the arrays (grown by doubling) and the snapshot buffers."""
        arrays = list(self._arrays.values()) + list(self._snapshots.values())
        return sum(a.nbytes for a in arrays)

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
            a = self._arrays
            values = a["values"]
            step = max(1, _BLOCK_BYTES // (4 * self.dim))
            for lo in range(0, len(rows), step):
                r = rows[lo:lo + step]
                w = np.take(values, r, axis=0)
                state = {name: np.take(a[name], r, axis=0) for name in self._layout}
                optimizers.apply(self.spec.optimizer, w, grads[lo:lo + step], state)
                values[r] = w
                for name, block in state.items():
                    a[name][r] = block

    def arrays(self) -> dict[str, np.ndarray]:
        """Views of the live rows (hold `lock` while using them)."""
        return {name: arr[: self._size] for name, arr in self._arrays.items()}

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the live rows (hold `lock`), in buffers kept for the next snapshot:
        memory already mapped copies several times faster than fresh memory. One snapshot
        is valid until the next one (background saves never overlap)."""
        n = self._size
        for name, arr in self._arrays.items():
            snap = self._snapshots.get(name)
            if snap is None or len(snap) < n or snap.shape[1:] != arr.shape[1:]:
                snap = np.empty((max(n, 16) + n // 4,) + arr.shape[1:], dtype=arr.dtype)
                self._snapshots[name] = snap
            np.copyto(snap[:n], arr[:n])
        return {name: snap[:n] for name, snap in self._snapshots.items()}

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
            self._size = n


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
