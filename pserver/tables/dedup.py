"""Dedup ids and sum duplicate gradients, fast when duplicates are few.

Trainers mostly send distinct ids, and uniform id streams repeat only a few:
both functions pay one `np.sort` to find out, and then touch only the
repeated ids, instead of permuting every row; when many repeat they sort
once (stably) and work on groups. Duplicate gradients are summed strictly
left to right in the order they appear, so a sum's bits depend only on that
id's gradients: not on the batch, the pserver or the path taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pserver.tables.sharding import fmix64


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


@dataclass
class Groups:
    """The distinct keys of a batch and where each came from, to gather rows back into
    request order and to sum gradients per key without sorting again."""

    uniq: np.ndarray  # distinct keys
    inverse: np.ndarray | None  # uniq[inverse] == keys; None when keys were distinct
    first: np.ndarray | None  # position of each distinct key's first appearance
    later: np.ndarray | None  # positions of repeats, ascending

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows of `uniq` back in request order."""
        return rows if self.inverse is None else np.take(rows, self.inverse, axis=0)

    def sum(self, grads: np.ndarray) -> np.ndarray:
        """Gradients (request order) summed per distinct key, strictly left to right."""
        if self.inverse is None:
            return grads
        out = np.take(grads, self.first, axis=0)
        _add_in_order(out, self.inverse[self.later], np.take(grads, self.later, axis=0))
        return out


def group(keys: np.ndarray) -> Groups:
    """Find the distinct keys: one `np.sort` when they are distinct or few repeat (then
    distinct keys keep the order of first appearance), one stable argsort when many do
    (then they come sorted)."""
    srt, repeats = _sorted_repeats(keys)
    if repeats == 0:
        return Groups(keys, None, None, None)
    if repeats > len(keys) // 8:
        order, first, grp = _groups(keys)
        inverse = np.empty(len(keys), dtype=np.int64)
        inverse[order] = grp
        firsts = order[first]
        return Groups(keys[firsts], inverse, firsts, np.sort(order[~first]))
    grouped, first, grp = _few_groups(keys, srt)
    keep = np.ones(len(keys), dtype=bool)
    later = np.sort(grouped[~first])
    keep[later] = False
    new_index = np.cumsum(keep) - 1
    inverse = new_index.copy()
    inverse[grouped] = new_index[grouped[first][grp]]
    return Groups(keys[keep], inverse, np.flatnonzero(keep), later)


def dedup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(distinct keys, inverse) with `uniq[inverse] == keys`; inverse is None when the keys
    were distinct already (then uniq is keys itself)."""
    g = group(keys)
    return g.uniq, g.inverse


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
    appear (first + second + third ...). When the keys are distinct, the inputs come
    back as they are.
    """
    g = group(keys)
    return g.uniq, g.sum(grads)
