"""`python -m pserver status --config job.toml`: one line per pserver of a running job.

Asks every pserver for `Info` (and the gRPC health service) with a short
deadline; a pserver that does not answer is listed as such with the error.
The newest checkpoint of the job's `checkpoint_dir` is shown with its age.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckpt import reader
from pserver import psrt_pb2 as pb
from pserver.config import JobConfig, RpcConfig
from pserver.security import open_channel
from pserver.servicer import SERVICE


def _one(address: str, timeout: float, rpc: RpcConfig) -> tuple[str, pb.InfoResponse | None, str]:
    """(health, info or None, error) of the pserver at `address`."""
    with open_channel(address, rpc) as ch:
        try:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
            info = ch.unary_unary(f"/{SERVICE}/Info", request_serializer=None,
                                  response_deserializer=pb.InfoResponse.FromString)(
                b"", timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(health.status), info, ""
        except grpc.RpcError as e:
            return "NOT ANSWERING", None, f"{e.code().name}: {e.details()}"


def report(config: JobConfig, timeout: float = 2.0) -> tuple[str, bool]:
    """The status table, and whether every pserver answered."""
    lines = [f"job {config.name!r}: {config.mode} mode, {config.num_pservers} pservers, "
             f"{config.num_trainers} trainers"]
    lines.append(f"{'role':<11} {'address':<22} {'health':<14} {'step':>6} {'rows':>12}  "
                 "tables")
    all_ok = True
    for i, address in enumerate(config.pservers):
        health, info, error = _one(address, timeout, config.rpc)
        if info is None:
            all_ok = False
            lines.append(f"{f'pserver[{i}]':<11} {address:<22} {health:<14} {'-':>6} "
                         f"{'-':>12}  {error}")
            continue
        steps = [t.applied_steps for t in info.tables] + [d.applied_steps for d in info.dense]
        rows = sum(t.rows for t in info.tables)
        tables = ", ".join(f"{t.name}={t.rows}" for t in info.tables)
        lines.append(f"{f'pserver[{i}]':<11} {address:<22} {health:<14} "
                     f"{max(steps, default=0):>6} {rows:>12,}  {tables}")
    if config.checkpoint is not None:
        storage = config.checkpoint.storage()
        newest = reader.newest_complete(storage, deep=False)
        if newest is None:
            lines.append(f"checkpoints: none complete in {storage.root}")
        else:
            age = time.time() - newest.created
            lines.append(f"checkpoints: newest complete is checkpoint_{newest.serial} (step "
                         f"{newest.global_step}, {age:.0f}s old) in {storage.root}")
    lines.append("(trainers serve no port and are not listed)")
    return "\n".join(lines), all_ok
