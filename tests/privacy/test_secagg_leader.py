"""A curious leader: it is one of the sites (so it knows its own pair seeds), it holds every
masked update of the round and every revealed seed. Whatever it subtracts, what is left of a
single other site's update is uniform in the ring; the same statistical test fails broken masks
(zero, 32-bit, one mask for every pair, the same mask every round, only two sites)."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_sim import Site, make_sites, play, uniform_z

from swarmnode.errors import AggregateRejected
from swarmnode.privacy import aggregate, encoding, masks, ring

DIM = 1 << 14
# a uniform vector scores about N(0, 1): over 6 about once in 10^9 (the sites' X25519 keys come
# from the OS, so the masks differ from run to run); broken masks score in the thousands
LIMIT = 6.0


def _structured_changes(sites: list[Site]) -> dict[str, np.ndarray]:
    """Changes a leader would recognise at once: constant, all positive, tiny."""
    return {s.address: np.full(DIM, 0.001 * (i + 1), dtype=np.float32)
            for i, s in enumerate(sites)}


def _leader_view(leader: Site, site: str, rnd_masked: np.ndarray, reveals, plan) -> np.ndarray:
    """A site's masked update less everything the leader can compute: its own pair mask with
    the site and the masks of the seeds revealed for dropouts."""
    view = rnd_masked.copy()
    own = leader.seeds(1)[site]
    masks.add_pair_mask(view, own, -1 if masks.adds_first(site, leader.address) else 1)
    for r in reveals:
        if r.revealer == site:
            masks.add_pair_mask(view, r.seed, -1 if masks.adds_first(site, r.missing) else 1)
    view &= plan.modulus_mask
    return view


def test_each_update_is_uniform_to_the_leader() -> None:
    rng = np.random.default_rng(11)
    sites = make_sites(6, rng)
    plan = ring.plan(6, 100, 1.0)
    present = sites[:4]  # two dropped before checking in: their seeds are revealed
    changes = _structured_changes(present)
    rnd = play(sites, plan, changes, {s.address: 100 for s in present})
    leader = present[0]
    assert len(rnd.reveals) == 4 * 2
    for site in present[1:]:
        view = _leader_view(leader, site.address, rnd.masked[site.address], rnd.reveals, plan)
        assert uniform_z(view) < LIMIT, site.address
        # the part the leader lacks is the masks with the other survivors, and it is uniform
        residual = view - rnd.encoded[site.address].values
        assert uniform_z(residual) < LIMIT
        # the encoding itself is far from uniform: the test has something to hide
        assert uniform_z(rnd.encoded[site.address].values) > 100
    # the sum still comes out: privacy did not cost the result
    result = aggregate.aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1)
    assert np.allclose(result.mean, 0.0025, atol=1e-8)


def _weak_round(weak_mask) -> tuple[list[float], list[float]]:
    """Every site masks with ``weak_mask(pair seed, sign, plan)`` instead of the real masks:
    scores of the leader's views of the other sites, and of every masked update as it is."""
    rng = np.random.default_rng(12)
    sites = make_sites(3, rng)
    plan = ring.plan(3, 100, 1.0)
    changes = _structured_changes(sites)
    rnd = play(sites, plan, changes, {s.address: 100 for s in sites})
    leader, views, raw = sites[0], [], []
    for site in sites:
        y = rnd.encoded[site.address].values.copy()
        for peer, seed in site.seeds(1).items():
            y += weak_mask(seed, 1 if masks.adds_first(site.address, peer) else -1, plan)
        raw.append(uniform_z(y))
        if site is not leader:
            own = weak_mask(leader.seeds(1)[site.address],
                            -1 if masks.adds_first(site.address, leader.address) else 1, plan)
            views.append(uniform_z(y + own))
    return views, raw


def test_the_test_passes_real_masks_and_fails_broken_ones() -> None:
    def real(seed: bytes, sign: int, plan: ring.RingPlan) -> np.ndarray:
        m = masks.expand(seed, DIM, plan)
        return m if sign > 0 else (np.uint64(0) - m)

    def zero(seed: bytes, sign: int, plan: ring.RingPlan) -> np.ndarray:
        return np.zeros(DIM, dtype=np.uint64)

    def low_32_bits(seed: bytes, sign: int, plan: ring.RingPlan) -> np.ndarray:
        return real(seed, sign, plan) & np.uint64(0xFFFFFFFF)

    shared = masks.expand(b"\x01" * 32, DIM, ring.plan(3, 100, 1.0))

    def same_for_every_pair(seed: bytes, sign: int, plan: ring.RingPlan) -> np.ndarray:
        return shared if sign > 0 else (np.uint64(0) - shared)

    views, raw = _weak_round(real)
    assert max(views + raw) < LIMIT
    assert min(_weak_round(zero)[0]) > 100
    assert min(_weak_round(low_32_bits)[0]) > 100
    # one mask for every pair: the site between the other two adds it once and subtracts it
    # once, and pushes its encoding in the clear
    assert max(_weak_round(same_for_every_pair)[1]) > 100


def test_with_two_sites_the_leader_sees_the_other_update() -> None:
    """Why secure aggregation needs 3 sites: with 2, the leader's own seed is the whole mask."""
    rng = np.random.default_rng(13)
    sites = make_sites(2, rng)
    plan = ring.plan(2, 100, 1.0)
    changes = _structured_changes(sites)
    leader, other = sites
    enc = encoding.encode(changes[other.address], 100, plan, seed=0)
    y = masks.mask_update(enc.values, other.address, other.seeds(1), plan)
    view = _leader_view(leader, other.address, y, [], plan)
    assert np.array_equal(view, enc.values)
    assert uniform_z(view) > 100


def test_one_rounds_seeds_say_nothing_about_another_round() -> None:
    rng = np.random.default_rng(14)
    sites = make_sites(4, rng)
    plan = ring.plan(4, 100, 1.0)
    present = sites[:3]
    changes = _structured_changes(present)
    weights = {s.address: 100 for s in present}
    first = play(sites, plan, changes, weights, round_number=5)
    second = play(sites, plan, changes, weights, round_number=6)
    # a reveal is one 32-byte seed, and the next round's seeds differ
    assert {len(r.seed) for r in first.reveals} == {32}
    assert not {r.seed for r in first.reveals} & {r.seed for r in second.reveals}
    # same change, next round: the difference of the two masked updates is still uniform (the
    # same mask every round would leave the difference of the changes: here zero)
    for site in present:
        delta = second.masked[site.address] - first.masked[site.address]
        assert uniform_z(delta) < LIMIT
    # round 5's reveals do not unmask round 6: refused by round, and when relabelled the
    # residue is uniform noise that the bound check throws out
    with pytest.raises(AggregateRejected, match="is for round 5"):
        aggregate.aggregate(second.roster, weights, second.masked, first.reveals, plan, 6)
    relabelled = [type(r)(r.revealer, r.missing, 6, 0, r.seed) for r in first.reveals]
    with pytest.raises(AggregateRejected, match="over the bound"):
        aggregate.aggregate(second.roster, weights, second.masked, relabelled, plan, 6)
    # the same round's reveals do
    assert aggregate.aggregate(second.roster, weights, second.masked, second.reveals, plan,
                               6).contributors == tuple(sorted(weights))
