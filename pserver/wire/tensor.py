"""Bytes on the wire <-> numpy arrays, with the checks every RPC shares (no copies).

Ids are little-endian uint64; rows, gradients and dense values little-endian
float32 with an explicit shape.
"""

from __future__ import annotations

import math

import numpy as np

from pserver.errors import InvalidArgument
from pserver.wire import psrt_pb2 as pb

ID_DTYPE = np.dtype("<u8")
ROW_DTYPE = np.dtype("<f4")


def encode_ids(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype=ID_DTYPE).tobytes()


def encode_tensor(arr: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(arr, dtype=ROW_DTYPE)
    return pb.Tensor(data=a.tobytes(), shape=a.shape)


def rows_at(buf: bytes | memoryview, start: int, end: int, shape: list[int],
            where: str) -> np.ndarray:
    """The float32 array of `shape` in bytes start..end of `buf` (a view, no copy), or
    InvalidArgument naming `where` when the bytes do not fit the shape."""
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{where}: shape {shape} has a negative dimension")
    count = math.prod(shape)  # Python ints: np.prod wraps around on huge shapes
    size = end - start
    if size != count * ROW_DTYPE.itemsize:
        raise InvalidArgument(f"{where}: shape {shape} needs {count * ROW_DTYPE.itemsize} "
                              f"bytes of little-endian float32, got {size} bytes")
    try:
        return np.frombuffer(buf, dtype=ROW_DTYPE, count=count, offset=start).reshape(shape)
    except ValueError as e:  # e.g. an empty tensor with a dimension numpy cannot index
        raise InvalidArgument(f"{where}: shape {shape} is not a usable shape: {e}") from None


def decode_tensor(t: pb.Tensor, where: str) -> np.ndarray:
    """A Tensor message's array (a view of its bytes)."""
    return rows_at(t.data, 0, len(t.data), list(t.shape), where)
