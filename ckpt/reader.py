"""Reading checkpoints: which exist, which are complete and intact, and their parts.

Reading never creates anything. A checkpoint counts only with `_SUCCESS` and
a manifest whose files are all there with the right sizes (and, verified
deeply, the right checksum); anything else in `checkpoint_dir` is ignored.
A delta checkpoint restores only with its whole chain: each base back to a
full checkpoint must count too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ckpt import layout
from ckpt.manifest import Manifest
from ckpt.storage import Damaged, Storage, mismatch

log = logging.getLogger(__name__)


@dataclass
class Entry:
    serial: int
    complete: bool  # _SUCCESS present
    manifest: Manifest | None
    problem: str | None  # why it does not count, or None


def _load_manifest(storage: Storage, serial: int) -> tuple[Manifest | None, str | None]:
    base = layout.checkpoint_name(serial)
    if not storage.exists(f"{base}/{layout.SUCCESS}"):
        return None, "no _SUCCESS (torn or still being written)"
    try:
        return Manifest.from_json(storage.read_bytes(f"{base}/{layout.MANIFEST}").decode()), None
    except FileNotFoundError:
        return None, "_SUCCESS without MANIFEST.json"
    except (ValueError, KeyError, TypeError) as e:
        return None, f"MANIFEST.json is unreadable: {e}"


def load_manifest(storage: Storage, serial: int) -> Manifest:
    """The manifest of a committed checkpoint; ValueError says why there is none."""
    manifest, problem = _load_manifest(storage, serial)
    if manifest is None:
        raise ValueError(f"checkpoint_{serial} in {storage.root}: {problem}")
    return manifest


# `deep` of verify and newest_complete: "parts" checks the checksums of the trainers'
# files only (small), the sizes of the rest; the pservers check theirs while they load them
PARTS = "parts"


def _deep_for(deep: bool | str, rel: str) -> bool:
    return deep is True or (deep == PARTS and rel.startswith("trainer_"))


def verify(storage: Storage, serial: int, deep: bool | str = True) -> list[str]:
    """Problems of checkpoint `serial` (empty: intact). `deep` also checks every checksum
    (PARTS: those of the trainers' files)."""
    manifest, problem = _load_manifest(storage, serial)
    if manifest is None:
        return [problem or "unreadable"]
    if manifest.serial != serial:
        return [f"MANIFEST.json says serial {manifest.serial}"]
    problems = []
    base = layout.checkpoint_name(serial)
    present = storage.sizes(base)  # one listing (one request on an object store)
    for rel, want in sorted(manifest.files.items()):
        path = f"{base}/{rel}"
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        size, digest = storage.checksum(path) if _deep_for(deep, rel) else (present[rel], None)
        if (problem := mismatch(size, digest, want)) is not None:
            problems.append(f"{rel}: {problem}")
    return problems


def entries(storage: Storage, deep: bool = False) -> list[Entry]:
    """Every `checkpoint_<serial>` entry, oldest first; other names are ignored."""
    out = []
    for name in storage.listdir():
        serial = layout.parse_serial(name)
        if serial is None:
            continue
        manifest, problem = _load_manifest(storage, serial)
        if manifest is not None:
            problems = verify(storage, serial, deep)
            problem = "; ".join(problems) if problems else None
        out.append(Entry(serial, storage.exists(f"{name}/{layout.SUCCESS}"), manifest, problem))
    return sorted(out, key=lambda e: e.serial)


def chain(storage: Storage, manifest: Manifest, deep: bool | str = False,
          checked: dict[int, list[str]] | None = None) -> list[Manifest]:
    """The checkpoints to load to restore `manifest`, oldest first: a full checkpoint, then
    each delta over it (just [manifest] for a full one). ValueError names the first link
    that is missing, torn or damaged. `checked` caches verify() answers by serial."""
    checked = {} if checked is None else checked
    links = [manifest]
    while links[0].kind == "delta":
        head, base = links[0], links[0].base
        where = f"checkpoint_{head.serial} is a delta of checkpoint_{base}"
        if base >= head.serial:
            raise ValueError(f"{where}, which is not older")
        if not storage.exists(f"{layout.checkpoint_name(base)}/{layout.SUCCESS}"):
            raise ValueError(f"{where}, which is missing (or was never committed)")
        if base not in checked:
            checked[base] = verify(storage, base, deep)
        if checked[base]:
            raise ValueError(f"{where}, which does not count: {_brief(checked[base])}")
        links.insert(0, load_manifest(storage, base))
    return links


def _brief(problems: list[str]) -> str:
    return "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")


def newest_complete(storage: Storage, deep: bool | str = True,
                    damaged: dict[int, str] | None = None) -> Manifest | None:
    """The newest checkpoint that is complete and intact, and (a delta) whose chain of bases
    is too; others are skipped with a warning saying what is wrong. `damaged`: serials
    found damaged while they were restored, and why (they and deltas over them are
    skipped)."""
    return next(restorable(storage, deep, damaged), None)


def restorable(storage: Storage, deep: bool | str = True,
               damaged: dict[int, str] | None = None) -> Iterator[Manifest]:
    """Every checkpoint `newest_complete` would take, newest first (each skipped one is
    logged when it is passed)."""
    damaged = damaged or {}
    checked: dict[int, list[str]] = {s: [f"damaged: {why}"] for s, why in damaged.items()}
    for e in reversed(entries(storage, deep=False)):
        problem = e.problem or (f"damaged: {damaged[e.serial]}" if e.serial in damaged
                                else None)
        if problem is None:
            if e.serial not in checked:
                checked[e.serial] = verify(storage, e.serial, deep)
            problem = _brief(checked[e.serial]) if checked[e.serial] else None
        if problem is None and e.manifest is not None:
            try:
                chain(storage, e.manifest, deep, checked)
                yield e.manifest
                continue
            except ValueError as err:
                problem = f"cannot be restored: {err}"
        log.warning("skipping %s in %s: %s", layout.checkpoint_name(e.serial), storage.root,
                    problem)


def max_serial(storage: Storage) -> int:
    """The largest serial of any entry, complete or not; -1 when there is none."""
    serials = [layout.parse_serial(n) for n in storage.listdir()]
    return max((s for s in serials if s is not None), default=-1)


def read_trainer(storage: Storage, serial: int, trainer_id: int) -> tuple[int, int, dict]:
    """(epoch_id, step_id, reader_state) of a trainer."""
    base = layout.checkpoint_name(serial)

    def text(name: str) -> str:
        return storage.read_bytes(f"{base}/{layout.trainer_file(trainer_id, name)}").decode()

    return int(text("epoch_id")), int(text("step_id")), json.loads(text("reader_state"))


def read_dense(storage: Storage, serial: int, name: str, array: str = "value",
               manifest: Manifest | None = None) -> np.ndarray:
    """A dense variable's value (or state array); with the manifest, checked against it
    while it is read (Damaged names the file)."""
    rel = layout.dense_file(name, array)
    if manifest is not None:
        return _read(storage, manifest, rel)
    return storage.read_array(f"{layout.checkpoint_name(serial)}/{rel}")


def _read(storage: Storage, manifest: Manifest, rel: str, mmap: bool = False) -> np.ndarray:
    """A file of checkpoint `manifest`, checked against its manifest entry in the same read
    (or, memory-mapped, by one checksum pass first): Damaged names the file."""
    path = f"{layout.checkpoint_name(manifest.serial)}/{rel}"
    want = manifest.files.get(rel)
    if want is None:
        raise Damaged(path, "not in the checkpoint's manifest")
    if not mmap:
        return storage.read_verified(path, want["size"], want["xxh3"])
    if (problem := mismatch(*storage.checksum(path), want)) is not None:
        raise Damaged(path, problem)
    return storage.read_array(path, mmap=True)


def read_table(storage: Storage, manifest: Manifest, table: str, arrays: list[str],
               vshard_lo: int, vshard_hi: int) -> dict[str, np.ndarray]:
    """The rows of virtual shards [lo, hi) of a table, from every old pserver's files
    ({} when there are none).

    Each old shard lists its rows sorted by virtual shard (`order`, `vshards`), so only
    the needed rows are read (memory-mapped, in file order, after one checksum pass); a
    whole old shard is read once and checked in that read. Damaged names a file whose
    size or checksum differs from the manifest.
    """
    plan = []  # (old pserver, its rows to read, or None: all of them)
    for p in range(manifest.num_pservers):
        offsets = _read(storage, manifest, layout.table_file(p, table, "vshards"))
        lo = int(offsets[min(vshard_lo, len(offsets) - 1)])
        hi = int(offsets[min(vshard_hi, len(offsets) - 1)])
        if hi <= lo:
            continue
        if lo == 0 and hi == int(offsets[-1]):  # the whole old shard: read it straight
            plan.append((p, None, hi))
            continue
        order = _read(storage, manifest, layout.table_file(p, table, "order"), mmap=True)
        plan.append((p, np.sort(order[lo:hi]), hi - lo))  # ascending: reads walk forward
    if not plan:
        return {}

    def source(p: int, a: str, mmap: bool = True) -> np.ndarray:
        return _read(storage, manifest, layout.table_file(p, table, a), mmap=mmap)

    if len(plan) == 1:  # one piece: no copy into a joined array
        p, rows, _ = plan[0]
        if rows is None:
            return {a: source(p, a, mmap=False) for a in arrays}
        return {a: np.take(source(p, a), rows, axis=0) for a in arrays}
    # several pieces go straight into one array each (no pieces, then a joined copy: half
    # the memory touched)
    total = sum(n for _, _, n in plan)
    out = {}
    for a in arrays:
        at = 0
        for p, rows, n in plan:
            src = source(p, a)
            if a not in out:
                out[a] = np.empty((total,) + src.shape[1:], dtype=src.dtype)
            if rows is None:
                np.copyto(out[a][at:at + n], src)
            else:
                np.take(src, rows, axis=0, out=out[a][at:at + n])
            at += n
    return out


def read_all(storage: Storage, manifest: Manifest) -> dict[str, dict[str, np.ndarray]]:
    """Every table (rows sorted by id) and dense variable of a checkpoint (a delta: with its
    chain applied), in memory:
    {"table/NAME": {"ids", "values", state...}, "dense/NAME": {"value", state...}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    links = chain(storage, manifest)
    for name, spec in manifest.tables.items():
        names = ["ids", "values", *spec["state"]]
        pieces = [read_table(storage, link, name, names, 0, link.virtual_shards)
                  for link in links]
        out[f"table/{name}"] = newest_rows([p for p in pieces if p])
    for name, spec in manifest.dense.items():
        out[f"dense/{name}"] = {"value": read_dense(storage, manifest.serial, name,
                                                    manifest=manifest), **{
            k: read_dense(storage, manifest.serial, name, k, manifest) for k in spec["state"]}}
    return out


def newest_rows(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several checkpoints (oldest first) merged: each id's newest row, by id."""
    if not pieces:
        return {}
    merged = {k: np.concatenate([p[k] for p in pieces])[::-1] for k in pieces[0]}
    _, first = np.unique(merged["ids"], return_index=True)  # reversed: first is newest
    return {k: np.take(v, first, axis=0) for k, v in merged.items()}
