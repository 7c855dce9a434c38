"""What the peer and local APIs share: channel options, and SwarmErrors across a gRPC call.

A SwarmError raised on the serving side travels as a gRPC status (a code chosen by its class, its
message as the details) plus its class name in the trailing metadata key ``swarm-error``; the
calling side raises the same class with the same message (see :func:`swarmnode.errors.error_class`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, NoReturn

import grpc

from swarmnode.errors import (
    ConfigError,
    NodeError,
    PayloadRejected,
    PeerRefused,
    PeerUnavailable,
    SwarmError,
    TransportError,
    error_class,
)

__all__ = [
    "ADDRESS_KEY",
    "ERROR_KEY",
    "MAX_MESSAGE",
    "abort",
    "channel_options",
    "error_from_rpc",
    "host_port",
    "swarm_error_name",
]

log = logging.getLogger("swarmnode.transport")

ADDRESS_KEY = "swarm-address"  # metadata: the caller's chain address (peer API)
ERROR_KEY = "swarm-error"  # trailing metadata: the SwarmError class name
MAX_MESSAGE = 16 << 20  # one gRPC message; payloads travel as ~1 MiB chunks, never as one message


_TSI_FRAME = 1 << 20  # TLS frame protector buffer (gRPC's default is 16 KiB): fewer, larger writes


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.tsi.max_frame_size", _TSI_FRAME),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.tsi.max_frame_size", _TSI_FRAME),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]


def _code(exc: SwarmError) -> grpc.StatusCode:
    if isinstance(exc, PeerRefused):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, PayloadRejected | ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, ConnectionError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.FAILED_PRECONDITION


def abort(
    context: grpc.ServicerContext, exc: SwarmError, code: grpc.StatusCode | None = None
) -> NoReturn:
    """End the call with ``exc``: status code, message, and the name of its nearest class in
    :mod:`swarmnode.errors` in trailing metadata."""
    name = next(c.__name__ for c in type(exc).__mro__ if error_class(c.__name__) is c)
    context.set_trailing_metadata(((ERROR_KEY, name),))
    context.abort(code or _code(exc), str(exc))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def swarm_error_name(err: grpc.RpcError) -> str | None:
    """The SwarmError class name the server attached, if any."""
    try:
        md = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # a locally raised RpcError carries no metadata
        return None
    for key, value in md:
        if key == ERROR_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


def error_from_rpc(err: grpc.RpcError, prefix: str = "") -> SwarmError:
    """The SwarmError for a failed call: the server's class if it sent one, else by status."""
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    details: str = err.details() or code.name  # type: ignore[attr-defined]
    name = swarm_error_name(err)
    lead = f"{prefix}: " if prefix else ""
    if name is not None:
        return error_class(name)(lead + details)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PeerRefused(lead + details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return PayloadRejected(lead + details)
    if code is grpc.StatusCode.UNAVAILABLE:
        return PeerUnavailable(lead + details)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerUnavailable(lead + "no answer before the deadline (" + details + ")")
    if code is grpc.StatusCode.INTERNAL or code is grpc.StatusCode.UNKNOWN:
        return NodeError(lead + "the other side failed internally: " + details)
    return TransportError(lead + f"{code.name}: {details}")


def host_port(endpoint: str, what: str = "endpoint") -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port), ConfigError naming the endpoint otherwise."""
    target = endpoint.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} {endpoint!r} is not host:port (e.g. node1.example.org:7441)")
    return host, int(port)


def dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise NodeError(f"{what} is not JSON-serialisable: {exc}") from None


def loads(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        raise PayloadRejected(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PayloadRejected(f"{what} is not a JSON object")
    return value
