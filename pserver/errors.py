"""psrt's error types and the one table that maps them to gRPC status codes.

Pure logic raises these; the servicers turn them into a status with the
message (`pserver.rpc.handlers`); the clients turn a status back into the same
type, carrying the server's message. The table names the codes, so that this
module (and the table logic that raises its errors) imports no gRPC.
"""

from __future__ import annotations

JOB_FAILED = 3  # exit code: the job failed (a process did not come back); not restarted


class PsrtError(Exception):
    """Base of every error psrt raises on purpose."""


class InvalidArgument(PsrtError, ValueError):
    """Bad shape, dtype, byte length, dim, NaN/Inf, wrong owner, unparsable bytes."""


class NotFound(PsrtError, LookupError):
    """Unknown table or dense variable."""


class FailedPrecondition(PsrtError, RuntimeError):
    """Wrong step or generation: the request does not fit the server's state."""


class MissingBase(FailedPrecondition):
    """A pserver cannot write a delta of that checkpoint: it neither saved nor restored it
    (a restarted pserver); the coordinator makes the next save full."""


class CheckpointFailed(FailedPrecondition):
    """A checkpoint could not be committed; the message lists each failing process."""


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


STATUS = {  # error type -> the name of its grpc.StatusCode
    InvalidArgument: "INVALID_ARGUMENT",
    NotFound: "NOT_FOUND",
    FailedPrecondition: "FAILED_PRECONDITION",
    Unavailable: "UNAVAILABLE",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    ResourceExhausted: "RESOURCE_EXHAUSTED",
    Unauthenticated: "UNAUTHENTICATED",
    JobFailed: "ABORTED",
    Internal: "INTERNAL",
}
_BY_CODE = {code: err for err, code in STATUS.items()}


def code_name(err: PsrtError) -> str:
    """The status code name of an error (the nearest type of the table it subclasses)."""
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return "INTERNAL"


def from_code(name: str, message: str) -> PsrtError:
    """The error of a status code name (INTERNAL's for codes of no type here)."""
    return _BY_CODE.get(name, Internal)(message)
