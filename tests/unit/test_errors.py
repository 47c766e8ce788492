"""The typed errors of pserver.errors: built-in kinds too, each with its status code in one
table (what a rejected call answers: tests/integration/test_bad_input.py)."""

from __future__ import annotations

import grpc

from pserver import errors
from pserver.rpc.handlers import status_of


def test_client_typed_errors_are_the_builtin_kinds_too() -> None:
    assert issubclass(errors.InvalidArgument, ValueError)
    assert issubclass(errors.NotFound, LookupError)
    assert issubclass(errors.DeadlineExceeded, TimeoutError)
    for err, code in errors.STATUS.items():
        assert status_of(err("x")) == grpc.StatusCode[code]
