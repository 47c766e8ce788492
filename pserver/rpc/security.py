"""TLS, mutual TLS, the shared token and message sizes: every gRPC port and channel of a job
is made here.

Keys ([rpc] of the job file): `tls` is off, tls or mtls. With tls, pservers
present `tls_cert`/`tls_key` and clients verify them against `tls_ca` (or the
system's roots). With mtls, clients present `tls_client_cert`/`tls_client_key`
(default: `tls_cert`/`tls_key`) and pservers refuse a handshake without a
certificate signed by `tls_ca`. The token comes from the file `rpc.token_file`
or the `PSRT_TOKEN` environment variable (never both); every call then carries
it as `authorization: Bearer TOKEN` and pservers answer a call without the right
one with UNAUTHENTICATED before any handler runs. The gRPC health service stays
open (probes carry no token); reflection and every psrt method need the token.

The token is read when a server or channel is made, kept only in the
interceptors, and never logged or put in an error message.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pserver.config import ConfigError, RpcConfig

log = logging.getLogger(__name__)

TOKEN_ENV = "PSRT_TOKEN"
TOKEN_HEADER = "authorization"
MIN_TOKEN_CHARS = 16
# Probes (docker/kubernetes healthchecks) carry no token; everything else needs it.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_TLS_FILES = ("tls_cert", "tls_key", "tls_ca", "tls_client_cert", "tls_client_key")


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"rpc.{key}", f"no such file: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"rpc.{key}", f"{path} is a directory, expected a file") from None
    except OSError as e:
        raise ConfigError(f"rpc.{key}", f"cannot read {path}: {e.strerror}") from None
    if not data.strip():
        raise ConfigError(f"rpc.{key}", f"{path} is empty")
    return data


def _pem(key: str, path: str, marker: bytes, what: str) -> bytes:
    data = _read(key, path)
    if b"-----BEGIN " not in data or marker not in data:
        raise ConfigError(f"rpc.{key}", f"{path} holds no PEM {what}")
    return data


def _pair(cert_key: str, key_key: str, rpc: RpcConfig) -> tuple[bytes, bytes]:
    """(certificate chain, private key) of two keys, checked to belong together."""
    cert_path, key_path = getattr(rpc, cert_key), getattr(rpc, key_key)
    cert = _pem(cert_key, cert_path, b"CERTIFICATE-----", "certificate")
    key = _pem(key_key, key_path, b"PRIVATE KEY-----", "private key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        raise ConfigError(f"rpc.{key_key}", f"{key_path} is not the private key of the "
                          f"certificate in rpc.{cert_key} ({cert_path}): {e.reason}") from None
    return cert, key


def _ca(rpc: RpcConfig) -> bytes | None:
    if not rpc.tls_ca:
        return None
    data = _pem("tls_ca", rpc.tls_ca, b"CERTIFICATE-----", "certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode())
    except (ssl.SSLError, UnicodeDecodeError) as e:
        raise ConfigError("rpc.tls_ca", f"{rpc.tls_ca} holds no usable CA certificate: "
                          f"{getattr(e, 'reason', e)}") from None
    return data


def token(rpc: RpcConfig, environ: Any = None) -> str | None:
    """The shared token (None: no token check), from rpc.token_file or PSRT_TOKEN."""
    env = (os.environ if environ is None else environ).get(TOKEN_ENV, "")
    if env and rpc.token_file:
        raise ConfigError("rpc.token_file", f"is set and so is the {TOKEN_ENV} environment "
                          "variable; use one of them")
    if rpc.token_file:
        where, text = "rpc.token_file", _read("token_file", rpc.token_file).decode("latin-1")
    elif env:
        where, text = TOKEN_ENV, env
    else:
        return None
    value = text.strip()
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        raise ConfigError(where, "the token must be printable ASCII without spaces "
                          "(its value is not shown)")
    if len(value) < MIN_TOKEN_CHARS:
        raise ConfigError(where, f"the token must have at least {MIN_TOKEN_CHARS} characters, "
                          f"it has {len(value)} (make one: python -c 'import secrets; "
                          "print(secrets.token_hex(32))')")
    return value


# ---- servers ------------------------------------------------------------------------------

def server_credentials(rpc: RpcConfig) -> grpc.ServerCredentials | None:
    """The credentials of a pserver's port (None: plaintext)."""
    if rpc.tls == "off":
        return None
    if not rpc.tls_cert:
        raise ConfigError("rpc.tls_cert", f"a pserver needs its certificate when rpc.tls is "
                          f"{rpc.tls!r} (rpc.tls_cert and rpc.tls_key)")
    cert, key = _pair("tls_cert", "tls_key", rpc)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=_ca(rpc),
                                       require_client_auth=rpc.tls == "mtls")


def describe(rpc: RpcConfig) -> str:
    """The security a job runs with, for logs (never the token itself)."""
    tokens = "token check on" if token(rpc) is not None else "no token check"
    return f"{'plaintext' if rpc.tls == 'off' else rpc.tls}, {tokens}"


def add_port(server: grpc.Server, listen: str, rpc: RpcConfig, role: str) -> int:
    """Bind `listen` with the job's credentials; the bound port (0: could not bind)."""
    creds = server_credentials(rpc)
    log.info("%s security: %s", role, describe(rpc))
    if creds is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, creds)


def server_interceptors(rpc: RpcConfig, role: str) -> list[grpc.ServerInterceptor]:
    """The token check for grpc.server(interceptors=...); none when the job has no token."""
    value = token(rpc)
    return [] if value is None else [TokenCheck(value, role)]


def _refuse(kind: str, method: str, reason: str, role: str) -> grpc.RpcMethodHandler:
    message = f"{method}: {reason} (rpc.token_file or {TOKEN_ENV})"

    def deny(_request: Any, ctx: grpc.ServicerContext) -> Any:
        log.warning("%s refused %s from %s: %s", role, method, ctx.peer(), reason)
        ctx.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make: Callable[..., grpc.RpcMethodHandler] = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(deny)


class TokenCheck(grpc.ServerInterceptor):
    """Refuses every call (but health probes) whose token is missing or wrong."""

    def __init__(self, value: str, role: str) -> None:
        self._expected = f"Bearer {value}".encode()
        self._role = role

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if details.method in OPEN_METHODS:
            return handler
        got = [v for k, v in details.invocation_metadata or () if k == TOKEN_HEADER]
        if len(got) == 1 and hmac.compare_digest(str(got[0]).encode(), self._expected):
            return handler
        reason = "no token" if not got else "wrong token"
        kind = "unary_unary"
        if handler is not None:
            kind = ("stream" if handler.request_streaming else "unary") + "_" + \
                   ("stream" if handler.response_streaming else "unary")
        return _refuse(kind, details.method, reason, self._role)


# ---- clients ------------------------------------------------------------------------------

def channel_credentials(rpc: RpcConfig) -> grpc.ChannelCredentials | None:
    """What a client presents and trusts (None: plaintext)."""
    if rpc.tls == "off":
        return None
    cert = key = None
    if rpc.tls == "mtls":
        if not rpc.tls_client_cert and not rpc.tls_cert:
            raise ConfigError("rpc.tls_client_cert", "a client needs a certificate when rpc.tls "
                              "is 'mtls' (rpc.tls_client_cert and rpc.tls_client_key, or "
                              "rpc.tls_cert and rpc.tls_key)")
        pair = ("tls_client_cert", "tls_client_key") if rpc.tls_client_cert \
            else ("tls_cert", "tls_key")
        cert, key = _pair(*pair, rpc)
    return grpc.ssl_channel_credentials(root_certificates=_ca(rpc), private_key=key,
                                        certificate_chain=cert)


def channel_options(rpc: RpcConfig) -> list[tuple[str, int]]:
    """The options of every channel and server of a job: its message size limit, and
    reconnects within a second of a restarted peer (not after gRPC's default backoff of up
    to two minutes)."""
    size = rpc.max_message_bytes
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def open_channel(address: str, rpc: RpcConfig) -> grpc.Channel:
    """A channel to `address` with the job's TLS, token and message sizes (every psrt
    client uses this)."""
    opts = channel_options(rpc)
    creds = channel_credentials(rpc)
    value = token(rpc)
    if creds is None:
        channel = grpc.insecure_channel(address, options=opts)
    else:
        if rpc.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", rpc.tls_server_name))
        channel = grpc.secure_channel(address, creds, options=opts)
    if value is None:
        return channel
    return grpc.intercept_channel(channel, _AddToken(value))


class _AddToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, value: str) -> None:
        self._header = (TOKEN_HEADER, f"Bearer {value}")

    def __repr__(self) -> str:
        return "_AddToken(<hidden>)"

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self._header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._details(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: float | None, metadata: list, credentials: Any,
                 wait_for_ready: bool | None, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def why_unreachable(channel: grpc.Channel, rpc: RpcConfig, timeout: float = 2.0) -> str:
    """With TLS on, gRPC's reason a channel never became ready (a failed handshake looks like
    an absent pserver otherwise), as "; ..." to append to an error; "" without TLS."""
    if rpc.tls == "off":
        return ""
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                  timeout=timeout)
    except grpc.RpcError as e:
        return f"; with rpc.tls = {rpc.tls!r}: {e.details()}"
    return ""
