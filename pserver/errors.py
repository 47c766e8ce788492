"""psrt's error types and the one table that maps them to gRPC status codes.

Servers raise these from pure logic; the servicer turns them into a status
with the message; the client turns a status back into the same type, carrying
the server's message.
"""

from __future__ import annotations

import grpc


class PsrtError(Exception):
    """Base of every error psrt raises on purpose."""


class InvalidArgument(PsrtError, ValueError):
    """Bad shape, dtype, byte length, dim, NaN/Inf, wrong owner, unparsable bytes."""


class NotFound(PsrtError, LookupError):
    """Unknown table or dense variable."""


class FailedPrecondition(PsrtError, RuntimeError):
    """Wrong step or generation: the request does not fit the server's state."""


class Unavailable(PsrtError, ConnectionError):
    """The peer cannot be reached, or is recovering."""


class DeadlineExceeded(PsrtError, TimeoutError):
    """The call ran out of time."""


class ResourceExhausted(PsrtError, RuntimeError):
    """A message or a table over its size limit."""


class Unauthenticated(PsrtError, PermissionError):
    """Missing or wrong credentials."""


class JobFailed(PsrtError, RuntimeError):
    """The job cannot go on (a process did not come back in time); every process stops."""


class Internal(PsrtError, RuntimeError):
    """A bug on the server: the message says where."""


STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    JobFailed: grpc.StatusCode.ABORTED,
    Internal: grpc.StatusCode.INTERNAL,
}
_BY_CODE = {code: err for err, code in STATUS.items()}


def status_of(err: PsrtError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def from_rpc_error(err: grpc.RpcError, where: str) -> PsrtError:
    """The typed error for a failed call; `where` names the call and the peer."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, Internal)
    exc = cls(f"{where}: {detail}")
    exc.code = code  # type: ignore[attr-defined]
    return exc
