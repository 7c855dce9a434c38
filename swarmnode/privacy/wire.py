"""A masked update's canonical bytes and their SHA-256, the hash a site's check-in carries.

Format ``swarmnode-secagg/3`` (FORMAT, since 2026-12): the canonical bytes are the very payload a
site pushes to its leader, the transport's canonical safetensors (:mod:`swarmnode.transport.serde`)
of one tensor named FORMAT of the update's element count, its ring elements in their natural
width (little-endian): int32 (4 bytes) in the narrow 2^32 ring, int64 (8 bytes) in the wide 2^64
ring (:mod:`swarmnode.privacy.ring`: which ring a round uses follows from public data, so the
leader knows which width to expect; the tensor's dtype says it too). So the hash on chain is the
transport's digest of the pushed payload: a site hashes its masked vector once (that digest is
its check-in's hash and its push's digest), and the leader compares the digest the data plane
computed as the bytes arrived (and checked) with the chain's, without a second pass over them.
An auditor recomputes it from the vector alone (:func:`update_hash`, without building the bytes).

Earlier formats, refused by name (the payload's one tensor is named after its format):
``swarmnode-secagg/2`` (before the narrow ring) pushed every ring element in 8 bytes whatever the
ring and masked with 8 keystream bytes per element; ``swarmnode-secagg/1`` hashed other bytes
apart from the pushed payload. Nodes of different formats cannot share a training: a /1 or /2
push is refused at a /3 leader (:class:`MaskedSpec` names the format it sent), and a /3
member's audit of a round summed by an older leader fails at its hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from swarmnode.errors import PayloadRejected
from swarmnode.privacy.ring import RingPlan
from swarmnode.transport import serde
from swarmnode.transport.compression import UpdateSpec

__all__ = ["FORMAT", "OLD_FORMATS", "MaskedSpec", "from_bytes", "header", "params", "to_bytes",
           "update_hash"]

FORMAT = "swarmnode-secagg/3"  # the format, and the name of the payload's one tensor
OLD_FORMATS = ("swarmnode-secagg/1", "swarmnode-secagg/2")  # refused by name
_WIRE = {4: "int32", 8: "int64"}  # element bytes -> the payload tensor's dtype


def _itemsize(ring_bits: int) -> int:
    return 4 if ring_bits <= 32 else 8


def params(n: int, ring_bits: int = 64) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layout of a masked update of ``n`` elements in a ``ring_bits`` ring (one int32
    tensor for a ring of at most 32 bits, else one int64 tensor)."""
    return {FORMAT: ((n,), _WIRE[_itemsize(ring_bits)])}


def header(n: int, ring_bits: int = 64) -> bytes:
    """The bytes before the elements in the canonical payload of ``n`` elements."""
    return serde.ParamSpec(params(n, ring_bits)).header()


def _body(vector: np.ndarray) -> np.ndarray:
    if not isinstance(vector, np.ndarray) or vector.dtype not in (np.uint32, np.uint64) \
            or vector.ndim != 1:
        raise PayloadRejected("a masked update is a 1-D uint32 or uint64 vector of ring "
                              "elements")
    return np.ascontiguousarray(vector, dtype=vector.dtype.newbyteorder("<"))


def _bits(vector: np.ndarray) -> int:
    return 32 if vector.dtype == np.uint32 else 64


def to_bytes(vector: np.ndarray) -> bytes:
    """The canonical bytes of a masked update (what is pushed and what is hashed)."""
    body = _body(vector)
    return header(vector.shape[0], _bits(vector)) + body.tobytes()


def update_hash(vector: np.ndarray) -> bytes:
    """SHA-256 of :func:`to_bytes` (computed without building the bytes): the digest of the
    pushed payload."""
    body = _body(vector)
    h = hashlib.sha256(header(vector.shape[0], _bits(vector)))
    h.update(memoryview(body).cast("B"))
    return h.digest()


def from_bytes(data: bytes, plan: RingPlan, n: int) -> np.ndarray:
    """The vector (the plan's dtype) in ``data``; PayloadRejected unless it is a well-formed
    update of ``n`` elements in this ring."""
    head = header(n, plan.ring_bits)
    size = plan.bytes_per_element
    if len(data) != len(head) + n * size or not data.startswith(head):
        raise PayloadRejected(
            f"not a masked update of {n} elements of the {plan.ring_bits}-bit ring in format "
            f"{FORMAT} ({len(data)} bytes, header {bytes(data[:len(head)])!r}); the sender "
            "must encode it with this round's secure-aggregation plan")
    vector = np.frombuffer(data, dtype=np.dtype(plan.dtype).newbyteorder("<"),
                           offset=len(head)).astype(plan.dtype)
    if plan.reduces and bool((vector > plan.modulus_mask).any()):
        raise PayloadRejected(f"a masked update holds values outside the {plan.ring_bits}-bit "
                              "ring; the sender must reduce it")
    return vector


class MaskedSpec(UpdateSpec):
    """What a pushed masked update of ``n`` elements may look like: one tensor named FORMAT of
    ``n`` elements, int32 (narrow ring) or int64 (wide ring); its size limit is the wide one's.
    A payload of an older format is refused naming it. Which width the round takes is the
    leader's check (node.secure: the round's plan)."""

    def __init__(self, n: int) -> None:
        super().__init__(params(n, 64), "none")
        object.__setattr__(self, "n", int(n))

    def __hash__(self) -> int:
        return hash((FORMAT, self.n))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskedSpec) and other.n == self.n

    def payload_sizes(self) -> tuple[int, ...]:
        return tuple(serde.ParamSpec(params(self.n, bits)).payload_bytes for bits in (32, 64))

    def _check(self, got: Mapping[str, tuple[tuple[int, ...], str]], who: str) -> None:
        old = sorted(set(got) & set(OLD_FORMATS))
        if old:
            raise PayloadRejected(
                f"{who} is a masked update in format {old[0]}; this node takes {FORMAT} (the "
                "sender's swarmnode is older: every site of a training must run a version "
                "with the same format)")
        entry = got.get(FORMAT)
        if len(got) == 1 and entry is not None and entry[1] == "int32":
            serde.ParamSpec(params(self.n, 32))._check(got, who)
            return
        serde.ParamSpec(params(self.n, 64))._check(got, who)
