"""A committed secure round's evidence: what its leader summed, as bytes a member can check.

The leader keeps, per summed round, the masked update of every site in the sum, the survivors'
seed reveals for the sites that never checked in, the exact ring sum it decoded, the digest it
committed and a model: the round's starting model (the latest committed before it), or, for a
round without one, the merged model (whose tensors that are not summed the leader took from
its own); either one's digest is on chain, so the member needs no model of its own. A member
fetches them (masked updates are masked: safe to hand to members) and checks them with
:func:`swarmnode.privacy.audit.verify_sum` against the hashes on chain, then decodes the sum as
the leader does and compares the model's digest with the chain's (:mod:`swarmnode.node.secaudit`).

Bytes: safetensors (never pickle), tensors ``meta/round`` (int64 [1]), ``meta/first`` (uint8
[1]: 1 when the round had no starting model and encoded the parameters whole), ``meta/digest``
(uint8 [32]), ``model`` (uint8: canonical safetensors bytes), ``masked/<site>`` (uint32 [d] in
the narrow ring, uint64 [d] in the wide one: the round's ring, format swarmnode-secagg/3; every
vector of one file the same), ``reveal/<revealer>/<dropout>`` (uint8 [32]) and, optionally,
``sum`` (of the vectors' type [d]); addresses lower-case. A node no longer writes ``sum`` (since
2026-12): the member recomputes it from the masked updates and reveals (``verify_sum``) and
decodes that, so a stated sum added nothing but d x 8 bytes; evidence that holds one (older
leaders) is still read, and the sum checked.
:meth:`Evidence.write_to` streams the file from the vectors' own memory (no whole-file copy).
"""

from __future__ import annotations

import io
import json
import mmap
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from swarmnode.errors import PayloadRejected
from swarmnode.privacy.dropout import SeedReveal

__all__ = ["Evidence"]

_ADDR = r"0x[0-9a-f]{40}"
_MASKED = re.compile(rf"masked/({_ADDR})")
_REVEAL = re.compile(rf"reveal/({_ADDR})/({_ADDR})")
_META = {"meta/round", "meta/first", "meta/digest", "sum", "model"}
_WRITE = 8 << 20  # bytes per write: the file grows from each vector's own memory


def _ring(vector: np.ndarray) -> np.ndarray:
    if vector.dtype not in (np.uint32, np.uint64):
        raise PayloadRejected("evidence holds uint32 or uint64 ring vectors")
    return np.ascontiguousarray(vector)


@dataclass(frozen=True)
class Evidence:
    """One summed round, as its leader holds it (attempt-0 seeds: see node.secure)."""

    round: int
    first: bool  # no starting model: the parameters were encoded whole (the round's plan)
    digest: bytes  # the merged model's digest the leader committed
    ring_sum: np.ndarray | None  # the vectors' type: the leader's exact sum, masks removed
    # (None: not stated; the member recomputes it)
    masked: Mapping[str, np.ndarray]  # site (lower-case) -> its masked update (uint32/uint64)
    reveals: Sequence[SeedReveal]
    model: bytes | bytearray | memoryview | mmap.mmap  # the starting model's bytes (first: the
    # merged model's), digest on chain; from_bytes gives bytes

    def _tensors(self) -> list[tuple[str, np.ndarray]]:
        tensors: list[tuple[str, np.ndarray]] = [
            ("meta/round", np.array([self.round], dtype=np.int64)),
            ("meta/first", np.array([1 if self.first else 0], dtype=np.uint8)),
            ("meta/digest", np.frombuffer(self.digest, dtype=np.uint8)),
            ("model", np.frombuffer(self.model, dtype=np.uint8)),
        ]
        if self.ring_sum is not None:
            tensors.append(("sum", _ring(self.ring_sum)))
        for site, vector in self.masked.items():
            tensors.append((f"masked/{site.lower()}", _ring(vector)))
        for r in self.reveals:
            tensors.append((f"reveal/{r.revealer.lower()}/{r.missing.lower()}",
                            np.frombuffer(r.seed, dtype=np.uint8)))
        return tensors

    def _header(self, tensors: list[tuple[str, np.ndarray]]) -> bytes:
        """safetensors' header for ``tensors`` laid out in that order (padded to 8 bytes)."""
        codes = {np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8",
                 np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64"}
        header, at = {}, 0
        for name, t in tensors:
            header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape),
                            "data_offsets": [at, at + t.nbytes]}
            at += t.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text

    def write_to(self, f: BinaryIO) -> int:
        """Write the evidence's bytes to the open file ``f``, each tensor from its own memory
        (nothing the size of the file is built); the bytes written."""
        tensors = self._tensors()
        head = self._header(tensors)
        f.write(head)
        total = len(head)
        for _, t in tensors:
            view = memoryview(t).cast("B")
            for start in range(0, len(view), _WRITE):
                total += f.write(view[start: start + _WRITE])
        return total

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        self.write_to(out)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, size: int, what: str = "secure-round evidence"
                   ) -> Evidence:
        """The evidence in ``data``, each vector of ``size`` ring elements; PayloadRejected
        saying what is wrong otherwise (the bytes come from another site)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors = load(bytes(data))
        except (SafetensorError, ValueError, TypeError) as exc:
            raise PayloadRejected(f"{what}: not safetensors bytes ({exc})") from None

        def need(name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
            t = tensors.get(name)
            if t is None or t.dtype != dtype or t.shape != shape:
                raise PayloadRejected(f"{what}: tensor {name!r} missing or not {np.dtype(dtype)}"
                                      f" of shape {shape}; the leader must send this "
                                      "version's evidence")
            return t

        rnd = int(need("meta/round", np.int64, (1,))[0])
        first = int(need("meta/first", np.uint8, (1,))[0])
        digest = need("meta/digest", np.uint8, (32,)).tobytes()
        # the ring's type: the vectors' (all the same; uint32 narrow, uint64 wide)
        types = {tensors[n].dtype for n in tensors if n == "sum" or _MASKED.fullmatch(n)}
        if len(types) > 1 or not types <= {np.dtype(np.uint32), np.dtype(np.uint64)}:
            raise PayloadRejected(f"{what}: its vectors are {sorted(map(str, types))}, not all "
                                  "uint32 or all uint64 (one ring per round)")
        ring_type = types.pop() if types else np.dtype(np.uint64)
        ring_sum = need("sum", ring_type, (size,)) if "sum" in tensors else None
        model = tensors.get("model")
        if model is None or model.dtype != np.uint8 or model.ndim != 1 or not model.size:
            raise PayloadRejected(f"{what}: no model bytes (tensor 'model'); the leader must "
                                  "send this version's evidence")
        if rnd < 1 or first not in (0, 1):
            raise PayloadRejected(f"{what}: round {rnd} / first {first} out of range")
        masked: dict[str, np.ndarray] = {}
        reveals: list[SeedReveal] = []
        for name in tensors:
            if name in _META:
                continue
            if m := _MASKED.fullmatch(name):
                masked[m.group(1)] = need(name, ring_type, (size,))
            elif m := _REVEAL.fullmatch(name):
                seed = need(name, np.uint8, (32,)).tobytes()
                reveals.append(SeedReveal(m.group(1), m.group(2), rnd, 0, seed))
            else:
                raise PayloadRejected(f"{what}: unexpected tensor {name[:80]!r}")
        return cls(rnd, bool(first), digest, ring_sum, masked, reveals, model.tobytes())
