"""`python -m pserver health --config job.toml --id I`: exit 0 when pserver I is SERVING.

For container healthchecks: one call to the standard gRPC health service of
pserver I (its address in `job.pservers`, or `--address`), with a deadline.
A pserver reports SERVING once it has restored its checkpoint and joined the
job. Exit 1 (with one line saying why) otherwise, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pserver import config as cfg
from pserver.config import RpcConfig
from pserver.rpc.security import open_channel


def check(address: str, timeout: float, rpc: RpcConfig | None = None) -> str:
    """The serving status of the server at `address` ("SERVING", ...), or why it has none;
    over the job's TLS (`rpc`) if it has any."""
    with open_channel(address, rpc or RpcConfig()) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=timeout)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pserver health", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg.add_job_arguments(p, "job file (TOML)")
    p.add_argument("--id", type=int, required=True, help="pserver id, 0..P-1")
    p.add_argument("--address", help="HOST:PORT to ask instead of job.pservers[ID]")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (default 2)")
    args = p.parse_args(argv)
    try:
        config = cfg.load(args.config, args.set)
        if not 0 <= args.id < config.num_pservers:
            raise cfg.ConfigError("--id", f"pserver id {args.id} is out of range "
                                  f"0..{config.num_pservers - 1}")
    except cfg.ConfigError as e:
        print(f"pserver health: config error: {e}", file=sys.stderr)
        return 2
    address = args.address or config.pservers[args.id]
    try:
        status = check(address, args.timeout, config.rpc)
    except cfg.ConfigError as e:  # a TLS file that cannot be read
        print(f"pserver health: config error: {e}", file=sys.stderr)
        return 2
    print(f"pserver[{args.id}] at {address}: {status}")
    return 0 if status == "SERVING" else 1
