"""Unit tests of the data layer: Criteo parsing, id hashing, the reader, datagen, metrics."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

from trainer.data import (
    MISSING_VALUE,
    DataError,
    Dataset,
    TrainerReader,
    diagnose_line,
    hash_ids,
    parse_file,
    read_file,
    split_holdout,
)
from trainer.datagen import GeneratorConfig, generate, main
from trainer.metrics import auc, logloss

M64 = (1 << 64) - 1


def ref_splitmix64(x: int) -> int:
    """SplitMix64's finalizer on Python ints: the reference for the hashing rule."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_id(slot: int, field: str) -> int:
    value = int(field, 16) if field else M64
    return ref_splitmix64(value ^ (((slot + 1) * 0x9E3779B97F4A7C15) & M64))


def ref_parse(
    lines: list[str],
) -> tuple[list[float], list[list[float]], list[list[int]], list[int]]:
    """The contract written plainly: (labels, numeric, ids, 1-based numbers of bad lines)."""
    labels, numeric, ids, bad = [], [], [], []
    for lineno, line in enumerate(lines, 1):
        if diagnose_line(line.encode()) is not None:
            bad.append(lineno)
            continue
        f = line.split("\t")
        labels.append(float(f[0]))
        numeric.append([math.log1p(max(int(x), 0)) if x else 0.0 for x in f[1:14]])
        ids.append([ref_id(s, x) for s, x in enumerate(f[14:])])
    return labels, numeric, ids, bad


def line(label: str = "1", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{0x68FD1E64 + s:08x}" for s in range(26)]
    return "\t".join([label, *ints, *cats])


def write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_bytes((end.join(lines) + end).encode())
    return path


# ------------------------------------------------------------------ parsing


def test_parse_handwritten_file_with_empty_fields(tmp_path: Path) -> None:
    ints = ["1", "", "-3", "0", "255"] + [""] * 8
    cats = ["05db9164", "", "ABCDEF01", "0"] + [""] * 21 + ["ffffffffffffffff"]
    lines = [line("0", ints, cats), line()]
    data = read_file(write(tmp_path / "d.txt", lines), strict=True)
    assert len(data) == 2 and data.labels.tolist() == [0.0, 1.0]
    assert data.labels.dtype == np.float32 and data.numeric.dtype == np.float32
    expect = np.array([math.log1p(1), 0, 0, 0, math.log1p(255)] + [0] * 8, dtype=np.float32)
    np.testing.assert_array_equal(data.numeric[0], expect)
    assert data.ids.dtype == np.uint64 and data.ids.shape == (2, 26)
    assert data.ids[0].tolist() == [ref_id(s, c) for s, c in enumerate(cats)]
    assert data.ids[1].tolist() == [ref_id(s, f"{0x68FD1E64 + s:08x}") for s in range(26)]


def test_hashing_rule() -> None:
    values = np.array([[0x68FD1E64] * 26, [MISSING_VALUE] * 26], dtype=np.uint64)
    ids = hash_ids(values)
    assert ids[0].tolist() == [ref_id(s, "68fd1e64") for s in range(26)]
    assert ids[1].tolist() == [ref_id(s, "") for s in range(26)]
    assert len(set(ids[0].tolist())) == 26  # one value, 26 slots: 26 ids
    assert len(set(ids[1].tolist())) == 26  # every slot has its own missing id
    assert int(ids.max()) > 1 << 63  # ids use the whole 64-bit range


def random_field(rng: np.random.Generator, numeric: bool) -> str:
    kind = rng.integers(10)
    if kind == 0:
        return ""
    if numeric:
        digits = int(rng.choice([1, 3, 8, 9, 12, 18, 19, 25]))
        text = "".join(rng.choice(list("0123456789"), digits))
        text = ("-" if rng.random() < 0.2 else "") + text
        return {1: text + "x", 2: "1.5", 3: "+4", 4: "-", 5: text + "e"}.get(int(kind), text)
    digits = int(rng.choice([1, 7, 8, 8, 8, 9, 16, 17]))
    text = "".join(rng.choice(list("0123456789abcdefABCDEF"), digits))
    return {1: text[:-1] + "g", 2: "0x1f", 3: " a1"}.get(int(kind), text)


def test_vectorised_parser_matches_the_plain_rules(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    lines = []
    for _ in range(3000):
        fields = [str(rng.choice(["0", "1", "1", "1", "2", ""]))]
        fields += [
            random_field(rng, True) if rng.random() < 0.1 else str(rng.integers(-9, 10**6))
            for _ in range(13)
        ]
        fields += [
            random_field(rng, False) if rng.random() < 0.1 else f"{rng.integers(2**32):08x}"
            for _ in range(26)
        ]
        if rng.random() < 0.02:
            fields = fields[: int(rng.integers(1, 41))]
        lines.append("\t".join(fields))
    labels, numeric, ids, bad = ref_parse(lines)
    assert 50 < len(bad) < 2900 and labels  # the mix really exercises both outcomes
    result = parse_file(write(tmp_path / "fuzz.txt", lines))
    assert result.bad_lines == len(bad) and result.num_lines == len(lines)
    assert result.first_bad is not None and result.first_bad[0] == bad[0]
    np.testing.assert_array_equal(result.dataset.labels, np.array(labels, dtype=np.float32))
    np.testing.assert_array_equal(result.dataset.numeric, np.array(numeric, dtype=np.float32))
    assert result.dataset.ids.tolist() == ids


def test_bad_lines_skipped_counted_and_warned_once(tmp_path: Path, caplog) -> None:
    lines = [
        line(),
        line("2"),
        line(),
        line(ints=["1.5"] + ["1"] * 12),
        line()[:-3] + "zzz",
        "1\t2\t3",
        line(),
    ]
    path = write(tmp_path / "bad.txt", lines)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        result = parse_file(path)
    assert len(result.dataset) == 3 and result.bad_lines == 4
    assert result.first_bad == (2, "label must be 0 or 1, got b'2'")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "4 bad line(s)" in message and f"{path}:2: label must be 0 or 1" in message


@pytest.mark.parametrize(
    ("lines", "lineno", "reason"),
    [
        ([line(), line("x")], 2, "label must be 0 or 1, got b'x'"),
        ([line(), line(), "1\t2"], 3, "expected 40 tab-separated columns, got 2"),
        ([line(ints=["1", "7e"] + ["1"] * 11)], 1, "column 3 (I2): not an int64 integer: b'7e'"),
        ([line(ints=["9" * 19] + ["1"] * 12)], 1, "column 2 (I1): not an int64 integer"),
        ([line(cats=["q1"] + ["a"] * 25)], 1, "column 15 (C1): not a 64-bit hex value: b'q1'"),
        ([line(), "", line()], 2, "empty line"),
    ],
)
def test_strict_raises_with_file_and_line(tmp_path: Path, lines, lineno, reason) -> None:
    path = write(tmp_path / "bad.txt", lines)
    with pytest.raises(DataError) as e:
        read_file(path, strict=True)
    assert str(e.value).startswith(f"{path}:{lineno}: {reason}")
    assert isinstance(e.value, ValueError)


def test_trailing_empty_lines_crlf_and_no_final_newline(tmp_path: Path) -> None:
    a = read_file(write(tmp_path / "a.txt", [line(), line("0"), "", ""]), strict=True)
    b = read_file(write(tmp_path / "b.txt", [line(), line("0")], end="\r\n"), strict=True)
    (tmp_path / "c.txt").write_text(line() + "\n" + line("0"))
    c = read_file(tmp_path / "c.txt", strict=True)
    for d in (b, c):
        np.testing.assert_array_equal(d.labels, a.labels)
        np.testing.assert_array_equal(d.ids, a.ids)
    assert len(read_file(write(tmp_path / "e.txt", [""]), strict=True)) == 0


def test_long_fields_and_values_around_int64(tmp_path: Path) -> None:
    ints = [str(2**63 - 1), "-" + "9" * 18, "1" * 10, "0" * 25 + "7"] + ["1"] * 9
    cats = ["0123456789abcdef", "fedcba987", "F" * 16] + ["1"] * 23
    data = read_file(write(tmp_path / "l.txt", [line("1", ints, cats)]), strict=True)
    assert data.numeric[0, :4].tolist() == pytest.approx(
        [math.log1p(2**63 - 1), 0.0, math.log1p(1111111111), math.log1p(7)], rel=1e-6
    )
    assert data.ids[0, :3].tolist() == [ref_id(s, c) for s, c in enumerate(cats[:3])]


def test_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path / "c.txt", [line(), line("2"), line("0")])
    first = parse_file(path, cache=True)
    assert (tmp_path / "c.txt.psrt.npz").exists()
    calls = []
    monkeypatch.setattr("trainer.data.scan_file", lambda *a: calls.append(a) or first)
    again = parse_file(path, cache=True)
    assert calls == [] and again.bad_lines == 1 and again.first_bad == first.first_bad
    np.testing.assert_array_equal(again.dataset.ids, first.dataset.ids)
    with pytest.raises(DataError, match=r"c.txt:2: label"):  # strict also applies to a cache hit
        parse_file(path, cache=True, strict=True)
    monkeypatch.undo()
    write(path, [line("0")] * 4)
    os.utime(path, ns=(1, 1))
    assert parse_file(path, cache=True).dataset.labels.tolist() == [0.0] * 4
    cache_dir = tmp_path / "cache"
    assert len(read_file(path, cache=cache_dir)) == 4 and len(list(cache_dir.iterdir())) == 1
    (tmp_path / "c.txt.psrt.npz").write_bytes(b"garbage")
    assert len(read_file(path, cache=True)) == 4  # an unreadable cache is re-made


# ------------------------------------------------------------------ reader


def dataset(n: int) -> Dataset:
    """Examples whose label is their row number, so sets of rows are easy to compare."""
    return Dataset(
        np.arange(n, dtype=np.float32),
        np.zeros((n, 13), np.float32),
        np.arange(n * 26, dtype=np.uint64).reshape(n, 26),
    )


def rows_of(reader: TrainerReader) -> list[int]:
    return [int(x) for batch in reader.batches() for x in batch.labels]


def test_slices_are_disjoint_cover_the_data_and_have_equal_steps() -> None:
    n, t, b = 1003, 4, 10
    readers = [TrainerReader(dataset(n), j, t, b, seed=5) for j in range(t)]
    assert {r.steps_per_epoch for r in readers} == {(n // t) // b}
    slices = [set(range(r.lo, r.hi)) for r in readers]
    assert set().union(*slices) == set(range(n)) and sum(map(len, slices)) == n
    seen = [set(rows_of(r)) for r in readers]
    for j, rows in enumerate(seen):
        assert rows <= slices[j] and len(rows) == readers[j].steps_per_epoch * b
    batch = TrainerReader(dataset(n), 0, t, b, seed=5).next_batch()
    assert batch is not None and len(batch) == b
    assert batch.numeric.shape == (b, 13) and batch.ids.shape == (b, 26)


def test_order_is_deterministic_per_seed_trainer_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        r = TrainerReader(dataset(500), 1, 2, 25, seed)
        r.start_epoch(epoch)
        return rows_of(r)

    assert order(3, 0) == order(3, 0) and order(3, 4) == order(3, 4)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    assert sorted(order(3, 0)) == sorted(order(3, 1)) == list(range(250, 500))


def test_state_restore_mid_epoch_continues_exactly() -> None:
    data = dataset(777)
    full = TrainerReader(data, 2, 3, 16, seed=9)
    full.start_epoch(2)
    expected = rows_of(full)
    first = TrainerReader(data, 2, 3, 16, seed=9)
    first.start_epoch(2)
    head = [int(x) for _ in range(5) for x in first.next_batch().labels]
    state = json.loads(json.dumps(first.state()))
    assert state["epoch"] == 2 and state["position"] == 5 and state["num_examples"] == 777
    resumed = TrainerReader(data, 2, 3, 16, seed=9)
    resumed.restore(state)
    tail = rows_of(resumed)
    assert head + tail == expected and not set(head) & set(tail)
    assert resumed.next_batch() is None and resumed.position == resumed.steps_per_epoch


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_examples": 776}, "num_examples"),
        ({"seed": 1}, "seed"),
        ({"batch_size": 8}, "batch_size"),
        ({"trainer_id": 0}, "trainer_id"),
        ({"position": 99}, "position"),
    ],
)
def test_restore_rejects_a_state_that_does_not_fit(change, field) -> None:
    reader = TrainerReader(dataset(777), 2, 3, 16, seed=9)
    state = {**reader.state(), **change}
    with pytest.raises(ValueError, match=f"'{field}'"):
        reader.restore(state)
    other = TrainerReader(dataset(776), 2, 3, 16, seed=9)
    with pytest.raises(ValueError, match="field 'num_examples' is 777 in the checkpoint but 776"):
        other.restore(TrainerReader(dataset(777), 2, 3, 16, seed=9).state())


def test_reader_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="trainer_id"):
        TrainerReader(dataset(100), 2, 2, 10, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainerReader(dataset(100), 0, 2, 51, seed=0)


def test_split_holdout_is_deterministic_and_disjoint() -> None:
    data = dataset(1000)
    train, test = split_holdout(data, 0.1, seed=3)
    assert len(test) == 100 and len(train) == 900
    assert sorted(train.labels.tolist() + test.labels.tolist()) == list(range(1000))
    again = split_holdout(data, 0.1, seed=3)[1]
    np.testing.assert_array_equal(again.labels, test.labels)
    assert not np.array_equal(split_holdout(data, 0.1, seed=4)[1].labels, test.labels)


# ------------------------------------------------------------------ datagen


def test_generate_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "gen" / "train.txt"
    res = generate(path, 6000, seed=11, holdout_fraction=0.25, bad_lines=6)
    assert res.num_examples == 4500 and res.num_holdout == 1500 and res.oracle_on == "holdout"
    parsed = parse_file(path)
    assert len(parsed.dataset) == 4500 and parsed.bad_lines == 6
    holdout = read_file(res.holdout_path, strict=True)
    assert len(holdout) == 1500
    assert 0.1 < parsed.dataset.labels.mean() < 0.5 and 0.1 < res.positive_rate < 0.5
    assert 0.72 < res.oracle_auc < 0.92 and 0.2 < res.oracle_logloss < 0.6
    assert (parsed.dataset.ids[:, 0] == parsed.dataset.ids[0, 0]).mean() > 0.05  # Zipf head
    copy = tmp_path / "copy.txt"
    generate(
        copy,
        6000,
        seed=11,
        holdout_fraction=0.25,
        bad_lines=6,
        holdout_path=tmp_path / "copy.holdout.txt",
    )
    assert copy.read_bytes() == path.read_bytes()


def test_generate_cli_prints_json(tmp_path: Path, capsys) -> None:
    assert (
        main([str(tmp_path / "t.txt"), "--examples", "800", "--seed", "2", "--vocab-size", "1000"])
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_examples"] == 720 and out["num_holdout"] == 80
    assert 0.5 < out["oracle_auc"] <= 1.0
    with pytest.raises(ValueError, match="vocab_size"):
        GeneratorConfig(vocab_size=0)


# ------------------------------------------------------------------ metrics


def brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 5, 30, 200):
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, n).astype(np.float64)  # many ties
        assert auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auc(np.ones(3), np.arange(3.0))


def test_logloss() -> None:
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert logloss(np.array([1]), np.array([0.0])) == pytest.approx(-math.log(1e-7))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        logloss(np.array([2.0]), np.array([0.5]))
