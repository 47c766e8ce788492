"""Dedup ids and sum duplicate gradients, fast when duplicates are few.

Trainers mostly send distinct ids, and uniform id streams repeat only a few:
both functions pay one `np.sort` to find out, and then touch only the
repeated ids, instead of permuting every row; when many repeat they sort
once (stably) and work on groups. Duplicate gradients are summed strictly
left to right in the order they appear, so a sum's bits depend only on that
id's gradients: not on the batch, the pserver or the path taken.
"""

from __future__ import annotations

import numpy as np

from pserver.sharding import fmix64


def _sorted_repeats(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """(sorted keys, how many are repeats of an earlier equal key)."""
    srt = np.sort(keys)
    return srt, int(np.count_nonzero(srt[1:] == srt[:-1]))


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, first, group): a stable sort of keys, the first of each run of equal keys,
    and each sorted position's group number."""
    order = np.argsort(keys, kind="stable")
    srt = keys[order]
    first = np.empty(len(srt), dtype=bool)
    first[:1] = True
    np.not_equal(srt[1:], srt[:-1], out=first[1:])
    return order, first, np.cumsum(first) - 1


def _positions_of(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Positions of the keys that are in `values` (sorted, few): a hashed bitmap filters
    the candidates, a binary search over the few left confirms them."""
    bits = 1 << max(12, (8 * len(values)).bit_length())
    mask = np.uint64(bits - 1)
    bitmap = np.zeros(bits, dtype=bool)
    bitmap[(fmix64(values) & mask).astype(np.intp)] = True
    cand = np.flatnonzero(bitmap[(fmix64(keys) & mask).astype(np.intp)])
    k = keys[cand]
    at = np.minimum(np.searchsorted(values, k), len(values) - 1)
    return cand[values[at] == k]


def _few_groups(keys: np.ndarray, srt: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                            np.ndarray]:
    """`_groups` restricted to the positions of repeated keys: (positions, first, group)."""
    same = srt[1:] == srt[:-1]
    pos = _positions_of(keys, np.unique(srt[1:][same]))
    order, first, group = _groups(keys[pos])
    return pos[order], first, group


def dedup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(distinct keys, inverse) with `uniq[inverse] == keys`; inverse is None when the keys
    were distinct already (then uniq is keys itself)."""
    srt, repeats = _sorted_repeats(keys)
    if repeats == 0:
        return keys, None
    if repeats > len(keys) // 8:
        order, first, group = _groups(keys)
        inverse = np.empty(len(keys), dtype=np.int64)
        inverse[order] = group
        return keys[order[first]], inverse
    grouped, first, group = _few_groups(keys, srt)
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
    appear (first + second + third ...), whichever way the repeats are found. When the
    keys are distinct, the inputs come back as they are.
    """
    srt, repeats = _sorted_repeats(keys)
    if repeats == 0:
        return keys, grads
    if repeats > len(keys) // 8:
        order, first, group = _groups(keys)
        out = np.take(grads, order[first], axis=0)
        # later occurrences, grouped by key and in appearance order within a key
        _add_in_order(out, group[~first], grads[order[~first]])
        return keys[order[first]], out
    grouped, first, group = _few_groups(keys, srt)
    keep = np.ones(len(keys), dtype=bool)
    later = grouped[~first]
    keep[later] = False
    new_index = np.cumsum(keep) - 1
    out = grads[keep]
    target = new_index[grouped[first][group]]  # where each grouped position's sum lands
    _add_in_order(out, target[~first], grads[later])
    return keys[keep], out
