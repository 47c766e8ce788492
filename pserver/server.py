"""Start a pserver: `create_server` (importable, for tests) and `run` (the CLI's body)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ckpt.lock import LockedError
from ckpt.manifest import Part
from pserver import malloc, persist
from pserver import metrics as pmetrics
from pserver import psrt_pb2 as pb
from pserver.config import ConfigError, JobConfig
from pserver.coordinator import Coordinator
from pserver.coordinator_rpc import SERVICE as COORDINATOR
from pserver.coordinator_rpc import CoordinatorClient, CoordinatorServicer
from pserver.errors import from_rpc_error
from pserver.member import PserverMember
from pserver.security import add_port, open_channel, server_interceptors
from pserver.servicer import SERVICE, Servicer
from pserver.shard import Shard

log = logging.getLogger(__name__)
JOB_FAILED = 3  # exit code: the job failed (a process did not come back); not restarted


def channel_options(config: JobConfig) -> list[tuple[str, int]]:
    size = config.rpc.max_message_bytes
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        # a restarted peer is reached again within a second, not after gRPC's default
        # backoff of up to two minutes
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


@dataclass
class Pserver:
    server: grpc.Server
    port: int
    shard: Shard  # replaced by a restored one when the job rolls back
    servicer: Servicer
    health: health.HealthServicer
    address: str  # where other processes reach it
    coordinator: Coordinator | None = None
    member: PserverMember | None = None
    metrics: pmetrics.ServerMetrics | pmetrics.NullServerMetrics = pmetrics.NULL
    stopped: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # why the job failed, when it did

    def fail(self, message: str) -> None:
        """The job cannot go on: log why and stop serving (`run` exits 1)."""
        log.error("pserver[%d]: %s", self.shard.pserver_id, message)
        self.error = message
        if self.coordinator is None:
            self.stopped.set()
            return
        # the coordinator's host lingers a few heartbeats so the others hear why
        linger = threading.Timer(3 * self.shard.config.recovery.heartbeat_s + 0.5,
                                 self.stopped.set)
        linger.daemon = True
        linger.start()

    def stop(self, grace: float | None = None) -> None:
        if self.member is not None:
            self.member.stop()
        if self.coordinator is not None:
            self.coordinator.close()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.metrics.stop()


def create_server(config: JobConfig, pserver_id: int, port: int | None = None,
                  bind_host: str | None = None) -> Pserver:
    """Build and start pserver `pserver_id`, restored from the newest checkpoint if the job
    has one; `port=0` picks a free port (see `.port`). Pserver 0 hosts the coordinator."""
    if not 0 <= pserver_id < config.num_pservers:
        raise ConfigError("--id", f"pserver id {pserver_id} is out of range "
                          f"0..{config.num_pservers - 1} (job.pservers has "
                          f"{config.num_pservers} addresses)")
    malloc.tune()
    host, _, own_port = config.pservers[pserver_id].rpartition(":")
    port = int(own_port) if port is None else port
    shard = Shard(config, pserver_id)
    role = f"pserver[{pserver_id}]"
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.rpc.server_threads,
                                   thread_name_prefix=role),
        options=channel_options(config),
        interceptors=server_interceptors(config.rpc, role),
    )
    metrics = pmetrics.for_pserver(config, pserver_id, shard)
    servicer = Servicer(shard, role, metrics)
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    services = [SERVICE]
    coordinator = None
    if config.checkpoint is not None and pserver_id == 0:
        coordinator = _coordinator(config, servicer)
        metrics.watch_coordinator(coordinator)
        wait = config.rpc.checkpoint_timeout_s
        server.add_generic_rpc_handlers((CoordinatorServicer(coordinator, wait)
                                         .generic_handler(),))
        services.append(COORDINATOR)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    listen = f"{bind_host if bind_host is not None else host}:{port}"
    try:
        bound = add_port(server, listen, config.rpc, role)
    except RuntimeError as e:
        raise ConfigError(f"job.pservers[{pserver_id}]", f"cannot listen on {listen}: {e}") \
            from None
    if bound == 0:
        raise ConfigError(f"job.pservers[{pserver_id}]",
                          f"cannot listen on {listen} (port in use or host not local)")
    server.start()
    ps = Pserver(server, bound, shard, servicer, health_servicer, f"{host}:{bound}", coordinator,
                 metrics=metrics)
    try:
        metrics.start()
        _restore(ps)
    except BaseException:
        ps.stop(0)
        raise
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ps


def _coordinator(config: JobConfig, servicer: Servicer) -> Coordinator:
    """The coordinator, saving this pserver's shard in-process (the one serving at the time
    of the save: a rollback replaces it) and the others' over gRPC."""
    storage = config.checkpoint.storage()

    background = config.checkpoint.background

    def save_shard(pserver_id: int, serial: int, base: int) -> Part | None:
        shard = servicer.shard
        if pserver_id == shard.pserver_id:
            if background:
                persist.save_shard_background(
                    shard, storage, serial,
                    lambda part, err: coordinator.report_part(pserver_id, serial, part, err),
                    base if base >= 0 else None)
                return None
            return persist.save_shard(shard, storage, serial, base if base >= 0 else None)
        address = coordinator.address_of(pserver_id)
        with open_channel(address, config.rpc, channel_options(config)) as ch:
            call = ch.unary_unary(f"/{SERVICE}/SaveShard",
                                  request_serializer=pb.SaveShardRequest.SerializeToString,
                                  response_deserializer=pb.SaveShardResponse.FromString)
            try:
                resp = call(pb.SaveShardRequest(serial=serial, background=background,
                                                delta=base >= 0, base=max(base, 0)),
                            timeout=config.rpc.checkpoint_timeout_s)
            except grpc.RpcError as e:
                raise from_rpc_error(e, f"SaveShard on pserver[{pserver_id}] at {address}") \
                    from None
        return Part.from_json(resp.part) if resp.part else None

    try:
        coordinator = Coordinator(config, config.checkpoint, persist.job_facts(servicer.shard),
                                  save_shard)
    except LockedError as e:
        raise ConfigError("checkpoint.checkpoint_dir", str(e)) from None
    return coordinator


def _restore(ps: Pserver) -> None:
    """Join the coordinator, load the checkpoint it names (if any), report ready, and
    heartbeat from then on (see `pserver.member`)."""
    config = ps.shard.config
    if config.checkpoint is None:
        return
    ps.servicer.generation = None  # nothing is served before the restore
    coord = ps.coordinator if ps.coordinator is not None else CoordinatorClient(config)
    ps.member = PserverMember(ps, coord)
    ps.member.start()


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

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s got %s, draining in-flight calls (up to %.1fs)", role,
                 signal.Signals(signum).name, config.rpc.grace_s)
        ps.stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ps.stopped.wait()
    ps.stop(config.rpc.grace_s)
    if ps.error is not None:
        log.error("%s stopped: %s", role, ps.error)
        return JOB_FAILED
    log.info("%s stopped", role)
    return 0


__all__ = ["Pserver", "channel_options", "create_server", "run", "pb"]
