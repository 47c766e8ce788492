"""Criteo display-ads data: parse a text file once into numpy arrays, and slice it per trainer.

File format: one example per line, 40 tab-separated columns::

    label  I1 .. I13  C1 .. C26

- label: ``0`` or ``1``.
- I1..I13: integers (``-?[0-9]+``, int64 range), possibly empty.
- C1..C26: hexadecimal values (``[0-9a-fA-F]{1,16}``, usually 8 digits), possibly empty.

A line that breaks any of these rules is bad: by default it is skipped, counted
and reported in one warning per file; with ``strict=True`` it raises `DataError`
("path:line: reason"). Empty lines at the end of the file are not lines. A
``\\r\\n`` line ending is accepted.

Parsed arrays (the data contract shared with models and checkpoints):

- ``labels``  float32 (N,)
- ``numeric`` float32 (N, 13): ``log1p(max(x, 0))``; a missing value is 0.
- ``ids``     uint64 (N, 26): slot ``s`` (0-based) of a value ``v`` (the hex
  digits read as an unsigned integer; an empty field is ``v = 0xFFFFFFFFFFFFFFFF``)
  has the feature id::

      ids[:, s] = splitmix64(v ^ ((s + 1) * 0x9E3779B97F4A7C15 mod 2**64))

  with `pserver.sharding.splitmix64`, so ids spread over the whole 64-bit
  range, equal values in different slots get different ids, and every slot
  has its own "missing" id.

Parsing is vectorised over the bytes of 16 MB blocks; `read_file` can keep
the result in a ``.npz`` cache keyed by the file's size and mtime. The
per-trainer reader is in `trainer.reader`-free form here: see `TrainerReader`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pserver.sharding import splitmix64

logger = logging.getLogger(__name__)

NUM_NUMERIC = 13
NUM_CATEGORICAL = 26
NUM_COLUMNS = 1 + NUM_NUMERIC + NUM_CATEGORICAL
MISSING_VALUE = 0xFFFF_FFFF_FFFF_FFFF
SLOT_SALT = 0x9E37_79B9_7F4A_7C15
_SLOT_KEYS = np.array(
    [((s + 1) * SLOT_SALT) & MISSING_VALUE for s in range(NUM_CATEGORICAL)], dtype=np.uint64
)
_BLOCK_BYTES = 16 << 20
_CACHE_VERSION = 1
_MAX_FAST_DIGITS = 18  # up to 18 decimal digits always fit in int64


class DataError(ValueError):
    """A malformed data file; the message is ``"{path}:{lineno}: {reason}"``."""


@dataclass(frozen=True)
class Batch:
    """One minibatch: labels (B,) float32, numeric (B, 13) float32, ids (B, 26) uint64."""

    labels: np.ndarray
    numeric: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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

    def batch(self, indices: np.ndarray) -> Batch:
        """The examples at `indices` as a `Batch` (copies)."""
        return Batch(self.labels[indices], self.numeric[indices], self.ids[indices])


@dataclass(frozen=True)
class ParseResult:
    """A parsed file: its examples, its line count and its bad lines (count, first one)."""

    dataset: Dataset
    path: str
    num_lines: int
    bad_lines: int
    first_bad: tuple[int, str] | None  # (1-based line number, reason)


def hash_ids(values: np.ndarray) -> np.ndarray:
    """Feature ids (N, 26) uint64 of raw categorical values (N, 26), by the rule above."""
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
            return f"column {i + 2 + NUM_NUMERIC} (C{i + 1}): not a 64-bit hex value: {field[:24]!r}"
    return None


# ---------------------------------------------------------- vectorised parser

_DEC_LUT = np.full(256, 255, dtype=np.uint8)
_DEC_LUT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX_LUT = _DEC_LUT.copy()
_HEX_LUT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_HEX_LUT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _parse_hex(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, ...]:
    """Hex fields -> (values uint64, bad bool); an empty field is MISSING_VALUE."""
    last = buf.shape[0] - 1
    values = np.zeros(starts.shape, dtype=np.uint64)
    bad = lens > 16
    for p in range(min(int(lens.max(initial=0)), 16)):
        inside = lens > p
        nib = _HEX_LUT[buf[np.minimum(starts + p, last)]]
        bad |= inside & (nib == 255)
        shifted = (values << np.uint64(4)) | nib.astype(np.uint64)
        np.copyto(values, shifted, where=inside)
    values[lens == 0] = np.uint64(MISSING_VALUE)
    return values, bad


def _parse_dec(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, ...]:
    """Integer fields -> (values float64, present bool, bad bool)."""
    last = buf.shape[0] - 1
    neg = (lens > 0) & (buf[np.minimum(starts, last)] == ord("-"))
    digits = lens - neg
    first = starts + neg
    slow = digits > _MAX_FAST_DIGITS
    bad = (lens > 0) & (digits == 0)
    acc = np.zeros(starts.shape, dtype=np.int64)
    for p in range(min(int(digits.max(initial=0)), _MAX_FAST_DIGITS)):
        inside = (digits > p) & ~slow
        d = _DEC_LUT[buf[np.minimum(first + p, last)]]
        bad |= inside & (d == 255)
        np.copyto(acc, acc * 10 + d, where=inside)
    values = np.where(neg, -acc, acc).astype(np.float64)
    for i in np.flatnonzero(slow):  # rare: more than 18 digits
        text = buf[starts.flat[i] : starts.flat[i] + lens.flat[i]].tobytes()
        ok = _INT_RE.fullmatch(text) is not None and -(2**63) <= int(text) < 2**63
        values.flat[i] = float(int(text)) if ok else 0.0
        bad.flat[i] = not ok
    return values, lens > 0, bad


def _parse_block(buf: np.ndarray) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Parse whole lines (`buf` ends with a newline).

    Returns the good examples, and line indices (within the block) of the bad
    non-empty lines and of the empty lines.
    """
    newlines = np.flatnonzero(buf == 10)
    seps = np.flatnonzero((buf == 9) | (buf == 10))
    nl_at = np.searchsorted(seps, newlines)
    tabs = np.diff(nl_at, prepend=-1) - 1
    line_starts = np.r_[0, newlines[:-1] + 1]
    empty = newlines == line_starts
    good = tabs == NUM_COLUMNS - 1
    ends = seps[nl_at[good][:, None] + np.arange(1 - NUM_COLUMNS, 1)]
    starts = np.empty_like(ends)
    starts[:, 0] = line_starts[good]
    starts[:, 1:] = ends[:, :-1] + 1
    lens = ends - starts
    label_ok = (lens[:, 0] == 1) & np.isin(buf[starts[:, 0]], (48, 49))
    num, present, num_bad = _parse_dec(buf, starts[:, 1:14], lens[:, 1:14])
    cat, cat_bad = _parse_hex(buf, starts[:, 14:], lens[:, 14:])
    ok = label_ok & ~num_bad.any(axis=1) & ~cat_bad.any(axis=1)
    bad_mask = ~good & ~empty
    bad_mask[np.flatnonzero(good)[~ok]] = True
    labels = (buf[starts[ok, 0]] == 49).astype(np.float32)
    data = Dataset(labels, transform_numeric(num[ok], present[ok]), hash_ids(cat[ok]))
    return data, np.flatnonzero(bad_mask), np.flatnonzero(empty)


@dataclass(frozen=True)
class _Block:
    data: Dataset
    bad: np.ndarray  # global line indices of bad non-empty lines
    empty: np.ndarray  # global line indices of empty lines
    num_lines: int
    last_nonempty: int  # global index, -1 if none


def _iter_blocks(path: Path) -> Iterator[bytes]:
    """Whole lines of `path` in ~16 MB blocks, each ending with a newline."""
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(_BLOCK_BYTES):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
        if rest:
            yield rest + b"\n"


def _scan(path: Path, strict: bool) -> ParseResult:
    parts: list[Dataset] = []
    bad: list[np.ndarray] = []
    empties: list[np.ndarray] = []
    first_bad: tuple[int, str] | None = None  # first bad non-empty line
    line0, last_nonempty = 0, -1
    for text in _iter_blocks(path):
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")
        block = _parse(text, line0)
        if first_bad is None and block.bad.size:
            lineno = int(block.bad[0]) + 1
            line = text.split(b"\n", lineno - line0)[lineno - line0 - 1]
            first_bad = (lineno, diagnose_line(line) or "malformed line")
        parts.append(block.data)
        bad.append(block.bad)
        empties.append(block.empty)
        line0 += block.num_lines
        last_nonempty = max(last_nonempty, block.last_nonempty)
        first = _first_error(first_bad, empties, last_nonempty)
        if strict and first is not None:
            raise DataError(f"{path}:{first[0]}: {first[1]}")
    all_empty = np.concatenate(empties) if empties else np.zeros(0, np.int64)
    num_bad = sum(b.size for b in bad) + int((all_empty < last_nonempty).sum())
    dataset = Dataset(*(np.concatenate([getattr(p, f) for p in parts]) if parts else empty_arr
                        for f, empty_arr in zip(("labels", "numeric", "ids"), _empty_arrays())))
    return ParseResult(dataset, str(path), last_nonempty + 1, num_bad,
                       _first_error(first_bad, empties, last_nonempty))


def _empty_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.zeros(0, np.float32), np.zeros((0, NUM_NUMERIC), np.float32),
            np.zeros((0, NUM_CATEGORICAL), np.uint64))


def _first_error(first_bad: tuple[int, str] | None, empties: list[np.ndarray],
                 last_nonempty: int) -> tuple[int, str] | None:
    """The earliest bad line: `first_bad`, or an empty line that a non-empty line follows."""
    for e in empties:
        if e.size and e[0] < last_nonempty:
            if first_bad is None or e[0] + 1 < first_bad[0]:
                return int(e[0]) + 1, "empty line"
            break
    return first_bad


def _parse(text: bytes, line0: int) -> _Block:
    buf = np.frombuffer(text, dtype=np.uint8)
    data, bad, empty = _parse_block(buf)
    num_lines = text.count(b"\n")
    nonempty = num_lines - empty.size
    if nonempty == 0:
        last = -1
    elif empty.size == 0 or empty[-1] != num_lines - 1:
        last = line0 + num_lines - 1
    else:  # trailing empty lines: the last non-empty one is before the run
        gaps = np.flatnonzero(np.diff(empty) != 1)
        run_start = int(empty[gaps[-1] + 1]) if gaps.size else int(empty[0])
        last = line0 + run_start - 1
    return _Block(data, bad + line0, empty + line0, num_lines, last)
