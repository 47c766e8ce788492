"""The parameter-server service: the gRPC face of a `Shard`, thin.

Each method parses its request (bulk ones with `pserver.wire.codec`), calls
the shard and encodes the answer; handlers, the error policy and the method
table are `pserver.rpc.handlers` and `pserver.wire.methods`, shared with the
coordinator's service.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from ckpt.manifest import Part
from pserver.errors import (
    FailedPrecondition,
    InvalidArgument,
    MissingBase,
    PsrtError,
    ResourceExhausted,
    Unavailable,
)
from pserver.metrics.hooks import NULL
from pserver.rpc.coord import CoordinatorClient
from pserver.rpc.handlers import generic_handler, remaining
from pserver.tables import persist
from pserver.tables.shard import Shard
from pserver.wire import codec
from pserver.wire import psrt_pb2 as pb
from pserver.wire.methods import GENERATION_KEY, PARAMETER_SERVER, PS_METHODS
from pserver.wire.tensor import ROW_DTYPE, decode_tensor, encode_tensor

log = logging.getLogger(__name__)


class Servicer:
    def __init__(self, shard: Shard, role: str, metrics: Any = NULL) -> None:
        self.shard = shard
        self.role = role
        self.metrics: Any = metrics  # a ServerMetrics, or NullServerMetrics (off)
        self.default_wait = shard.config.rpc.deadline_s
        # the generation served: 0 with no coordinator (nothing fenced), None while recovering
        self.generation: int | None = 0

    def check_generation(self, name: str, ctx: grpc.ServicerContext) -> None:
        """Fence off data calls from before a rollback, and any while this pserver restores."""
        gen = self.generation
        if gen is None:
            raise Unavailable(f"{name}: {self.role} is restoring a checkpoint (the job is "
                              f"recovering); join again")
        if gen == 0:
            return
        for key, value in ctx.invocation_metadata() or ():
            if key == GENERATION_KEY and value != str(gen):
                raise FailedPrecondition(f"{name}: the call belongs to generation {value}, "
                                         f"{self.role} serves generation {gen} (the job rolled "
                                         f"back); join again")

    # Pull and Push carry the bulk of the bytes: `codec` reads and writes them without copies.

    def Pull(self, raw: bytes, ctx: grpc.ServicerContext) -> bytes:
        req = codec.decode_pull_request(raw)
        self._check_answer_size(req.table, len(req.ids))
        rows = self.shard.pull(req.table, req.ids, req.trainer_id, req.step,
                               remaining(ctx, self.default_wait))
        self.metrics.pulled(req.table, rows)
        return codec.encode_pull_response(rows)

    def _check_answer_size(self, table: str, n: int) -> None:
        """Refuse a pull whose answer would be over the size limit before it creates rows."""
        t = self.shard.tables.get(table)
        limit = self.shard.config.rpc.max_message_bytes
        need = n * t.dim * ROW_DTYPE.itemsize + 64 if t is not None else 0  # 64: framing
        if need > limit:
            raise ResourceExhausted(
                f"Pull: the answer for {n} ids of table {table!r} (dim {t.dim}) needs about "
                f"{need} bytes, over rpc.max_message_bytes {limit}; pull fewer ids per call"
            )

    def Push(self, raw: bytes, ctx: grpc.ServicerContext) -> bytes:
        req = codec.decode_push_request(raw)
        grads = req.grads.array(raw, "Push: grads")
        applied = self.shard.push(req.table, req.ids, grads, req.trainer_id, req.step,
                                  remaining(ctx, self.default_wait))
        self.metrics.pushed(req.table, grads)
        return codec.encode_push_response(applied)

    def PullDense(self, req: pb.DensePullRequest, ctx: grpc.ServicerContext) -> Any:
        values = self.shard.pull_dense(list(req.names), req.trainer_id, req.step,
                                       remaining(ctx, self.default_wait))
        self.metrics.dense_pulled(values)
        return pb.DensePullResponse(values=[encode_tensor(v) for v in values])

    def PushDense(self, req: pb.DensePushRequest, ctx: grpc.ServicerContext) -> Any:
        grads = [decode_tensor(t, f"PushDense: grads[{i}]") for i, t in enumerate(req.grads)]
        applied = self.shard.push_dense(list(req.names), grads, req.trainer_id, req.step,
                                        remaining(ctx, self.default_wait))
        self.metrics.dense_pushed(grads)
        return pb.DensePushResponse(applied_steps=applied)

    def Info(self, req: pb.InfoRequest, ctx: grpc.ServicerContext) -> pb.InfoResponse:
        s, cfg = self.shard, self.shard.config
        return pb.InfoResponse(
            pserver_id=s.pserver_id, num_pservers=cfg.num_pservers, mode=cfg.mode,
            num_trainers=cfg.num_trainers, virtual_shards=cfg.virtual_shards,
            tables=[pb.TableInfo(name=n, dim=t.dim, rows=len(t),
                                 optimizer=t.spec.optimizer.kind,
                                 applied_steps=s.gates[n].applied)
                    for n, t in s.tables.items()],
            dense=[pb.DenseInfo(name=n, shape=v.shape, optimizer=v.spec.optimizer.kind,
                                applied_steps=s.gates[n].applied)
                   for n, v in s.dense.items()],
        )

    def PullBatch(self, raw: bytes, ctx: grpc.ServicerContext) -> bytes:
        tables, dense, trainer_id, step = codec.decode_pull_batch(raw)
        for name, ids in tables:
            self._check_answer_size(name, len(ids))
        rows, values = self.shard.pull_batch(tables, dense, trainer_id, step,
                                             remaining(ctx, self.default_wait))
        self.metrics.pulled_batch(tables, rows, values)
        return codec.encode_pull_batch_response(rows, values)

    def PushBatch(self, raw: bytes, ctx: grpc.ServicerContext) -> bytes:
        tables, dense, dense_grads, trainer_id, step = codec.decode_push_batch(raw)
        sparse = [(n, ids, g.array(raw, f"PushBatch: grads of {n!r}")) for n, ids, g in tables]
        grads = [g.array(raw, f"PushBatch: dense_grads[{i}]") for i, g in enumerate(dense_grads)]
        applied = self.shard.push_batch(sparse, dense, grads, trainer_id, step,
                                        remaining(ctx, self.default_wait))
        self.metrics.pushed_batch(sparse, grads)
        return codec.encode_push_response(applied)

    def SaveShard(self, req: pb.SaveShardRequest, ctx: grpc.ServicerContext) -> Any:
        if req.delta and not 0 <= req.base < req.serial:
            raise InvalidArgument(f"SaveShard: a delta's base must be an older serial, 0 <= "
                                  f"base < {req.serial}, got {req.base}")
        ck = self.shard.config.checkpoint
        if ck is None:
            raise FailedPrecondition("SaveShard: the job has no [checkpoint] section")
        storage = ck.storage()
        base = req.base if req.delta else None
        try:
            if req.background:
                persist.save_shard_background(self.shard, storage, req.serial,
                                              self._reporter(req.serial), base)
                return pb.SaveShardResponse(part="")
            part = persist.save_shard(self.shard, storage, req.serial, base)
        except MissingBase as e:  # an answer, not a failure: the next save is full
            return pb.SaveShardResponse(missing_base=str(e))
        return pb.SaveShardResponse(part=part.to_json())

    def _reporter(self, serial: int) -> Any:
        """Sends a background save's part to the coordinator when it is written."""

        def report(part: Part | None, error: str | None) -> None:
            client = CoordinatorClient(self.shard.config)
            try:
                client.report_part(self.shard.pserver_id, serial, part, error)
            except PsrtError:
                log.exception("%s could not report its part of checkpoint_%d", self.role,
                              serial)
            finally:
                client.close()

        return report

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return generic_handler(PARAMETER_SERVER, PS_METHODS, self, self.role,
                               before=self.check_generation, timed=self.metrics.timed)
