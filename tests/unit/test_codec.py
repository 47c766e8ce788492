"""pserver.wire.codec against the generated protobuf classes, both ways."""

from __future__ import annotations

import numpy as np
import pytest

from pserver.errors import InvalidArgument
from pserver.wire import codec
from pserver.wire import psrt_pb2 as pb
from pserver.wire.tensor import encode_tensor

CASES = [(0, 4, 0, 0), (5, 3, 2, 7), (1, 1, -1, -5), (100, 64, 1, 2**40), (3, 2, 2**31 - 1, -1)]


@pytest.mark.parametrize("n,dim,trainer,step", CASES)
def test_encoders_match_protobuf(n: int, dim: int, trainer: int, step: int) -> None:
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    g = rng.standard_normal((n, dim)).astype(np.float32)
    assert codec.encode_push_request("emb", ids, g, trainer, step) == pb.PushRequest(
        table="emb", ids=ids.tobytes(), grads=encode_tensor(g), trainer_id=trainer, step=step
    ).SerializeToString()
    assert codec.encode_pull_request("emb", ids, trainer, step) == pb.PullRequest(
        table="emb", ids=ids.tobytes(), trainer_id=trainer, step=step).SerializeToString()
    assert codec.encode_pull_response(g) == pb.PullResponse(
        rows=encode_tensor(g)).SerializeToString()
    assert codec.encode_push_response(step if step > 0 else 0) == pb.PushResponse(
        applied_steps=step if step > 0 else 0).SerializeToString()


@pytest.mark.parametrize("n,dim,trainer,step", CASES)
def test_decoders_match_protobuf(n: int, dim: int, trainer: int, step: int) -> None:
    rng = np.random.default_rng(n + 1)
    ids = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    g = rng.standard_normal((n, dim)).astype(np.float32)
    raw = pb.PushRequest(table="tåble", ids=ids.tobytes(), grads=encode_tensor(g),
                         trainer_id=trainer, step=step).SerializeToString()
    d = codec.decode_push_request(raw)
    assert (d.table, d.trainer_id, d.step) == ("tåble", trainer, step)
    assert np.array_equal(d.ids, ids)
    assert np.array_equal(d.grads.array(raw, "t"), g)
    raw = pb.PullRequest(table="e", ids=ids.tobytes(), trainer_id=trainer,
                         step=step).SerializeToString()
    p = codec.decode_pull_request(raw)
    assert (p.table, p.trainer_id, p.step) == ("e", trainer, step)
    assert np.array_equal(p.ids, ids)
    raw = pb.PullResponse(rows=encode_tensor(g)).SerializeToString()
    assert np.array_equal(codec.decode_pull_response(raw).array(raw, "t"), g)


def test_unknown_fields_are_skipped_and_last_value_wins() -> None:
    raw = pb.PullRequest(table="a", step=1).SerializeToString()
    raw += pb.PullRequest(table="b", step=2).SerializeToString()
    raw += bytes([0x50 | 5]) + b"\x00\x00\x00\x00"  # field 10, fixed32: unknown
    p = codec.decode_pull_request(raw)
    assert (p.table, p.step) == ("b", 2)


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x10ab", b"\x0b", b"\x00\x01",
                                 b"\x0a\x02\xff\xfe"])
def test_garbage_raises_decode_error(raw: bytes) -> None:
    with pytest.raises(InvalidArgument):
        codec.decode_pull_request(raw)
    with pytest.raises(InvalidArgument):
        codec.decode_push_request(raw)


def test_batch_messages_match_protobuf_both_ways() -> None:
    rng = np.random.default_rng(7)
    ids = [rng.integers(0, 2**64 - 1, n, dtype=np.uint64) for n in (5, 0, 3)]
    names = ["emb_0", "wide", "x"]
    tables = list(zip(names, ids, strict=True))
    raw = codec.encode_pull_batch_request(tables, ["w", "b"], 1, 7)
    assert raw == pb.PullBatchRequest(
        tables=[pb.TableIds(table=n, ids=i.tobytes()) for n, i in tables], dense=["w", "b"],
        trainer_id=1, step=7).SerializeToString()
    got, dense, trainer, step = codec.decode_pull_batch(raw)
    assert [n for n, _ in got] == names and dense == ["w", "b"] and (trainer, step) == (1, 7)
    assert all(np.array_equal(a, b) for (_, a), b in zip(got, ids, strict=True))
    rows = [rng.standard_normal((len(i), 4)).astype(np.float32) for i in ids]
    values = [rng.standard_normal((3, 2)).astype(np.float32), np.zeros(1, np.float32)]
    raw = codec.encode_pull_batch_response(rows, values)
    assert raw == pb.PullBatchResponse(rows=[encode_tensor(r) for r in rows],
                                       dense=[encode_tensor(v) for v in values]
                                       ).SerializeToString()
    views, dense_views = codec.decode_pull_batch_response(raw)
    for v, r in zip([*views, *dense_views], [*rows, *values], strict=True):
        assert np.array_equal(v.array(raw, "t"), r) and v.array(raw, "t").shape == r.shape
    grads = [(n, i, rng.standard_normal((len(i), 3)).astype(np.float32)) for n, i in tables]
    dense_grads = [("w", values[0]), ("b", values[1])]
    raw = codec.encode_push_batch_request(grads, dense_grads, 2, 9)
    assert raw == pb.PushBatchRequest(
        tables=[pb.TableGrads(table=n, ids=i.tobytes(), grads=encode_tensor(g))
                for n, i, g in grads], dense=["w", "b"],
        dense_grads=[encode_tensor(g) for _, g in dense_grads], trainer_id=2,
        step=9).SerializeToString()
    t, dn, dg, trainer, step = codec.decode_push_batch(raw)
    assert [x[0] for x in t] == names and dn == ["w", "b"] and (trainer, step) == (2, 9)
    for (_, i, g), (_, ei, eg) in zip(t, grads, strict=True):
        assert np.array_equal(i, ei) and np.array_equal(g.array(raw, "g"), eg)
    assert np.array_equal(dg[0].array(raw, "d"), values[0])
