"""The coordinator over gRPC: its servicer (thin) and the client pservers and trainers use.

`CoordinatorClient` has the same methods as `Coordinator` (join_pserver, ready,
join_trainer, barrier, commit), so a trainer drives an in-process coordinator
(stand-alone) and a remote one the same way. Handlers, errors and stubs come
from `pserver.rpc.handlers` and the method table `pserver.wire.methods`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc

from ckpt.manifest import Part
from pserver.config import JobConfig
from pserver.coord.coordinator import Coordinator
from pserver.errors import CheckpointFailed, FailedPrecondition, InvalidArgument, Unavailable
from pserver.retry import retry
from pserver.rpc.handlers import from_rpc_error, generic_handler, remaining, stubs
from pserver.rpc.security import open_channel
from pserver.wire import psrt_pb2 as pb
from pserver.wire.methods import COORD_METHODS, COORDINATOR

log = logging.getLogger(__name__)


def _part(text: str, where: str) -> Part | None:
    """A part's JSON as a Part (None: no part), or InvalidArgument."""
    if not text:
        return None
    try:
        return Part.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{where}: {e}") from None


class CoordinatorServicer:
    def __init__(self, coordinator: Coordinator, default_wait: float) -> None:
        self.c = coordinator
        self.wait = default_wait

    def Join(self, req: pb.JoinRequest, ctx: grpc.ServicerContext) -> pb.JoinResponse:
        if req.role == "pserver":
            serial, gen = self.c.join_pserver_at(req.id, req.address, req.incarnation)
        elif req.role == "trainer":
            serial, gen = self.c.join_trainer_at(req.id, remaining(ctx, self.wait),
                                                 req.incarnation)
        else:
            raise InvalidArgument(f"Join: role must be 'pserver' or 'trainer', got {req.role!r}")
        return pb.JoinResponse(serial=serial, generation=gen)

    def Ready(self, req: pb.ReadyRequest, ctx: grpc.ServicerContext) -> pb.ReadyResponse:
        self.c.ready(req.pserver_id, req.serial, req.generation or None, req.damaged)
        return pb.ReadyResponse()

    def Heartbeat(self, req: pb.HeartbeatRequest, ctx: grpc.ServicerContext) -> Any:
        gen, serial, running = self.c.heartbeat(req.role, req.id, req.incarnation,
                                                req.global_step, req.finished, req.generation)
        return pb.HeartbeatResponse(generation=gen, serial=serial, running=running)

    def Members(self, req: pb.MembersRequest, ctx: grpc.ServicerContext) -> Any:
        return pb.MembersResponse(json=json.dumps(self.c.describe()))

    def Barrier(self, req: pb.BarrierRequest, ctx: grpc.ServicerContext) -> pb.BarrierResponse:
        serial = self.c.barrier(req.trainer_id, req.global_step, req.epoch_id, req.step_id,
                                req.final, remaining(ctx, self.wait))
        return pb.BarrierResponse(serial=serial)

    def Commit(self, req: pb.CommitRequest, ctx: grpc.ServicerContext) -> pb.CommitResponse:
        part = _part(req.part, "Commit")
        error = None if part is not None else "reported no part"
        serial = self.c.commit(req.trainer_id, req.serial, part, error, remaining(ctx, self.wait))
        return pb.CommitResponse(serial=serial)

    def ReportPart(self, req: pb.ReportPartRequest, ctx: grpc.ServicerContext) -> Any:
        part = _part(req.part, "ReportPart")
        error = req.error or (None if part is not None else "reported no part")
        self.c.report_part(req.pserver_id, req.serial, part, error)
        return pb.ReportPartResponse()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return generic_handler(COORDINATOR, COORD_METHODS, self, "coordinator")


class CoordinatorClient:
    """Calls the coordinator at `address` (pserver 0); every call has a deadline."""

    def __init__(self, config: JobConfig, address: str | None = None) -> None:
        self.address = address or config.pservers[0]
        self.deadline = config.rpc.deadline_s
        self.long_deadline = config.rpc.checkpoint_timeout_s
        self.connect_timeout = config.rpc.connect_timeout_s
        self.heartbeat_deadline = max(1.0, config.recovery.heartbeat_s * 2)
        self.generation = 0  # learnt from the last Join
        self._channel = open_channel(self.address, config.rpc)
        self._stubs = stubs(self._channel, COORD_METHODS)

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, req: Any, timeout: float, retry_unavailable: bool = False) -> Any:
        """One call; with `retry_unavailable`, again while the coordinator cannot be reached
        (it starts, or restarts), up to `rpc.connect_timeout_s`."""

        def call() -> Any:
            try:
                return self._stubs[name](req, timeout=timeout, wait_for_ready=retry_unavailable)
            except grpc.RpcError as e:
                raise from_rpc_error(e, f"{name} on the coordinator at {self.address}") from None

        return retry(call, seconds=self.connect_timeout if retry_unavailable else 0,
                     errors=(Unavailable,), delay=0.05, max_delay=1.0)

    def join_pserver(self, pserver_id: int, address: str, incarnation: str = "") -> int:
        req = pb.JoinRequest(role="pserver", id=pserver_id, address=address,
                             incarnation=incarnation)
        resp = self._call("Join", req, self.connect_timeout, retry_unavailable=True)
        self.generation = resp.generation
        return resp.serial

    def ready(self, pserver_id: int, serial: int, generation: int | None = None,
              damaged: str = "") -> None:
        req = pb.ReadyRequest(pserver_id=pserver_id, serial=serial, generation=generation or 0,
                              damaged=damaged)
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
