"""Integration: every kind of bad input gets its status code and a message naming the problem.

Each case runs against real in-process pservers and checks four things: (a) the exact
gRPC status code, (b) the message names the call, the table or variable and what was
expected against what came in, (c) the shard is bit-identical afterwards (rows, row
count, optimizer state, dense values, sync-step bookkeeping), and (d) the pserver still
serves good pulls and pushes. Raw requests go through a bare channel (bytes in, bytes
out) so the client's own checks cannot hide a server that lets bad input through; the
last tests show the same errors reach trainers as typed `pserver.errors` exceptions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from pserver import errors
from pserver.config import DenseSpec, TableSpec
from pserver.rpc.client import PSClient
from pserver.tables.sharding import owner
from pserver.wire import psrt_pb2 as pb
from pserver.wire.methods import PARAMETER_SERVER as SERVICE
from pserver.wire.tensor import encode_ids, encode_tensor
from tests.helpers import Cluster, job

METHODS = ("Pull", "Push", "PullDense", "PushDense", "Info", "PullBatch", "PushBatch",
           "SaveShard")
V = 1024  # job.virtual_shards default
_ALL = np.arange(2000, dtype=np.uint64)
_OWNERS = owner(_ALL, 2, V)
OWN0 = _ALL[_OWNERS == 0]  # ids pserver 0 owns when P=2 (P=1: it owns every id)
OWN1 = _ALL[_OWNERS == 1]
SEEDED = OWN0[:4]  # rows created and trained before every bad request
FRESH = OWN0[4:6]  # ids no request has touched: a bad request must not create them
GOOD = OWN0[6:9]  # ids of the good requests that follow


def f32(*shape: int, fill: float = 0.25) -> np.ndarray:
    return np.full(shape, fill, dtype=np.float32)


def tensor(shape: list[int], nbytes: int | None = None, fill: float = 0.25) -> pb.Tensor:
    """A Tensor of `shape`, optionally with a wrong number of data bytes."""
    t = encode_tensor(f32(*shape, fill=fill))
    if nbytes is not None:
        t = pb.Tensor(data=(t.data * 2 + bytes(nbytes))[:nbytes], shape=shape)
    return t


def push_req(ids: np.ndarray = FRESH, grads: pb.Tensor | None = None, table: str = "emb",
             trainer_id: int = 0, step: int = 1, raw_ids: bytes | None = None) -> bytes:
    g = tensor([len(ids), 8]) if grads is None else grads
    return pb.PushRequest(table=table, ids=encode_ids(ids) if raw_ids is None else raw_ids,
                          grads=g, trainer_id=trainer_id, step=step).SerializeToString()


def pull_req(ids: np.ndarray = FRESH, table: str = "emb", trainer_id: int = 0, step: int = 0,
             raw_ids: bytes | None = None) -> bytes:
    return pb.PullRequest(table=table, ids=encode_ids(ids) if raw_ids is None else raw_ids,
                          trainer_id=trainer_id, step=step).SerializeToString()


def dense_push_req(grads: dict[str, pb.Tensor], trainer_id: int = 0, step: int = 1) -> bytes:
    return pb.DensePushRequest(names=list(grads), grads=list(grads.values()),
                               trainer_id=trainer_id, step=step).SerializeToString()


def dense_pull_req(names: list[str], trainer_id: int = 0, step: int = 0) -> bytes:
    return pb.DensePullRequest(names=names, trainer_id=trainer_id, step=step).SerializeToString()


def pull_batch_req(tables: list[tuple[str, np.ndarray]], dense: tuple[str, ...] = (),
                   step: int = 0) -> bytes:
    return pb.PullBatchRequest(tables=[pb.TableIds(table=t, ids=encode_ids(i)) for t, i in tables],
                               dense=list(dense), step=step).SerializeToString()


def push_batch_req(tables: list[tuple[str, np.ndarray, pb.Tensor]],
                   dense: dict[str, pb.Tensor] | None = None, step: int = 1) -> bytes:
    return pb.PushBatchRequest(
        tables=[pb.TableGrads(table=t, ids=encode_ids(i), grads=g) for t, i, g in tables],
        dense=list(dense or {}), dense_grads=list((dense or {}).values()),
        step=step).SerializeToString()


def nan_at(shape: list[int], value: float, index: tuple[int, ...]) -> pb.Tensor:
    a = f32(*shape)
    a[index] = value
    return encode_tensor(a)


# ---- the cluster every case runs on -------------------------------------------------


class Rig:
    """A started cluster, one client per trainer, raw channels, and seeded state."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.config = cluster.config
        self.sync = self.config.mode == "sync"
        self.clients = [cluster.client(j) for j in range(self.config.num_trainers)]
        self.channels = [grpc.insecure_channel(a) for a in self.config.pservers]

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    @property
    def shards(self) -> list[Any]:
        return [s.shard for s in self.cluster.servers]

    def raw(self, method: str, request: bytes, pserver: int = 0) -> bytes:
        call = self.channels[pserver].unary_unary(f"/{SERVICE}/{method}")
        return call(request, timeout=10)

    def seed_state(self) -> None:
        """Create rows and train one step everywhere, so 'unchanged' has something to keep."""
        for c in self.clients:
            c.pull("emb", SEEDED)
        for j, c in enumerate(self.clients):
            c.push("emb", SEEDED, f32(len(SEEDED), 8, fill=0.1 * (j + 1)), step=0)
            c.push_dense({"w": f32(4, 3, fill=0.2), "b": f32(3, fill=-0.3)}, step=0)

    def gate(self, name: str) -> Any:
        """The step gate of a dense variable's pserver, or of a table on pserver 0."""
        holders = [sh for sh in self.shards if name in sh.dense] or self.shards[:1]
        return holders[0].gates[name]

    def still_serves(self) -> None:
        """Good pushes from every trainer still apply, and pulls see them."""
        gate = self.gate("emb")
        step, waiting = gate.applied, set(gate.pending)
        before = self.clients[0].pull("emb", GOOD)
        for j, c in enumerate(self.clients):
            if j not in waiting:
                c.push("emb", GOOD, f32(len(GOOD), 8, fill=0.5), step=step)
        after = self.clients[0].pull("emb", GOOD, step=step + 1 if self.sync else 0)
        assert not np.array_equal(before, after)
        np.testing.assert_array_equal(after, self.shards[0].tables["emb"].pull(GOOD))
        if self.sync:
            assert gate.applied == step + 1
        dense_before = self.clients[0].pull_dense()
        for name, shape in (("w", (4, 3)), ("b", (3,))):
            g = self.gate(name)
            step, waiting = g.applied, set(g.pending)
            for j, c in enumerate(self.clients):
                if j not in waiting:
                    c.push_dense({name: f32(*shape, fill=0.5)}, step=step)
            if self.sync:
                assert g.applied == step + 1
        dense_after = self.clients[0].pull_dense()
        for name in ("w", "b"):
            assert not np.array_equal(dense_before[name], dense_after[name])
        info = pb.InfoResponse.FromString(self.raw("Info", b""))  # and Info answers
        assert info.pserver_id == 0 and info.tables[0].name == "emb"


def snapshot(shards: list[Any]) -> dict[str, Any]:
    """Every array and step counter of every shard, as bytes (bit-identical comparison)."""
    out: dict[str, Any] = {}
    for sh in shards:
        p = sh.pserver_id
        for name, table in sh.tables.items():
            out[f"{p}/table/{name}/len"] = len(table)
            for key, arr in table.export().items():
                out[f"{p}/table/{name}/{key}"] = (arr.dtype.str, arr.shape, arr.tobytes())
        for name, var in sh.dense.items():
            with var.lock:
                arrays = {"value": var.value, **var.state}
                for key, arr in arrays.items():
                    out[f"{p}/dense/{name}/{key}"] = (arr.dtype.str, arr.shape, arr.tobytes())
        for name, gate in sh.gates.items():
            with gate.cond:
                out[f"{p}/gate/{name}"] = (gate.applied,
                                           sorted((j, id(v)) for j, v in gate.pending.items()))
    return out


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"a rejected request changed {changed}"


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, needles: tuple[str, ...]) -> None:
    assert err.code() == code, (err.code(), err.details())
    for needle in needles:
        assert needle in err.details(), f"{needle!r} not in {err.details()!r}"


# ---- the cases ---------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    request: Callable[[Rig], bytes]
    code: grpc.StatusCode
    needles: tuple[str, ...]
    pservers: int = 1
    trainers: int = 1
    mode: str = "sync"
    setup: Callable[[Rig], None] | None = None
    sections: dict[str, Any] = field(default_factory=dict)


def _pending_push(rig: Rig) -> None:
    """Trainer 0 pushes step 1 (emb, w, b); trainer 1 has not yet: step 1 stays pending."""
    rig.raw("Push", push_req(GOOD[:1], step=1))
    rig.raw("PushDense", dense_push_req({"w": tensor([4, 3]), "b": tensor([3])}, step=1))


def _b_applied_alone(rig: Rig) -> None:
    """Step 1 of 'b' is applied, step 1 of 'w' is not."""
    rig.raw("PushDense", dense_push_req({"b": tensor([3])}, step=1))


CASES = [
    # ids bytes not a multiple of 8
    Case("pull-ids-12-bytes", "Pull", lambda r: pull_req(raw_ids=bytes(12)), INVALID,
         ("Pull", "8 bytes each", "got 12 bytes")),
    Case("push-ids-12-bytes", "Push",
         lambda r: push_req(raw_ids=bytes(12), grads=tensor([1, 8])), INVALID,
         ("Push", "8 bytes each", "got 12 bytes")),
    # grads bytes that do not match their shape
    Case("push-grads-short", "Push", lambda r: push_req(grads=tensor([2, 8], nbytes=60)),
         INVALID, ("Push: grads", "shape [2, 8] needs 64 bytes", "got 60 bytes")),
    Case("push-grads-long", "Push", lambda r: push_req(grads=tensor([2, 8], nbytes=68)),
         INVALID, ("Push: grads", "shape [2, 8] needs 64 bytes", "got 68 bytes")),
    Case("push-grads-shape-overflows", "Push",
         lambda r: push_req(grads=pb.Tensor(data=b"", shape=[2**32, 2**32])), INVALID,
         ("Push: grads", "[4294967296, 4294967296]", "got 0 bytes")),
    Case("push-grads-empty-huge-dim", "Push",
         lambda r: push_req(grads=pb.Tensor(data=b"", shape=[0, 2**62])), INVALID,
         ("Push: grads", str(2**62))),
    Case("push-grads-negative-dim", "Push",
         lambda r: push_req(grads=pb.Tensor(data=b"", shape=[2, -8])), INVALID,
         ("Push: grads", "[2, -8]", "negative")),
    # id count and gradient rows differ
    Case("push-3-ids-2-rows", "Push", lambda r: push_req(OWN0[4:7], grads=tensor([2, 8])),
         INVALID, ("Push", "3 ids", "[3, 8]", "got [2, 8]")),
    Case("push-grads-1d", "Push", lambda r: push_req(grads=tensor([16])), INVALID,
         ("Push", "2 ids", "[2, 8]", "got [16]")),
    # wrong dim
    Case("push-dim-4", "Push", lambda r: push_req(grads=tensor([2, 4])), INVALID,
         ("Push: table 'emb' has dim 8, got gradients of dim 4",)),
    # NaN / Inf
    Case("push-nan", "Push", lambda r: push_req(grads=nan_at([2, 8], np.nan, (1, 3))), INVALID,
         ("Push", "NaN or Inf", "[1, 3]")),
    Case("push-inf", "Push", lambda r: push_req(grads=nan_at([2, 8], np.inf, (0, 0))), INVALID,
         ("Push", "NaN or Inf", "[0, 0]")),
    Case("push-minus-inf", "Push", lambda r: push_req(grads=nan_at([2, 8], -np.inf, (1, 7))),
         INVALID, ("Push", "NaN or Inf", "[1, 7]")),
    Case("push-dense-nan", "PushDense",
         lambda r: dense_push_req({"w": nan_at([4, 3], np.nan, (2, 1))}), INVALID,
         ("PushDense", "'w'", "NaN or Inf", "[2, 1]")),
    Case("push-dense-inf", "PushDense",
         lambda r: dense_push_req({"b": nan_at([3], np.inf, (2,))}), INVALID,
         ("PushDense", "'b'", "NaN or Inf", "[2]")),
    # unknown table / variable
    Case("pull-unknown-table", "Pull", lambda r: pull_req(table="nope"), NOT_FOUND,
         ("Pull", "unknown table 'nope'", "emb")),
    Case("push-unknown-table", "Push", lambda r: push_req(table="nope"), NOT_FOUND,
         ("Push", "unknown table 'nope'", "emb")),
    Case("pull-dense-unknown", "PullDense", lambda r: dense_pull_req(["w", "nope"]), NOT_FOUND,
         ("PullDense", "unknown dense variable 'nope'")),
    Case("push-dense-unknown", "PushDense", lambda r: dense_push_req({"nope": tensor([3])}),
         NOT_FOUND, ("PushDense", "unknown dense variable 'nope'")),
    Case("push-dense-on-other-pserver", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3])}), NOT_FOUND,
         ("PushDense", "'w'", "lives on pserver 1", "not on pserver 0"), pservers=2),
    # dense gradient of the wrong shape
    Case("push-dense-transposed", "PushDense", lambda r: dense_push_req({"w": tensor([3, 4])}),
         INVALID, ("PushDense", "variable 'w' has shape [4, 3]", "got gradients of shape [3, 4]")),
    Case("push-dense-scalar", "PushDense",
         lambda r: dense_push_req({"b": pb.Tensor(data=bytes(4), shape=[])}), INVALID,
         ("PushDense", "variable 'b' has shape [3]", "got gradients of shape []")),
    Case("push-dense-bytes", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3], nbytes=40)}), INVALID,
         ("PushDense: grads[0]", "needs 48 bytes", "got 40 bytes")),
    Case("push-dense-names-vs-grads", "PushDense",
         lambda r: pb.DensePushRequest(names=["w", "b"], grads=[tensor([4, 3])],
                                       step=1).SerializeToString(),
         INVALID, ("PushDense", "2 names but 1 gradients")),
    Case("push-dense-name-twice", "PushDense",
         lambda r: pb.DensePushRequest(names=["b", "b"], grads=[tensor([3]), tensor([3])],
                                       step=1).SerializeToString(),
         INVALID, ("PushDense", "named twice", "'b'")),
    # a multi-variable PushDense whose second variable is bad applies nothing
    Case("push-dense-second-nan", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3]), "b": nan_at([3], np.nan, (0,))}),
         INVALID, ("PushDense", "'b'", "NaN or Inf")),
    Case("push-dense-second-shape", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3]), "b": tensor([4])}), INVALID,
         ("PushDense", "variable 'b' has shape [3]", "got gradients of shape [4]")),
    Case("push-dense-second-unknown", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3]), "nope": tensor([3])}), NOT_FOUND,
         ("PushDense", "unknown dense variable 'nope'")),
    Case("push-dense-second-applied", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3]), "b": tensor([3])}, step=1),
         PRECONDITION, ("PushDense", "step 1 of 'b' is already applied", "next step is 2"),
         setup=_b_applied_alone),
    Case("push-dense-async-second-nan", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3]), "b": nan_at([3], np.inf, (1,))}),
         INVALID, ("PushDense", "'b'", "NaN or Inf"), mode="async"),
    # sync: steps and trainers
    Case("push-step-applied", "Push", lambda r: push_req(step=0), PRECONDITION,
         ("Push", "step 0 of 'emb' is already applied", "next step is 1")),
    Case("push-dense-step-applied", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3])}, step=0), PRECONDITION,
         ("PushDense", "step 0 of 'w' is already applied", "next step is 1")),
    Case("push-step-twice", "Push", lambda r: push_req(step=1), PRECONDITION,
         ("Push", "trainer 0 already pushed step 1 of 'emb'"), trainers=2, setup=_pending_push),
    Case("push-dense-step-twice", "PushDense",
         lambda r: dense_push_req({"b": tensor([3])}, step=1), PRECONDITION,
         ("PushDense", "trainer 0 already pushed step 1 of 'b'"), trainers=2,
         setup=_pending_push),
    Case("push-trainer-out-of-range", "Push", lambda r: push_req(trainer_id=2), INVALID,
         ("Push", "trainer_id 2 is out of range 0..1"), trainers=2),
    Case("push-trainer-negative", "Push", lambda r: push_req(trainer_id=-1), INVALID,
         ("Push", "trainer_id -1 is out of range 0..1"), trainers=2),
    Case("pull-trainer-out-of-range", "Pull", lambda r: pull_req(trainer_id=2, step=1),
         INVALID, ("Pull", "trainer_id 2 is out of range 0..1"), trainers=2),
    Case("push-dense-trainer-out-of-range", "PushDense",
         lambda r: dense_push_req({"w": tensor([4, 3])}, trainer_id=5), INVALID,
         ("PushDense", "trainer_id 5 is out of range 0..1"), trainers=2),
    Case("pull-dense-trainer-out-of-range", "PullDense",
         lambda r: dense_pull_req(["w"], trainer_id=5, step=1), INVALID,
         ("PullDense", "trainer_id 5 is out of range 0..1"), trainers=2),
    # an id sent to a pserver that does not own it
    Case("pull-wrong-owner", "Pull", lambda r: pull_req(np.array([FRESH[0], OWN1[0]])),
         INVALID, ("Pull", f"id {OWN1[0]} belongs to pserver 1", "not to pserver 0",
                   "1 of 2 ids"), pservers=2),
    Case("push-wrong-owner", "Push", lambda r: push_req(np.array([OWN1[0], FRESH[0]])),
         INVALID, ("Push", f"id {OWN1[0]} belongs to pserver 1", "not to pserver 0"),
         pservers=2),
    # a pull whose answer would be over the size limit (it must not create the rows)
    Case("pull-answer-too-large", "Pull", lambda r: pull_req(np.arange(40_000, dtype=np.uint64)),
         grpc.StatusCode.RESOURCE_EXHAUSTED,
         ("Pull", "40000 ids", "'emb'", "1000000"), sections={"rpc": {"max_message_bytes":
                                                                       1_000_000}}),
    # bytes that do not parse as the request
    *[Case(f"{m}-garbage", m, lambda r: b"\xff\xff\xff\xff", INVALID,
           (m, "do not parse", "Request")) for m in METHODS],
    # a batch is checked as a whole: one bad part and nothing at all is applied or created
    Case("pull-batch-second-table-unknown", "PullBatch",
         lambda r: pull_batch_req([("emb", FRESH), ("nope", FRESH)]), NOT_FOUND,
         ("PullBatch", "unknown table 'nope'")),
    Case("pull-batch-dense-unknown", "PullBatch",
         lambda r: pull_batch_req([("emb", FRESH)], ("w", "nope")), NOT_FOUND,
         ("PullBatch", "unknown dense variable 'nope'")),
    Case("push-batch-second-table-unknown", "PushBatch",
         lambda r: push_batch_req([("emb", FRESH, tensor([2, 8])),
                                   ("nope", FRESH, tensor([2, 8]))]), NOT_FOUND,
         ("PushBatch", "unknown table 'nope'")),
    Case("push-batch-table-twice", "PushBatch",
         lambda r: push_batch_req([("emb", FRESH, tensor([2, 8])),
                                   ("emb", FRESH, tensor([2, 8]))]), INVALID,
         ("PushBatch", "named twice")),
    Case("push-batch-dense-nan", "PushBatch",
         lambda r: push_batch_req([("emb", FRESH, tensor([2, 8]))],
                                  {"w": tensor([4, 3]), "b": nan_at([3], float("nan"), (1,))}),
         INVALID, ("PushBatch", "'b'", "NaN or Inf")),
    Case("push-batch-names-and-grads-differ", "PushBatch",
         lambda r: pb.PushBatchRequest(dense=["w", "b"], dense_grads=[tensor([4, 3])],
                                       step=1).SerializeToString(), INVALID,
         ("PushBatch", "2 names but 1 gradients")),
    Case("push-batch-step-applied", "PushBatch",
         lambda r: push_batch_req([("emb", FRESH, tensor([2, 8]))], step=0), PRECONDITION,
         ("PushBatch", "step 0", "already applied")),
    Case("save-shard-delta-of-a-newer-base", "SaveShard",
         lambda r: pb.SaveShardRequest(serial=5, delta=True, base=5).SerializeToString(),
         INVALID, ("SaveShard", "base must be an older serial", "base < 5, got 5")),
    Case("save-shard-delta-of-a-negative-base", "SaveShard",
         lambda r: pb.SaveShardRequest(serial=5, delta=True, base=-1).SerializeToString(),
         INVALID, ("SaveShard", "0 <= base < 5, got -1")),
    Case("pull-batch-wrong-owner", "PullBatch",
         lambda r: pull_batch_req([("emb", FRESH), ("emb", OWN1[:1])]), INVALID,
         ("PullBatch", f"id {int(OWN1[0])} belongs to pserver 1"), pservers=2),
]


@pytest.fixture
def rig_factory(cluster_factory: Callable[..., Cluster]) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(pservers: int = 1, mode: str = "sync", trainers: int = 1, **sections: Any) -> Rig:
        rig = Rig(cluster_factory(job(pservers, mode, trainers, **sections)))
        rigs.append(rig)
        rig.seed_state()
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_request_is_rejected_and_changes_nothing(case: Case, rig_factory: Any) -> None:
    rig = rig_factory(case.pservers, case.mode, case.trainers, **case.sections)
    if case.setup is not None:
        case.setup(rig)
    before = snapshot(rig.shards)
    with pytest.raises(grpc.RpcError) as info:
        rig.raw(case.method, case.request(rig))
    assert_status(info.value, case.code, case.needles)
    assert_unchanged(before, snapshot(rig.shards))
    for shard in rig.shards:  # not even a row for an id only the bad request named
        assert not np.isin(FRESH, shard.tables["emb"].export()["ids"]).any()
    rig.still_serves()


def test_message_over_the_size_limit_is_resource_exhausted(rig_factory: Any) -> None:
    """gRPC itself refuses a request over rpc.max_message_bytes before our code runs."""
    rig = rig_factory(mode="async", rpc={"max_message_bytes": 1_000_000})
    n = 40_000  # 320 kB of ids and 1.28 MB of gradients
    ids = np.arange(10**6, 10**6 + n, dtype=np.uint64)
    before = snapshot(rig.shards)
    with pytest.raises(grpc.RpcError) as info:
        rig.raw("Push", push_req(ids, grads=tensor([n, 8]), step=0))
    assert_status(info.value, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  ("larger than max", "vs. 1000000"))
    assert_unchanged(before, snapshot(rig.shards))
    with pytest.raises(errors.ResourceExhausted) as typed:
        rig.clients[0].push("emb", ids, f32(n, 8))
    assert typed.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1000000" in str(typed.value) and rig.config.pservers[0] in str(typed.value)
    assert_unchanged(before, snapshot(rig.shards))
    rig.still_serves()


def test_push_dense_second_variable_bad_leaves_first_untouched(rig_factory: Any) -> None:
    """Spelled out for the multi-variable case: 'w' is fine, 'b' is NaN; 'w' must not move."""
    rig = rig_factory()
    shard = rig.shards[0]
    w_before = shard.dense["w"].pull()
    with pytest.raises(grpc.RpcError) as info:
        rig.raw("PushDense", dense_push_req({"w": tensor([4, 3]), "b": nan_at([3], np.nan, (0,))}))
    assert_status(info.value, INVALID, ("'b'", "NaN or Inf"))
    assert shard.dense["w"].pull().tobytes() == w_before.tobytes()
    assert shard.gates["w"].applied == 1 and not shard.gates["w"].pending
    with pytest.raises(errors.InvalidArgument):
        rig.clients[0].push_dense({"w": f32(4, 3), "b": np.array([1, np.nan, 2], np.float32)},
                                  step=1)
    assert shard.dense["w"].pull().tobytes() == w_before.tobytes()
    rig.still_serves()


# ---- the same errors through the client, as typed exceptions ------------------------


def _client_with(rig: Rig, trainer_id: int = 0, **changes: Any) -> PSClient:
    """A client whose view of the job differs from the pservers' (stale or wrong config)."""
    c = PSClient(dataclasses.replace(rig.config, **changes), trainer_id)
    rig.cluster.clients.append(c)
    return c


def _typed(exc_type: type[errors.PsrtError], code: grpc.StatusCode, rig: Rig,
           call: Callable[[], object], needles: tuple[str, ...], pserver: int = 0) -> None:
    before = snapshot(rig.shards)
    with pytest.raises(exc_type) as info:
        call()
    msg = str(info.value)
    assert info.value.code == code
    assert f"pserver[{pserver}] at {rig.config.pservers[pserver]}" in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert_unchanged(before, snapshot(rig.shards))


def test_client_raises_typed_errors_carrying_the_server_message(rig_factory: Any) -> None:
    rig = rig_factory(trainers=2)
    c0 = rig.clients[0]
    nan = f32(2, 8)
    nan[1, 2] = np.nan
    _typed(errors.InvalidArgument, INVALID, rig, lambda: c0.push("emb", FRESH, nan, step=1),
           ("Push 'emb'", "NaN or Inf", "[1, 2]"))
    _typed(errors.InvalidArgument, INVALID, rig,
           lambda: c0.push_dense({"w": np.full((4, 3), np.inf, np.float32)}, step=1),
           ("PushDense", "'w'", "NaN or Inf"))
    _typed(errors.InvalidArgument, INVALID, rig,
           lambda: c0.push_dense({"w": f32(3, 4)}, step=1),
           ("PushDense", "variable 'w' has shape [4, 3], got gradients of shape [3, 4]"))
    wrong_dim = _client_with(rig, tables=(TableSpec("emb", dim=4),))
    _typed(errors.InvalidArgument, INVALID, rig,
           lambda: wrong_dim.push("emb", FRESH, f32(2, 4), step=1),
           ("Push: table 'emb' has dim 8, got gradients of dim 4",))
    stale = _client_with(rig, tables=(*rig.config.tables, TableSpec("clicks", dim=8)),
                         dense=(*rig.config.dense, DenseSpec("extra", shape=(2,))))
    _typed(errors.NotFound, NOT_FOUND, rig, lambda: stale.pull("clicks", FRESH),
           ("Pull 'clicks'", "unknown table 'clicks'"))
    _typed(errors.NotFound, NOT_FOUND, rig, lambda: stale.push("clicks", FRESH, f32(2, 8), step=1),
           ("Push 'clicks'", "unknown table 'clicks'"))
    _typed(errors.NotFound, NOT_FOUND, rig, lambda: stale.pull_dense(["extra"]),
           ("PullDense", "unknown dense variable 'extra'"))
    _typed(errors.NotFound, NOT_FOUND, rig, lambda: stale.push_dense({"extra": f32(2)}, step=1),
           ("PushDense", "unknown dense variable 'extra'"))
    _typed(errors.FailedPrecondition, PRECONDITION, rig,
           lambda: c0.push("emb", FRESH, f32(2, 8), step=0),
           ("Push 'emb'", "step 0 of 'emb' is already applied"))
    c0.push("emb", GOOD[:1], f32(1, 8), step=1)
    _typed(errors.FailedPrecondition, PRECONDITION, rig,
           lambda: c0.push("emb", FRESH, f32(2, 8), step=1),
           ("Push 'emb'", "trainer 0 already pushed step 1 of 'emb'"))
    outsider = _client_with(rig, trainer_id=2)
    _typed(errors.InvalidArgument, INVALID, rig,
           lambda: outsider.push("emb", FRESH, f32(2, 8), step=1),
           ("Push 'emb'", "trainer_id 2 is out of range 0..1"))
    _typed(errors.InvalidArgument, INVALID, rig, lambda: outsider.pull("emb", FRESH, step=1),
           ("Pull 'emb'", "trainer_id 2 is out of range 0..1"))
    rig.still_serves()


def test_client_wrong_owner_is_named_by_the_pserver(rig_factory: Any) -> None:
    """A client that believes in one pserver sends every id to pserver 0 of a 2-pserver job."""
    rig = rig_factory(pservers=2)
    one = _client_with(rig, pservers=rig.config.pservers[:1])
    ids = np.array([FRESH[0], OWN1[0]], dtype=np.uint64)
    _typed(errors.InvalidArgument, INVALID, rig, lambda: one.pull("emb", ids),
           ("Pull 'emb'", f"id {OWN1[0]} belongs to pserver 1", "not to pserver 0"))
    _typed(errors.InvalidArgument, INVALID, rig, lambda: one.push("emb", ids, f32(2, 8), step=1),
           ("Push 'emb'", f"id {OWN1[0]} belongs to pserver 1"))
    rig.still_serves()
