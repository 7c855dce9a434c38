"""A site's update as ring elements, and a decoded sum back to floats.

Encode: the change from the round's starting model (a flat float vector), clipped to L2 norm
``C`` (the spec's ``clip_norm``: the rule the plain ``mean`` applies at the leader, moved to the
site, since the leader never sees an update), times the site's integer weight, in fixed point
with ``f`` fractional bits and stochastic rounding (unbiased: the expected encoding is the exact
value), as uint64 ring elements. Why L2 and not per coordinate: it keeps the update's direction
(a per-coordinate clip bends it and silently breaks large-moving tensors such as BatchNorm
statistics), it is the norm-bounding defence compatible with a masked sum, and it bounds every
coordinate too (``|x_j| <= ||x||``), which is all the ring width needs.

Decode: the ring sum centred (values >= 2^(k-1) are negative, two's-complement style), divided
by 2^f; the mean is that over the total weight (public: the check-ins carry the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from swarmnode.errors import ConfigError, NonFiniteValues
from swarmnode.privacy.ring import RingPlan

__all__ = ["SCREEN", "Encoded", "decode_mean", "decode_sum", "encode", "squares"]

CHUNK = 1 << 18  # elements per step: the float64 temporaries stay in cache-sized pieces
# The squared norm is summed without BLAS (numpy's own loop: one thread, the same bits on every
# machine; a threaded BLAS dot spins its threads and costs some 50x the CPU on a loaded host).
# Whether a change is clipped, and the clipping factor, still come from the BLAS sum the
# encoding always used (so the same seed gives the same bits as before) whenever the norm is
# within SCREEN of the clip: both sums of squares are within n * 2^-53 of the exact one.
SCREEN = 1e-6


@dataclass(frozen=True)
class Encoded:
    """A site's encoded contribution (before masking) and what clipping did to it."""

    values: np.ndarray  # uint64, one ring element per coordinate
    norm: float  # L2 norm of the change before clipping
    clipped: bool  # True when the change was scaled down to norm C


def encode(change: np.ndarray, weight: int, plan: RingPlan,
           seed: int | np.random.SeedSequence) -> Encoded:
    """``change`` (1-D float array: the update minus the round's starting model) as ring
    elements. ``seed`` drives the stochastic rounding, so the same inputs give the same bits."""
    if not isinstance(change, np.ndarray) or change.ndim != 1 \
            or not np.issubdtype(change.dtype, np.floating):
        raise ConfigError("secure aggregation encodes a 1-D float numpy array (the flattened "
                          "change from the round's starting model)")
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) \
            or not 1 <= weight <= plan.weight_cap:
        raise ConfigError(f"secure aggregation: weight {weight!r} must be a whole number in "
                          f"1..{plan.weight_cap} (the spec's max_weight)")
    norm = math.sqrt(squares(change))
    if not math.isfinite(norm):
        raise NonFiniteValues("the change to encode holds NaN or Inf (or overflows its norm); "
                              "the site's training diverged: fix it before the round")
    if norm > plan.clip * (1 - SCREEN):  # near or over the clip: the factor uses the norm
        norm = math.sqrt(_blas_squares(change))
    clipped = norm > plan.clip
    factor = int(weight) * math.ldexp(1.0, plan.fraction_bits)
    if clipped:
        factor *= plan.clip / norm
    # |x_j| <= norm, so after the scaling every |x_j| <= w C 2^f up to float rounding: the clamp
    # only removes that rounding, never real signal
    bound = int(weight) * plan.clip * math.ldexp(1.0, plan.fraction_bits)
    rng = np.random.default_rng(seed)
    values = np.empty(change.shape[0], dtype=np.uint64)
    signed = values.view(np.int64)
    # in chunks, through buffers made once: a few MiB of temporaries, no per-chunk allocation
    x, floor, u = (np.empty(min(CHUNK, change.shape[0])) for _ in range(3))
    up = np.empty(x.shape[0], dtype=bool)
    for start in range(0, change.shape[0], CHUNK):
        m = min(CHUNK, change.shape[0] - start)
        xs, fs, us, ups = x[:m], floor[:m], u[:m], up[:m]
        np.multiply(change[start: start + m], factor, out=xs, dtype=np.float64)
        np.clip(xs, -bound, bound, out=xs)
        np.floor(xs, out=fs)
        xs -= fs  # the fraction, in [0, 1)
        rng.random(out=us)
        np.less(us, xs, out=ups)  # up with probability equal to the fraction
        fs += ups
        np.copyto(signed[start: start + m], fs, casting="unsafe")  # whole numbers < 2^63
    if plan.ring_bits < 64:
        values &= plan.modulus_mask
    return Encoded(values, norm, bool(clipped))


def squares(x: np.ndarray) -> float:
    """The sum of squares of ``x`` in float64, in chunks, without BLAS (see SCREEN)."""
    total = 0.0
    buf = None if x.dtype == np.float64 else np.empty(min(CHUNK, x.shape[0]))
    for start in range(0, x.shape[0], CHUNK):
        part = x[start: start + CHUNK]
        if buf is not None:
            part = buf[: part.shape[0]]
            np.copyto(part, x[start: start + part.shape[0]])
        total += float(np.einsum("i,i->", part, part))
    return total


def _blas_squares(change: np.ndarray) -> float:
    squares_ = 0.0
    for start in range(0, change.shape[0], CHUNK):
        part = change[start: start + CHUNK].astype(np.float64)
        squares_ += float(np.dot(part, part))
    return squares_


def decode_sum(ring_sum: np.ndarray, plan: RingPlan) -> np.ndarray:
    """The float64 weighted sum a ring sum encodes (centred: the top half is negative)."""
    if ring_sum.dtype != np.uint64:
        raise ConfigError("secure aggregation decodes a uint64 ring sum")
    k = plan.ring_bits
    if k == 64:
        signed = ring_sum.view(np.int64)
    else:
        signed = ring_sum.astype(np.int64)
        signed[signed >= (1 << (k - 1))] -= 1 << k
    out = signed.astype(np.float64)
    out *= math.ldexp(1.0, -plan.fraction_bits)  # a power of two: exact
    return out


def decode_mean(ring_sum: np.ndarray, plan: RingPlan, total_weight: int) -> np.ndarray:
    """The weighted mean change: the decoded sum over the total weight of its contributors."""
    if isinstance(total_weight, bool) or not isinstance(total_weight, int | np.integer) \
            or total_weight < 1:
        raise ConfigError(f"secure aggregation: the total weight must be a positive whole "
                          f"number, got {total_weight!r}")
    out = decode_sum(ring_sum, plan)
    out /= float(total_weight)
    return out
