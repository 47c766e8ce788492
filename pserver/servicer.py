"""The gRPC face of a `Shard`: parse bytes, call the shard, map errors to statuses.

Requests arrive as raw bytes (no deserializer is registered) so that bytes
that do not parse as the request get INVALID_ARGUMENT with a message instead
of gRPC's generic failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pserver import codec, persist
from pserver import psrt_pb2 as pb
from pserver.errors import (
    FailedPrecondition,
    InvalidArgument,
    PsrtError,
    ResourceExhausted,
    Unavailable,
    status_of,
)
from pserver.metrics import NULL, NullServerMetrics, ServerMetrics
from pserver.shard import Shard
from pserver.wire import ROW_DTYPE, decode_tensor, encode_tensor

SERVICE = "psrt.v1.ParameterServer"
GENERATION_KEY = "psrt-generation"  # call metadata: the generation a trainer's call belongs to
_DATA = ("Pull", "Push", "PullDense", "PushDense", "PullBatch", "PushBatch")
log = logging.getLogger(__name__)


def remaining(context: grpc.ServicerContext, default: float) -> float:
    """Time left before the caller's deadline, less a margin so the answer arrives in time."""
    left = context.time_remaining()
    return default if left is None else max(0.0, left - 0.1)


class Servicer:
    def __init__(self, shard: Shard, role: str,
                 metrics: ServerMetrics | NullServerMetrics = NULL) -> None:
        self.shard = shard
        self.role = role
        self.metrics = metrics
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
        if req.background:
            persist.save_shard_background(self.shard, storage, req.serial,
                                          self._reporter(req.serial), base)
            return pb.SaveShardResponse(part="")
        part = persist.save_shard(self.shard, storage, req.serial, base)
        return pb.SaveShardResponse(part=part.to_json())

    def _reporter(self, serial: int) -> Any:
        """Sends a background save's part to the coordinator when it is written."""
        from pserver.coordinator_rpc import CoordinatorClient

        def report(part: Any, error: str | None) -> None:
            client = CoordinatorClient(self.shard.config)
            try:
                client.report_part(self.shard.pserver_id, serial, part, error)
            except PsrtError:
                log.exception("%s could not report its part of checkpoint_%d", self.role,
                              serial)
            finally:
                client.close()

        return report

    def _wrap(self, name: str, request_type: Any) -> Callable[[bytes, Any], bytes]:
        method = getattr(self, name)
        bulk = name in ("Pull", "Push", "PullBatch", "PushBatch")
        data = name in _DATA

        def handler(raw: bytes, ctx: grpc.ServicerContext) -> bytes:
            try:
                if data:
                    self.check_generation(name, ctx)
                if bulk:
                    return method(raw, ctx)
                return method(request_type.FromString(raw), ctx).SerializeToString()
            except (DecodeError, codec.DecodeError) as e:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{name}: request bytes do not parse as {request_type.__name__}: {e}")
            except PsrtError as e:
                log.debug("%s %s rejected: %s", self.role, name, e)
                ctx.abort(status_of(e), str(e))
            except Exception as e:  # a bug: never leak it as UNKNOWN
                log.exception("%s %s failed", self.role, name)
                ctx.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error: {e!r}")

        return self.metrics.timed(name, handler)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Pull": pb.PullRequest, "Push": pb.PushRequest, "PullDense": pb.DensePullRequest,
            "PushDense": pb.DensePushRequest, "Info": pb.InfoRequest,
            "PullBatch": pb.PullBatchRequest, "PushBatch": pb.PushBatchRequest,
            "SaveShard": pb.SaveShardRequest,
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._wrap(name, req_type))
            for name, req_type in methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)
