"""Fuzz every RPC the servers expose, as listed by the reflection service.

Each method gets random bytes, mutations of a valid request, and well-formed
messages with random field values (hypothesis). The server must answer every
call with a status (never UNKNOWN, never dying), a rejected call must leave
every shard bit-identical, and the server must still answer afterwards.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Cluster, job

ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
}
SKIP = {"grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    ckdir = tmp_path_factory.mktemp("fuzz") / "ckpt"
    config = job(1, "sync", 2, checkpoint={"checkpoint_dir": str(ckdir)})
    c = Cluster(config)
    yield c
    c.stop()


def _methods(channel: grpc.Channel) -> list[tuple[str, Any, Any]]:
    """(path, request class, response class) of every method reflection lists."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**kw: Any) -> Any:
        req = reflection_pb2.ServerReflectionRequest(**kw)
        return next(iter(stub.ServerReflectionInfo(iter([req]), timeout=5)))

    names = [s.name for s in ask(list_services="").list_services_response.service]
    pool = descriptor_pool.DescriptorPool()
    seen: set[str] = set()
    for name in names:
        for raw in ask(file_containing_symbol=name).file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            if fd.name not in seen:
                seen.add(fd.name)
                pool.Add(fd)
    out = []
    for name in names:
        if name in SKIP:
            continue
        for m in pool.FindServiceByName(name).methods:
            out.append((f"/{name}/{m.name}", message_factory.GetMessageClass(m.input_type),
                        message_factory.GetMessageClass(m.output_type)))
    return out


def _snapshot(cluster: Cluster) -> list[bytes]:
    state = []
    for s in cluster.servers:
        for t in s.shard.tables.values():
            state += [a.tobytes() for a in t.export().values()]
        for v in s.shard.dense.values():
            state += [v.value.tobytes(), *(a.tobytes() for a in v.state.values())]
        state += [repr(sorted((n, g.applied, sorted(g.pending)) for n, g in
                              s.shard.gates.items())).encode()]
    return state


def _call(cluster: Cluster, path: str, payload: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(cluster.config.pservers[0]) as ch:
        call = ch.unary_unary(path)
        try:
            call(payload, timeout=0.5)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            assert e.code() in ALLOWED, f"{path}: {e.code()} {e.details()}"
            return e.code()


def _message(cls: Any, data: st.DataObject) -> bytes:
    """A well-formed message of `cls` with random values in every field."""
    msg = cls()
    for f in cls.DESCRIPTOR.fields:
        repeated = f.is_repeated
        if f.type == f.TYPE_MESSAGE:
            sub_cls = message_factory.GetMessageClass(f.message_type)
            for _ in range(data.draw(st.integers(0, 2 if repeated else 1))):
                sub = sub_cls.FromString(_message(sub_cls, data))
                target = getattr(msg, f.name).add() if repeated else getattr(msg, f.name)
                target.CopyFrom(sub)
            continue
        if f.type == f.TYPE_STRING:
            value = st.sampled_from(["", "emb", "w", "b", "nope", "trainer", "pserver", "é"])
        elif f.type == f.TYPE_BYTES:
            value = st.one_of(st.binary(max_size=64),
                              st.integers(0, 8).map(lambda k: np.arange(k, dtype="<u8")
                                                    .tobytes()))
        elif f.type == f.TYPE_BOOL:
            value = st.booleans()
        else:
            value = st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 5)
        if repeated:
            getattr(msg, f.name).extend(data.draw(st.lists(value, max_size=3)))
        else:
            setattr(msg, f.name, data.draw(value))
    return msg.SerializeToString()


FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_every_method_survives_random_and_mutated_requests(cluster: Cluster,
                                                           data: st.DataObject) -> None:
    methods = getattr(cluster, "_fuzz_methods", None)
    if methods is None:
        with grpc.insecure_channel(cluster.config.pservers[0]) as ch:
            methods = cluster._fuzz_methods = _methods(ch)  # type: ignore[attr-defined]
        assert any(p.endswith("/PushBatch") for p, _, _ in methods)
        assert any(p.endswith("/Barrier") for p, _, _ in methods)
    path, req_cls, _ = data.draw(st.sampled_from(methods))
    valid = _message(req_cls, data)
    payload = data.draw(st.one_of(
        st.binary(max_size=128),
        st.just(valid),
        st.builds(lambda cut: valid[:cut], st.integers(0, max(0, len(valid) - 1))),
        st.builds(lambda i, b: valid[:i] + bytes([b]) + valid[i + 1:],
                  st.integers(0, max(0, len(valid) - 1)), st.integers(0, 255)),
    ))
    before = _snapshot(cluster)
    code = _call(cluster, path, payload)
    if code != grpc.StatusCode.OK and not path.endswith(("/Barrier", "/Commit", "/Join")):
        assert _snapshot(cluster) == before, f"{path} was rejected but changed state"
    info_path = "/psrt.v1.ParameterServer/Info"
    assert _call(cluster, info_path, b"") == grpc.StatusCode.OK  # still serving
