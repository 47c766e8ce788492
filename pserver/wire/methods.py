"""Every RPC of psrt's two services, read from the proto's descriptor: the one method table.

`PARAMETER_SERVER` (each pserver) and `COORDINATOR` (pserver 0) map a method's
name to its `Method`: the request and response classes, and whether it is a
bulk call (Pull, Push and their batches: bytes encoded by `pserver.wire.codec`
without copies, not by the generated classes) or a data call (fenced by the
caller's generation, sent as `GENERATION_KEY` metadata). Servers, clients and
tools build their handlers and stubs from these tables only.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from pserver.wire import psrt_pb2 as pb

GENERATION_KEY = "psrt-generation"  # call metadata: the generation a trainer's call belongs to
_BULK = frozenset({"Pull", "Push", "PullBatch", "PushBatch"})
_DATA = _BULK | {"PullDense", "PushDense"}


@dataclass(frozen=True)
class Method:
    service: str  # the full name, e.g. psrt.v1.ParameterServer
    name: str
    request: type[Message]
    response: type[Message]
    bulk: bool  # request and answer are raw bytes (pserver.wire.codec)
    data: bool  # refused unless it belongs to the generation served

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def _service(name: str) -> tuple[str, dict[str, Method]]:
    desc = pb.DESCRIPTOR.services_by_name[name]
    methods = {m.name: Method(desc.full_name, m.name, getattr(pb, m.input_type.name),
                              getattr(pb, m.output_type.name), m.name in _BULK and
                              name == "ParameterServer", m.name in _DATA and
                              name == "ParameterServer")
               for m in desc.methods}
    return desc.full_name, methods


PARAMETER_SERVER, PS_METHODS = _service("ParameterServer")
COORDINATOR, COORD_METHODS = _service("Coordinator")
