"""Synthetic CTR data in the Criteo text format (`trainer.data`), from a hidden model.

The ground truth is derived from ``truth_seed`` (by default the data seed):

- Categorical slot s draws a rank k in 1..V from a Zipf(a) law truncated to
  V (``vocab_size``) and writes it as 8 hex digits ``(k * M_s + A_s) mod 2**32``
  (M_s odd: no two ranks share a value); with probability ``miss_s`` the field
  is empty instead (rank 0). The pair (s, k) has the weight ``sigma * z`` with
  ``z ~ N(0, 1)`` computed from a hash of (truth seed, s, k) by Box-Muller, so
  no table of V weights per slot is ever built.
- Integer feature i is ``floor(exp(mu_i + s_i * g)) - shift_i`` with
  ``g ~ N(0, 1)``, empty with probability ``q_i``; the model sees
  ``f_i = log1p(max(x, 0))`` (0 if empty) and adds ``v_i * (f_i - m_i)``.
- ``label ~ Bernoulli(sigmoid(bias + sum of the weights above))``.

A model with one weight or embedding per feature id can represent this
exactly, so the "oracle" AUC, that of the true probabilities, is the ceiling
a trained model approaches. ``python -m trainer.datagen OUT --examples N
--seed S [--holdout-fraction F]`` prints it as a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pserver.tables.sharding import splitmix64
from trainer.metrics import auc, logloss

NUM_NUMERIC = 13
NUM_CATEGORICAL = 26
_CHUNK = 1 << 12  # examples per generated chunk; part of what makes the output deterministic
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_POW10 = 10 ** np.arange(19, dtype=np.int64)
_GUIDE = 1 << 16  # buckets of the Zipf sampler's guide table


@dataclass(frozen=True)
class GeneratorConfig:
    """The hidden model's shape; ValueError names a bad field."""

    vocab_size: int = 100_000
    zipf_a: float = 1.1
    sigma: float = 0.15
    numeric_sigma: float = 0.35
    bias: float = -1.4

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or not 1 <= self.vocab_size < 2**31:
            raise ValueError(
                f"GeneratorConfig: vocab_size must be in [1, 2**31), got {self.vocab_size!r}"
            )
        for name in ("zipf_a", "sigma", "numeric_sigma"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"GeneratorConfig: {name} must be a finite number >= 0, got {value!r}"
                )
        if not math.isfinite(self.bias):
            raise ValueError(f"GeneratorConfig: bias must be finite, got {self.bias!r}")


@dataclass
class Sample:
    """Generated examples before formatting: raw field values and the true logits."""

    cat_values: np.ndarray  # uint32 (n, 26)
    cat_present: np.ndarray  # bool (n, 26)
    num_values: np.ndarray  # int64 (n, 13)
    num_present: np.ndarray  # bool (n, 13)
    logits: np.ndarray  # float64 (n,)
    labels: np.ndarray  # int8 (n,)


def _normal(keys: np.ndarray) -> np.ndarray:
    """A standard normal per uint64 key, deterministic (hash -> two uniforms -> Box-Muller)."""
    h1 = splitmix64(keys)
    h2 = splitmix64(h1 ^ np.uint64(0xD1B54A32D192ED03))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


class GroundTruth:
    """The hidden model of `GeneratorConfig` and `truth_seed`; `sample` draws examples."""

    def __init__(self, config: GeneratorConfig, truth_seed: int) -> None:
        self.config = config
        rng = np.random.default_rng([truth_seed, 0x7207])
        c = config
        self.slot_keys = rng.integers(0, 2**63, NUM_CATEGORICAL, dtype=np.uint64)
        self.hex_mul = rng.integers(0, 2**31, NUM_CATEGORICAL, dtype=np.uint64) * 2 + 1
        self.hex_add = rng.integers(0, 2**32, NUM_CATEGORICAL, dtype=np.uint64)
        self.cat_missing = 0.6 * rng.random(NUM_CATEGORICAL) ** 3
        self.num_mu = rng.uniform(0.0, 4.0, NUM_NUMERIC)
        self.num_scale = rng.uniform(0.5, 1.5, NUM_NUMERIC)
        self.num_shift = np.where(rng.random(NUM_NUMERIC) < 0.15, 2, 0)
        self.num_missing = 0.4 * rng.random(NUM_NUMERIC) ** 2
        self.num_weights = rng.normal(0.0, c.numeric_sigma, NUM_NUMERIC)
        self.num_mean = self._numeric(rng, 1 << 14)[2].mean(axis=0)
        pmf = np.arange(1, c.vocab_size + 1, dtype=np.float64) ** -c.zipf_a
        self.cdf = np.cumsum(pmf / pmf.sum())
        self.guide = np.searchsorted(self.cdf, np.arange(_GUIDE + 1) / _GUIDE, side="right")

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """Zipf ranks (1..V) of uniforms `u`: ``searchsorted(cdf, u, "right") + 1``, faster.

        u in bucket [j/G, (j+1)/G) has its answer in [guide[j], guide[j+1]]; most
        buckets hold one rank, the rest take a short vectorised binary search.
        """
        bucket = (u * _GUIDE).astype(np.int64)
        lo, hi = self.guide[bucket], self.guide[bucket + 1]
        todo = np.flatnonzero(lo != hi)
        left, right, target = lo.flat[todo], hi.flat[todo], u.flat[todo]
        while (active := left < right).any():
            mid = (left + right) // 2
            below = self.cdf[np.minimum(mid, self.config.vocab_size - 1)] <= target
            left = np.where(active & below, mid + 1, left)
            right = np.where(active & ~below, mid, right)
        lo.flat[todo] = left
        return np.minimum(lo + 1, self.config.vocab_size)

    def weights(self, slot: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """The hidden weight of every (slot, rank) pair; rank 0 is the slot's missing value."""
        keys = self.slot_keys[slot] + rank.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return self.config.sigma * _normal(keys)

    def _numeric(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
        """(values int64, present, features f = log1p(max(x, 0)) or 0) of n examples."""
        g = rng.standard_normal((n, NUM_NUMERIC))
        values = np.floor(np.exp(self.num_mu + self.num_scale * g)).astype(np.int64)
        values -= self.num_shift
        present = rng.random((n, NUM_NUMERIC)) >= self.num_missing
        return values, present, np.where(present, np.log1p(np.maximum(values, 0)), 0.0)

    def sample(self, rng: np.random.Generator, n: int) -> Sample:
        """Draw n examples with their true logits and labels."""
        ranks = self.ranks(rng.random((n, NUM_CATEGORICAL)))
        cat_present = rng.random((n, NUM_CATEGORICAL)) >= self.cat_missing
        ranks = np.where(cat_present, ranks, 0)
        cat_values = (ranks.astype(np.uint64) * self.hex_mul + self.hex_add) & np.uint64(2**32 - 1)
        num_values, num_present, feats = self._numeric(rng, n)
        slots = np.broadcast_to(np.arange(NUM_CATEGORICAL), ranks.shape)
        logits = (
            self.config.bias
            + self.weights(slots, ranks).sum(axis=1)
            + (feats - self.num_mean) @ self.num_weights
        )
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
        return Sample(
            cat_values.astype(np.uint32), cat_present, num_values, num_present, logits, labels
        )


# ------------------------------------------------------------------ text


def _decimal(values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integers (n, c) as left-aligned ASCII (n, c, width) uint8, and which bytes to keep."""
    neg = values < 0
    mag = np.abs(values)
    lens = np.where(present, np.searchsorted(_POW10[1:], mag, side="right") + 1 + neg, 0)
    width = max(int(lens.max(initial=0)), 1)
    from_right = lens[..., None] - 1 - np.arange(width)  # digit index, counted from the right
    digits = (mag[..., None] // _POW10[np.clip(from_right, 0, 18)]) % 10
    chars = (digits + ord("0")).astype(np.uint8)
    chars[..., 0][neg] = ord("-")
    return chars, from_right >= 0


def _hex8(values: np.ndarray) -> np.ndarray:
    """uint32 values (n, c) as 8 lowercase hex digits (n, c, 8) uint8."""
    octets = values.astype(">u4").view(np.uint8).reshape(*values.shape, 4)
    nibbles = np.stack([octets >> 4, octets & 0xF], axis=-1).reshape(*values.shape, 8)
    return nibbles + np.uint8(ord("0")) + (nibbles > 9).view(np.uint8) * np.uint8(39)


def format_lines(sample: Sample) -> tuple[bytes, np.ndarray]:
    """The examples as Criteo text lines, and each line's byte length."""
    n = sample.labels.shape[0]
    digits, digits_kept = _decimal(sample.num_values, sample.num_present)
    regions = [  # (n, columns, chars per column) and which chars to keep
        ((sample.labels[:, None, None] + ord("0")).astype(np.uint8), np.ones((n, 1, 1), bool)),
        (digits, digits_kept),
        (_hex8(sample.cat_values), np.broadcast_to(sample.cat_present[..., None], (n, 26, 8))),
    ]
    width = sum(c.shape[1] * (c.shape[2] + 1) for c, _ in regions)
    text = np.empty((n, width), dtype=np.uint8)
    keep = np.ones((n, width), dtype=bool)
    at = 0
    for chars, kept in regions:
        cols, w = chars.shape[1:]
        region = text[:, at : at + cols * (w + 1)].reshape(n, cols, w + 1)
        region[:, :, :w] = chars
        region[:, :, w] = ord("\t")
        keep[:, at : at + cols * (w + 1)].reshape(n, cols, w + 1)[:, :, :w] = kept
        at += cols * (w + 1)
    text[:, -1] = ord("\n")
    return text[keep].tobytes(), keep.sum(axis=1)


_BAD_KINDS = ("columns", "label", "numeric", "categorical")


def bad_line(kind: int, rng: np.random.Generator) -> bytes:
    """A malformed line: kind % 4 picks wrong column count, bad label, bad integer, bad hex."""
    fields = ["1", *map(str, rng.integers(0, 100, NUM_NUMERIC))]
    fields += [f"{v:08x}" for v in rng.integers(0, 2**32, NUM_CATEGORICAL)]
    k = _BAD_KINDS[kind % len(_BAD_KINDS)]
    if k == "columns":
        del fields[-1]
    elif k == "label":
        fields[0] = "2"
    elif k == "numeric":
        fields[1 + int(rng.integers(NUM_NUMERIC))] = "3.5"
    else:
        fields[1 + NUM_NUMERIC + int(rng.integers(NUM_CATEGORICAL))] = "zz12xy34"
    return ("\t".join(fields) + "\n").encode()


@dataclass
class GenerateResult:
    """What `generate` wrote, and how good the hidden model itself is on the scored part."""

    path: str
    num_examples: int  # examples in `path`, not counting the bad lines
    holdout_path: str | None
    num_holdout: int
    bad_lines: int
    positive_rate: float  # over all examples
    oracle_auc: float | None  # None if the scored part has a single class
    oracle_logloss: float
    oracle_on: str  # "holdout", or "train" when there is no holdout
    seconds: float = field(default=0.0, compare=False)


def default_holdout_path(path: str | os.PathLike[str]) -> Path:
    """``train.txt`` -> ``train.holdout.txt``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.holdout{p.suffix}")


def _write_chunk(
    out: BinaryIO,
    text: bytes,
    line_lens: np.ndarray,
    first: int,
    bad_at: np.ndarray,
    bad: list[bytes],
) -> None:
    """Write `text` (lines first, first+1, ...) with bad[j] inserted before line bad_at[j]."""
    offsets = np.r_[0, np.cumsum(line_lens)]
    cut = 0
    for j in np.flatnonzero((bad_at >= first) & (bad_at < first + line_lens.shape[0])):
        at = int(offsets[bad_at[j] - first])
        out.write(text[cut:at])
        out.write(bad[j])
        cut = at
    out.write(text[cut:])


def generate(
    path: str | os.PathLike[str],
    num_examples: int,
    seed: int,
    *,
    holdout_fraction: float = 0.0,
    holdout_path: str | os.PathLike[str] | None = None,
    bad_lines: int = 0,
    config: GeneratorConfig | None = None,
    truth_seed: int | None = None,
) -> GenerateResult:
    """Write `num_examples` examples: round(num_examples * holdout_fraction) of them to
    `holdout_path` (default `default_holdout_path(path)`), the rest to `path`.

    The output is a function of all arguments. `bad_lines` malformed lines are
    inserted at random places in `path`, on top of the examples. Several
    files from one hidden model: pass the same `truth_seed` with different seeds.
    """
    for name, value, low in (
        ("num_examples", num_examples, 1),
        ("seed", seed, 0),
        ("bad_lines", bad_lines, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"generate: {name} must be an int >= {low}, got {value!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"generate: holdout_fraction must be in [0, 1), got {holdout_fraction}")
    num_holdout = round(num_examples * holdout_fraction)
    num_train = num_examples - num_holdout
    if num_train < 1:
        raise ValueError(
            f"generate: holdout_fraction {holdout_fraction} of {num_examples} "
            "examples leaves none to train on"
        )
    started = time.perf_counter()
    truth = GroundTruth(config or GeneratorConfig(), seed if truth_seed is None else truth_seed)
    if num_holdout and holdout_path is None:
        holdout_path = default_holdout_path(path)
    holdout_target = Path(holdout_path) if num_holdout and holdout_path else Path(os.devnull)
    if holdout_target.resolve() == Path(path).resolve():
        raise ValueError(f"generate: holdout_path is the training file {path}")
    for p in (path, holdout_target):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    bad_rng = np.random.default_rng([seed, 0xBAD])
    bad = [bad_line(j, bad_rng) for j in range(bad_lines)]
    bad_at = np.sort(bad_rng.integers(0, num_train, bad_lines))
    scored: list[tuple[np.ndarray, np.ndarray]] = []
    positives = 0
    with open(path, "wb") as train_out, open(holdout_target, "wb") as holdout_out:
        for first in range(0, num_examples, _CHUNK):
            sample = truth.sample(
                np.random.default_rng([seed, first // _CHUNK]), min(_CHUNK, num_examples - first)
            )
            text, line_lens = format_lines(sample)
            k = min(max(num_train - first, 0), line_lens.shape[0])  # rows for `path`
            split = int(line_lens[:k].sum())
            _write_chunk(train_out, text[:split], line_lens[:k], first, bad_at, bad)
            holdout_out.write(text[split:])
            rows = slice(k, None) if num_holdout else slice(None, k)
            scored.append((sample.labels[rows], sample.logits[rows]))
            positives += int(sample.labels.sum())
    labels = np.concatenate([y for y, _ in scored])
    probs = 1.0 / (1.0 + np.exp(-np.concatenate([z for _, z in scored])))
    try:
        oracle_auc: float | None = auc(labels, probs)
    except ValueError:  # a single class: too few examples
        oracle_auc = None
    return GenerateResult(
        path=str(path),
        num_examples=num_train,
        holdout_path=str(holdout_path) if num_holdout else None,
        num_holdout=num_holdout,
        bad_lines=bad_lines,
        positive_rate=positives / num_examples,
        oracle_auc=oracle_auc,
        oracle_logloss=logloss(labels, probs),
        oracle_on="holdout" if num_holdout else "train",
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: write the file(s), print the result (with the oracle AUC) as one JSON line."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer datagen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_path", help="the training file to write")
    parser.add_argument("--examples", type=int, default=100_000, help="train + holdout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout-fraction", type=float, default=0.1)
    parser.add_argument("--holdout-path", default=None, help="default: OUT.holdout.EXT")
    parser.add_argument("--truth-seed", type=int, default=None, help="default: --seed")
    parser.add_argument("--bad-lines", type=int, default=0, help="malformed lines to insert")
    defaults = GeneratorConfig()
    for name in ("vocab_size", "zipf_a", "sigma", "numeric_sigma", "bias"):
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = parser.parse_args(argv)
    try:
        config = GeneratorConfig(
            args.vocab_size, args.zipf_a, args.sigma, args.numeric_sigma, args.bias
        )
        result = generate(
            args.out_path,
            args.examples,
            args.seed,
            holdout_fraction=args.holdout_fraction,
            holdout_path=args.holdout_path,
            bad_lines=args.bad_lines,
            config=config,
            truth_seed=args.truth_seed,
        )
    except (ValueError, OSError) as e:
        parser.error(str(e))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
