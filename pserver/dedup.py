"""Dedup ids and sum duplicate gradients, fast when duplicates are few.

Trainers mostly send distinct ids, and uniform id streams repeat only a few:
both functions pay one `np.sort` to find out, and then touch only the
repeated ids, instead of sorting and permuting every row. Distinct ids keep
the order of their first appearance (when few repeat), and duplicate gradients are summed in
the order they appear, so results are reproducible bit for bit.
"""

from __future__ import annotations

import numpy as np

from pserver.sharding import fmix64


def _repeats(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """For repeated keys: their positions grouped by key (appearance order within a key),
    and a flag for the first position of each key; None when all keys are distinct."""
    srt = np.sort(keys)
    same = srt[1:] == srt[:-1]
    if not same.any():
        return None
    repeated = np.unique(srt[1:][same])
    pos = _positions_of(keys, repeated)
    order = np.argsort(keys[pos], kind="stable")
    grouped = pos[order]
    k = keys[grouped]
    first = np.empty(len(k), dtype=bool)
    first[0] = True
    np.not_equal(k[1:], k[:-1], out=first[1:])
    return grouped, first, np.cumsum(first) - 1


def _positions_of(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Positions of the keys that are in `values` (sorted, usually few): a hashed bitmap
    filters the candidates, a binary search over the few left confirms them."""
    bits = 1 << max(12, (8 * len(values)).bit_length())
    mask = np.uint64(bits - 1)
    bitmap = np.zeros(bits, dtype=bool)
    bitmap[(fmix64(values) & mask).astype(np.intp)] = True
    cand = np.flatnonzero(bitmap[(fmix64(keys) & mask).astype(np.intp)])
    k = keys[cand]
    at = np.minimum(np.searchsorted(values, k), len(values) - 1)
    return cand[values[at] == k]


def _many_repeats(keys: np.ndarray) -> bool:
    """A cheap guess (from a sample) that over an eighth of the keys repeat."""
    sample = keys[:: max(1, len(keys) // 4096)]
    return len(np.unique(sample)) < len(sample) * 7 // 8


def dedup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(distinct keys, inverse) with `uniq[inverse] == keys`; inverse is None when the keys
    were distinct already (then uniq is keys itself)."""
    if _many_repeats(keys):
        return np.unique(keys, return_inverse=True)
    rep = _repeats(keys)
    if rep is None:
        return keys, None
    grouped, first, group = rep
    keep = np.ones(len(keys), dtype=bool)
    keep[grouped[~first]] = False
    new_index = np.cumsum(keep) - 1
    inverse = new_index.copy()
    inverse[grouped] = new_index[grouped[first][group]]
    return keys[keep], inverse


def _add_in_order(out: np.ndarray, targets: np.ndarray, rows: np.ndarray) -> None:
    """out[targets[i]] += rows[i] for i = 0, 1, ... in that order (unbuffered, flat)."""
    if not len(targets):
        return
    width = int(np.prod(out.shape[1:], dtype=np.int64))
    flat = (targets[:, None] * width + np.arange(width)).ravel()
    np.add.at(out.reshape(-1), flat, rows.reshape(-1))


def sum_duplicates(keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, their summed gradients).

    A repeated key's gradients are added strictly left to right in the order they
    appear (first + second + third ...), whichever way the repeats are found, so the
    bits of a sum depend only on that key's own gradients and their order. When the
    keys are distinct, the inputs come back as they are.
    """
    if _many_repeats(keys):
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        out = np.take(grads, first, axis=0)
        later = np.ones(len(keys), dtype=bool)
        later[first] = False
        _add_in_order(out, inverse[later], grads[later])
        return uniq, out
    rep = _repeats(keys)
    if rep is None:
        return keys, grads
    grouped, first, group = rep
    keep = np.ones(len(keys), dtype=bool)
    later = grouped[~first]
    keep[later] = False
    new_index = np.cumsum(keep) - 1
    out = grads[keep]
    target = new_index[grouped[first][group]]  # where each grouped position's sum lands
    order = np.argsort(later, kind="stable")  # later occurrences in appearance order
    _add_in_order(out, target[~first][order], grads[later[order]])
    return keys[keep], out
