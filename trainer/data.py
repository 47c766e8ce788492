"""Criteo display-ads data: the data contract, and each trainer's reader over its slice.

File format: one example per line, 40 tab-separated columns::

    label  I1 .. I13  C1 .. C26

- label: ``0`` or ``1``.
- I1..I13: integers (``-?[0-9]+``, within int64), each possibly empty.
- C1..C26: hexadecimal values (``[0-9a-fA-F]{1,16}``, usually 8 digits), each
  possibly empty.

A line breaking any of these rules is bad: by default it is skipped, counted
and reported in one warning per file; with ``strict=True`` it raises
`DataError` ``"{path}:{lineno}: {reason}"``. Empty lines at the end of a file
are ignored (elsewhere an empty line is bad); ``\\r\\n`` endings are accepted.

A file is parsed once (`read_file`, `trainer.criteo`) into arrays:

- ``labels``  float32 (N,)
- ``numeric`` float32 (N, 13): ``log1p(max(x, 0))`` computed in float64; missing is 0.
- ``ids``     uint64 (N, 26): the feature id of the value ``v`` in slot ``s``
  (0-based), ``v`` being the hex digits read as an unsigned integer, or
  ``0xFFFFFFFFFFFFFFFF`` if the field is empty, is (wrapping uint64 arithmetic)::

      ids[:, s] = splitmix64(v ^ ((s + 1) * 0x9E3779B97F4A7C15))

  with `pserver.tables.sharding.splitmix64`: ids use the whole 64-bit range, one
  value in two slots gives two ids, and each slot has its own "missing" id.

`TrainerReader` gives trainer j of T the contiguous rows
``[j*N//T, (j+1)*N//T)``, ``(N // T) // batch_size`` batches per epoch for
every trainer, in an order drawn from ``default_rng([seed, j, epoch])``; its
`state()` goes into the trainer's checkpoint and `restore()` resumes with no
example replayed or skipped.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from trainer.criteo import (
    MISSING_VALUE,
    NUM_CATEGORICAL,
    NUM_COLUMNS,
    NUM_NUMERIC,
    SLOT_SALT,
    DataError,
    Dataset,
    ParseResult,
    diagnose_line,
    hash_ids,
    scan_file,
    transform_numeric,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MISSING_VALUE",
    "NUM_CATEGORICAL",
    "NUM_COLUMNS",
    "NUM_NUMERIC",
    "SLOT_SALT",
    "DataError",
    "Dataset",
    "ParseResult",
    "TrainerReader",
    "diagnose_line",
    "hash_ids",
    "parse_file",
    "read_file",
    "scan_file",
    "split_holdout",
    "transform_numeric",
]

_CACHE_VERSION = 1
_STATE_FIELDS = ("seed", "trainer_id", "num_trainers", "batch_size", "num_examples")


def _cache_file(path: Path, cache: bool | str | os.PathLike[str]) -> Path:
    if cache is True:
        return path.with_name(path.name + ".psrt.npz")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return Path(cache) / f"{path.name}.{digest}.psrt.npz"


def _cache_key(path: Path) -> np.ndarray:
    st = path.stat()
    return np.array([_CACHE_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _load_cache(cache_file: Path, key: np.ndarray, path: Path) -> ParseResult | None:
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if not np.array_equal(z["key"], key):
                return None
            data = Dataset(z["labels"], z["numeric"], z["ids"])
            num_lines, bad_lines, first_line = (int(x) for x in z["meta"])
            reason = str(z["reason"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("ignoring unreadable cache %s: %s", cache_file, e)
        return None
    first_bad = (first_line, reason) if first_line > 0 else None
    return ParseResult(data, str(path), num_lines, bad_lines, first_bad)


def _save_cache(cache_file: Path, key: np.ndarray, result: ParseResult) -> None:
    first_line, reason = result.first_bad or (0, "")
    tmp = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            d = result.dataset
            meta = np.array([result.num_lines, result.bad_lines, first_line], dtype=np.int64)
            np.savez(
                f,
                key=key,
                labels=d.labels,
                numeric=d.numeric,
                ids=d.ids,
                meta=meta,
                reason=np.array(reason),
            )
        os.replace(tmp, cache_file)
    except OSError as e:
        logger.warning("could not write cache %s: %s", cache_file, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def parse_file(
    path: str | os.PathLike[str],
    *,
    strict: bool = False,
    cache: bool | str | os.PathLike[str] = False,
) -> ParseResult:
    """Parse a Criteo text file (format: `trainer.data`); one warning if lines were bad.

    `cache`: False, True (a ``.psrt.npz`` next to the file) or a directory;
    the cache is reused while the file's size and mtime are unchanged.
    """
    path = Path(path)
    key = _cache_key(path)
    cache_file = None if cache is False or cache is None else _cache_file(path, cache)
    result = _load_cache(cache_file, key, path) if cache_file is not None else None
    if result is None:
        result = scan_file(path, strict)
        if cache_file is not None and np.array_equal(_cache_key(path), key):
            _save_cache(cache_file, key, result)
    if result.first_bad is not None:
        lineno, reason = result.first_bad
        if strict:
            raise DataError(f"{path}:{lineno}: {reason}")
        logger.warning(
            "skipped %d bad line(s) of %d in %s; the first at %s:%d: %s",
            result.bad_lines,
            result.num_lines,
            path,
            path,
            lineno,
            reason,
        )
    return result


def read_file(
    path: str | os.PathLike[str],
    *,
    strict: bool = False,
    cache: bool | str | os.PathLike[str] = False,
) -> Dataset:
    """The examples of a Criteo text file.

    `cache`: False, True (a ``.psrt.npz`` next to the file) or a directory; a
    cache is used while the file's size and mtime match. See `parse_file` for
    the line counts.
    """
    return parse_file(path, strict=strict, cache=cache).dataset


def split_holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split into (train, test), test holding round(fraction * N) random examples.

    Deterministic from `seed`; both parts keep the dataset's order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split_holdout: fraction must be in [0, 1), got {fraction}")
    n = len(dataset)
    rng = np.random.default_rng([seed, 0x401D])
    is_test = np.zeros(n, dtype=bool)
    is_test[rng.permutation(n)[: round(fraction * n)]] = True
    return dataset.take(np.flatnonzero(~is_test)), dataset.take(np.flatnonzero(is_test))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class TrainerReader:
    """Trainer `trainer_id`'s batches of `dataset`, epoch after epoch, resumable exactly.

    `position` is the index of the next batch within epoch `epoch`; iterating
    (`batches()` or `for batch in reader`) yields the rest of the current
    epoch and advances `position` as it goes, so `state()` taken after a batch
    was handed out counts it as consumed. Call `start_epoch(epoch + 1)` after.
    """

    def __init__(
        self, dataset: Dataset, trainer_id: int, num_trainers: int, batch_size: int, seed: int
    ) -> None:
        for name, value, low in (
            ("num_trainers", num_trainers, 1),
            ("batch_size", batch_size, 1),
            ("trainer_id", trainer_id, 0),
            ("seed", seed, 0),
        ):
            if not _is_int(value) or value < low:
                raise ValueError(f"TrainerReader: {name} must be an int >= {low}, got {value!r}")
        if trainer_id >= num_trainers:
            raise ValueError(
                f"TrainerReader: trainer_id must be < num_trainers "
                f"({num_trainers}), got {trainer_id}"
            )
        n = len(dataset)
        self.steps_per_epoch = (n // num_trainers) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"TrainerReader: batch_size {batch_size} is larger than a trainer's "
                f"share of {n} examples over {num_trainers} trainers"
            )
        self.dataset = dataset
        self.trainer_id, self.num_trainers = int(trainer_id), int(num_trainers)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.lo = self.trainer_id * n // self.num_trainers  # this trainer's rows: [lo, hi)
        self.hi = (self.trainer_id + 1) * n // self.num_trainers
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset rows this trainer reads in `epoch`, in order (steps * batch_size of them)."""
        rng = np.random.default_rng([self.seed, self.trainer_id, epoch])
        perm = rng.permutation(self.hi - self.lo)[: self.steps_per_epoch * self.batch_size]
        return perm + self.lo

    def start_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` (>= 0) from its first batch."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"TrainerReader: epoch must be an int >= 0, got {epoch!r}")
        self.epoch, self.position, self._order = int(epoch), 0, None

    def next_batch(self) -> Dataset | None:
        """The next batch of the current epoch (its examples, copied), or None once the
        epoch is over."""
        if self.position >= self.steps_per_epoch:
            return None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        rows = self._order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        self.position += 1
        return self.dataset.take(rows)

    def batches(self) -> Iterator[Dataset]:
        """The remaining batches of the current epoch."""
        while (batch := self.next_batch()) is not None:
            yield batch

    __iter__ = batches

    def state(self) -> dict[str, int]:
        """The reader's position and identity, JSON-serialisable, for a checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "trainer_id": self.trainer_id,
            "num_trainers": self.num_trainers,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` left off; ValueError naming a field that does not fit."""
        if not isinstance(state, dict):
            raise ValueError(f"reader state must be a dict, got {type(state).__name__}")
        mine = self.state()
        for name in ("epoch", "position", *_STATE_FIELDS):
            if name not in state:
                raise ValueError(f"reader state: missing field '{name}'")
            if not _is_int(state[name]):
                raise ValueError(
                    f"reader state: field '{name}' must be an int, got {state[name]!r}"
                )
        for name in _STATE_FIELDS:
            if state[name] != mine[name]:
                raise ValueError(
                    f"reader state: field '{name}' is {state[name]} in the "
                    f"checkpoint but {mine[name]} for this reader"
                )
        if state["epoch"] < 0:
            raise ValueError(f"reader state: field 'epoch' must be >= 0, got {state['epoch']}")
        if not 0 <= state["position"] <= self.steps_per_epoch:
            raise ValueError(
                f"reader state: field 'position' must be in "
                f"[0, {self.steps_per_epoch}], got {state['position']}"
            )
        self.start_epoch(state["epoch"])
        self.position = int(state["position"])
