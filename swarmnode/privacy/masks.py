"""Pairwise masks: ring elements from a cryptographic PRG, added by one site and subtracted by
the other, so they cancel in the sum.

PRG: AES-256-CTR keyed by the pair's 32-byte round seed (a fresh key per pair, round and
attempt, so the all-zero counter block never repeats under one key), 8 keystream bytes per
element read as little-endian uint64; for a ring of k < 64 bits the low k bits are kept (every
bit is uniform: no modulo bias). Sign: of two sites, the one with the lower address adds the
pair's mask and the other subtracts it (addresses compared as 20-byte numbers).

Work is done in blocks of 2^20 elements (8 MiB of keystream), so masking a vector of tens of
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


def _blocks(seed: bytes, n: int):  # type: ignore[no-untyped-def]
    """(start, uint64 view of that block's keystream) for elements 0..n-1."""
    stream = _keystream(seed)
    buf = bytearray(BLOCK * 8 + 16)
    for start in range(0, n, BLOCK):
        count = min(BLOCK, n - start)
        stream.update_into(memoryview(_ZEROS)[: count * 8], buf)
        yield start, np.frombuffer(buf, dtype="<u8", count=count)


def expand(seed: bytes, n: int, plan: RingPlan) -> np.ndarray:
    """The mask of ``n`` ring elements a seed stands for (the whole vector: for tests, audits)."""
    out = np.empty(n, dtype=np.uint64)
    for start, block in _blocks(seed, n):
        out[start: start + block.shape[0]] = block
    if plan.ring_bits < 64:
        out &= plan.modulus_mask
    return out


def adds_first(me: str, peer: str) -> bool:
    """True when ``me`` adds the pair's mask (its address is the lower), False: it subtracts."""
    mine, theirs = address_bytes(me, "site address"), address_bytes(peer, "site address")
    if mine == theirs:
        raise ConfigError(f"secure aggregation: a site does not mask with itself ({me})")
    return mine < theirs


def add_pair_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """``vector += sign * PRG(seed)`` in place, modulo 2^64 (reduce to k bits afterwards)."""
    if sign not in (1, -1):
        raise ConfigError("secure aggregation: a mask's sign is +1 or -1")
    for start, block in _blocks(seed, vector.shape[0]):
        part = vector[start: start + block.shape[0]]
        if sign > 0:
            part += block
        else:
            part -= block


def mask_update(encoded: np.ndarray, me: str, seeds: Mapping[str, bytes],
                plan: RingPlan) -> np.ndarray:
    """The masked update ``me`` pushes: its encoded values plus, for every other site of the
    round (``seeds``: peer address -> this round's pair seed), + or - that pair's mask."""
    if encoded.dtype != np.uint64 or encoded.ndim != 1:
        raise ConfigError("secure aggregation masks a 1-D uint64 vector (from encode)")
    out = encoded.copy()
    _add_masks(out, me, seeds)
    if plan.ring_bits < 64:
        out &= plan.modulus_mask
    return out


def pair_masks(n: int, me: str, seeds: Mapping[str, bytes]) -> np.ndarray:
    """The sum of the ``n``-element masks :func:`mask_update` adds for ``me`` (modulo 2^64, not
    reduced to k bits): it does not depend on the update, so a site can make it before its
    update is ready; ``(encoded + pair_masks(...)) & modulus_mask`` is ``mask_update``'s vector
    bit for bit (addition modulo 2^64 in any order)."""
    out = np.zeros(n, dtype=np.uint64)
    _add_masks(out, me, seeds)
    return out


def _add_masks(vector: np.ndarray, me: str, seeds: Mapping[str, bytes]) -> None:
    if not seeds:
        raise ConfigError("secure aggregation: a site masks with every other site of the "
                          "round; it was given none")
    for peer, seed in sorted(seeds.items()):
        add_pair_mask(vector, seed, 1 if adds_first(me, peer) else -1)
