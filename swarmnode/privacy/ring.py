"""The integer ring Z_{2^k} masked updates live in: how wide it must be, and what it costs.

A site's contribution is one ring element per coordinate: its clipped change ``x`` (every
coordinate ``|x_j| <= C``, the L2 clip bound, since a coordinate is never larger than the norm)
times its integer weight ``w <= w_cap``, in fixed point with ``f`` fractional bits and stochastic
rounding: ``round(w * x_j * 2^f)``, whose magnitude is at most ``floor(w_cap * C * 2^f) + 1``. The
sum over ``n`` sites is then at most ``M = n * (floor(w_cap * C * 2^f) + 1)`` in magnitude and
decodes without wrap-around (two's-complement centring) when ``M <= 2^(k-1) - 1``, so::

    k >= bit_length(n * (floor(w_cap * C * 2^f) + 1)) + 1        (about log2 n + log2 w_cap
                                                                   + log2 C + f + 1)

Encoding error of the decoded weighted sum, per coordinate: each stochastic rounding is off by
less than one unit ``2^-f``, so ``|decoded - sum_i w_i x_i| < n * 2^-f``, plus float64's own
rounding of the result (relative ``2^-53``); the mean's error is that over the total weight.

Ring elements are numpy ``uint64`` (arithmetic wraps modulo 2^64 natively); for ``k < 64`` every
result is reduced with ``& (2^k - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from swarmnode.errors import ConfigError

__all__ = [
    "FIRST_FRACTION_BITS",
    "FRACTION_BITS",
    "MAX_SITES",
    "RING_BITS",
    "RingPlan",
    "first_round_clip",
    "largest_weight_cap",
    "plan",
    "required_bits",
]

# The layout a pinned spec uses (format swarmnode-secagg/1): a 2^64 ring (numpy uint64 wraps
# natively), 32 fractional bits, and room for up to 256 sites (every site masks with every
# other: above a few hundred sites a sparse mask graph is needed, which this core does not
# build). 64 - 1 (sign) - 32 - 8 leaves 23 bits for w_cap * C: max_weight * clip_norm <= ~8.4e6.
RING_BITS = 64
FRACTION_BITS = 32
MAX_SITES = 256
# A round with no starting model encodes the parameters whole: their norm is far larger than a
# round's change, so it trades fractional bits for range (2^-16 per site and unit of weight:
# the mean's error is n 2^-16 / total weight, with weights that are sample counts)
FIRST_FRACTION_BITS = 16


def first_round_clip(weight_cap: int) -> float:
    """The widest clip the spec's ring holds at ``weight_cap`` with FIRST_FRACTION_BITS: the
    bound of a round that has no starting model (its parameters are encoded whole, clipped to
    this L2 norm). Below 1 when ``weight_cap`` leaves such a round no room."""
    limit = ((1 << (RING_BITS - 1)) - 1) // MAX_SITES
    return float(limit // (weight_cap << FIRST_FRACTION_BITS) - 2)


def _magnitude(n_sites: int, weight_cap: int, clip: float, fraction_bits: int) -> int:
    """The largest |sum| of ``n_sites`` encoded contributions: n * (floor(w_cap C 2^f) + 1)."""
    per_site = math.floor(Fraction(clip) * weight_cap * (1 << fraction_bits)) + 1
    return n_sites * per_site


def _check_inputs(n_sites: int, weight_cap: int, clip: float, fraction_bits: int) -> None:
    for name, value in (("n_sites", n_sites), ("weight_cap", weight_cap),
                        ("fraction_bits", fraction_bits)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"secure aggregation: {name} must be a whole number, got {value!r}")
    if n_sites < 1:
        raise ConfigError(f"secure aggregation: n_sites must be at least 1, got {n_sites}")
    if weight_cap < 1:
        raise ConfigError(f"secure aggregation: the weight cap must be at least 1, got "
                          f"{weight_cap}; set max_weight in the spec")
    if not 0 <= fraction_bits <= 62:
        raise ConfigError(f"secure aggregation: fraction_bits must be in 0..62, got "
                          f"{fraction_bits}")
    if (isinstance(clip, bool) or not isinstance(clip, int | float)
            or not math.isfinite(clip) or clip <= 0):
        raise ConfigError(f"secure aggregation: the clip bound must be a positive finite number, "
                          f"got {clip!r}; set merge option clip_norm")


def required_bits(n_sites: int, weight_cap: int, clip: float,
                  fraction_bits: int = FRACTION_BITS) -> int:
    """The narrowest ring width k whose centred range holds the sum of ``n_sites`` updates."""
    _check_inputs(n_sites, weight_cap, clip, fraction_bits)
    return _magnitude(n_sites, weight_cap, clip, fraction_bits).bit_length() + 1


def largest_weight_cap(n_sites: int, clip: float, fraction_bits: int = FRACTION_BITS,
                       ring_bits: int = RING_BITS) -> int:
    """The largest weight cap that fits the ring at this clip (0: none does)."""
    _check_inputs(n_sites, 1, clip, fraction_bits)
    limit = (1 << (ring_bits - 1)) - 1
    # n * (floor(w C 2^f) + 1) <= limit  <=>  w C 2^f < limit // n  (integers: floor(.) <= q - 1)
    cap = math.ceil(Fraction(limit // n_sites) / (Fraction(clip) * (1 << fraction_bits))) - 1
    while cap > 0 and _magnitude(n_sites, cap, clip, fraction_bits) > limit:
        cap -= 1  # guard the boundary of the closed form
    return max(cap, 0)


@dataclass(frozen=True)
class RingPlan:
    """One round's encoding: ring width, fixed point, the bound every contribution keeps."""

    ring_bits: int
    fraction_bits: int
    n_sites: int
    weight_cap: int
    clip: float

    @property
    def modulus_mask(self) -> np.uint64:
        """``2^k - 1`` as uint64: ``v & modulus_mask`` reduces ``v`` into the ring."""
        return np.uint64((1 << self.ring_bits) - 1)

    @property
    def unit(self) -> float:
        """The value of one ring unit: 2^-f."""
        return math.ldexp(1.0, -self.fraction_bits)

    def sum_error(self, n_contributors: int | None = None) -> float:
        """Bound on |decoded sum - float sum| per coordinate, before float64's own rounding of
        the result: n * 2^-f (each stochastic rounding is off by less than one unit)."""
        return (self.n_sites if n_contributors is None else n_contributors) * self.unit

    def mean_error(self, total_weight: int, n_contributors: int | None = None) -> float:
        """Bound on the mean's error per coordinate: the sum's over the total weight."""
        return self.sum_error(n_contributors) / total_weight

    @property
    def bytes_per_element(self) -> int:
        """Wire bytes per parameter: 4 for k <= 32, else 8."""
        return 4 if self.ring_bits <= 32 else 8


def plan(n_sites: int, weight_cap: int, clip: float, fraction_bits: int = FRACTION_BITS,
         ring_bits: int = RING_BITS) -> RingPlan:
    """The round's :class:`RingPlan`; ConfigError saying what to change unless it fits."""
    need = required_bits(n_sites, weight_cap, clip, fraction_bits)
    if not 1 <= ring_bits <= 64:
        raise ConfigError(f"secure aggregation: the ring width must be in 1..64 bits, got "
                          f"{ring_bits}")
    if need > ring_bits:
        cap = largest_weight_cap(n_sites, clip, fraction_bits, ring_bits)
        hint = (f"lower max_weight to at most {cap} at clip_norm {clip}" if cap
                else "lower clip_norm or fraction_bits")
        raise ConfigError(
            f"secure aggregation: {n_sites} sites with weights up to {weight_cap} and changes "
            f"clipped to norm {clip} need a {need}-bit ring at {fraction_bits} fractional bits, "
            f"more than {ring_bits}: the sum would wrap around; {hint}, or use fewer sites")
    return RingPlan(ring_bits, fraction_bits, n_sites, weight_cap, float(clip))
