"""One secure-aggregation round played with the real core: real X25519 keys, HKDF pair keys,
HMAC round seeds, AES-CTR masks, the leader's aggregate (no chain, no transport: the round
engine does not run it yet)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from swarmnode.privacy import dropout, encoding, keys, masks
from swarmnode.privacy.ring import RingPlan

CHAIN_ID = 31337
TRAINING = "0x" + "5a" * 20


@dataclass
class Site:
    address: str
    key: keys.SiteKey
    pair_keys: dict[str, bytes] = field(default_factory=dict)

    def seeds(self, round_number: int, attempt: int = 0) -> dict[str, bytes]:
        return {peer: keys.round_seed(k, round_number, attempt)
                for peer, k in self.pair_keys.items()}


def make_sites(n: int, rng: np.random.Generator) -> list[Site]:
    """``n`` sites with random addresses and fresh keys, each with its pair keys derived from
    its own private key and the others' public keys (as each site would)."""
    addresses = ["0x" + rng.bytes(20).hex() for _ in range(n)]
    assert len(set(addresses)) == n
    sites = [Site(a, keys.SiteKey.generate()) for a in addresses]
    for me in sites:
        for peer in sites:
            if peer is not me:
                me.pair_keys[peer.address] = keys.pair_key(
                    me.key, peer.key.public_bytes, chain_id=CHAIN_ID, training=TRAINING,
                    me=me.address, peer=peer.address)
    return sites


@dataclass
class Round:
    plan: RingPlan
    roster: list[str]
    weights: dict[str, int]  # checked-in sites -> weight
    changes: dict[str, np.ndarray]  # checked-in sites -> float32 change
    encoded: dict[str, encoding.Encoded]
    masked: dict[str, np.ndarray]
    reveals: list[dropout.SeedReveal]
    round_number: int
    attempt: int


def play(sites: list[Site], plan: RingPlan, changes: dict[str, np.ndarray],
         weights: dict[str, int], round_number: int = 1, attempt: int = 0,
         seed: int = 0) -> Round:
    """Sites in ``changes`` check in, encode, mask and push; the rest of the roster dropped
    before checking in, and every survivor reveals its seeds with them."""
    roster = [s.address for s in sites]
    encoded, masked = {}, {}
    for i, site in enumerate(sites):
        if site.address not in changes:
            continue
        enc = encoding.encode(changes[site.address], weights[site.address], plan,
                              seed=[seed, round_number, attempt, i])
        encoded[site.address] = enc
        masked[site.address] = masks.mask_update(enc.values, site.address,
                                                 site.seeds(round_number, attempt), plan)
    reveals = []
    for site in sites:
        if site.address in changes:
            reveals += dropout.reveal_seeds(site.address, roster, changes.keys(), round_number,
                                            attempt, site.seeds(round_number, attempt))
    return Round(plan, roster, dict(weights), dict(changes), encoded, masked, reveals,
                 round_number, attempt)


def clipped(change: np.ndarray, clip: float) -> np.ndarray:
    x = change.astype(np.float64)
    norm = math.sqrt(float(np.dot(x, x)))
    return x * (clip / norm) if norm > clip else x


def uniform_z(values: np.ndarray, ring_bits: int = 64) -> float:
    """How far the bytes of k-bit ring elements are from uniform: a chi-square over 256 bins for
    each byte position, summed, as a standard normal score (Wilson-Hilferty). Uniform values
    score about N(0, 1)."""
    v = values.astype(np.uint64)
    stat, df = 0.0, 0
    for byte in range((ring_bits + 7) // 8):
        bits = min(8, ring_bits - 8 * byte)
        bins = 1 << bits
        counts = np.bincount(((v >> np.uint64(8 * byte)) & np.uint64(bins - 1)).astype(np.int64),
                             minlength=bins)
        expected = v.shape[0] / bins
        stat += float(((counts - expected) ** 2).sum() / expected)
        df += bins - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
