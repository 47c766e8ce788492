"""The client trainers use: pull and push rows and dense variables across all pservers.

`pull` dedups ids, splits them by owning pserver, calls every pserver in
parallel (gRPC futures), and scatters the answers back into request order.
Every call has a deadline; a failed call raises the typed error of
`pserver.errors` carrying the server's message and naming the pserver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import grpc
import numpy as np

from pserver.config import JobConfig
from pserver.errors import InvalidArgument, NotFound, PsrtError, Unavailable
from pserver.rpc import malloc
from pserver.rpc.api import checked_grads
from pserver.rpc.handlers import from_rpc_error, stubs
from pserver.rpc.security import open_channel, why_unreachable
from pserver.tables.dedup import Groups, dedup, group, sum_duplicates
from pserver.tables.sharding import owner
from pserver.wire import codec
from pserver.wire import psrt_pb2 as pb
from pserver.wire.methods import GENERATION_KEY, PS_METHODS
from pserver.wire.tensor import decode_tensor, encode_tensor

log = logging.getLogger(__name__)


class PSClient:
    """Talks to every pserver of a job on behalf of trainer `trainer_id` (a
    `pserver.rpc.api.Client`)."""

    def __init__(self, config: JobConfig, trainer_id: int = 0,
                 addresses: Iterable[str] | None = None) -> None:
        malloc.tune()  # reuse message-sized buffers instead of page-faulting them anew
        self.config = config
        self.trainer_id = trainer_id
        self.addresses = list(addresses or config.pservers)
        self.deadline = config.rpc.deadline_s
        self.generation = 0  # 0: calls carry none (no coordinator)
        self._metadata: tuple | None = None
        self.fenced: PsrtError | None = None  # set by the heartbeat: the next call raises it
        self._dims = {t.name: t.dim for t in config.tables}
        self._dense = {d.name: config.dense_owner(d.name) for d in config.dense}  # -> pserver
        self._channels = [open_channel(a, config.rpc) for a in self.addresses]
        # Pull, Push and their batches go as raw bytes (pserver.wire.codec); the rest as
        # protobuf messages
        self._stubs = [stubs(ch, PS_METHODS) for ch in self._channels]

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait (gRPC reconnects with backoff) until every pserver answers."""
        timeout = self.config.rpc.connect_timeout_s if timeout is None else timeout
        for p, ch in enumerate(self._channels):
            try:
                grpc.channel_ready_future(ch).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise Unavailable(f"pserver[{p}] at {self.addresses[p]} did not answer within "
                                  f"{timeout:.0f}s (rpc.connect_timeout_s)"
                                  f"{why_unreachable(ch, self.config.rpc)}") from None

    def set_generation(self, generation: int) -> None:
        """Every call from now on belongs to `generation` (pservers refuse other ones)."""
        self.generation = generation
        self._metadata = ((GENERATION_KEY, str(generation)),) if generation else None
        self.fenced = None

    def fence(self, error: PsrtError) -> None:
        """The job rolled back (FailedPrecondition) or failed (JobFailed): the next call
        raises `error`."""
        self.fenced = error

    def _call(self, p: int, method: str, request: object,
              deadline: float | None = None) -> grpc.Future:
        if self.fenced is not None:
            raise type(self.fenced)(f"{method}: {self.fenced}")
        return self._stubs[p][method].future(request, timeout=deadline or self.deadline,
                                             metadata=self._metadata)

    def _result(self, fut: grpc.Future, p: int, what: str) -> object:
        try:
            return fut.result()
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"{what} on pserver[{p}] at {self.addresses[p]}") from None

    def _split(self, ids: np.ndarray) -> list[np.ndarray]:
        """Positions in `ids` owned by each pserver."""
        n = len(self.addresses)
        if n == 1:
            return [np.arange(len(ids))]
        owners = owner(ids, n, self.config.virtual_shards)
        order = np.argsort(owners, kind="stable")
        bounds = np.searchsorted(owners[order], np.arange(n + 1))
        return [order[bounds[p]:bounds[p + 1]] for p in range(n)]

    def dim(self, table: str) -> int:
        if table not in self._dims:
            raise NotFound(f"unknown table {table!r} (tables: {', '.join(self._dims)})")
        return self._dims[table]

    def pull(self, table: str, ids: np.ndarray, step: int = 0, unique: bool = False) -> np.ndarray:
        """Rows of `ids` (float32, (len(ids), dim)) in request order; duplicates allowed.

        `unique=True` promises the ids are distinct, skipping the dedup. In sync mode
        `step` > 0 waits until every step before it is applied.
        """
        ids = np.asarray(ids, dtype=np.uint64).ravel()
        dim = self.dim(table)
        uniq, inverse = (ids, None) if unique else dedup(ids)
        parts = self._split(uniq)
        futs = [(p, pos, self._call(p, "Pull", codec.encode_pull_request(
                    table, uniq[pos], self.trainer_id, step)))
                for p, pos in enumerate(parts) if len(pos) or len(parts) == 1]
        if len(futs) == 1:
            p, _, fut = futs[0]
            out = self._rows(self._result(fut, p, f"Pull {table!r}"), len(uniq), dim, p)
            return np.take(out, inverse, axis=0) if inverse is not None else out.copy()
        out = np.empty((len(uniq), dim), dtype=np.float32)
        for p, pos, fut in futs:
            out[pos] = self._rows(self._result(fut, p, f"Pull {table!r}"), len(pos), dim, p)
        return out if inverse is None else np.take(out, inverse, axis=0)

    def _rows(self, raw: bytes, n: int, dim: int, p: int) -> np.ndarray:
        try:
            view = codec.decode_pull_response(raw)
        except codec.DecodeError as e:
            raise InvalidArgument(f"Pull: pserver[{p}] answered bytes that do not parse: {e}") \
                from None
        rows = view.array(raw, f"Pull answer from pserver[{p}]")
        if rows.shape != (n, dim):
            raise InvalidArgument(f"Pull: pserver[{p}] answered shape {list(rows.shape)}, "
                                  f"expected {[n, dim]}")
        return rows

    def push(self, table: str, ids: np.ndarray, grads: np.ndarray, step: int = 0) -> int:
        """Push gradients of rows; duplicate ids are summed here, left to right.

        In sync mode every pserver gets a push (possibly empty) for the step.
        """
        ids = np.asarray(ids, dtype=np.uint64).ravel()
        grads = self._checked_grads(table, len(ids), grads)
        uniq, summed = sum_duplicates(ids, grads)
        sync = self.config.mode == "sync"
        parts = self._split(uniq)
        futs = [(p, self._call(p, "Push", codec.encode_push_request(
                    table, uniq[pos] if len(parts) > 1 else uniq,
                    summed[pos] if len(parts) > 1 else summed, self.trainer_id, step)))
                for p, pos in enumerate(parts) if len(pos) or sync]
        return min((self._applied(self._result(f, p, f"Push {table!r}")) for p, f in futs),
                   default=0)

    def _checked_grads(self, table: str, n: int, grads: np.ndarray) -> np.ndarray:
        return checked_grads(table, self.dim(table), n, grads)

    @staticmethod
    def _applied(raw: bytes) -> int:
        return int(codec.scan(raw).get(1, [0])[-1])

    def _dense_by_pserver(self, names: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for n in names:
            if n not in self._dense:
                raise NotFound(f"unknown dense variable {n!r} (dense: {', '.join(self._dense)})")
            groups.setdefault(self._dense[n], []).append(n)
        return groups

    def pull_dense(self, names: Iterable[str] | None = None, step: int = 0,
                   deadline: float | None = None) -> dict[str, np.ndarray]:
        """Values of dense variables (default: all), from the pservers that hold them;
        `deadline` in seconds (default: rpc.deadline_s)."""
        groups = self._dense_by_pserver(self._dense if names is None else names)
        futs = [(p, ns, self._call(p, "PullDense", pb.DensePullRequest(
                    names=ns, trainer_id=self.trainer_id, step=step), deadline))
                for p, ns in groups.items()]
        out = {}
        for p, ns, fut in futs:
            resp = self._result(fut, p, "PullDense")
            for n, t in zip(ns, resp.values, strict=True):
                out[n] = decode_tensor(t, f"PullDense answer for {n!r}").copy()
        return out

    def push_dense(self, grads: Mapping[str, np.ndarray], step: int = 0) -> int:
        """Push gradients of dense variables to the pservers that hold them."""
        groups = self._dense_by_pserver(grads)
        futs = [(p, self._call(p, "PushDense", pb.DensePushRequest(
                    names=ns, grads=[encode_tensor(grads[n]) for n in ns],
                    trainer_id=self.trainer_id, step=step)))
                for p, ns in groups.items()]
        return min((self._result(f, p, "PushDense").applied_steps for p, f in futs), default=0)

    def plan(self, ids: Mapping[str, np.ndarray]) -> dict[str, tuple[Groups, list]]:
        """Dedup and split the ids of one step, once, for `pull_all` and `push_many`."""
        out = {}
        for t, x in ids.items():
            self.dim(t)
            g = group(np.asarray(x, dtype=np.uint64).ravel())
            out[t] = (g, self._split(g.uniq))
        return out

    def pull_all(self, plan: Mapping[str, tuple[Groups, list]],
                 step: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Rows (in request order) of the planned tables and every dense variable: one
        PullBatch per pserver."""
        dense = self._dense_by_pserver(self._dense)
        futs = []
        for p in range(len(self.addresses)):
            tables = [(t, g.uniq[parts[p]]) for t, (g, parts) in plan.items() if len(parts[p])]
            names = dense.get(p, [])
            if tables or names:
                req = codec.encode_pull_batch_request(tables, names, self.trainer_id, step)
                futs.append((p, tables, names, self._call(p, "PullBatch", req)))
        rows = {t: np.empty((len(g.uniq), self.dim(t)), dtype=np.float32)
                for t, (g, _) in plan.items()}
        values = {}
        for p, tables, names, fut in futs:
            raw = self._result(fut, p, "PullBatch")
            got, dense_views = codec.decode_pull_batch_response(raw)
            for (t, sub), view in zip(tables, got, strict=True):
                arr = view.array(raw, f"PullBatch answer for {t!r}")
                if arr.shape != (len(sub), self.dim(t)):
                    raise InvalidArgument(f"PullBatch: pserver[{p}] answered shape "
                                          f"{list(arr.shape)} for {t!r}")
                rows[t][plan[t][1][p]] = arr
            for n, view in zip(names, dense_views, strict=True):
                values[n] = view.array(raw, f"PullBatch answer for {n!r}").copy()
        return {t: g.gather(rows[t]) for t, (g, _) in plan.items()}, values

    def push_many(self, plan: Mapping[str, tuple[Groups, list]],
                  grads: Mapping[str, np.ndarray], dense: Mapping[str, np.ndarray] | None = None,
                  step: int = 0) -> int:
        """Gradients of the planned tables (rows in request order; duplicates are summed
        here, left to right) and of dense variables: one PushBatch per pserver (in sync
        mode every pserver gets one, possibly empty)."""
        return self.start_push_many(plan, grads, dense, step)()

    def start_push_many(self, plan: Mapping[str, tuple[Groups, list]],
                        grads: Mapping[str, np.ndarray],
                        dense: Mapping[str, np.ndarray] | None = None,
                        step: int = 0) -> Callable[[], int]:
        """`push_many` without waiting: returns a function that waits for the answers
        (and raises the first error). A trainer can prepare its next batch meanwhile."""
        sync = self.config.mode == "sync"
        summed = {}
        for t, (g, parts) in plan.items():
            n = len(g.uniq) if g.inverse is None else len(g.inverse)
            summed[t] = (g.uniq, g.sum(self._checked_grads(t, n, grads[t])), parts)
        by_pserver = self._dense_by_pserver(dense or {})
        futs = []
        for p in range(len(self.addresses)):
            tables = [(t, uniq[parts[p]], total[parts[p]]) for t, (uniq, total, parts)
                      in summed.items() if len(parts[p]) or sync]
            names = [(n, dense[n]) for n in by_pserver.get(p, [])]
            if tables or names:
                req = codec.encode_push_batch_request(tables, names, self.trainer_id, step)
                futs.append((p, self._call(p, "PushBatch", req)))
        return lambda: min((self._applied(self._result(f, p, "PushBatch")) for p, f in futs),
                           default=0)

    def info(self, pserver_id: int) -> pb.InfoResponse:
        fut = self._call(pserver_id, "Info", pb.InfoRequest())
        return self._result(fut, pserver_id, "Info")
