"""The coordinator over gRPC: its servicer (thin) and the client pservers and trainers use.

`CoordinatorClient` has the same methods as `Coordinator` (join_pserver, ready,
join_trainer, barrier, commit), so a trainer drives an in-process coordinator
(stand-alone) and a remote one the same way.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ckpt.manifest import Part
from pserver import psrt_pb2 as pb
from pserver.config import JobConfig
from pserver.coordinator import CheckpointFailed, Coordinator
from pserver.errors import (
    FailedPrecondition,
    InvalidArgument,
    PsrtError,
    Unavailable,
    from_rpc_error,
    status_of,
)
from pserver.security import open_channel
from pserver.servicer import remaining as _remaining

log = logging.getLogger(__name__)
SERVICE = "psrt.v1.Coordinator"
_METHODS = {
    "Join": (pb.JoinRequest, pb.JoinResponse),
    "Ready": (pb.ReadyRequest, pb.ReadyResponse),
    "Barrier": (pb.BarrierRequest, pb.BarrierResponse),
    "Commit": (pb.CommitRequest, pb.CommitResponse),
    "ReportPart": (pb.ReportPartRequest, pb.ReportPartResponse),
    "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatResponse),
    "Members": (pb.MembersRequest, pb.MembersResponse),
}


class CoordinatorServicer:
    def __init__(self, coordinator: Coordinator, default_wait: float) -> None:
        self.c = coordinator
        self.wait = default_wait

    def Join(self, req: pb.JoinRequest, ctx: grpc.ServicerContext) -> pb.JoinResponse:
        if req.role == "pserver":
            serial, gen = self.c.join_pserver_at(req.id, req.address, req.incarnation)
        elif req.role == "trainer":
            serial, gen = self.c.join_trainer_at(req.id, _remaining(ctx, self.wait),
                                                 req.incarnation)
        else:
            raise InvalidArgument(f"Join: role must be 'pserver' or 'trainer', got {req.role!r}")
        return pb.JoinResponse(serial=serial, generation=gen)

    def Ready(self, req: pb.ReadyRequest, ctx: grpc.ServicerContext) -> pb.ReadyResponse:
        self.c.ready(req.pserver_id, req.serial, req.generation or None)
        return pb.ReadyResponse()

    def Heartbeat(self, req: pb.HeartbeatRequest, ctx: grpc.ServicerContext) -> Any:
        gen, serial, running = self.c.heartbeat(req.role, req.id, req.incarnation,
                                                req.global_step, req.finished, req.generation)
        return pb.HeartbeatResponse(generation=gen, serial=serial, running=running)

    def Members(self, req: pb.MembersRequest, ctx: grpc.ServicerContext) -> Any:
        return pb.MembersResponse(json=json.dumps(self.c.describe()))

    def Barrier(self, req: pb.BarrierRequest, ctx: grpc.ServicerContext) -> pb.BarrierResponse:
        serial = self.c.barrier(req.trainer_id, req.global_step, req.epoch_id, req.step_id,
                                req.final, _remaining(ctx, self.wait))
        return pb.BarrierResponse(serial=serial)

    def Commit(self, req: pb.CommitRequest, ctx: grpc.ServicerContext) -> pb.CommitResponse:
        part = Part.from_json(req.part) if req.part else None
        error = None if part is not None else "reported no part"
        serial = self.c.commit(req.trainer_id, req.serial, part, error, _remaining(ctx, self.wait))
        return pb.CommitResponse(serial=serial)

    def ReportPart(self, req: pb.ReportPartRequest, ctx: grpc.ServicerContext) -> Any:
        part = Part.from_json(req.part) if req.part else None
        error = req.error or (None if part is not None else "reported no part")
        self.c.report_part(req.pserver_id, req.serial, part, error)
        return pb.ReportPartResponse()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def wrap(name: str, req_type: Any) -> Any:
            method = getattr(self, name)

            def handler(raw: bytes, ctx: grpc.ServicerContext) -> bytes:
                try:
                    return method(req_type.FromString(raw), ctx).SerializeToString()
                except DecodeError as e:
                    ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{name}: request bytes do not parse as {req_type.__name__}: {e}")
                except PsrtError as e:
                    ctx.abort(status_of(e), str(e))
                except (ValueError, KeyError, TypeError) as e:
                    ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {e}")
                except Exception as e:  # a bug or an I/O error: never leak it as UNKNOWN
                    log.exception("coordinator %s failed", name)
                    ctx.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error: {e!r}")

            return grpc.unary_unary_rpc_method_handler(handler)  # raw bytes in and out

        return grpc.method_handlers_generic_handler(
            SERVICE, {name: wrap(name, req) for name, (req, _) in _METHODS.items()})


class CoordinatorClient:
    """Calls the coordinator at `address` (pserver 0); every call has a deadline."""

    def __init__(self, config: JobConfig, address: str | None = None) -> None:
        self.address = address or config.pservers[0]
        self.deadline = config.rpc.deadline_s
        self.long_deadline = config.rpc.checkpoint_timeout_s
        self.connect_timeout = config.rpc.connect_timeout_s
        self.heartbeat_deadline = max(1.0, config.recovery.heartbeat_s * 2)
        self.generation = 0  # learnt from the last Join
        from pserver.server import channel_options

        self._channel = open_channel(self.address, config.rpc, channel_options(config))
        self._stubs = {name: self._channel.unary_unary(
            f"/{SERVICE}/{name}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp.FromString) for name, (_, resp) in _METHODS.items()}

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, req: Any, timeout: float, retry_unavailable: bool = False) -> Any:
        deadline = time.monotonic() + (self.connect_timeout if retry_unavailable else 0)
        delay = 0.05
        while True:
            try:
                return self._stubs[name](req, timeout=timeout, wait_for_ready=retry_unavailable)
            except grpc.RpcError as e:
                err = from_rpc_error(e, f"{name} on the coordinator at {self.address}")
                if isinstance(err, Unavailable) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(1.0, delay * 2)
                    continue
                raise err from None

    def join_pserver(self, pserver_id: int, address: str, incarnation: str = "") -> int:
        req = pb.JoinRequest(role="pserver", id=pserver_id, address=address,
                             incarnation=incarnation)
        resp = self._call("Join", req, self.connect_timeout, retry_unavailable=True)
        self.generation = resp.generation
        return resp.serial

    def ready(self, pserver_id: int, serial: int, generation: int | None = None) -> None:
        req = pb.ReadyRequest(pserver_id=pserver_id, serial=serial, generation=generation or 0)
        self._call("Ready", req, self.deadline)

    def join_trainer(self, trainer_id: int, timeout: float | None = None,
                     incarnation: str = "") -> int:
        req = pb.JoinRequest(role="trainer", id=trainer_id, incarnation=incarnation)
        resp = self._call("Join", req, self.long_deadline, retry_unavailable=True)
        self.generation = resp.generation
        return resp.serial

    def heartbeat(self, role: str, i: int, incarnation: str, step: int = 0,
                  finished: bool = False, generation: int = 0) -> tuple[int, int, bool]:
        req = pb.HeartbeatRequest(role=role, id=i, incarnation=incarnation, global_step=step,
                                  finished=finished, generation=generation)
        resp = self._call("Heartbeat", req, self.heartbeat_deadline)
        return resp.generation, resp.serial, resp.running

    def barrier(self, trainer_id: int, global_step: int, epoch_id: int, step_id: int,
                final: bool, timeout: float | None = None) -> int:
        req = pb.BarrierRequest(trainer_id=trainer_id, global_step=global_step,
                                epoch_id=epoch_id, step_id=step_id, final=final)
        return self._call("Barrier", req, self.long_deadline).serial

    def report_part(self, pserver_id: int, serial: int, part: Part | None,
                    error: str | None) -> None:
        req = pb.ReportPartRequest(pserver_id=pserver_id, serial=serial,
                                   part=part.to_json() if part is not None else "",
                                   error=error or "")
        self._call("ReportPart", req, self.deadline, retry_unavailable=True)

    def describe(self, timeout: float | None = None) -> dict:
        return json.loads(self._call("Members", pb.MembersRequest(),
                                     timeout or self.deadline).json)

    def commit(self, trainer_id: int, serial: int, part: Part | None, error: str | None,
               timeout: float | None = None) -> int:
        req = pb.CommitRequest(trainer_id=trainer_id, serial=serial,
                               part=part.to_json() if part is not None else "")
        try:
            return self._call("Commit", req, self.long_deadline).serial
        except FailedPrecondition as e:
            raise CheckpointFailed(str(e)) from None
