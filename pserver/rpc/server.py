"""Start a pserver: `create_server` (importable, for tests) and `run` (the CLI's body)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ckpt.lock import LockedError
from ckpt.manifest import Part
from pserver.config import ConfigError, JobConfig
from pserver.coord.coordinator import Coordinator
from pserver.coord.local import shard_saver
from pserver.coord.member import PserverMember
from pserver.errors import JOB_FAILED, MissingBase
from pserver.metrics import server_metrics as pmetrics
from pserver.metrics.hooks import NULL
from pserver.rpc import malloc
from pserver.rpc.coord import CoordinatorClient, CoordinatorServicer
from pserver.rpc.handlers import from_rpc_error, stubs
from pserver.rpc.security import add_port, channel_options, open_channel, server_interceptors
from pserver.rpc.servicer import Servicer
from pserver.tables import persist
from pserver.tables.shard import Shard
from pserver.wire import psrt_pb2 as pb
from pserver.wire.methods import COORDINATOR, PARAMETER_SERVER, PS_METHODS

log = logging.getLogger(__name__)


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
    metrics: Any = NULL  # a ServerMetrics, or NULL (metrics off)
    stopped: threading.Event = field(default_factory=threading.Event)
    error: str | None = None  # why the job failed, when it did
    coord_client: CoordinatorClient | None = None  # pservers but 0: the coordinator's

    # ---- what its member (pserver.coord.member) drives ----------------------------------

    @property
    def generation(self) -> int | None:
        return self.servicer.generation

    def serve(self, shard: Shard, generation: int, reason: str) -> None:
        old, self.shard = self.shard, shard
        self.servicer.shard = shard
        if old is not shard:
            old.fence(reason)
            self.metrics.use_shard(shard)
            self.metrics.recovered()
        self.servicer.generation = generation
        self.metrics.set_generation(generation)

    def pause(self, reason: str | None) -> None:
        self.servicer.generation = None
        if reason is not None:
            self.shard.fence(reason)

    def fail(self, message: str) -> None:
        """The job cannot go on: log why and stop serving (`run` exits 3, JOB_FAILED)."""
        log.error("pserver[%d]: %s", self.shard.pserver_id, message)
        self.error = message
        if self.coordinator is None:
            self.stopped.set()
            return
        # the job fails with it: calls waiting in the coordinator (a trainer's Join) return,
        # and the coordinator's host lingers a few heartbeats so the others hear why
        self.coordinator.fail(message)
        linger = threading.Timer(3 * self.shard.config.recovery.heartbeat_s + 0.5,
                                 self.stopped.set)
        linger.daemon = True
        linger.start()

    def stop(self, grace: float | None = None) -> None:
        if self.member is not None:
            self.member.stop()
        if self.coord_client is not None:
            self.coord_client.close()
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
        options=channel_options(config.rpc),
        interceptors=server_interceptors(config.rpc, role),
    )
    metrics = pmetrics.for_pserver(config, pserver_id, shard)
    servicer = Servicer(shard, role, metrics)
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    services = [PARAMETER_SERVER]
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
    ckpt = config.checkpoint
    local = shard_saver(lambda: servicer.shard, ckpt,
                        lambda serial, part, err: coordinator.report_part(
                            servicer.shard.pserver_id, serial, part, err))

    def save_shard(pserver_id: int, serial: int, base: int) -> Part | None:
        if pserver_id == servicer.shard.pserver_id:
            return local(serial, base)
        address = coordinator.address_of(pserver_id)
        with open_channel(address, config.rpc) as ch:
            try:
                resp = stubs(ch, PS_METHODS)["SaveShard"](
                    pb.SaveShardRequest(serial=serial, background=ckpt.background,
                                        delta=base >= 0, base=max(base, 0)),
                    timeout=config.rpc.checkpoint_timeout_s)
            except grpc.RpcError as e:
                raise from_rpc_error(e, f"SaveShard on pserver[{pserver_id}] at {address}") \
                    from None
        if resp.missing_base:
            raise MissingBase(f"SaveShard on pserver[{pserver_id}] at {address}: "
                              f"{resp.missing_base}")
        return Part.from_json(resp.part) if resp.part else None

    try:
        coordinator = Coordinator(config, ckpt, persist.job_facts(servicer.shard), save_shard)
    except LockedError as e:
        raise ConfigError("checkpoint.checkpoint_dir", str(e)) from None
    return coordinator


def _restore(ps: Pserver) -> None:
    """Join the coordinator, load the checkpoint it names (if any), report ready, and
    heartbeat from then on (see `pserver.coord.member`)."""
    config = ps.shard.config
    if config.checkpoint is None:
        return
    ps.servicer.generation = None  # nothing is served before the restore
    coord: Any = ps.coordinator
    if coord is None:
        coord = ps.coord_client = CoordinatorClient(config)
    ps.member = PserverMember(ps, coord, config)
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


__all__ = ["JOB_FAILED", "Pserver", "create_server", "run"]
