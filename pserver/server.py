"""Start a pserver: `create_server` (importable, for tests) and `run` (the CLI's body)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pserver import psrt_pb2 as pb
from pserver.config import ConfigError, JobConfig
from pserver.servicer import SERVICE, Servicer
from pserver.shard import Shard

log = logging.getLogger(__name__)


def channel_options(config: JobConfig) -> list[tuple[str, int]]:
    size = config.rpc.max_message_bytes
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
    ]


@dataclass
class Pserver:
    server: grpc.Server
    port: int
    shard: Shard
    health: health.HealthServicer

    def stop(self, grace: float | None = None) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def create_server(config: JobConfig, pserver_id: int, port: int | None = None,
                  bind_host: str | None = None) -> Pserver:
    """Build and start pserver `pserver_id`; `port=0` picks a free port (see `.port`)."""
    if not 0 <= pserver_id < config.num_pservers:
        raise ConfigError("--id", f"pserver id {pserver_id} is out of range "
                          f"0..{config.num_pservers - 1} (job.pservers has "
                          f"{config.num_pservers} addresses)")
    host, _, own_port = config.pservers[pserver_id].rpartition(":")
    host = bind_host if bind_host is not None else host
    port = int(own_port) if port is None else port
    shard = Shard(config, pserver_id)
    role = f"pserver[{pserver_id}]"
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.rpc.server_threads,
                                   thread_name_prefix=role),
        options=channel_options(config),
    )
    server.add_generic_rpc_handlers((Servicer(shard, role).generic_handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigError(f"job.pservers[{pserver_id}]", f"cannot listen on {address}: {e}") \
            from None
    if bound == 0:
        raise ConfigError(f"job.pservers[{pserver_id}]",
                          f"cannot listen on {address} (port in use or host not local)")
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Pserver(server, bound, shard, health_servicer)


def run(config: JobConfig, pserver_id: int, port: int | None = None,
        bind_host: str | None = None, ready_file: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls; returns the exit code."""
    ps = create_server(config, pserver_id, port, bind_host)
    role = f"pserver[{pserver_id}]"
    host = config.pservers[pserver_id].rpartition(":")[0] if bind_host is None else bind_host
    tables = ", ".join(f"{t.name}(dim={t.dim}, {t.optimizer.kind})" for t in config.tables)
    dense = ", ".join(f"{n}{list(v.shape)}" for n, v in ps.shard.dense.items())
    log.info("%s listening on %s:%d (%s mode, %d trainers); tables: %s; dense: %s", role, host,
             ps.port, config.mode, config.num_trainers, tables or "none", dense or "none")
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(f"{host}:{ps.port}\n")
        tmp.replace(ready_file)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s got %s, draining in-flight calls (up to %.1fs)", role,
                 signal.Signals(signum).name, config.rpc.grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    ps.stop(config.rpc.grace_s)
    log.info("%s stopped", role)
    return 0


__all__ = ["Pserver", "channel_options", "create_server", "run", "pb"]
