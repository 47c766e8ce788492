"""The Criteo text format, parsed fast: bytes in, numpy arrays out.

The format, the parsed arrays and the id hashing rule are the data contract
documented in `trainer.data`; this module implements it. Lines are parsed
vectorised, ~2 MB at a time: separators are found with one pass over the
bytes, then every field is decoded from one or two 8-byte words (SWAR), so a
field costs a few numpy operations, not a Python call. Fields longer than 8
characters take a slower but still vectorised path; a line's error message
comes from `diagnose_line`, the same rules written plainly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pserver.tables.sharding import splitmix64

NUM_NUMERIC = 13
NUM_CATEGORICAL = 26
NUM_COLUMNS = 1 + NUM_NUMERIC + NUM_CATEGORICAL
MISSING_VALUE = 0xFFFF_FFFF_FFFF_FFFF
SLOT_SALT = 0x9E37_79B9_7F4A_7C15
_SLOT_KEYS = np.array(
    [((s + 1) * SLOT_SALT) & MISSING_VALUE for s in range(NUM_CATEGORICAL)], dtype=np.uint64
)
_BLOCK_BYTES = 2 << 20
_PAD = 32  # zero bytes after each block, so that word reads never run off its end
_MAX_FAST_DIGITS = 18  # up to 18 decimal digits always fit in int64


class DataError(ValueError):
    """A malformed data file; the message is ``"{path}:{lineno}: {reason}"``."""


@dataclass(frozen=True)
class Dataset:
    """Parsed examples: labels (N,) float32, numeric (N, 13) float32, ids (N, 26) uint64."""

    labels: np.ndarray
    numeric: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        expected = {
            "labels": (self.labels, np.float32, (n,)),
            "numeric": (self.numeric, np.float32, (n, NUM_NUMERIC)),
            "ids": (self.ids, np.uint64, (n, NUM_CATEGORICAL)),
        }
        for name, (array, dtype, shape) in expected.items():
            if array.dtype != dtype or array.shape != shape:
                raise ValueError(
                    f"Dataset: {name} must be {np.dtype(dtype)} {shape}, "
                    f"got {array.dtype} {array.shape}"
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> Dataset:
        """The examples at `indices` (copies), in that order."""
        return Dataset(self.labels[indices], self.numeric[indices], self.ids[indices])


@dataclass(frozen=True)
class ParseResult:
    """A parsed file: its examples, its line count and its bad lines (count, first one)."""

    dataset: Dataset
    path: str
    num_lines: int
    bad_lines: int
    first_bad: tuple[int, str] | None  # (1-based line number, reason)


def hash_ids(values: np.ndarray) -> np.ndarray:
    """Feature ids (N, 26) uint64 of raw categorical values (N, 26): see `trainer.data`."""
    v = np.asarray(values, dtype=np.uint64)
    return splitmix64(v ^ _SLOT_KEYS)


def transform_numeric(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``log1p(max(x, 0))`` as float32, 0 where not `present`."""
    x = np.where(present, np.maximum(np.asarray(values, dtype=np.float64), 0.0), 0.0)
    return np.log1p(x).astype(np.float32)


# ---------------------------------------------------------------- line checks


_INT_RE = re.compile(rb"-?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]{1,16}")


def diagnose_line(line: bytes) -> str | None:
    """Why `line` (without its newline) is bad, or None if it is a good example line."""
    fields = line.split(b"\t")
    if len(fields) != NUM_COLUMNS:
        return f"expected {NUM_COLUMNS} tab-separated columns, got {len(fields)}"
    if fields[0] not in (b"0", b"1"):
        return f"label must be 0 or 1, got {fields[0][:20]!r}"
    for i, field in enumerate(fields[1 : 1 + NUM_NUMERIC]):
        if field and (not _INT_RE.fullmatch(field) or not -(2**63) <= int(field) < 2**63):
            return f"column {i + 2} (I{i + 1}): not an int64 integer: {field[:24]!r}"
    for i, field in enumerate(fields[1 + NUM_NUMERIC :]):
        if field and not _HEX_RE.fullmatch(field):
            column = i + 2 + NUM_NUMERIC
            return f"column {column} (C{i + 1}): not a 64-bit hex value: {field[:24]!r}"
    return None


# ---------------------------------------------------------- vectorised parser

_INVALID = 0x80  # the code of a byte that is not a hex digit


def _codes(buf: np.ndarray) -> np.ndarray:
    """Every byte's hex digit value (0..15; decimal digits are 0..9), or _INVALID."""
    digit = buf - np.uint8(ord("0"))
    letter = (buf | np.uint8(0x20)) - np.uint8(ord("a") - 10)
    is_digit = -(digit < 10).view(np.uint8)  # 0xFF or 0
    is_letter = -((letter - np.uint8(10)) < 6).view(np.uint8)
    invalid = np.uint8(_INVALID) & ~(is_digit | is_letter)
    return (digit & is_digit) | (letter & is_letter) | invalid


_BYTE_MASK = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)  # k low bytes
_U = np.uint64
_B80, _B06, _B10 = _U(0x8080808080808080), _U(0x0606060606060606), _U(0x1010101010101010)
_POW10 = 10 ** np.arange(_MAX_FAST_DIGITS, dtype=np.int64)


def _words(codes: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The first min(len, 8) byte codes of every field as a little-endian word, 0-padded."""
    view = np.ndarray((codes.shape[0] - 7,), dtype="<u8", buffer=codes, strides=(1,))
    return view[starts] & _BYTE_MASK[np.minimum(lens, 8)]


def _hex_word(w: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Up to 8 hex digit codes (char 0 in the low byte) -> their value."""
    m4, m8, m16 = _U(0x000F000F000F000F), _U(0x000000FF000000FF), _U(0xFFFF)
    w = ((w & m4) << _U(4)) | ((w >> _U(8)) & m4)
    w = ((w & m8) << _U(8)) | ((w >> _U(16)) & m8)
    w = ((w & m16) << _U(16)) | ((w >> _U(32)) & m16)
    return w >> (_U(4) * (_U(8) - np.clip(lens, 1, 8).astype(np.uint64)))


def _dec_word(w: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Up to 8 decimal digit codes (char 0 in the low byte) -> their value (uint64)."""
    w = w << (_U(8) * (_U(8) - np.clip(digits, 1, 8).astype(np.uint64)))  # right-align
    w = (w * _U(10) + (w >> _U(8))) & _U(0x00FF00FF00FF00FF)
    w = (w * _U(100) + (w >> _U(16))) & _U(0x0000FFFF0000FFFF)
    return (w * _U(10000) + (w >> _U(32))) & _U(0xFFFFFFFF)


def _windows(
    codes: np.ndarray, starts: np.ndarray, lens: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Slow path: (codes (M, width) with 0 past each field's end, bad (M,))."""
    view = np.lib.stride_tricks.as_strided(codes, (codes.shape[0] - width + 1, width), (1, 1))
    inside = np.arange(width) < lens[:, None]
    window = np.where(inside, view[starts], 0)
    return window, (window == _INVALID).any(axis=1)


def _parse_hex(
    codes: np.ndarray, starts: np.ndarray, lens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hex fields (flat) -> (values uint64, bad bool); an empty field is MISSING_VALUE."""
    w = _words(codes, starts, lens)
    bad = ((w & _B80) != 0) | (lens > 16)
    values = _hex_word(w, lens)
    long = np.flatnonzero((lens > 8) & (lens <= 16))
    if long.size:  # rare: 9 to 16 digits
        window, long_bad = _windows(codes, starts[long], lens[long], 16)
        nib = window.astype(np.uint64)
        left = np.bitwise_or.reduce(nib << (_U(4) * np.arange(15, -1, -1, dtype=np.uint64)), 1)
        values[long] = left >> (_U(4) * (_U(16) - lens[long].astype(np.uint64)))
        bad[long] |= long_bad
    values[lens == 0] = _U(MISSING_VALUE)
    return values, bad


def _parse_dec(
    buf: np.ndarray, codes: np.ndarray, starts: np.ndarray, lens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Integer fields (flat) -> (values float64, bad bool)."""
    neg = (lens > 0) & (buf[starts] == ord("-"))
    digits = lens - neg
    w = _words(codes, starts + neg, digits)
    bad = ((lens > 0) & (digits == 0)) | (((w + _B06) & (_B10 | _B80)) != 0)
    acc = _dec_word(w, digits).astype(np.int64)
    long = np.flatnonzero((digits > 8) & (digits <= _MAX_FAST_DIGITS))
    if long.size:  # rare: 9 to 18 digits
        window, long_bad = _windows(codes, starts[long] + neg[long], digits[long], 18)
        power = np.clip(digits[long, None] - 1 - np.arange(18), 0, None)
        acc[long] = (window.astype(np.int64) * _POW10[power]).sum(axis=1)
        bad[long] |= long_bad | (window > 9).any(axis=1)
    values = np.where(neg, -acc, acc).astype(np.float64)
    for i in np.flatnonzero(digits > _MAX_FAST_DIGITS):  # very rare: Python ints
        text = buf[starts[i] : starts[i] + lens[i]].tobytes()
        bad[i] = _INT_RE.fullmatch(text) is None or not -(2**63) <= int(text) < 2**63
        values[i] = 0.0 if bad[i] else float(int(text))
    return values, bad


@dataclass(frozen=True)
class _Block:
    data: Dataset
    bad: np.ndarray  # file line indices (0-based) of bad non-empty lines
    empty: np.ndarray  # file line indices of empty lines
    num_lines: int
    last_nonempty: int  # file line index, -1 if none


def _parse_block(buf: np.ndarray, line0: int) -> _Block:
    """Parse whole lines (`buf` ends with a newline; its first line is line `line0`)."""
    seps = np.flatnonzero((buf == 9) | (buf == 10))
    nl_at = np.flatnonzero(buf[seps] == 10)
    newlines = seps[nl_at]
    tabs = np.diff(nl_at, prepend=-1) - 1
    line_starts = np.r_[0, newlines[:-1] + 1]
    empty = newlines == line_starts
    good = tabs == NUM_COLUMNS - 1
    ends = seps[nl_at[good][:, None] + np.arange(1 - NUM_COLUMNS, 1)]
    starts = np.empty_like(ends)
    starts[:, 0] = line_starts[good]
    starts[:, 1:] = ends[:, :-1] + 1
    lens = ends - starts
    label_ok = (lens[:, 0] == 1) & ((buf[starts[:, 0]] | np.uint8(1)) == ord("1"))
    codes = _codes(buf)
    num, num_bad = (
        a.reshape(-1, NUM_NUMERIC)
        for a in _parse_dec(buf, codes, starts[:, 1:14].ravel(), lens[:, 1:14].ravel())
    )
    cat, cat_bad = (
        a.reshape(-1, NUM_CATEGORICAL)
        for a in _parse_hex(codes, starts[:, 14:].ravel(), lens[:, 14:].ravel())
    )
    ok = label_ok & ~num_bad.any(axis=1) & ~cat_bad.any(axis=1)
    bad_mask = ~good & ~empty
    if not ok.all():
        bad_mask[np.flatnonzero(good)[~ok]] = True
        starts, lens, num, cat = starts[ok], lens[ok], num[ok], cat[ok]
    labels = (buf[starts[:, 0]] == ord("1")).astype(np.float32)
    data = Dataset(labels, transform_numeric(num, lens[:, 1:14] > 0), hash_ids(cat))
    nonempty = np.flatnonzero(~empty)
    last = line0 + int(nonempty[-1]) if nonempty.size else -1
    return _Block(
        data,
        np.flatnonzero(bad_mask) + line0,
        np.flatnonzero(empty) + line0,
        int(newlines.size),
        last,
    )


# ------------------------------------------------------------------ files


def _iter_blocks(path: Path) -> Iterator[bytes]:
    """Whole lines of `path` in ~2 MB blocks, each ending with a newline, CRLF made LF."""
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(_BLOCK_BYTES):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut].replace(b"\r\n", b"\n") if b"\r" in data else data[:cut]
        if rest:
            yield (rest + b"\n").replace(b"\r\n", b"\n")


def _first_error(
    first_bad: tuple[int, str] | None, first_empty: int | None, last_nonempty: int
) -> tuple[int, str] | None:
    """The earliest bad line: `first_bad`, or an empty line that a non-empty line follows."""
    if first_empty is not None and first_empty < last_nonempty:
        if first_bad is None or first_empty + 1 < first_bad[0]:
            return first_empty + 1, "empty line"
    return first_bad


def _concat(parts: list[Dataset]) -> Dataset:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Dataset(
            np.zeros(0, np.float32),
            np.zeros((0, NUM_NUMERIC), np.float32),
            np.zeros((0, NUM_CATEGORICAL), np.uint64),
        )
    return Dataset(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("labels", "numeric", "ids"))
    )


def scan_file(path: str | os.PathLike[str], strict: bool = False) -> ParseResult:
    """Parse a whole file, no cache, no logging; `strict` raises DataError at a bad line."""
    path = Path(path)
    parts: list[Dataset] = []
    empties: list[np.ndarray] = []
    num_bad, line0, last_nonempty, first_empty = 0, 0, -1, None
    first_bad: tuple[int, str] | None = None  # the first bad non-empty line
    for text in _iter_blocks(path):
        block = _parse_block(np.frombuffer(text + bytes(_PAD), dtype=np.uint8), line0)
        if first_bad is None and block.bad.size:
            k = int(block.bad[0]) - line0
            first_bad = (line0 + k + 1, diagnose_line(text.split(b"\n", k + 1)[k]) or "malformed")
        parts.append(block.data)
        empties.append(block.empty)
        num_bad += block.bad.size
        line0 += block.num_lines
        last_nonempty = max(last_nonempty, block.last_nonempty)
        if first_empty is None and block.empty.size:
            first_empty = int(block.empty[0])
        first = _first_error(first_bad, first_empty, last_nonempty)
        if strict and first is not None:
            raise DataError(f"{path}:{first[0]}: {first[1]}")
    all_empty = np.concatenate(empties) if empties else np.zeros(0, np.int64)
    return ParseResult(
        dataset=_concat(parts),
        path=str(path),
        num_lines=last_nonempty + 1,
        bad_lines=num_bad + int(np.count_nonzero(all_empty < last_nonempty)),
        first_bad=_first_error(first_bad, first_empty, last_nonempty),
    )
