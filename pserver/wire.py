"""Bytes on the wire <-> numpy arrays, with the checks every RPC shares.

Ids are little-endian uint64; rows, gradients and dense values little-endian
float32 with an explicit shape.
"""

from __future__ import annotations

import math

import numpy as np

from pserver import psrt_pb2 as pb
from pserver.errors import InvalidArgument

ID_DTYPE = np.dtype("<u8")
ROW_DTYPE = np.dtype("<f4")


def encode_ids(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype=ID_DTYPE).tobytes()


def encode_tensor(arr: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(arr, dtype=ROW_DTYPE)
    return pb.Tensor(data=a.tobytes(), shape=a.shape)


def decode_tensor(t: pb.Tensor, where: str) -> np.ndarray:
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{where}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)  # Python ints: np.prod wraps around on huge shapes
    if len(t.data) != count * ROW_DTYPE.itemsize:
        raise InvalidArgument(
            f"{where}: shape {list(shape)} needs {count * ROW_DTYPE.itemsize} bytes of "
            f"little-endian float32, got {len(t.data)} bytes"
        )
    try:
        return np.frombuffer(t.data, dtype=ROW_DTYPE).reshape(shape)
    except ValueError as e:  # e.g. an empty tensor with a dimension numpy cannot index
        raise InvalidArgument(f"{where}: shape {list(shape)} is not a usable shape: {e}") from None


def check_finite(arr: np.ndarray, where: str) -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InvalidArgument(f"{where}: gradients hold NaN or Inf (first at index {bad})")
