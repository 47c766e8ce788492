"""The plumbing every psrt service and client shares: handlers, one error policy, stubs.

A servicer is a plain object with one method per RPC, taking the parsed request
(raw bytes for bulk calls) and the context, returning the answer. `handler`
wraps those methods for gRPC with one policy:

- bytes that do not parse as the request: INVALID_ARGUMENT, naming the type;
- a `PsrtError`: its status (`pserver.errors.STATUS`), its message;
- anything else is a bug: logged with its traceback, INTERNAL, never UNKNOWN.

Requests arrive as raw bytes (no deserializer is registered) so that bytes
that do not parse get INVALID_ARGUMENT with a message instead of gRPC's
generic failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pserver.errors import PsrtError, code_name, from_code
from pserver.wire import codec
from pserver.wire.methods import Method

log = logging.getLogger(__name__)
Handler = Callable[[bytes, grpc.ServicerContext], bytes]


def status_of(err: PsrtError) -> grpc.StatusCode:
    """The gRPC status of one of our errors (`pserver.errors.STATUS`)."""
    return grpc.StatusCode[code_name(err)]


def from_rpc_error(err: grpc.RpcError, where: str) -> PsrtError:
    """The typed error for a failed call; `where` names the call and the peer."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    exc = from_code(code.name, f"{where}: {detail}")
    exc.code = code  # type: ignore[attr-defined]
    return exc


def remaining(context: grpc.ServicerContext, default: float) -> float:
    """Time left before the caller's deadline, less a margin so the answer arrives in time."""
    left = context.time_remaining()
    return default if left is None else max(0.0, left - 0.1)


def _wrap(method: Method, call: Callable[[Any, grpc.ServicerContext], Any], role: str,
          before: Callable[[str, grpc.ServicerContext], None] | None) -> Handler:
    name, request = method.name, method.request

    def handler(raw: bytes, ctx: grpc.ServicerContext) -> bytes:
        try:
            if before is not None:
                before(name, ctx)
            if method.bulk:
                return call(raw, ctx)
            return call(request.FromString(raw), ctx).SerializeToString()
        except (DecodeError, codec.DecodeError) as e:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{name}: request bytes do not parse as {request.__name__}: {e}")
        except PsrtError as e:
            log.debug("%s %s rejected: %s", role, name, e)
            ctx.abort(status_of(e), str(e))
        except Exception as e:  # a bug: never leak it as UNKNOWN
            log.exception("%s %s failed", role, name)
            ctx.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error: {e!r}")

    return handler


def generic_handler(service: str, methods: Mapping[str, Method], servicer: object, role: str,
                    before: Callable[[str, grpc.ServicerContext], None] | None = None,
                    timed: Callable[[str, Handler], Handler] | None = None
                    ) -> grpc.GenericRpcHandler:
    """gRPC handlers for every method of `service`, each calling `servicer`'s method of that
    name (a servicer has one for every method of its service). `before(name,
    ctx)` runs first (it may raise a PsrtError: the generation check of data calls);
    `timed(name, handler)` wraps each handler (metrics)."""
    handlers = {}
    for name, method in methods.items():
        wrapped = _wrap(method, getattr(servicer, name), role,
                        before if method.data else None)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            timed(name, wrapped) if timed is not None else wrapped)
    return grpc.method_handlers_generic_handler(service, handlers)


def stubs(channel: grpc.Channel, methods: Mapping[str, Method]) -> dict[str, Any]:
    """A callable per method on `channel`: bulk ones take and give bytes, the others the
    generated messages."""
    return {name: channel.unary_unary(
        m.path, request_serializer=None if m.bulk else m.request.SerializeToString,
        response_deserializer=None if m.bulk else m.response.FromString)
        for name, m in methods.items()}
