"""A masked update's canonical bytes and their SHA-256, the hash a site's check-in carries.

Bytes: ``b"swarmnode-secagg/1\\0"``, the ring width k (one byte), the element count (8 bytes,
little-endian), then every element little-endian in 4 bytes (k <= 32) or 8 (k > 32).
"""

from __future__ import annotations

import hashlib

import numpy as np

from swarmnode.errors import PayloadRejected
from swarmnode.privacy.ring import RingPlan

__all__ = ["MAGIC", "from_bytes", "to_bytes", "update_hash"]

MAGIC = b"swarmnode-secagg/1\0"


def _header(plan: RingPlan, n: int) -> bytes:
    return MAGIC + bytes([plan.ring_bits]) + n.to_bytes(8, "little")


def _body(vector: np.ndarray, plan: RingPlan) -> np.ndarray:
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.ndim != 1:
        raise PayloadRejected("a masked update is a 1-D uint64 vector of ring elements")
    if plan.bytes_per_element == 4:
        return vector.astype("<u4")
    return np.ascontiguousarray(vector, dtype="<u8")


def to_bytes(vector: np.ndarray, plan: RingPlan) -> bytes:
    """The canonical bytes of a masked update (what travels and what is hashed)."""
    return _header(plan, vector.shape[0]) + _body(vector, plan).tobytes()


def update_hash(vector: np.ndarray, plan: RingPlan) -> bytes:
    """SHA-256 of :func:`to_bytes` (computed without building the bytes)."""
    h = hashlib.sha256(_header(plan, vector.shape[0]))
    h.update(memoryview(_body(vector, plan)).cast("B"))
    return h.digest()


def from_bytes(data: bytes, plan: RingPlan, n: int) -> np.ndarray:
    """The uint64 vector in ``data``; PayloadRejected unless it is a well-formed update of ``n``
    elements in this ring."""
    header = _header(plan, n)
    width = plan.bytes_per_element
    if len(data) != len(header) + n * width or not data.startswith(header):
        raise PayloadRejected(
            f"not a masked update of {n} elements in a {plan.ring_bits}-bit ring "
            f"({len(data)} bytes, header {bytes(data[:len(header)])!r}); the sender must "
            "encode it with this training's secure-aggregation plan")
    body = np.frombuffer(data, dtype="<u4" if width == 4 else "<u8", offset=len(header))
    vector = body.astype(np.uint64)
    if plan.ring_bits < 64 and bool((vector > plan.modulus_mask).any()):
        raise PayloadRejected(f"a masked update holds values outside the {plan.ring_bits}-bit "
                              "ring; the sender must reduce it")
    return vector
