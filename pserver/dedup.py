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


def sum_duplicates(keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys in order of first appearance, their summed gradients).

    A repeated key's gradients are added in a fixed order following their appearance
    (first + second + ... when few keys repeat; numpy's segmented sum over a stable
    sort when many do).
    When the keys are distinct, the inputs come back as they are.
    """
    if _many_repeats(keys):  # sort once, then one segmented sum
        order = np.argsort(keys, kind="stable")
        srt = keys[order]
        first = np.empty(len(srt), dtype=bool)
        first[0] = True
        np.not_equal(srt[1:], srt[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        return srt[starts], np.add.reduceat(np.take(grads, order, axis=0), starts, axis=0)
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
    order = np.argsort(later, kind="stable")  # add later occurrences in appearance order
    np.add.at(out, target[~first][order], grads[later[order]])
    return keys[keep], out
