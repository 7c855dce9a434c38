"""Samples of the discrete Gaussian N_Z(0, sigma^2): P(x) proportional to exp(-x^2 / (2 sigma^2))
on the integers, vectorised.

The algorithm is Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian for Differential
Privacy", algorithms 2 and 3), run on whole arrays: with ``t = floor(sigma) + 1``,

1. discrete Laplace with scale t: ``U`` uniform in {0..t-1}, kept with probability
   ``exp(-U/t)``; ``V`` geometric (``P(V >= v) = exp(-v)``); ``X = U + t V``; a fair sign ``B``,
   rejecting ``B = 1, X = 0``; ``Y = (1 - 2B) X``;
2. kept with probability ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2))``: the kept ``Y`` are exactly
   N_Z(0, sigma^2).

Every candidate of a batch runs both steps at once and the kept ones fill the output in order;
a batch is about twice what is missing (about 45% of candidates are kept).

What differs from the exact algorithm: the paper draws each Bernoulli(exp(-gamma)) with exact
rational arithmetic; here a Bernoulli(p) is ``uniform53 < p`` with ``p`` computed in float64,
and ``V`` is ``floor(-log(1 - uniform53))``. Each such draw is off from its exact probability by
less than 2^-40 (float64's relative error 2^-52 on ``gamma``, times ``gamma`` below 800; beyond,
``exp`` underflows to the exact value's neighbour 0), so the sampled distribution is within
total variation ~2^-38 of N_Z(0, sigma^2) per sample. ``U`` and the sign are exact (numpy's
unbiased bounded integers). ``V <= 36`` (the smallest uniform is 2^-53), so ``t V`` stays an
int64 while ``t < 2^57``.

The generator is the caller's: :mod:`swarmnode.privacy.noise` seeds numpy's PCG64DXSM with 256
secret bits derived from the site's key; its outputs never leave the site (only the masked sum
of every share), so nothing can learn its state from them.
"""

from __future__ import annotations

import math

import numpy as np

from swarmnode.errors import ConfigError

__all__ = ["MAX_SIGMA", "discrete_gaussian", "pmf"]

MAX_SIGMA = float(1 << 56)  # t V < 2^63 with V <= 36 needs t < 2^57
BATCH = 1 << 20  # candidates per step at most: a few tens of MiB of temporaries


def discrete_gaussian(sigma2: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` independent samples of N_Z(0, sigma2) as int64 (zeros when ``sigma2`` is 0)."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
        raise ConfigError(f"discrete Gaussian: size must be a whole number >= 0, got {size!r}")
    if not (isinstance(sigma2, int | float) and math.isfinite(sigma2) and sigma2 >= 0):
        raise ConfigError(f"discrete Gaussian: the variance must be finite and >= 0, got "
                          f"{sigma2!r}")
    out = np.zeros(int(size), dtype=np.int64)
    if sigma2 == 0 or size == 0:
        return out
    sigma = math.sqrt(sigma2)
    if sigma > MAX_SIGMA:
        raise ConfigError(f"discrete Gaussian: sigma {sigma:.4g} is above 2^56, the largest "
                          "this sampler holds in int64; lower the noise multiplier")
    t = math.floor(sigma) + 1
    shift = sigma2 / t
    filled = 0
    while filled < size:
        m = min(BATCH, 2 * (size - filled) + 64)
        u = rng.integers(0, t, size=m, dtype=np.int64)
        keep = rng.random(m) < np.exp(-(u / t))
        v = np.floor(-np.log1p(-rng.random(m))).astype(np.int64)
        x = u + t * v
        negative = rng.integers(0, 2, size=m, dtype=np.int8).astype(bool)
        keep &= ~(negative & (x == 0))
        gamma = np.square(x.astype(np.float64) - shift) / (2.0 * sigma2)
        keep &= rng.random(m) < np.exp(-gamma)
        y = np.where(negative, -x, x)[keep]
        take = min(y.shape[0], size - filled)
        out[filled: filled + take] = y[:take]
        filled += take
    return out


def pmf(sigma2: float, support: np.ndarray) -> np.ndarray:
    """The exact probabilities of N_Z(0, sigma2) at the integers ``support`` (the normalising
    sum taken over +-(12 sigma + 12), beyond which the mass is below 1e-31)."""
    reach = int(12 * math.sqrt(sigma2)) + 12
    z = np.arange(-reach, reach + 1, dtype=np.float64)
    norm = float(np.exp(-np.square(z) / (2 * sigma2)).sum())
    s = np.asarray(support, dtype=np.float64)
    return np.exp(-np.square(s) / (2 * sigma2)) / norm
