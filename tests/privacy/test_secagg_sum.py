"""Property test: 3 to 16 sites with random dropouts before check-in. The masks cancel exactly
(the unmasked ring sum equals the sum of the encodings, integer for integer) and the decoded sum
equals the float sum of the clipped, weighted changes within the encoding's stated error."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_sim import clipped, make_sites, play

from swarmnode.privacy import aggregate, masks, ring

TRIALS = 24


def _trial(seed: int, ring_bits: int, fraction_bits: int | None) -> None:
    """``fraction_bits`` None: the round's plan (ring.round_plan: the narrow ring at the most
    fraction bits the mask set leaves)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 17))
    sites = make_sites(n, rng)
    # W C <= 2048: 16 sites keep the narrow ring's floor of 16 fraction bits
    cap, clip = int(rng.integers(1, 257)), float(rng.choice([0.5, 2.0, 8.0]))
    if fraction_bits is None:
        plan = ring.round_plan(n, cap, clip)
        assert plan.ring_bits == 32 and plan.dtype == np.uint32
        assert plan.fraction_bits == ring.narrow_fraction_bits(n, cap, clip)
    else:
        plan = ring.plan(n, cap, clip, fraction_bits, ring_bits)
    dim = int(rng.choice([1, 7, int(rng.integers(100, 3000))]))
    n_drop = int(rng.integers(0, n - 3 + 1))
    dropped = set(rng.choice(n, size=n_drop, replace=False).tolist())
    changes, weights = {}, {}
    for i, site in enumerate(sites):
        if i in dropped:
            continue
        # about half the sites move further than the clip bound
        scale = clip * float(rng.choice([0.3, 3.0])) / max(1.0, dim ** 0.5)
        changes[site.address] = (rng.standard_normal(dim) * scale).astype(np.float32)
        weights[site.address] = int(rng.integers(1, cap + 1))
    rnd = play(sites, plan, changes, weights, round_number=int(rng.integers(0, 1 << 40)),
               seed=seed)

    result = aggregate.aggregate(rnd.roster, weights, rnd.masked, rnd.reveals, plan,
                                 rnd.round_number)
    # masks cancel exactly: the ring sum is the sum of the encodings, integer for integer
    encodings = np.zeros(dim, dtype=plan.dtype)
    for enc in rnd.encoded.values():
        assert enc.values.dtype == plan.dtype
        encodings += enc.values
    encodings &= plan.modulus_mask
    assert result.ring_sum.dtype == plan.dtype and np.array_equal(result.ring_sum, encodings)
    # and a masked update is nothing like its encoding
    some = next(iter(rnd.masked))
    assert dim < 8 or not np.array_equal(rnd.masked[some], rnd.encoded[some].values)

    expected = sum(w * clipped(changes[a], clip) for a, w in weights.items())
    total = sum(weights.values())
    bound = plan.sum_error(len(weights)) + 2.0 ** -50 * total * clip  # + float64 rounding
    assert np.max(np.abs(result.weighted_sum - expected)) <= bound
    assert result.total_weight == total
    assert result.dropouts == tuple(sorted(s.address for i, s in enumerate(sites)
                                           if i in dropped))
    assert np.max(np.abs(result.mean - expected / total)) <= bound / total


@pytest.mark.parametrize("seed", range(TRIALS))
def test_sum_of_masked_updates_decodes_to_the_float_sum(seed: int) -> None:
    _trial(seed, ring.RING_BITS, ring.FRACTION_BITS)


@pytest.mark.parametrize("seed", range(TRIALS))
def test_the_32_bit_ring_of_the_round_plan_decodes_to_the_float_sum(seed: int) -> None:
    """The narrow ring (format /3): uint32, 4 keystream bytes an element, the fraction bits the
    round's mask set leaves; the same exactness and the same stated error."""
    _trial(200 + seed, 32, None)


@pytest.mark.parametrize("seed", range(4))
def test_a_narrower_ring_works_the_same(seed: int) -> None:
    """k < 64: masks keep k bits and every sum is reduced modulo 2^k."""
    _trial(100 + seed, 50, 16)


def test_unclipped_changes_are_within_n_units_in_the_ring() -> None:
    """The integer form of the stated error: |ring sum - sum of w x 2^f| < n units, exactly
    (w x 2^f is exact in float64 for float32 changes, so the reference has no rounding)."""
    rng = np.random.default_rng(7)
    sites = make_sites(5, rng)
    plan = ring.plan(5, 1000, 4.0)
    changes = {s.address: (rng.standard_normal(4000) * 0.01).astype(np.float32)
               for s in sites}
    weights = {s.address: int(rng.integers(1, 1001)) for s in sites}
    rnd = play(sites, plan, changes, weights)
    result = aggregate.aggregate(rnd.roster, weights, rnd.masked, rnd.reveals, plan, 1)
    scaled = [w * changes[a].astype(np.float64) * 2.0 ** plan.fraction_bits
              for a, w in weights.items()]
    floors = sum(np.floor(s).astype(np.int64) for s in scaled)
    fractions = sum(s - np.floor(s) for s in scaled)
    off = (result.ring_sum.view(np.int64) - floors).astype(np.float64) - fractions
    assert np.max(np.abs(off)) < len(sites)
    assert np.abs(off).max() > 0  # stochastic rounding did round


def test_masks_span_keystream_blocks() -> None:
    """A vector longer than one keystream block (2^20 elements) still cancels exactly."""
    rng = np.random.default_rng(3)
    sites = make_sites(3, rng)
    plan = ring.plan(3, 10, 1.0)
    dim = masks.BLOCK + 5
    changes = {s.address: (rng.standard_normal(dim) * 1e-4).astype(np.float32)
               for s in sites}
    rnd = play(sites, plan, changes, {s.address: 1 for s in sites})
    result = aggregate.aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1)
    total = sum((e.values for e in rnd.encoded.values()), np.zeros(dim, dtype=np.uint64))
    assert np.array_equal(result.ring_sum, total)
    # the block boundary is no seam: the keystream goes on
    seed = sites[0].seeds(1)[sites[1].address]
    whole = masks.expand(seed, dim, plan)
    assert not np.array_equal(whole[masks.BLOCK: masks.BLOCK + 5], whole[:5])
