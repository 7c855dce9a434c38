"""Distributed noise on the masked sum: the spec option, each site's share, and its bounds.

With ``"distributed_noise": {"noise_multiplier": z, "delta": d}`` in a secure-aggregation spec
every site of a round's mask set (n sites, fixed before check-ins: privacy.roster) adds discrete
Gaussian noise of variance ``sigma^2 / n`` to its encoded update, in the ring, after clipping and
encoding and before masking, with ``sigma = z * (W * C * 2^f + sqrt(d))`` in ring units (W the
spec's max_weight, C its clip_norm, f the fractional bits, d the number of summed coordinates).
The sum of the k shares that arrive has variance ``k sigma^2 / n``: a site of the mask set that
never checks in (a dropout) takes its share with it, and the accountant
(:mod:`swarmnode.privacy.accountant`) says so.

Sensitivity (site-level, add/remove one site's update): a site's encoded update is its change
clipped to L2 norm C, times its weight w, times 2^f, rounded stochastically coordinate by
coordinate (each by less than one unit), so its L2 norm is at most ``w C 2^f + sqrt(d)``. Weights
are public (the check-ins carry them): the noise protects what an update says, not that a site
took part or with what weight. ``sigma`` uses W because a site masks before the round's weights
are known; the accountant uses the round's largest adding weight.

The first round (no committed starting model: the parameters are summed whole, bounded only by
the ring) carries no noise: no noise at clip_norm's scale would protect parameters whole, and
noise at their scale would destroy them. The accountant lists such a round as not covered.

Each site's generator is seeded with HMAC-SHA256(its X25519 private key, training, round): secret
(other sites cannot subtract the share) and the same for the same key and round, so a vector
masked again is the same vector (one masked vector per round, as the masks need).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from swarmnode.privacy import ring
from swarmnode.privacy.accountant import RoundNoise
from swarmnode.privacy.discrete_gaussian import MAX_SIGMA, discrete_gaussian
from swarmnode.privacy.guards import MIN_SITES

__all__ = ["TAIL", "DistributedNoise", "check_ring", "generator", "parameter_count",
           "round_noise", "sensitivity", "share", "sigma", "sum_noise_bound"]

# The sum's noise stays within TAIL sigma on a coordinate but with probability 2 exp(-72)
TAIL = 12.0


@dataclass(frozen=True)
class DistributedNoise:
    """The spec's ``distributed_noise``: the noise multiplier z (the sum's noise sigma over one
    site's largest contribution) and the delta the swarm's epsilon is reported at."""

    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        z, d = self.noise_multiplier, self.delta
        if isinstance(z, bool) or not isinstance(z, int | float) or not math.isfinite(z) \
                or not 0 < z <= 1000:
            raise ValueError(f"distributed_noise.noise_multiplier must be a number in (0, 1000], "
                             f"got {z!r} (about 1 gives a single-digit epsilon per round)")
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d < 1:
            raise ValueError(f"distributed_noise.delta must be a number in (0, 1), got {d!r} "
                             "(e.g. 1e-5: well below 1 / the number of sites)")

    def to_dict(self) -> dict[str, float]:
        return {"delta": float(self.delta), "noise_multiplier": float(self.noise_multiplier)}

    @classmethod
    def from_raw(cls, raw: Any) -> DistributedNoise | None:
        """The JSON value (None, or an object with noise_multiplier and optional delta)."""
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise ValueError(f"distributed_noise must be an object like "
                             f'{{"noise_multiplier": 1.0, "delta": 1e-5}}, got {raw!r}')
        unknown = set(raw) - {"noise_multiplier", "delta"}
        if unknown:
            raise ValueError(f"distributed_noise has unknown fields {sorted(unknown)}; it takes "
                             "noise_multiplier and delta")
        if "noise_multiplier" not in raw:
            raise ValueError("distributed_noise needs noise_multiplier (e.g. 1.0)")
        return cls(raw["noise_multiplier"], raw.get("delta", 1e-5))


def sensitivity(weight: int, plan: ring.RingPlan, size: int) -> float:
    """The L2 norm bound of one site's encoded update in ring units: w C 2^f + sqrt(d)."""
    return weight * plan.clip * math.ldexp(1.0, plan.fraction_bits) + math.sqrt(size)


def sigma(noise: DistributedNoise, plan: ring.RingPlan, size: int) -> float:
    """The sum's noise sigma in ring units when every share arrives: z x the sensitivity at the
    spec's max_weight."""
    return noise.noise_multiplier * sensitivity(plan.weight_cap, plan, size)


def share(noise: DistributedNoise, plan: ring.RingPlan, size: int, expected: int,
          rng: np.random.Generator) -> np.ndarray:
    """One site's share: N_Z(0, sigma^2 / expected) per coordinate, as ring elements (the
    plan's dtype, two's complement: add it to the encoded update). A round with noise uses the
    wide ring (ring.round_plan: sigma is in units of the spec's fixed fraction bits)."""
    values = discrete_gaussian(sigma(noise, plan, size) ** 2 / expected, size, rng)
    out = values.view(np.uint64) if plan.dtype == np.uint64 else \
        values.astype(plan.signed).view(plan.dtype)
    if plan.reduces:
        out &= plan.modulus_mask
    return out


def generator(secret: bytes, training: bytes, site: bytes, round: int) -> np.random.Generator:
    """The site's noise generator for ``round``: PCG64DXSM seeded with 256 bits of
    HMAC-SHA256(secret, label || training || site || round), ``secret`` the site's private key."""
    digest = hmac.new(secret, b"swarmnode-dnoise/1" + training + site + round.to_bytes(8, "big"),
                      hashlib.sha256).digest()
    return np.random.Generator(np.random.PCG64DXSM(
        np.random.SeedSequence(int.from_bytes(digest, "big"))))


def sum_noise_bound(sum_sigma: float, size: int) -> float:
    """Bound (ring units) on the L2 norm of the sum's noise: sigma (sqrt(d) + TAIL); a Gaussian
    vector exceeds it with probability below exp(-TAIL^2 / 2) (the sum of discrete Gaussian
    shares of sigma >= 1 is that close to a Gaussian)."""
    return sum_sigma * (math.sqrt(size) + TAIL)


def check_ring(noise: DistributedNoise, plan: ring.RingPlan, size: int) -> None:
    """ValueError unless the ring holds ``plan.n_sites`` updates plus the noise (TAIL sigma per
    coordinate) without wrapping around, and the shares fit the sampler."""
    s = sigma(noise, plan, size)
    per_site = math.floor(plan.weight_cap * plan.clip * (1 << plan.fraction_bits)) + 1
    need = plan.n_sites * per_site + math.ceil(TAIL * s)
    limit = (1 << (plan.ring_bits - 1)) - 1
    if need > limit:
        room = plan.n_sites + TAIL * noise.noise_multiplier
        raise ValueError(
            f"distributed noise with noise_multiplier {noise.noise_multiplier} needs room for "
            f"{TAIL:g} sigma on top of {plan.n_sites} sites' updates, and the "
            f"{plan.ring_bits}-bit ring at {plan.fraction_bits} fractional bits does not hold "
            f"it: lower max_weight x clip_norm to at most about "
            f"{limit / room / (1 << plan.fraction_bits):.4g} (now "
            f"{plan.weight_cap * plan.clip:.4g}), or lower noise_multiplier")
    if s > MAX_SIGMA:
        raise ValueError(f"distributed noise: sigma {s:.4g} ring units is above the sampler's "
                         "2^56; lower max_weight x clip_norm or noise_multiplier")
    if s / math.sqrt(plan.n_sites) < 8:
        raise ValueError(f"distributed noise: a share's sigma would be {s:.3g} ring units, "
                         "below 8 (the sum of discrete Gaussian shares is then measurably off "
                         "a discrete Gaussian); raise noise_multiplier or clip_norm")


def parameter_count(params: Mapping[str, Any]) -> int:
    """The number of summed coordinates of a spec's params (floating tensors only)."""
    import torch  # the spec's dtypes are torch's names

    return sum(math.prod(p.shape) for p in params.values()
               if getattr(torch, p.dtype).is_floating_point)


def round_noise(round: int, roster: Collection[str], weights: Mapping[str, int],
                noise: DistributedNoise, plan: ring.RingPlan, size: int,
                covered: bool) -> RoundNoise:
    """What ``round``'s sum carried: ``roster`` its mask set (n shares planned), ``weights``
    every site that checked in -> its weight (those of the mask set added a share each; a sum is
    formed with at least MIN_SITES adding weight), ``covered`` whether the round had a starting
    model (without one no noise is added). Sensitivity at the round's largest adding weight."""
    members = {p.lower() for p in roster}
    checked = {p.lower(): int(w) for p, w in weights.items() if p.lower() in members}
    adding = [w for w in checked.values() if w > 0]
    return RoundNoise(
        round=round, expected=len(members), shares=len(checked),
        sensitivity=sensitivity(max(adding, default=1), plan, size),
        share_sigma=sigma(noise, plan, size) / math.sqrt(max(len(members), 1)),
        summed=len(adding) >= MIN_SITES, covered=covered)
