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

Two rings are used (format ``swarmnode-secagg/3``, :mod:`swarmnode.privacy.wire`), chosen per
round by :func:`round_plan` from public data only (the spec and the round's mask set), so every
encoder, the leader's decoder and every auditor derive the same plan bit for bit:

- the *narrow* ring Z_(2^32) (numpy ``uint32``, 4 bytes per parameter: the bytes of a plain
  float32 push) for a round with a starting model and no distributed noise. Its fraction bits
  are the most the round's sum holds: the largest ``f <= FRACTION_BITS`` with
  ``n (floor(W C 2^f) + 1) <= 2^31 - 1``, ``n`` the round's mask-set size (every site of it may
  add; fixed before anyone encodes: :mod:`swarmnode.privacy.roster`), ``W`` max_weight, ``C``
  clip_norm. So a site's contribution spends ``31 - log2 n`` bits on the range ``W C``: one unit
  is within a factor 2 of ``2 n W C 2^-31`` (relative resolution about ``n 2^-30`` of the
  range; 4 sites: 2^-28). At W C = 1000 (max_weight 100, clip_norm 10): f = 19 at 3-4 sites,
  18 at 5-8, 17 at 9-16, 16 at 17-32, the wide ring from 33 on; at the demo's W C = 5e6
  (2^22.3) f would be 7 at 3 sites, under the floor: the demo's rounds use the wide ring.
- the *wide* ring Z_(2^64) (``uint64``) with the layout of format /2: FRACTION_BITS = 32 bits
  for up to MAX_SITES sites, or FIRST_FRACTION_BITS in a round with no starting model (its
  parameters are encoded whole: far more range than a change needs), and with distributed noise
  (its sigma is in ring units of the spec's fixed ``f``: :mod:`swarmnode.privacy.noise`). It is
  also the narrow ring's fallback: a round whose narrow ``f`` would be under
  MIN_NARROW_FRACTION_BITS is encoded in the wide ring (twice the bytes, never less precision),
  so no spec is refused for its mask set growing; :func:`narrow_plan` itself refuses such a
  plan with what to change.

The floor, MIN_NARROW_FRACTION_BITS = 16 (round 1's precision in the wide ring): one unit is
then at most 2^-16 of a parameter unit per unit of weight, so the mean's rounding error per
coordinate is at most n 2^-16 / (total weight), unbiased. It was 4 for a day (f = 6-7 at the
demo's settings): a 5-site breast-cancer swarm in containers (weights 85-142) then ended with a
NaN loss, the rounding of the mean (up to 5 x 2^-6 / ~400 = 2e-4 per coordinate) reaching
BatchNorm running variances of ~1e-5, which went negative. Fixed point is uniform: small
parameters (variances, scales) need absolute precision, whatever the range W C. Below the floor
the wide ring keeps 32 fraction bits.

Ring elements are numpy ``uint32`` / ``uint64`` (:attr:`RingPlan.dtype`), whose arithmetic wraps
modulo 2^32 / 2^64 natively: no reduction is needed at k = 32 or 64; for other ``k`` (tests,
tools) every result is reduced with ``& (2^k - 1)`` (:attr:`RingPlan.reduces`).
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
    "MIN_NARROW_FRACTION_BITS",
    "NARROW_BITS",
    "RING_BITS",
    "RingPlan",
    "first_round_clip",
    "largest_weight_cap",
    "narrow_fraction_bits",
    "narrow_plan",
    "plan",
    "required_bits",
    "round_plan",
]

# The wide layout (format swarmnode-secagg/2's only one; /3's for round 1, distributed noise and
# the narrow ring's fallback): a 2^64 ring (numpy uint64 wraps
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
# The narrow ring (format swarmnode-secagg/3): 32 bits, fraction bits from the round's mask set,
# at least MIN_NARROW_FRACTION_BITS (else the round uses the wide ring; see the module docstring)
NARROW_BITS = 32
MIN_NARROW_FRACTION_BITS = 16


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
    def dtype(self) -> type[np.unsignedinteger]:
        """The numpy type of a ring element: uint32 for k <= 32, else uint64."""
        return np.uint32 if self.ring_bits <= NARROW_BITS else np.uint64

    @property
    def signed(self) -> type[np.signedinteger]:
        """The signed type of :attr:`dtype`'s width (two's complement views)."""
        return np.int32 if self.ring_bits <= NARROW_BITS else np.int64

    @property
    def reduces(self) -> bool:
        """Whether results need ``& modulus_mask`` (k narrower than its numpy type)."""
        return self.ring_bits not in (32, 64)

    @property
    def modulus_mask(self) -> np.unsignedinteger:
        """``2^k - 1`` as :attr:`dtype`: ``v & modulus_mask`` reduces ``v`` into the ring."""
        return self.dtype((1 << self.ring_bits) - 1)

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
        """Wire bytes per parameter (and keystream bytes per mask element): 4 for k <= 32,
        else 8."""
        return np.dtype(self.dtype).itemsize


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


def narrow_fraction_bits(n_sites: int, weight_cap: int, clip: float) -> int:
    """The most fraction bits (at most FRACTION_BITS) at which ``n_sites`` contributions fit the
    narrow ring; -1 when not even 0 does."""
    _check_inputs(n_sites, weight_cap, clip, 0)
    limit = (1 << (NARROW_BITS - 1)) - 1
    f = FRACTION_BITS
    while f >= 0 and _magnitude(n_sites, weight_cap, clip, f) > limit:
        f -= 1
    return f


def narrow_plan(n_sites: int, weight_cap: int, clip: float) -> RingPlan:
    """The narrow ring's plan for a round of ``n_sites`` (its mask set); ConfigError saying what
    to change when it leaves fewer than MIN_NARROW_FRACTION_BITS fraction bits."""
    f = narrow_fraction_bits(n_sites, weight_cap, clip)
    if f < MIN_NARROW_FRACTION_BITS:
        cap = largest_weight_cap(n_sites, clip, MIN_NARROW_FRACTION_BITS, NARROW_BITS)
        hint = (f"lower max_weight to at most {cap} at clip_norm {clip}" if cap
                else "lower clip_norm")
        raise ConfigError(
            f"secure aggregation: {n_sites} sites with weights up to {weight_cap} and changes "
            f"clipped to norm {clip} leave the {NARROW_BITS}-bit ring {max(f, 0)} fraction "
            f"bits, under its floor of {MIN_NARROW_FRACTION_BITS}; {hint}, or use the "
            f"{RING_BITS}-bit ring (round_plan does)")
    return plan(n_sites, weight_cap, clip, f, NARROW_BITS)


def round_plan(n_sites: int, weight_cap: int, clip: float, *, first: bool = False,
               noise: bool = False) -> RingPlan:
    """The plan of a round whose mask set has ``n_sites`` sites, from public data only (the
    spec's max_weight ``weight_cap`` and clip_norm ``clip``, the round's mask set, whether a
    model was committed before it: ``first`` when none was, and whether the spec adds
    distributed ``noise``): the narrow ring where it keeps MIN_NARROW_FRACTION_BITS, else the
    wide one (see the module docstring). Every site, the leader and every auditor call it with
    the same arguments and get the same plan."""
    if first:
        return plan(MAX_SITES, weight_cap, first_round_clip(weight_cap),
                    fraction_bits=FIRST_FRACTION_BITS)
    if not noise and n_sites <= MAX_SITES:
        try:
            return narrow_plan(n_sites, weight_cap, clip)
        except ConfigError:
            pass  # too few fraction bits: the wide ring
    return plan(MAX_SITES, weight_cap, clip)
