"""Fast (de)serialisation of the ``Chunk``/``Frame`` messages of peer.proto and local.proto.

Both messages are ``oneof body { Header header = 1; bytes data = 2; }``. Data chunks dominate
the traffic, and protobuf's Python runtime copies a ``bytes`` field several times (into the
message, out of it, into the wire string). These functions produce and read exactly the same
wire bytes for data chunks with one copy on the sending side and none on the receiving side (a
memoryview into gRPC's buffer); headers, and anything unusual, go through the generated classes.
A test checks the equivalence with protobuf in both directions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message

from swarmnode.errors import PayloadRejected

__all__ = ["Piece", "decoder", "encode", "header_of", "piece_data"]

_DATA_TAG = b"\x12"  # field 2, wire type 2 (length-delimited)

# What the deserialiser gives: a message, a data chunk's bytes, or the error for a malformed
# message (returned, not raised: gRPC would turn a raising deserialiser into a bare INTERNAL).
Piece = Message | memoryview | PayloadRejected


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def header_of(piece: Piece, field: str = "header") -> Any:
    """The header message of a chunk, or None if it is a data chunk."""
    if isinstance(piece, PayloadRejected):
        raise piece
    if isinstance(piece, memoryview) or piece.WhichOneof("body") != field:  # type: ignore[attr-defined]
        return None
    return getattr(piece, field)


def encode(item: Any) -> bytes:
    """Serialise a Chunk/Frame message, or a data chunk given as bytes-like (one copy)."""
    if isinstance(item, Message):
        return item.SerializeToString()
    view = memoryview(item).cast("B")
    return b"".join((_DATA_TAG, _varint(len(view)), view))


def decoder(cls: type[Message]) -> Callable[[bytes], Piece]:
    """A deserialiser: a data chunk becomes a memoryview of its bytes, the rest a ``cls``."""

    def decode(raw: bytes) -> Piece:
        if raw[:1] == _DATA_TAG:
            n, shift, pos = 0, 0, 1
            while pos < len(raw) and pos < 11:
                b = raw[pos]
                n |= (b & 0x7F) << shift
                pos += 1
                if not b & 0x80:
                    if pos + n == len(raw):
                        return memoryview(raw)[pos:]
                    break
                shift += 7
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            return PayloadRejected(f"a stream message is not a valid {cls.__name__}: {exc}")

    return decode


def piece_data(piece: Piece) -> memoryview | None:
    """The data bytes of a chunk, or None if it is not a data chunk (a header)."""
    if isinstance(piece, memoryview):
        return piece
    if isinstance(piece, PayloadRejected):
        raise piece
    if piece.WhichOneof("body") == "data":  # type: ignore[attr-defined]
        return memoryview(piece.data)  # type: ignore[attr-defined]
    return None
