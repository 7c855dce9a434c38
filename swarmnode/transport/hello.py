"""A TLS ClientHello read from the bytes a client sent first: which protocols its ALPN offers.

The one-port mode (:mod:`swarmnode.transport.oneport`) peeks at a new connection's first bytes
and routes it by the ALPN protocols its ClientHello offers, before any TLS work. This module only
parses; it never answers. Anything that is not a well-formed ClientHello within the limits
(another record type, a version that is not TLS, a record over 16 KiB, a handshake message over
:data:`MAX_HELLO`, lengths that do not add up, a duplicated extension, an empty protocol name) is
:class:`HelloError`, so a garbage, truncated or oversized hello is refused, never guessed at. A
hello fragmented over several records (allowed by TLS) is put back together, up to
:data:`MAX_RECORDS` of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["MAX_HELLO", "MAX_PEEK", "MAX_RECORDS", "Hello", "HelloError", "parse"]

MAX_HELLO = 16384  # bytes of the ClientHello handshake message (real ones: 0.2-2 KiB)
MAX_RECORDS = 16  # TLS records the hello may be fragmented over
_RECORD = 5  # type, version (2), length (2)
_MAX_RECORD = 16384  # a TLSPlaintext fragment's limit (RFC 8446 5.1)
MAX_PEEK = 4 + MAX_HELLO + MAX_RECORDS * _RECORD  # bytes a reader may have to look at, at most
_HANDSHAKE, _CLIENT_HELLO, _ALPN = 22, 1, 16


class HelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello within the limits."""


@dataclass(frozen=True)
class Hello:
    alpn: tuple[bytes, ...]  # the protocols offered, in the client's order (empty: no ALPN)


def parse(buf: bytes) -> Hello | int:
    """The ClientHello at the start of ``buf``, or, while it is incomplete, how many bytes of
    ``buf`` it takes at least (always more than ``len(buf)``, never more than
    :data:`MAX_PEEK`); :class:`HelloError` when it cannot be one."""
    body, need = _reassemble(buf)
    if need:
        return need
    return Hello(_alpn(body))


def _reassemble(buf: bytes) -> tuple[bytes, int]:
    """(the handshake message, 0) once whole, else (b"", bytes needed)."""
    message = bytearray()
    pos = records = 0
    while True:
        if len(buf) < pos + _RECORD:
            return b"", pos + _RECORD
        kind, major, minor, length = buf[pos], buf[pos + 1], buf[pos + 2], \
            struct.unpack_from(">H", buf, pos + 3)[0]
        if kind != _HANDSHAKE:
            raise HelloError(f"the first bytes are not a TLS handshake record (type {kind}): "
                             "not a TLS client")
        if major != 3 or minor > 4:
            raise HelloError(f"record version {major}.{minor} is not TLS")
        if not 0 < length <= _MAX_RECORD:
            raise HelloError(f"a {length}-byte handshake record (TLS allows 1-16384)")
        records += 1
        if records > MAX_RECORDS:
            raise HelloError(f"the ClientHello is split over more than {MAX_RECORDS} records")
        end = pos + _RECORD + length
        if end > MAX_PEEK:
            raise HelloError(f"the ClientHello's records run past {MAX_PEEK} bytes")
        size = _check_start(message + buf[pos + _RECORD:end])  # refused before it is whole
        if len(buf) < end:
            return b"", end
        message += buf[pos + _RECORD:end]
        pos = end
        if size is not None and len(message) >= 4 + size:
            return bytes(message[4:4 + size]), 0


def _check_start(message: bytes) -> int | None:
    """The ClientHello's size once its handshake header is here (None before)."""
    if len(message) < 4:
        return None
    if message[0] != _CLIENT_HELLO:
        raise HelloError(f"the first handshake message is type {message[0]}, not a ClientHello")
    size = int.from_bytes(message[1:4], "big")
    if size > MAX_HELLO:
        raise HelloError(f"a {size}-byte ClientHello, over the {MAX_HELLO}-byte limit")
    return size


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise HelloError(f"{self.what}: a length runs past its end")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> _Reader:
        return _Reader(self.take(self.uint(n)), self.what)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _alpn(body: bytes) -> tuple[bytes, ...]:
    r = _Reader(body, "ClientHello")
    r.take(2 + 32)  # legacy_version, random
    if len(r.vector(1).data) > 32:
        raise HelloError("ClientHello: a session id over 32 bytes")
    suites = r.vector(2).data
    if not suites or len(suites) % 2:
        raise HelloError("ClientHello: no cipher suites, or an odd-length list")
    if not r.vector(1).data:
        raise HelloError("ClientHello: no compression methods")
    if not r.left:
        return ()  # no extensions at all (TLS 1.2 allows it): no ALPN
    exts = r.vector(2)
    if r.left:
        raise HelloError("ClientHello: bytes after the extensions")
    seen: set[int] = set()
    offered: tuple[bytes, ...] = ()
    while exts.left:
        kind = exts.uint(2)
        data = exts.vector(2)
        if kind in seen:
            raise HelloError(f"ClientHello: extension {kind} twice")
        seen.add(kind)
        if kind == _ALPN:
            names = data.vector(2)
            if data.left or not names.left:
                raise HelloError("ClientHello: a malformed ALPN extension")
            out = []
            while names.left:
                name = names.vector(1).data
                if not name:
                    raise HelloError("ClientHello: an empty ALPN protocol name")
                out.append(name)
            offered = tuple(out)
    return offered
