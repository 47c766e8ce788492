"""Integration: sync mode is bit-for-bit reproducible, waits for every trainer, and times out
naming the trainer it waits for; async mode applies each push on arrival.

Trainers are threads, one `PSClient` each, against real in-process pservers. The oracle is
an in-process replay with `SparseTable` / `DenseVariable`: every step applies the sum of
the trainers' gradients in trainer-id order (each trainer's duplicate ids summed first, in
the order they appear, as the client sends them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from pserver import errors
from pserver.config import JobConfig
from pserver.tables.dense import DenseVariable
from pserver.tables.sharding import owner
from pserver.tables.sparse import SparseTable
from pserver.wire import psrt_pb2 as pb
from pserver.wire.methods import PARAMETER_SERVER as SERVICE
from pserver.wire.tensor import encode_ids, encode_tensor
from tests.helpers import Cluster, job

SEED = 20240611
DIM = 8
# a pool of ids over the whole uint64 range, small ones too; trainers' draws overlap
POOL = np.concatenate([
    np.array([0, 1, 2, 3, 7, 2**63, 2**64 - 1], dtype=np.uint64),
    np.random.default_rng([SEED, 99]).integers(0, 2**64, size=33, dtype=np.uint64),
])
IDS_PER_STEP = 12


# ---- one trainer's step, shared by the threads and the in-process replay ------------


def step_rng(seed: int, trainer: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, trainer, step])


def draw_ids(rng: np.random.Generator) -> np.ndarray:
    """Distinct within a push (repeats inside one push have their own test); trainers overlap."""
    return rng.choice(POOL, size=IDS_PER_STEP, replace=False)


def gradients(rng: np.random.Generator, rows: np.ndarray,
              dense: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pseudo-gradients that depend on what was pulled, so a stale pull changes the result."""
    g_rows = (0.5 * rows + rng.standard_normal(rows.shape)).astype(np.float32)
    g_dense = {n: (0.5 * dense[n] + rng.standard_normal(dense[n].shape)).astype(np.float32)
               for n in sorted(dense)}
    return g_rows, g_dense


def sum_in_trainer_order(pushes: list[tuple[np.ndarray, np.ndarray]]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per id: each trainer's duplicates summed in appearance order, then trainers in id order."""
    total: dict[int, np.ndarray] = {}
    for ids, grads in pushes:
        mine: dict[int, np.ndarray] = {}
        for i, g in zip(ids.tolist(), grads, strict=True):
            mine[i] = mine[i] + g if i in mine else g.copy()
        for i, g in mine.items():
            total[i] = total[i] + g if i in total else g
    ids = np.array(list(total), dtype=np.uint64)
    return ids, np.stack([total[i] for i in total]).astype(np.float32)


def replay(config: JobConfig, steps: int, seed: int = SEED) -> tuple[dict, dict, dict]:
    """The reference run in process: (sparse export, dense arrays, what each trainer pulled)."""
    table = SparseTable(config.table("emb"))
    dense = {d.name: DenseVariable(d) for d in config.dense}
    pulled: dict[tuple[int, int], Any] = {}
    for s in range(steps):
        sparse_pushes, dense_pushes = [], []
        for j in range(config.num_trainers):
            rng = step_rng(seed, j, s)
            ids = draw_ids(rng)
            rows = table.pull(ids)
            values = {n: v.pull() for n, v in dense.items()}
            g_rows, g_dense = gradients(rng, rows, values)
            pulled[j, s] = (rows, values)
            sparse_pushes.append((ids, g_rows))
            dense_pushes.append(g_dense)
        table.push(*sum_in_trainer_order(sparse_pushes))
        for n, v in dense.items():
            total = dense_pushes[0][n].copy()
            for g in dense_pushes[1:]:
                total += g[n]
            v.push(total)
    dense_arrays = {n: {"value": v.value.copy(), **{k: a.copy() for k, a in v.state.items()}}
                    for n, v in dense.items()}
    return by_id(table.export()), dense_arrays, pulled


# ---- the threaded run against real pservers ------------------------------------------


def train(cluster: Cluster, steps: int, timing_seed: int | None,
          seed: int = SEED) -> dict[tuple[int, int], Any]:
    """T trainer threads, each pull -> gradients -> push at step s; returns what they pulled."""
    config = cluster.config
    clients = [cluster.client(j) for j in range(config.num_trainers)]
    pulled: dict[tuple[int, int], Any] = {}
    failures: list[BaseException] = []

    def trainer(j: int) -> None:
        c = clients[j]
        timing = np.random.default_rng([timing_seed or 0, j])

        def pause() -> None:  # jitter only: the pservers do all the synchronising
            if timing_seed is not None:
                time.sleep(float(timing.uniform(0.0, 0.004)))

        try:
            for s in range(steps):
                rng = step_rng(seed, j, s)
                ids = draw_ids(rng)
                pause()
                rows = c.pull("emb", ids, step=s)
                values = c.pull_dense(step=s)
                g_rows, g_dense = gradients(rng, rows, values)
                pulled[j, s] = (rows, values)
                pause()
                c.push("emb", ids, g_rows, step=s)
                pause()
                c.push_dense(g_dense, step=s)
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=trainer, args=(j,), name=f"trainer[{j}]")
               for j in range(config.num_trainers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a trainer thread hung"
    if failures:
        raise failures[0]
    return pulled


def by_id(export: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(export["ids"], kind="stable")
    return {k: a[order] for k, a in export.items()}


def served_state(cluster: Cluster) -> tuple[dict, dict]:
    """Every pserver's rows merged and sorted by id; dense arrays from their owners."""
    config = cluster.config
    parts = []
    for server in cluster.servers:
        shard = server.shard
        export = shard.tables["emb"].export()
        owners = owner(export["ids"], config.num_pservers, config.virtual_shards)
        assert (owners == shard.pserver_id).all(), "a pserver holds rows it does not own"
        parts.append(export)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert len(np.unique(merged["ids"])) == len(merged["ids"]), "a row lives on two pservers"
    dense = {}
    for server in cluster.servers:
        for n, v in server.shard.dense.items():
            dense[n] = {"value": v.value.copy(), **{k: a.copy() for k, a in v.state.items()}}
    return by_id(merged), dense


def assert_bits_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bits_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bits_equal(x, y, f"{where}[{i}]")
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b) and a.tobytes() == b.tobytes(), f"{where} differs"


# ---- reproducibility -----------------------------------------------------------------

STEPS = 6


@pytest.mark.parametrize("pservers", [1, 2])
def test_sync_run_equals_in_process_replay(pservers: int,
                                           cluster_factory: Callable[..., Cluster]) -> None:
    config = job(pservers, "sync", 3, rpc={"deadline_s": 20.0})
    cluster = cluster_factory(config)
    pulled = train(cluster, STEPS, timing_seed=None)
    sparse, dense = served_state(cluster)
    ref_sparse, ref_dense, ref_pulled = replay(config, STEPS)
    assert len(sparse["ids"]) > 20  # the run touched rows on every pserver
    assert all(len(s.shard.tables["emb"]) for s in cluster.servers)
    assert_bits_equal(sparse, ref_sparse, "emb")
    assert_bits_equal(dense, ref_dense, "dense")
    assert_bits_equal(pulled, ref_pulled, "pulled")  # every pull saw exactly s steps
    for server in cluster.servers:
        assert all(g.applied == STEPS and not g.pending for g in server.shard.gates.values()
                   if g.name == "emb" or g.name in server.shard.dense)


def test_sync_runs_with_different_timings_end_bit_identical(
        cluster_factory: Callable[..., Cluster]) -> None:
    config = job(2, "sync", 3, rpc={"deadline_s": 20.0})
    results = []
    for timing_seed in (1, 2):
        cluster = cluster_factory(config)
        pulled = train(cluster, STEPS, timing_seed=timing_seed)
        results.append((served_state(cluster), pulled))
    (state_a, pulled_a), (state_b, pulled_b) = results
    assert_bits_equal(state_a, state_b, "final state")
    assert_bits_equal(pulled_a, pulled_b, "pulled")
    ref_sparse, ref_dense, _ = replay(config, STEPS)
    assert_bits_equal(state_a, (ref_sparse, ref_dense), "vs replay")


def test_different_seeds_give_different_runs(cluster_factory: Callable[..., Cluster]) -> None:
    """The oracle has teeth: the replay of another seed does not match."""
    config = job(1, "sync", 2)
    cluster = cluster_factory(config)
    train(cluster, 2, timing_seed=None)
    sparse, _ = served_state(cluster)
    other, _, _ = replay(config, 2, seed=SEED + 1)
    same_ids = sparse["ids"].shape == other["ids"].shape and (sparse["ids"] == other["ids"]).all()
    assert not same_ids or not np.array_equal(sparse["values"], other["values"])


# ---- waiting for the slow trainer ------------------------------------------------------


def test_pull_for_step_s_waits_until_every_trainer_pushed_s_minus_1(
        cluster_factory: Callable[..., Cluster]) -> None:
    config = job(1, "sync", 2, rpc={"deadline_s": 20.0})
    cluster = cluster_factory(config)
    fast, slow = cluster.client(0), cluster.client(1)
    shard = cluster.servers[0].shard
    ids = np.array([3, 1, 4, 1, 5], dtype=np.uint64)
    uniq = np.array([3, 1, 4, 5], dtype=np.uint64)
    rng = np.random.default_rng([SEED, 7])
    g_fast, g_slow = (rng.standard_normal((len(ids), DIM)).astype(np.float32) for _ in "ab")
    d_fast, d_slow = ({"w": rng.standard_normal((4, 3)).astype(np.float32),
                       "b": rng.standard_normal(3).astype(np.float32)} for _ in "ab")
    before = fast.pull("emb", ids, step=0)
    np.testing.assert_array_equal(slow.pull("emb", ids, step=0), before)
    assert fast.push("emb", ids, g_fast, step=0) == 0  # waits for trainer 1: not applied
    assert fast.push_dense(d_fast, step=0) == 0

    sparse_done, dense_done = threading.Event(), threading.Event()
    got: dict[str, Any] = {}

    def pull_next_step() -> None:
        try:
            got["rows"] = fast.pull("emb", ids, step=1)
            sparse_done.set()
            got["dense"] = fast.pull_dense(step=1)
        except BaseException as e:
            got["error"] = e
            sparse_done.set()
        dense_done.set()

    puller = threading.Thread(target=pull_next_step)
    puller.start()
    try:
        # Bounded negative checks: nothing to wait *for* while the pull is (correctly) stuck.
        assert not sparse_done.wait(0.3), f"pull of step 1 returned early: {got}"
        assert shard.gates["emb"].applied == 0 and set(shard.gates["emb"].pending) == {0}
        assert slow.push("emb", ids, g_slow, step=0) == 1  # the last push applies step 0
        assert sparse_done.wait(10), "pull of step 1 still waits after every trainer pushed"
        assert "error" not in got, got.get("error")
        assert not dense_done.wait(0.2), "pull_dense of step 1 returned before trainer 1 pushed"
        assert slow.push_dense(d_slow, step=0) == 1
        assert dense_done.wait(10) and "error" not in got, got.get("error")
    finally:
        puller.join(timeout=30)

    ref = SparseTable(config.table("emb"))
    ref.pull(ids)
    ref.push(*sum_in_trainer_order([(ids, g_fast), (ids, g_slow)]))
    assert_bits_equal(got["rows"], ref.pull(ids), "rows after step 0")
    assert not np.array_equal(got["rows"], before)
    for spec in config.dense:
        var = DenseVariable(spec)
        var.push(d_fast[spec.name] + d_slow[spec.name])
        assert_bits_equal(got["dense"][spec.name], var.value, spec.name)
    assert_bits_equal(by_id(shard.tables["emb"].export())["ids"], np.sort(uniq), "row ids")


def test_pull_past_its_deadline_names_the_missing_trainer(
        cluster_factory: Callable[..., Cluster]) -> None:
    config = job(1, "sync", 3, rpc={"deadline_s": 1.0})
    cluster = cluster_factory(config)
    c0, c1, c2 = (cluster.client(j) for j in range(3))
    shard = cluster.servers[0].shard
    addr = cluster.config.pservers[0]
    seen = np.array([10, 11], dtype=np.uint64)
    fresh = np.array([12], dtype=np.uint64)
    for c in (c0, c2):
        c.push("emb", seen, np.ones((2, DIM), np.float32), step=0)
        c.push_dense({"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, step=0)
    rows_before = len(shard.tables["emb"])

    t0 = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as info:
        c0.pull("emb", np.concatenate([seen, fresh]), step=1)
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    for needle in (f"pserver[0] at {addr}", "Pull", "step 0 of 'emb'", "trainers [1]"):
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert len(shard.tables["emb"]) == rows_before  # the failed pull created no row

    with pytest.raises(errors.DeadlineExceeded) as info:
        c2.pull_dense(["b"], step=1)
    msg = str(info.value)
    for needle in ("PullDense", "step 0 of 'b'", "trainers [1]"):
        assert needle in msg, f"{needle!r} not in {msg!r}"

    # the raw status, straight from the pserver (not the client's own timer)
    with grpc.insecure_channel(addr) as ch:
        call = ch.unary_unary(f"/{SERVICE}/Pull")
        request = pb.PullRequest(table="emb", ids=encode_ids(seen), trainer_id=2, step=1)
        with pytest.raises(grpc.RpcError) as raw:
            call(request.SerializeToString(), timeout=1.0)
    assert raw.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "trainers [1] have not pushed" in raw.value.details()

    # once the slow trainer pushes, the same pull goes through
    c1.push("emb", seen, np.ones((2, DIM), np.float32), step=0)
    assert c0.pull("emb", np.concatenate([seen, fresh]), step=1).shape == (3, DIM)


# ---- duplicate ids --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_duplicate_ids_in_one_push_are_summed_before_the_update(
        mode: str, cluster_factory: Callable[..., Cluster]) -> None:
    """Each repeated id appears twice, so the expected sum does not depend on the order of
    addition (float addition commutes); pushing the occurrences one by one differs."""
    same = {"dim": DIM, "seed": 7, "optimizer": "adagrad", "learning_rate": 0.5}
    tables = {n: dict(same) for n in ("raw_dups", "presummed", "client_dups", "one_by_one")}
    cluster = cluster_factory(job(1, mode, 1, tables=tables))
    client = cluster.client(0)
    shard = cluster.servers[0].shard
    ids = np.array([5, 9, 5, 2**64 - 1, 9, 12], dtype=np.uint64)
    g = np.random.default_rng([SEED, 3]).standard_normal((len(ids), DIM)).astype(np.float32)
    pre_ids = np.array([5, 9, 2**64 - 1, 12], dtype=np.uint64)
    pre = np.stack([g[0] + g[2], g[1] + g[4], g[3], g[5]])

    with grpc.insecure_channel(cluster.config.pservers[0]) as ch:
        push = ch.unary_unary(f"/{SERVICE}/Push")
        for table, i, t in (("raw_dups", ids, g), ("presummed", pre_ids, pre)):
            req = pb.PushRequest(table=table, ids=encode_ids(i), grads=encode_tensor(t), step=0)
            push(req.SerializeToString(), timeout=10)
    client.push("client_dups", ids, g, step=0)
    for s, k in enumerate([0, 2]):  # what a server that did not sum first would do
        client.push("one_by_one", ids[k:k + 1], g[k:k + 1], step=s)

    presummed = by_id(shard.tables["presummed"].export())
    assert_bits_equal(by_id(shard.tables["raw_dups"].export()), presummed, "raw_dups")
    assert_bits_equal(by_id(shard.tables["client_dups"].export()), presummed, "client_dups")
    row5 = shard.tables["one_by_one"].pull(np.array([5], dtype=np.uint64))
    assert not np.array_equal(row5, shard.tables["presummed"].pull(pre_ids[:1]))


def test_sync_sums_trainers_left_to_right_in_trainer_id_order(
        cluster_factory: Callable[..., Cluster]) -> None:
    """Four trainers push the same id; the step applies ((g0 + g1) + g2) + g3, bit for bit."""
    config = job(1, "sync", 4, tables={"emb": {"dim": 64, "optimizer": "sgd",
                                                "learning_rate": 1.0}})
    cluster = cluster_factory(config)
    clients = [cluster.client(j) for j in range(4)]
    ids = np.array([42, 7], dtype=np.uint64)
    rng = np.random.default_rng([SEED, 5])
    # magnitudes far apart, so that another order of addition rounds differently
    grads = [(rng.standard_normal((2, 64)) * 10.0 ** (3 * j % 7)).astype(np.float32)
             for j in range(4)]
    before = clients[0].pull("emb", ids)
    for j in (2, 0, 3, 1):  # arrival order must not matter
        clients[j].push("emb", ids, grads[j], step=0)
    total = ((grads[0] + grads[1]) + grads[2]) + grads[3]
    other = grads[0] + (grads[1] + (grads[2] + grads[3]))
    assert not np.array_equal(total, other)  # the data tells the orders apart
    assert_bits_equal(clients[0].pull("emb", ids, step=1), before - total, "rows")


# ---- async ----------------------------------------------------------------------------


def test_async_applies_each_push_on_arrival(cluster_factory: Callable[..., Cluster]) -> None:
    config = job(2, "async", 2)
    cluster = cluster_factory(config)
    c0, c1 = cluster.client(0), cluster.client(1)
    ids = POOL[:10]
    assert len(set(owner(ids, 2, config.virtual_shards).tolist())) == 2  # both pservers
    rng = np.random.default_rng([SEED, 11])
    ref = SparseTable(config.table("emb"))
    ref_dense = {d.name: DenseVariable(d) for d in config.dense}
    np.testing.assert_array_equal(c0.pull("emb", ids), ref.pull(ids))
    for k, (pusher, reader) in enumerate([(c0, c1), (c1, c0), (c0, c0)]):
        g = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        gd = {"w": rng.standard_normal((4, 3)).astype(np.float32),
              "b": rng.standard_normal(3).astype(np.float32)}
        # no other trainer pushes this step, and steps mean nothing here: applied at once
        assert pusher.push("emb", ids, g, step=7 * k) == 0
        assert pusher.push_dense(gd, step=7 * k) == 0
        ref.push(ids, g)
        for n, v in ref_dense.items():
            v.push(gd[n])
        assert_bits_equal(reader.pull("emb", ids, step=0), ref.pull(ids), f"rows after push {k}")
        dense = reader.pull_dense()
        for n, v in ref_dense.items():
            assert_bits_equal(dense[n], v.value, f"{n} after push {k}")
    for server in cluster.servers:
        assert all(g.applied == 0 and not g.pending for g in server.shard.gates.values())
