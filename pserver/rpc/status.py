"""`python -m pserver status --config job.toml`: one line per process of a running job.

Asks every pserver for `Info` (and the gRPC health service) with a short
deadline; a pserver that does not answer is listed as such with the error.
With a [checkpoint] section the coordinator (on pserver 0) is asked for the
job's generation and its members: every trainer with its step and how long
since its last heartbeat, and which processes the job lost. The newest
checkpoint of the job's `checkpoint_dir` is shown with its age.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckpt import reader
from pserver import config as cfg
from pserver.config import JobConfig, RpcConfig
from pserver.errors import PsrtError
from pserver.rpc.coord import CoordinatorClient
from pserver.rpc.handlers import stubs
from pserver.rpc.security import open_channel
from pserver.wire import psrt_pb2 as pb
from pserver.wire.methods import PARAMETER_SERVER, PS_METHODS


def _one(address: str, timeout: float, rpc: RpcConfig) -> tuple[str, pb.InfoResponse | None, str]:
    """(health, info or None, error) of the pserver at `address`."""
    with open_channel(address, rpc) as ch:
        try:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=PARAMETER_SERVER), timeout=timeout)
            info = stubs(ch, PS_METHODS)["Info"](pb.InfoRequest(), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(health.status), info, ""
        except grpc.RpcError as e:
            return "NOT ANSWERING", None, f"{e.code().name}: {e.details()}"


def report(config: JobConfig, timeout: float = 2.0) -> tuple[str, bool]:
    """The status table, and whether every pserver answered."""
    lines = [f"job {config.name!r}: {config.mode} mode, {config.num_pservers} pservers, "
             f"{config.num_trainers} trainers"]
    members = _members(config, timeout)
    known = members.get("members", {})
    lines.append(f"{'role':<11} {'address':<22} {'health':<14} {'generation':>14} {'step':>6} "
                 f"{'rows':>12}  tables")
    all_ok = True
    for i, address in enumerate(config.pservers):
        health, info, error = _one(address, timeout, config.rpc)
        if info is None:
            all_ok = False
            lines.append(f"{f'pserver[{i}]':<11} {address:<22} {health:<14} {'-':>14} "
                         f"{'-':>6} {'-':>12}  {error}")
            continue
        steps = [t.applied_steps for t in info.tables] + [d.applied_steps for d in info.dense]
        rows = sum(t.rows for t in info.tables)
        tables = ", ".join(f"{t.name}={t.rows}" for t in info.tables)
        gen = known.get(f"pserver[{i}]", {}).get("generation", "-") or "restoring"
        lines.append(f"{f'pserver[{i}]':<11} {address:<22} {health:<14} {gen:>14} "
                     f"{max(steps, default=0):>6} {rows:>12,}  {tables}")
    all_ok &= _trainer_lines(config, members, lines)
    if config.checkpoint is not None:
        storage = config.checkpoint.storage()
        newest = reader.newest_complete(storage, deep=False)
        if newest is None:
            lines.append(f"checkpoints: none complete in {storage.root}")
        else:
            age = time.time() - newest.created
            lines.append(f"checkpoints: newest complete is checkpoint_{newest.serial} (step "
                         f"{newest.global_step}, {age:.0f}s old) in {storage.root}")
    return "\n".join(lines), all_ok


def _members(config: JobConfig, timeout: float) -> dict:
    """What the coordinator knows of the job ({"error": ...} if it does not answer)."""
    if config.checkpoint is None:
        return {"error": "the job has no [checkpoint] section: no coordinator"}
    client = CoordinatorClient(config)
    try:
        return client.describe(timeout)
    except PsrtError as e:
        return {"error": str(e)}
    finally:
        client.close()


def _trainer_lines(config: JobConfig, members: dict, lines: list[str]) -> bool:
    """One line per trainer (from the coordinator's heartbeats), and the job's state."""
    if config.checkpoint is None:
        lines.append("trainers: not listed (without a [checkpoint] section no coordinator "
                     "tracks them)")
        return True
    if "error" in members:
        lines.append(f"trainers: unknown ({members['error']})")
        return False
    ok = True
    for j in range(config.num_trainers):
        m = members["members"].get(f"trainer[{j}]")
        if m is None:
            ok = False
            lines.append(f"{f'trainer[{j}]':<11} {'-':<22} {'NOT ANSWERING':<14} {'-':>14} "
                         f"{'-':>6} {'-':>12}  not a member (never joined, or lost)")
            continue
        state = "FINISHED" if m["finished"] else "ALIVE"
        lines.append(f"{f'trainer[{j}]':<11} {'-':<22} {state:<14} "
                     f"{m['generation'] or 'joining':>14} {m['step']:>6} {'-':>12}  "
                     f"last heartbeat {m['silent_s']:.1f}s ago")
    run = "running" if members["running"] else "recovering"
    lost = f"; lost: {', '.join(members['lost'])}" if members["lost"] else ""
    fatal = f"; FAILED: {members['fatal']}" if members["fatal"] else ""
    lines.append(f"job: generation {members['generation']}, {run}, {members['rollbacks']} "
                 f"rollbacks{lost}{fatal}")
    return ok and not members["fatal"]


def main(argv: list[str]) -> int:
    """`python -m pserver status`: exit 0 if every process answers, 1 if one does not,
    2 on a configuration error."""
    p = argparse.ArgumentParser(prog="python -m pserver status",
                                description="One line per process of a running job: pservers "
                                "(health, generation, step, rows), trainers (from the "
                                "coordinator's heartbeats), the job's generation and rollbacks, "
                                "and the newest checkpoint. Exit 1 if any process does not "
                                "answer.")
    cfg.add_job_arguments(p, "job file (TOML)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per pserver")
    args = p.parse_args(argv)
    try:
        config = cfg.load(args.config, args.set)
        text, all_ok = report(config, args.timeout)  # reads the TLS files and token
    except cfg.ConfigError as e:
        print(f"pserver status: config error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if all_ok else 1
