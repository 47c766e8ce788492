"""Writing a checkpoint: each process writes its part, the coordinator commits.

The commit writes MANIFEST.json, then _SUCCESS, each fsynced, then fsyncs the
directory: a checkpoint without _SUCCESS never existed. Parts never write
_SUCCESS, and nothing is written into a checkpoint after it. Nothing is ever
renamed, so the same commit holds on object stores (S3 and the like), where a
written object is whole or absent and a "directory" is a key prefix: readers
start from _SUCCESS and ignore whatever lies under a prefix without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np

from ckpt import layout
from ckpt.manifest import Manifest, Part
from ckpt.storage import FileEntry, Storage


def write_shard(storage: Storage, serial: int, pserver_id: int,
                tables: Mapping[str, Mapping[str, np.ndarray]],
                vshards: Mapping[str, np.ndarray], virtual_shards: int,
                dense_state: Mapping[str, Mapping[str, np.ndarray]],
                facts: dict | None = None, midway: Callable[[], None] | None = None) -> Part:
    """Pserver `pserver_id`'s part: every table's arrays (rows in table order, written
    sequentially), the rows sorted by virtual shard (`order`, with `vshards` offsets; each
    row's virtual shard is `vshards[t]`), and the optimizer state of its dense variables."""
    base = layout.checkpoint_name(serial)
    storage.makedirs(f"{base}/{layout.shard_dir(pserver_id)}")
    files: list[FileEntry] = []
    rows = {}
    for name, arrays in tables.items():
        vs = vshards[name]
        order = np.argsort(vs, kind="stable")
        offsets = np.searchsorted(vs[order], np.arange(virtual_shards + 1)).astype(np.int64)
        files.append(storage.write_array(base, layout.table_file(pserver_id, name, "vshards"),
                                         offsets, fsync=False))
        files.append(storage.write_array(base, layout.table_file(pserver_id, name, "order"),
                                         order.astype(np.int64), fsync=False))
        for array, arr in arrays.items():
            files.append(storage.write_array(base, layout.table_file(pserver_id, name, array),
                                             arr, fsync=False))
            if midway is not None:
                midway()
                midway = None
        rows[name] = int(len(vs))
    for name, arrays in dense_state.items():
        for array, arr in arrays.items():
            files.append(storage.write_array(base, layout.dense_file(name, array), arr,
                                             fsync=False))
    storage.fsync([f"{base}/{f.path}" for f in files])
    storage.fsync_dir(f"{base}/{layout.shard_dir(pserver_id)}")
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
    facts = {"epoch_id": epoch_id, "step_id": step_id,
             "global_step": int(reader_state.get("global_step", 0))}
    return Part("trainer", trainer_id, files, facts)


def commit(storage: Storage, manifest: Manifest) -> None:
    """Write MANIFEST.json then _SUCCESS, durably: the commit point."""
    base = layout.checkpoint_name(manifest.serial)
    storage.write_bytes(base, layout.MANIFEST, manifest.to_json().encode())
    storage.write_bytes(base, layout.SUCCESS, f"{manifest.serial}\n".encode())
    storage.fsync_dir(base)
    storage.fsync_dir("")
