"""Writing a checkpoint: each process writes its part, the coordinator commits.

The commit writes MANIFEST.json, then _SUCCESS, each fsynced, then fsyncs the
directory: a checkpoint without _SUCCESS never existed. Parts never write
_SUCCESS, and nothing is written into a checkpoint after it. Nothing is ever
renamed, so the same commit holds on object stores (S3 and the like), where a
written object is whole or absent and a "directory" is a key prefix: readers
start from _SUCCESS and ignore whatever lies under a prefix without it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from ckpt import layout
from ckpt.manifest import Manifest, Part
from ckpt.storage import FileEntry, Storage

# rows of a table written at a time: a multiple of 4096, so that every chunk of every
# array is whole disk blocks (written straight from aligned memory)
CHUNK_ROWS = 16_384


class Rows(Protocol):
    """A table's rows to write, read in order: `count` rows, their `ids` (for the index),
    `columns()` (an empty array per file: its name, dtype and row shape) and `read(hi)`,
    the next rows up to row `hi`, every column (valid until the next read)."""

    count: int

    @property
    def ids(self) -> np.ndarray: ...

    def columns(self) -> Mapping[str, np.ndarray]: ...

    def read(self, hi: int) -> Mapping[str, np.ndarray]: ...


class ArrayRows:
    """Rows that are arrays already: ids, values, optimizer state."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays, self.ids = arrays, arrays["ids"]
        self.count, self.done = len(self.ids), 0

    def columns(self) -> dict[str, np.ndarray]:
        return {name: arr[:0] for name, arr in self.arrays.items()}

    def read(self, hi: int) -> dict[str, np.ndarray]:
        lo, self.done = self.done, hi
        return {name: arr[lo:hi] for name, arr in self.arrays.items()}


def write_shard(storage: Storage, serial: int, pserver_id: int,
                tables: Mapping[str, Rows | Mapping[str, np.ndarray]],
                vshards: Mapping[str, np.ndarray], virtual_shards: int,
                dense_state: Mapping[str, Mapping[str, np.ndarray]],
                facts: dict | None = None,
                progress: Callable[[int], None] | None = None) -> Part:
    """Pserver `pserver_id`'s part: every table's rows (arrays, or `Rows` read as they are
    written), the rows sorted by virtual shard (`order`, with `vshards` offsets; each row's
    virtual shard is `vshards[t]`), and the optimizer state of its dense variables.

    A table's columns are written side by side, CHUNK_ROWS rows at a time, each into its
    own file. `progress(rows)` is called after each chunk with the rows written so far
    (all tables)."""
    base = layout.checkpoint_name(serial)
    storage.makedirs(f"{base}/{layout.shard_dir(pserver_id)}")
    files: list[FileEntry] = []
    rows: dict[str, int] = {}
    for name, table in tables.items():
        src = ArrayRows(table) if isinstance(table, Mapping) else table
        vs = vshards[name]
        # a stable sort of small integers is a radix sort in numpy: 7x faster than int64's
        small = vs.astype(np.uint16) if virtual_shards <= 1 << 16 else vs
        order = np.argsort(small, kind="stable")
        offsets = np.searchsorted(vs[order], np.arange(virtual_shards + 1)).astype(np.int64)
        files.append(storage.write_array(base, layout.table_file(pserver_id, name, "vshards"),
                                         offsets, fsync=False))
        files.append(storage.write_array(base, layout.table_file(pserver_id, name, "order"),
                                         order.astype(np.int64), fsync=False))
        n = src.count
        if len(vs) != n:
            raise ValueError(f"table {name!r}: {n} rows but {len(vs)} virtual shards")
        with contextlib.ExitStack() as stack:
            out = {a: stack.enter_context(storage.open_array(
                base, layout.table_file(pserver_id, name, a), arr.dtype, (n,) + arr.shape[1:],
                fsync=False)) for a, arr in src.columns().items()}
            for lo in range(0, n, CHUNK_ROWS):
                chunk = src.read(min(n, lo + CHUNK_ROWS))
                for a, w in out.items():
                    w.write(chunk[a])
                if progress is not None:
                    progress(sum(rows.values()) + min(n, lo + CHUNK_ROWS))
        files += [w.entry() for w in out.values()]
        rows[name] = n
    for name, arrays in dense_state.items():
        for array, arr in arrays.items():
            files.append(storage.write_array(base, layout.dense_file(name, array), arr,
                                             fsync=False))
    storage.fsync([f"{base}/{f.path}" for f in files])
    # the directories that gained an entry: the shard's own, its place in the tables', and
    # the dense state's (the checkpoint's own: the commit, before _SUCCESS)
    _fsync_dirs(storage, base, [layout.shard_dir(pserver_id), layout.TABLES_DIR,
                                *([layout.MODEL_DIR] if dense_state else [])])
    return Part("pserver", pserver_id, files, {"rows": rows, **(facts or {})})


def write_trainer(storage: Storage, serial: int, trainer_id: int, epoch_id: int,
                  step_id: int, reader_state: dict,
                  dense_values: Mapping[str, np.ndarray] | None = None) -> Part:
    """Trainer `trainer_id`'s part: its counters (and, for trainer 0, the dense values)."""
    base = layout.checkpoint_name(serial)
    files = [
        storage.write_bytes(base, layout.trainer_file(trainer_id, "epoch_id"), f"{epoch_id}\n"
                            .encode()),
        storage.write_bytes(base, layout.trainer_file(trainer_id, "step_id"), f"{step_id}\n"
                            .encode()),
        storage.write_bytes(base, layout.trainer_file(trainer_id, "reader_state"),
                            (json.dumps(reader_state, sort_keys=True) + "\n").encode()),
    ]
    for name, value in (dense_values or {}).items():
        files.append(storage.write_array(base, layout.dense_file(name), value))
    _fsync_dirs(storage, base, [layout.trainer_dir(trainer_id),
                                *([layout.MODEL_DIR] if dense_values else [])])
    facts = {"epoch_id": epoch_id, "step_id": step_id,
             "global_step": int(reader_state.get("global_step", 0))}
    return Part("trainer", trainer_id, files, facts)


def commit(storage: Storage, manifest: Manifest) -> None:
    """Write MANIFEST.json then _SUCCESS, durably: the commit point. Every directory that
    gained an entry is durable before _SUCCESS is written (the parts' own directories by
    their writers; the checkpoint's and checkpoint_dir's here), and _SUCCESS's entry
    before this returns."""
    base = layout.checkpoint_name(manifest.serial)
    storage.write_bytes(base, layout.MANIFEST, manifest.to_json().encode())
    _fsync_dirs(storage, base, ["", None])
    storage.write_bytes(base, layout.SUCCESS, f"{manifest.serial}\n".encode())
    _fsync_dirs(storage, base, ["", None])


def _fsync_dirs(storage: Storage, base: str, rels: list[str | None]) -> None:
    """fsync these directories of checkpoint `base` ("": base itself; None:
    checkpoint_dir), in order."""
    for rel in rels:
        storage.fsync_dir("" if rel is None else f"{base}/{rel}" if rel else base)
