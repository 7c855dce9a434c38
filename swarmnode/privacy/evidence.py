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
(uint8 [32]), ``model`` (uint8: canonical safetensors bytes), ``sum`` (uint64 [d]),
``masked/<site>`` (uint64 [d]) and ``reveal/<revealer>/<dropout>`` (uint8 [32]); addresses
lower-case.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from swarmnode.errors import PayloadRejected
from swarmnode.privacy.dropout import SeedReveal

__all__ = ["Evidence"]

_ADDR = r"0x[0-9a-f]{40}"
_MASKED = re.compile(rf"masked/({_ADDR})")
_REVEAL = re.compile(rf"reveal/({_ADDR})/({_ADDR})")
_META = {"meta/round", "meta/first", "meta/digest", "sum", "model"}


@dataclass(frozen=True)
class Evidence:
    """One summed round, as its leader holds it (attempt-0 seeds: see node.secure)."""

    round: int
    first: bool  # no starting model: the parameters were encoded whole (the round's plan)
    digest: bytes  # the merged model's digest the leader committed
    ring_sum: np.ndarray  # uint64: the leader's exact sum, masks removed
    masked: Mapping[str, np.ndarray]  # site (lower-case) -> its masked update (uint64)
    reveals: Sequence[SeedReveal]
    model: bytes  # the starting model's bytes (first: the merged model's), digest on chain

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors: dict[str, np.ndarray] = {
            "meta/round": np.array([self.round], dtype=np.int64),
            "meta/first": np.array([1 if self.first else 0], dtype=np.uint8),
            "meta/digest": np.frombuffer(self.digest, dtype=np.uint8).copy(),
            "sum": np.ascontiguousarray(self.ring_sum, dtype=np.uint64),
            "model": np.frombuffer(self.model, dtype=np.uint8).copy(),
        }
        for site, vector in self.masked.items():
            tensors[f"masked/{site.lower()}"] = np.ascontiguousarray(vector, dtype=np.uint64)
        for r in self.reveals:
            tensors[f"reveal/{r.revealer.lower()}/{r.missing.lower()}"] = np.frombuffer(
                r.seed, dtype=np.uint8).copy()
        return save(tensors)

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
        ring_sum = need("sum", np.uint64, (size,))
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
                masked[m.group(1)] = need(name, np.uint64, (size,))
            elif m := _REVEAL.fullmatch(name):
                seed = need(name, np.uint8, (32,)).tobytes()
                reveals.append(SeedReveal(m.group(1), m.group(2), rnd, 0, seed))
            else:
                raise PayloadRejected(f"{what}: unexpected tensor {name[:80]!r}")
        return cls(rnd, bool(first), digest, ring_sum, masked, reveals, model.tobytes())
