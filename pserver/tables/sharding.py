"""The sharding rule: which pserver owns an id.

An id (uint64) maps to one of `V` virtual shards, fixed when the job is
created, and virtual shards map to pservers in contiguous ranges::

    virtual_shard(id) = splitmix64(id) % V
    pserver(id)       = virtual_shard(id) * P // V

`splitmix64` is the finalizer of Steele et al.'s SplitMix64 generator: a
bijection on 64-bit integers whose output bits each depend on every input bit,
so skewed or sequential id spaces spread evenly. Because rows are grouped by
virtual shard, a checkpoint written by P pservers can be restored onto P'.
"""

from __future__ import annotations

import numpy as np

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S27, _S30, _S31, _S33 = (np.uint64(s) for s in (27, 30, 31, 33))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, element-wise on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _S30)) * _C1
        z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer; independent of `splitmix64`, used inside a shard."""
    k = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        k = (k ^ (k >> _S33)) * _M1
        k = (k ^ (k >> _S33)) * _M2
    return k ^ (k >> _S33)


def virtual_shard(ids: np.ndarray, virtual_shards: int) -> np.ndarray:
    """The virtual shard (int64) of every id."""
    return (splitmix64(ids) % np.uint64(virtual_shards)).astype(np.int64)


def owner(ids: np.ndarray, num_pservers: int, virtual_shards: int) -> np.ndarray:
    """The pserver (int64) that owns every id."""
    return virtual_shard(ids, virtual_shards) * num_pservers // virtual_shards


def owned_range(pserver_id: int, num_pservers: int, virtual_shards: int) -> range:
    """The virtual shards pserver `pserver_id` owns: a contiguous range."""
    lo = -(-pserver_id * virtual_shards // num_pservers)
    hi = -(-(pserver_id + 1) * virtual_shards // num_pservers)
    return range(lo, hi)
