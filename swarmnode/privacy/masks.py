"""Pairwise masks: ring elements from a cryptographic PRG, added by one site and subtracted by
the other, so they cancel in the sum.

PRG: AES-256-CTR keyed by the pair's 32-byte round seed (a fresh key per pair, round and
attempt, so the all-zero counter block never repeats under one key), read as little-endian ring
elements of the vector's type: 4 keystream bytes per element (uint32) in the narrow 2^32 ring,
8 (uint64) in the wide 2^64 one (format swarmnode-secagg/3; /2 read 8 bytes whatever the ring);
for a ring narrower than its type the low k bits are kept (every bit is uniform: no modulo
bias). Sign: of two sites, the one with the lower address adds the
pair's mask and the other subtracts it (addresses compared as 20-byte numbers).

Work is done in blocks of 2^20 elements (4 or 8 MiB of keystream), so masking a vector of tens of
millions of parameters needs no second full-size buffer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from swarmnode.errors import ConfigError
from swarmnode.privacy.keys import KEY_BYTES, address_bytes
from swarmnode.privacy.ring import RingPlan

__all__ = ["add_pair_mask", "adds_first", "expand", "mask_update", "pair_masks"]

BLOCK = 1 << 20  # elements per keystream block
_ZEROS = bytes(BLOCK * 8)


def _keystream(seed: bytes):  # type: ignore[no-untyped-def]
    if not isinstance(seed, bytes) or len(seed) != KEY_BYTES:
        raise ConfigError("secure aggregation: a round seed is 32 bytes (from round_seed)")
    return Cipher(algorithms.AES256(seed), modes.CTR(bytes(16))).encryptor()


def _ring_type(dtype: np.dtype) -> np.dtype:
    if dtype not in (np.uint32, np.uint64):
        raise ConfigError(f"secure aggregation masks uint32 or uint64 ring elements, not {dtype}")
    return np.dtype(dtype).newbyteorder("<")


def _blocks(seed: bytes, n: int, dtype: np.dtype | None = None):  # type: ignore[no-untyped-def]
    """(start, view of that block's keystream as ``dtype`` elements, uint64 when None) for
    elements 0..n-1."""
    ring_type = _ring_type(np.dtype(np.uint64 if dtype is None else dtype))
    size = ring_type.itemsize
    stream = _keystream(seed)
    buf = bytearray(BLOCK * size + 16)
    for start in range(0, n, BLOCK):
        count = min(BLOCK, n - start)
        stream.update_into(memoryview(_ZEROS)[: count * size], buf)
        yield start, np.frombuffer(buf, dtype=ring_type, count=count)


def expand(seed: bytes, n: int, plan: RingPlan) -> np.ndarray:
    """The mask of ``n`` ring elements a seed stands for (the whole vector: for tests, audits)."""
    out = np.empty(n, dtype=plan.dtype)
    for start, block in _blocks(seed, n, out.dtype):
        out[start: start + block.shape[0]] = block
    if plan.reduces:
        out &= plan.modulus_mask
    return out


def adds_first(me: str, peer: str) -> bool:
    """True when ``me`` adds the pair's mask (its address is the lower), False: it subtracts."""
    mine, theirs = address_bytes(me, "site address"), address_bytes(peer, "site address")
    if mine == theirs:
        raise ConfigError(f"secure aggregation: a site does not mask with itself ({me})")
    return mine < theirs


def add_pair_mask(vector: np.ndarray, seed: bytes, sign: int, *, fresh: bool = False) -> None:
    """``vector += sign * PRG(seed)`` in place, modulo its type's width (reduce to k bits
    afterwards); the keystream is read as elements of ``vector``'s type (uint32 / uint64).
    ``fresh``: ``vector = sign * PRG(seed)``, whatever it held (no pass to zero it first)."""
    if sign not in (1, -1):
        raise ConfigError("secure aggregation: a mask's sign is +1 or -1")
    for start, block in _blocks(seed, vector.shape[0], vector.dtype):
        part = vector[start: start + block.shape[0]]
        if fresh:
            if sign > 0:
                np.copyto(part, block)
            else:
                np.negative(block, out=part)  # unsigned: 2^k - x, the ring's -x
        elif sign > 0:
            part += block
        else:
            part -= block


def mask_update(encoded: np.ndarray, me: str, seeds: Mapping[str, bytes],
                plan: RingPlan) -> np.ndarray:
    """The masked update ``me`` pushes: its encoded values plus, for every other site of the
    round (``seeds``: peer address -> this round's pair seed), + or - that pair's mask."""
    if encoded.dtype != plan.dtype or encoded.ndim != 1:
        raise ConfigError(f"secure aggregation masks a 1-D {np.dtype(plan.dtype).name} vector "
                          "(from encode, in the round's ring)")
    out = encoded.copy()
    _add_masks(out, me, seeds)
    if plan.reduces:
        out &= plan.modulus_mask
    return out


def pair_masks(n: int, me: str, seeds: Mapping[str, bytes], out: np.ndarray | None = None,
               dtype: type[np.unsignedinteger] = np.uint64) -> np.ndarray:
    """The sum of the ``n``-element masks :func:`mask_update` adds for ``me`` (modulo the
    type's width, not reduced to k bits): it does not depend on the update, so a site can make
    it before its update is ready; ``(encoded + pair_masks(...)) & modulus_mask`` is
    ``mask_update``'s vector bit for bit (addition modulo 2^32 / 2^64 in any order). ``out``: a
    vector of ``n`` elements of the ring's type (the plan's dtype) to write it into (whatever
    it held is overwritten: the first pair's mask is written, not added to zeros); None: a
    fresh one of ``dtype``."""
    if out is None:
        out = np.empty(n, dtype=dtype)
    elif out.dtype not in (np.uint32, np.uint64) or out.shape != (n,):
        raise ConfigError(f"secure aggregation: pair masks go into a uint32 or uint64 vector "
                          f"of {n} elements")
    _add_masks(out, me, seeds, fresh=True)
    return out


def _add_masks(vector: np.ndarray, me: str, seeds: Mapping[str, bytes],
               fresh: bool = False) -> None:
    if not seeds:
        raise ConfigError("secure aggregation: a site masks with every other site of the "
                          "round; it was given none")
    for i, (peer, seed) in enumerate(sorted(seeds.items())):
        add_pair_mask(vector, seed, 1 if adds_first(me, peer) else -1, fresh=fresh and i == 0)
