"""A site's update as ring elements, and a decoded sum back to floats.

Encode: the change from the round's starting model (a flat float vector), clipped to L2 norm
``C`` (the spec's ``clip_norm``: the rule the plain ``mean`` applies at the leader, moved to the
site, since the leader never sees an update), times the site's integer weight, in fixed point
with ``f`` fractional bits and stochastic rounding (unbiased: the expected encoding is the exact
value), as ring elements (the plan's :attr:`~swarmnode.privacy.ring.RingPlan.dtype`: uint32 in the
narrow ring, uint64 in the wide one). Why L2 and not per coordinate: it keeps the update's direction
(a per-coordinate clip bends it and silently breaks large-moving tensors such as BatchNorm
statistics), it is the norm-bounding defence compatible with a masked sum, and it bounds every
coordinate too (``|x_j| <= ||x||``), which is all the ring width needs.

Decode: the ring sum centred (values >= 2^(k-1) are negative, two's-complement style), divided
by 2^f; the mean is that over the total weight (public: the check-ins carry the weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from swarmnode.errors import ConfigError, NonFiniteValues
from swarmnode.privacy.ring import RingPlan

__all__ = ["SCREEN", "Encoded", "Pieces", "decode_mean", "decode_sum", "encode", "squares",
           "sum_squares"]

CHUNK = 1 << 18  # elements per step: the float64 temporaries stay in cache-sized pieces
STEP = 1 << 16  # elements per step of encode (its norm sums too): three 512 KiB buffers
# The squared norm is summed without BLAS (numpy's own loop: one thread, the same bits on every
# machine; a threaded BLAS dot spins its threads and costs some 50x the CPU on a loaded host).
# Whether a change is clipped, and the clipping factor, come from a BLAS sum (np.dot per chunk)
# whenever the norm is within SCREEN of the clip: both sums of squares are within n * 2^-53 of
# the exact one, so the cheap one decides only where they cannot disagree.
SCREEN = 1e-6


@dataclass(frozen=True)
class Encoded:
    """A site's encoded contribution (before masking) and what clipping did to it."""

    values: np.ndarray  # the plan's dtype (uint32 / uint64), one ring element per coordinate
    norm: float  # L2 norm of the change before clipping
    clipped: bool  # True when the change was scaled down to norm C


class Pieces:
    """A change held as pieces laid end to end, each ``a - b`` in float64 (``b`` None: ``a``
    itself): a site's tensors minus the round's starting model, without building the flat
    vector (:func:`encode` reads it a chunk at a time)."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> None:
        for a, b in parts:
            if not isinstance(a, np.ndarray) or a.ndim != 1 \
                    or not np.issubdtype(a.dtype, np.floating) or (b is not None and (
                        not isinstance(b, np.ndarray) or b.shape != a.shape
                        or not np.issubdtype(b.dtype, np.floating))):
                raise ConfigError("secure aggregation encodes pieces of 1-D float numpy arrays "
                                  "(each tensor and its starting value, of the same length)")
        self.parts = tuple(parts)
        self.size = sum(a.shape[0] for a, _ in self.parts)


def _chunks(change: np.ndarray | Pieces, buf: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float64 values of the change from there) in chunks of ``buf``'s length: views
    of a float64 ``change`` itself (never to be written), else filled into ``buf``."""
    step = buf.shape[0]
    if isinstance(change, np.ndarray):
        if change.dtype == np.float64:
            for start in range(0, change.shape[0], step):
                yield start, change[start: start + step]
            return
        change = Pieces([(change, None)])
    parts = iter(change.parts)
    a = b = None
    at = left = 0  # position in the current piece, elements left in it
    for start in range(0, change.size, step):
        m = min(step, change.size - start)
        filled = 0
        while filled < m:
            if not left:
                a, b = next(parts)
                at, left = 0, a.shape[0]
                continue
            k = min(left, m - filled)
            dst = buf[filled: filled + k]
            if b is None:
                np.copyto(dst, a[at: at + k])
            else:
                np.subtract(a[at: at + k], b[at: at + k], out=dst, dtype=np.float64)
            filled, at, left = filled + k, at + k, left - k
        yield start, buf[:m]


def encode(change: np.ndarray | Pieces, weight: int, plan: RingPlan,
           seed: int | np.random.SeedSequence, *, out: np.ndarray | None = None) -> Encoded:
    """``change`` (the update minus the round's starting model: a 1-D float array, or its
    :class:`Pieces`) as ring elements. ``seed`` drives the stochastic rounding, so the same
    inputs give the same bits. ``out``: a vector of the plan's dtype the encoding is added to
    (modulo 2^32 or 2^64; a site's pair masks), returned as ``values``; None: fresh.

    Rounding: ``floor(y + u)`` for the scaled value ``y`` and ``u`` uniform in [0, 1) (53
    bits, PCG64 from the seed): ``floor(y) + 1`` with probability ``y - floor(y)``, so the
    expected encoding is ``y``, up to float64's rounding of ``y + u`` (under ``|y| 2^-53`` of
    a unit, the size of float64's own rounding of the product ``y``); every encoding is
    within one unit of ``y``. (Before 2026-12 the encoder drew ``u < y - floor(y)``: the same
    distribution, other bits for the same seed.)

    Passes over the change: one when it is neither clipped nor near the clip (its norm summed
    while it is encoded), else that one taken back and the encoding made again (the same bits
    as deciding first: the norm's sum runs over the same chunks in the same order)."""
    if isinstance(change, np.ndarray):
        if change.ndim != 1 or not np.issubdtype(change.dtype, np.floating):
            raise ConfigError("secure aggregation encodes a 1-D float numpy array (the "
                              "flattened change from the round's starting model)")
        n = change.shape[0]
    elif isinstance(change, Pieces):
        n = change.size
    else:
        raise ConfigError("secure aggregation encodes a 1-D float numpy array (the flattened "
                          "change from the round's starting model)")
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) \
            or not 1 <= weight <= plan.weight_cap:
        raise ConfigError(f"secure aggregation: weight {weight!r} must be a whole number in "
                          f"1..{plan.weight_cap} (the spec's max_weight)")
    dtype, signed_type = plan.dtype, plan.signed
    if out is not None and (not isinstance(out, np.ndarray) or out.dtype != dtype
                            or out.shape != (n,)):
        raise ConfigError(f"secure aggregation: the encoding is added to a "
                          f"{np.dtype(dtype).name} vector of {n} elements (the "
                          f"{plan.ring_bits}-bit ring's)")
    x = np.empty(min(STEP, max(n, 1)))
    u = np.empty(x.shape[0])
    values = np.empty(n, dtype=dtype) if out is None else out
    whole = None if out is None else np.empty(x.shape[0], dtype=signed_type)
    unit = math.ldexp(1.0, plan.fraction_bits)
    # |x_j| <= norm, so after the scaling every |x_j| <= w C 2^f up to float rounding: the clamp
    # only removes that rounding, never real signal (unclipped and clearly inside the bound it
    # is a no-op, and skipped)
    bound = int(weight) * plan.clip * unit

    def rounded(factor: float, clamp: bool, sign: int = 1,
                sums: list[float] | None = None) -> None:
        """One pass: floor(factor x + u) of every coordinate added to ``values`` (``sign``
        -1: subtracted, to take back a pass; without ``out``: written), the rounding drawn
        from the seed; ``sums``: each chunk's sum of squares appended (before scaling)."""
        rng = np.random.default_rng(seed)
        signed = values.view(signed_type)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf: refused after the pass
            for start, c in _chunks(change, x):
                m = c.shape[0]
                xs, us = x[:m], u[:m]
                if sums is not None:
                    sums.append(float(np.einsum("i,i->", c, c)))
                np.multiply(c, factor, out=xs)
                if clamp:
                    np.clip(xs, -bound, bound, out=xs)
                rng.random(out=us)
                xs += us
                np.floor(xs, out=xs)  # whole numbers, |.| < 2^(k-1): the ring's sum fits
                if whole is None:
                    np.copyto(signed[start: start + m], xs, casting="unsafe")
                    continue
                np.copyto(whole[:m], xs, casting="unsafe")
                part = values[start: start + m]
                (np.add if sign > 0 else np.subtract)(part, whole[:m].view(dtype), out=part)

    # One pass for the common case, the norm summed as the chunks are encoded unclipped: kept
    # when the norm then says the change is neither clipped nor near the clip (the encoding is
    # the one of the factor and clamp below, bit for bit); else taken back (the same pass
    # again, subtracted) and the change encoded again with what the norm decides.
    first = int(weight) * unit
    chunks: list[float] = []
    rounded(first, False, sums=chunks)
    norm = math.sqrt(sum(chunks))
    if math.isfinite(norm) and not norm > plan.clip * (1 - SCREEN) \
            and not norm * first >= bound * (1 - SCREEN):
        clipped = False
    else:
        if whole is not None:
            rounded(first, False, sign=-1)
        if not math.isfinite(norm):
            raise NonFiniteValues("the change to encode holds NaN or Inf (or overflows its "
                                  "norm); the site's training diverged: fix it before the "
                                  "round")
        if norm > plan.clip * (1 - SCREEN):  # near or over the clip: the factor uses the norm
            norm = math.sqrt(sum(float(np.dot(c, c)) for _, c in _chunks(change, x)))
        clipped = norm > plan.clip
        factor = first
        if clipped:
            factor *= plan.clip / norm
        rounded(factor, clipped or norm * factor >= bound * (1 - SCREEN))
    if plan.reduces:
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


def decode_sum(ring_sum: np.ndarray, plan: RingPlan, out: np.ndarray | None = None
               ) -> np.ndarray:
    """The float64 weighted sum a ring sum (the plan's dtype) encodes (centred: the top half is
    negative).
    ``out``: a float64 array of ring_sum's length to decode into (a piece at a time: what a
    leader does, decoding into the model without a whole float64 copy); None: fresh."""
    if ring_sum.dtype != plan.dtype:
        raise ConfigError(f"secure aggregation decodes a {np.dtype(plan.dtype).name} ring sum "
                          f"in the {plan.ring_bits}-bit ring, got {ring_sum.dtype}")
    k = plan.ring_bits
    if not plan.reduces:  # k is the type's width: two's complement as is
        signed = ring_sum.view(plan.signed)
    else:
        signed = ring_sum.astype(np.int64)
        signed[signed >= (1 << (k - 1))] -= 1 << k
    if out is None:
        out = signed.astype(np.float64)
    else:
        np.copyto(out, signed, casting="unsafe")
    out *= math.ldexp(1.0, -plan.fraction_bits)  # a power of two: exact
    return out


def sum_squares(ring_sum: np.ndarray, plan: RingPlan, blas: bool = False) -> float:
    """:func:`squares` of the decoded ``ring_sum`` (``blas``: through np.dot, see SCREEN),
    decoded a CHUNK at a time (the same chunks, so the same value as decoding it whole)."""
    buf = np.empty(min(CHUNK, ring_sum.shape[0]))
    total = 0.0
    for start in range(0, ring_sum.shape[0], CHUNK):
        part = decode_sum(ring_sum[start: start + CHUNK], plan,
                          out=buf[: min(CHUNK, ring_sum.shape[0] - start)])
        total += float(np.dot(part, part) if blas else np.einsum("i,i->", part, part))
    return total


def decode_mean(ring_sum: np.ndarray, plan: RingPlan, total_weight: int) -> np.ndarray:
    """The weighted mean change: the decoded sum over the total weight of its contributors."""
    if isinstance(total_weight, bool) or not isinstance(total_weight, int | np.integer) \
            or total_weight < 1:
        raise ConfigError(f"secure aggregation: the total weight must be a positive whole "
                          f"number, got {total_weight!r}")
    out = decode_sum(ring_sum, plan)
    out /= float(total_weight)
    return out
