"""Unit tests of the pserver's pure numpy pieces: sharding, id index, dedup, tables."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.config import DenseSpec, OptimizerSpec, TableSpec
from pserver.tables import initializers, sharding
from pserver.tables.dedup import dedup, sum_duplicates
from pserver.tables.dense import DenseVariable
from pserver.tables.idindex import IdIndex
from pserver.tables.sparse import SparseTable


def test_owner_spreads_sequential_ids_and_matches_owned_ranges() -> None:
    ids = np.arange(200_000, dtype=np.uint64)
    owners = sharding.owner(ids, 3, 1024)
    counts = np.bincount(owners, minlength=3)
    assert counts.min() > 0.3 * len(ids)
    vs = sharding.virtual_shard(ids, 1024)
    for p in range(3):
        r = sharding.owned_range(p, 3, 1024)
        assert np.array_equal((vs >= r.start) & (vs < r.stop), owners == p)


def test_splitmix64_known_value() -> None:
    # SplitMix64's first output for seed 0 is the finalizer of 0x9E3779B97F4A7C15.
    got = sharding.splitmix64(np.array([0x9E3779B97F4A7C15], dtype=np.uint64))[0]
    assert int(got) == 0xE220A8397B1DCDAF


def test_idindex_matches_a_dict() -> None:
    rng = np.random.default_rng(0)
    ix, ref = IdIndex(), {}
    for _ in range(40):
        ids = rng.integers(0, 2**64 - 1, 700, dtype=np.uint64)
        ids = np.concatenate([ids, ids[:50], rng.integers(0, 3000, 300).astype(np.uint64)])
        rows, new = ix.get_or_insert(ids)
        for i, r in zip(ids.tolist(), rows.tolist(), strict=True):
            assert ref.setdefault(i, r) == r
    assert len(ix) == len(ref)
    assert sorted(ref.values()) == list(range(len(ref)))
    assert ix.lookup(np.array([2**64 - 2], dtype=np.uint64))[0] in (-1, ref.get(2**64 - 2))


@pytest.mark.parametrize("span", [3, 40, 10_000])
def test_dedup_and_sum_duplicates_left_to_right(span: int) -> None:
    rng = np.random.default_rng(span)
    for _ in range(50):
        keys = rng.integers(0, span, rng.integers(1, 200)).astype(np.uint64)
        grads = rng.standard_normal((len(keys), 3)).astype(np.float32)
        uniq, inverse = dedup(keys)
        assert len(uniq) == len(set(keys.tolist()))
        assert np.array_equal(uniq if inverse is None else uniq[inverse], keys)
        k, summed = sum_duplicates(keys, grads)
        assert sorted(k.tolist()) == sorted(set(keys.tolist()))
        for key, row in zip(k.tolist(), summed, strict=True):
            parts = grads[keys == key]
            expected = parts[0].copy()
            for p in parts[1:]:  # strictly left to right, whichever path found the repeats
                expected += p
            assert expected.tobytes() == row.tobytes()


def test_rows_are_deterministic_from_seed_and_id() -> None:
    spec = TableSpec("t", 16, seed=7)
    a, b = SparseTable(spec), SparseTable(spec)
    ids = np.array([1, 2, 3, 2**64 - 1], dtype=np.uint64)
    a.pull(np.array([99, 3], dtype=np.uint64))  # a different creation order
    assert np.array_equal(a.pull(ids), b.pull(ids))
    other = SparseTable(TableSpec("t", 16, seed=8)).pull(ids)
    assert not np.array_equal(other, b.pull(ids))
    v = initializers.sparse_rows("normal", 1.0, 3, np.arange(20000, dtype=np.uint64), 8)
    assert abs(float(v.mean())) < 0.02 and abs(float(v.std()) - 1.0) < 0.02


def _reference_step(kind: str, w: np.ndarray, g: np.ndarray, state: dict, t: int) -> np.ndarray:
    s = OptimizerSpec(kind=kind)
    w, g = w.astype(np.float64), g.astype(np.float64)
    if kind == "sgd":
        return w - s.learning_rate * g
    if kind == "adagrad":
        state["a"] = state.get("a", s.initial_accumulator) + g * g
        return w - s.learning_rate * g / (np.sqrt(state["a"]) + s.epsilon)
    state["m"] = s.beta1 * state.get("m", 0) + (1 - s.beta1) * g
    state["v"] = s.beta2 * state.get("v", 0) + (1 - s.beta2) * g * g
    mh, vh = state["m"] / (1 - s.beta1**t), state["v"] / (1 - s.beta2**t)
    return w - s.learning_rate * mh / (np.sqrt(vh) + s.epsilon)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_optimizers_match_the_textbook(kind: str) -> None:
    rng = np.random.default_rng(1)
    table = SparseTable(TableSpec("t", 4, seed=1, optimizer=OptimizerSpec(kind=kind)))
    ids = np.array([5, 9], dtype=np.uint64)
    w = table.pull(ids).astype(np.float64)
    state: dict = {}
    for t in range(1, 4):
        g = rng.standard_normal((2, 4)).astype(np.float32)
        # id 5 twice: its two halves are summed before the update
        table.push(np.array([5, 9, 5], dtype=np.uint64), np.stack([g[0] / 2, g[1], g[0] / 2]))
        w = _reference_step(kind, w, g, state, t)
        np.testing.assert_allclose(table.pull(ids), w, rtol=2e-5, atol=1e-6)
    dense = DenseVariable(DenseSpec("d", (2, 4), optimizer=OptimizerSpec(kind=kind)))
    w0 = dense.pull().astype(np.float64)
    g = rng.standard_normal((2, 4)).astype(np.float32)
    dense.push(g)
    np.testing.assert_allclose(dense.pull(), _reference_step(kind, w0, g, {}, 1), rtol=2e-5,
                               atol=1e-6)


def test_table_export_load_round_trip() -> None:
    spec = TableSpec("t", 8, seed=2, optimizer=OptimizerSpec(kind="adam"))
    a = SparseTable(spec)
    ids = np.arange(5000, dtype=np.uint64) * np.uint64(977)
    a.push(ids, np.ones((5000, 8), np.float32))
    b = SparseTable(spec)
    b.load(a.export())
    for name, arr in a.export().items():
        assert np.array_equal(arr, b.export()[name]), name
    assert np.array_equal(a.pull(ids[::7]), b.pull(ids[::7]))
