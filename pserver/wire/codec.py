"""Zero-copy encoding and decoding of the bulk messages (Pull, Push and their answers).

protobuf's Python runtime copies a bytes field on parse and again on every
access, and builds a nested message before serializing it: for a 16 MB pull
answer that cost more than the transfer. These functions read and write the
same protobuf wire format (proto/pserver/wire/psrt.proto) directly: decoding
returns numpy views into the received buffer, encoding joins a small header
with the array's own buffer. `tests/unit/test_codec.py` checks them against the
generated classes both ways. Other messages use the generated classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pserver.errors import InvalidArgument
from pserver.wire.tensor import ID_DTYPE, ROW_DTYPE, rows_at

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class DecodeError(InvalidArgument):
    """Bytes that are not a valid message of the expected type."""


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def scan(buf: bytes) -> dict[int, list[int | tuple[int, int]]]:
    """Fields of a message: number -> values (ints, or (start, end) of length-delimited)."""
    fields: dict[int, list[int | tuple[int, int]]] = {}
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > n:
                raise DecodeError("length-delimited field runs past the end")
            value, pos = (pos, pos + size), pos + size
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            if pos + width > n:
                raise DecodeError("fixed-width field runs past the end")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict, number: int, wire: int, default: object) -> object:
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    if (wire == _LEN) != isinstance(value, tuple):
        raise DecodeError(f"field {number} has the wrong wire type")
    return value


def _string(buf: bytes, fields: dict, number: int) -> str:
    span = _last(fields, number, _LEN, None)
    if span is None:
        return ""
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"field {number} is not valid UTF-8") from None


def _int(fields: dict, number: int, bits: int) -> int:
    return _signed(int(_last(fields, number, _VARINT, 0)), bits)


def _bytes_span(fields: dict, number: int) -> tuple[int, int]:
    return _last(fields, number, _LEN, (0, 0))


def _shape(buf: bytes, fields: dict, number: int) -> list[int]:
    shape: list[int] = []
    for value in fields.get(number, []):
        if isinstance(value, tuple):  # packed
            pos, end = value
            while pos < end:
                v, pos = _read_varint(buf, pos)
                shape.append(_signed(v, 64))
            if pos != end:
                raise DecodeError("packed shape runs past its field")
        else:
            shape.append(_signed(value, 64))
    return shape


@dataclass
class TensorView:
    """A Tensor's shape and where its float32 bytes lie in the buffer."""

    shape: list[int]
    start: int
    end: int

    def array(self, buf: bytes, where: str) -> np.ndarray:
        return rows_at(buf, self.start, self.end, self.shape, where)


def _tensor(buf: bytes, fields: dict, number: int) -> TensorView:
    return _tensor_at(buf, _last(fields, number, _LEN, (0, 0)))


def _spans(fields: dict, number: int) -> list[tuple[int, int]]:
    """Every occurrence of a repeated length-delimited field."""
    spans = fields.get(number, [])
    if any(not isinstance(v, tuple) for v in spans):
        raise DecodeError(f"field {number} has the wrong wire type")
    return spans


def _tensor_at(buf: bytes, span: tuple[int, int]) -> TensorView:
    start, end = span
    sub = scan(memoryview(buf)[start:end]) if end > start else {}
    data = _bytes_span(sub, 1)
    return TensorView(_shape(memoryview(buf)[start:end], sub, 2), start + data[0],
                      start + data[1])


def _ids(buf: bytes, span: tuple[int, int], where: str) -> np.ndarray:
    size = span[1] - span[0]
    if size % ID_DTYPE.itemsize:
        raise InvalidArgument(f"{where}: ids must be little-endian uint64 (8 bytes each), "
                              f"got {size} bytes")
    return np.frombuffer(buf, dtype=ID_DTYPE, count=size // 8, offset=span[0])


@dataclass
class PullRequest:
    table: str
    ids: np.ndarray
    trainer_id: int
    step: int


@dataclass
class PushRequest:
    table: str
    ids: np.ndarray
    grads: TensorView
    trainer_id: int
    step: int


def decode_pull_request(buf: bytes) -> PullRequest:
    f = scan(buf)
    return PullRequest(_string(buf, f, 1), _ids(buf, _bytes_span(f, 2), "Pull"),
                       _int(f, 3, 32), _int(f, 4, 64))


def decode_push_request(buf: bytes) -> PushRequest:
    f = scan(buf)
    return PushRequest(_string(buf, f, 1), _ids(buf, _bytes_span(f, 2), "Push"),
                       _tensor(buf, f, 3), _int(f, 4, 32), _int(f, 5, 64))


def _table_entry(buf: bytes, span: tuple[int, int], where: str
                 ) -> tuple[str, np.ndarray, dict, int]:
    """A TableIds or TableGrads in `buf` at `span`: (table, ids, its fields, its start)."""
    view = memoryview(buf)[span[0]:span[1]]
    sub, base = scan(view), span[0]
    ids_span = _bytes_span(sub, 2)
    return _string(view, sub, 1), _ids(buf, (base + ids_span[0], base + ids_span[1]), where), \
        sub, base


def decode_pull_batch(buf: bytes) -> tuple[list[tuple[str, np.ndarray]], list[str], int, int]:
    """PullBatchRequest: ([(table, ids)], dense names, trainer_id, step)."""
    f = scan(buf)
    tables = [_table_entry(buf, span, "PullBatch")[:2] for span in _spans(f, 1)]
    dense = [_string(buf, {2: [s]}, 2) for s in _spans(f, 2)]
    return tables, dense, _int(f, 3, 32), _int(f, 4, 64)


def decode_push_batch(buf: bytes) -> tuple[list[tuple[str, np.ndarray, TensorView]], list[str],
                                             list[TensorView], int, int]:
    """PushBatchRequest: ([(table, ids, grads)], dense names, dense grads, trainer, step)."""
    f = scan(buf)
    tables = []
    for span in _spans(f, 1):
        name, ids, sub, base = _table_entry(buf, span, "PushBatch")
        g_span = _last(sub, 3, _LEN, (0, 0))
        tables.append((name, ids, _tensor_at(buf, (base + g_span[0], base + g_span[1]))))
    dense = [_string(buf, {2: [s]}, 2) for s in _spans(f, 2)]
    grads = [_tensor_at(buf, s) for s in _spans(f, 3)]
    return tables, dense, grads, _int(f, 4, 32), _int(f, 5, 64)


def decode_pull_batch_response(buf: bytes) -> tuple[list[TensorView], list[TensorView]]:
    f = scan(buf)
    return [_tensor_at(buf, s) for s in _spans(f, 1)], [_tensor_at(buf, s) for s in _spans(f, 2)]


def decode_pull_response(buf: bytes) -> TensorView:
    return _tensor(buf, scan(buf), 1)


def _len_field(number: int, size: int) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(size)


def _tensor_parts(arr: np.ndarray) -> list[bytes | memoryview]:
    a = np.ascontiguousarray(arr, dtype=ROW_DTYPE)
    packed = b"".join(_varint(d) for d in a.shape)
    parts: list[bytes | memoryview] = []
    if a.nbytes:
        parts += [_len_field(1, a.nbytes), memoryview(a).cast("B")]
    if packed:
        parts.append(_len_field(2, len(packed)) + packed)
    return parts


def _size(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) for p in parts)


def encode_pull_response(rows: np.ndarray) -> bytes:
    inner = _tensor_parts(rows)
    return b"".join([_len_field(1, _size(inner)), *inner])


def _scalar_parts(table: str, trainer_id: int, step: int, tid: int, sid: int) -> tuple:
    head = _len_field(1, len(table.encode())) + table.encode() if table else b""
    tail = (_varint(tid << 3) + _varint(trainer_id) if trainer_id else b"") + \
        (_varint(sid << 3) + _varint(step) if step else b"")
    return head, tail


def encode_pull_request(table: str, ids: np.ndarray, trainer_id: int, step: int) -> bytes:
    head, tail = _scalar_parts(table, trainer_id, step, 3, 4)
    raw = np.ascontiguousarray(ids, dtype=ID_DTYPE)
    body = [_len_field(2, raw.nbytes), memoryview(raw).cast("B")] if raw.nbytes else []
    return b"".join([head, *body, tail])


def encode_push_request(table: str, ids: np.ndarray, grads: np.ndarray, trainer_id: int,
                        step: int) -> bytes:
    head, tail = _scalar_parts(table, trainer_id, step, 4, 5)
    raw = np.ascontiguousarray(ids, dtype=ID_DTYPE)
    body = [_len_field(2, raw.nbytes), memoryview(raw).cast("B")] if raw.nbytes else []
    inner = _tensor_parts(grads)
    return b"".join([head, *body, _len_field(3, _size(inner)), *inner, tail])


def encode_push_response(applied_steps: int) -> bytes:
    return _varint(1 << 3) + _varint(applied_steps) if applied_steps else b""


def _message(number: int, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    return [_len_field(number, _size(parts)), *parts]


def _str_field(number: int, text: str) -> bytes:
    raw = text.encode()
    return _len_field(number, len(raw)) + raw if raw else b""


def _ids_field(number: int, ids: np.ndarray) -> list[bytes | memoryview]:
    raw = np.ascontiguousarray(ids, dtype=ID_DTYPE)
    return [_len_field(number, raw.nbytes), memoryview(raw).cast("B")] if raw.nbytes else []


def _scalars(trainer_id: int, tid: int, step: int, sid: int) -> bytes:
    return (_varint(tid << 3) + _varint(trainer_id) if trainer_id else b"") + \
        (_varint(sid << 3) + _varint(step) if step else b"")


def encode_pull_batch_request(tables: list[tuple[str, np.ndarray]], dense: list[str],
                              trainer_id: int, step: int) -> bytes:
    parts: list[bytes | memoryview] = []
    for name, ids in tables:
        parts += _message(1, [_str_field(1, name), *_ids_field(2, ids)])
    parts += [_len_field(2, len(n.encode())) + n.encode() for n in dense]
    return b"".join([*parts, _scalars(trainer_id, 3, step, 4)])


def encode_pull_batch_response(rows: list[np.ndarray], dense: list[np.ndarray]) -> bytes:
    parts: list[bytes | memoryview] = []
    for arr in rows:
        parts += _message(1, _tensor_parts(arr))
    for arr in dense:
        parts += _message(2, _tensor_parts(arr))
    return b"".join(parts)


def encode_push_batch_request(tables: list[tuple[str, np.ndarray, np.ndarray]],
                              dense: list[tuple[str, np.ndarray]], trainer_id: int,
                              step: int) -> bytes:
    parts: list[bytes | memoryview] = []
    for name, ids, grads in tables:
        parts += _message(1, [_str_field(1, name), *_ids_field(2, ids),
                              *_message(3, _tensor_parts(grads))])
    parts += [_len_field(2, len(n.encode())) + n.encode() for n, _ in dense]
    for _, g in dense:
        parts += _message(3, _tensor_parts(g))
    return b"".join([*parts, _scalars(trainer_id, 4, step, 5)])
