"""The narrow 2^32 ring (format swarmnode-secagg/3): which ring a round uses and at how many
fraction bits (from public data only), its floor, its wire bytes and keystream, a curious
leader's view of its masked updates, its evidence, and the leader's bound check folded into the
decoding pass."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from secagg_sim import make_sites, play, uniform_z

from swarmnode.errors import AggregateRejected, ConfigError, PayloadRejected
from swarmnode.privacy import aggregate, audit, dropout, encoding, masks, ring, wire
from swarmnode.privacy.evidence import Evidence
from swarmnode.transport import serde

DEMO_CAP, DEMO_CLIP = 100_000, 50.0  # swarmnode.demo.swarm's SECURE_MAX_WEIGHT, _CLIP_NORM


SMALL_CAP, SMALL_CLIP = 100, 10.0  # W C = 1000: the narrow ring up to 32 sites


def test_the_round_plan_takes_the_narrow_ring_at_the_mask_sets_fraction_bits() -> None:
    # W C = 1000 (2^9.97): 31 bits less log2 n for the range (values worked out by hand from
    # n (floor(W C 2^f) + 1) <= 2^31 - 1)
    got = {n: ring.round_plan(n, SMALL_CAP, SMALL_CLIP) for n in (3, 4, 5, 8, 9, 16, 17, 32)}
    assert {n: (p.ring_bits, p.fraction_bits) for n, p in got.items()} == {
        3: (32, 19), 4: (32, 19), 5: (32, 18), 8: (32, 18), 9: (32, 17), 16: (32, 17),
        17: (32, 16), 32: (32, 16)}
    for n, p in got.items():  # the most the sum holds: one bit more would wrap
        assert p.n_sites == n and p.dtype == np.uint32 and p.bytes_per_element == 4
        assert ring.required_bits(n, SMALL_CAP, SMALL_CLIP, p.fraction_bits) <= 32
        assert ring.required_bits(n, SMALL_CAP, SMALL_CLIP, p.fraction_bits + 1) > 32
    # the error it states, in relative terms: a unit is within a factor 2 of 2 n W C 2^-31
    p = got[4]
    assert p.sum_error() == 4 * 2.0 ** -19
    rel = p.unit / (SMALL_CAP * SMALL_CLIP)  # one unit against a site's whole range
    assert 2 ** -29 <= rel <= 2 ** -27
    # never more fraction bits than the wide ring's
    assert ring.round_plan(3, 1, 1e-3).fraction_bits == ring.FRACTION_BITS


def test_below_the_floor_the_round_takes_the_wide_ring_and_narrow_plan_says_what_to_change(
) -> None:
    assert ring.MIN_NARROW_FRACTION_BITS == 16
    # 33 sites at W C = 1000 leave 15 bits; the demo's settings (W C = 5e6) 7 at 3 sites
    assert ring.narrow_fraction_bits(33, SMALL_CAP, SMALL_CLIP) == 15
    assert ring.narrow_fraction_bits(3, DEMO_CAP, DEMO_CLIP) == 7
    for n, cap, clip in ((33, SMALL_CAP, SMALL_CLIP), (3, DEMO_CAP, DEMO_CLIP)):
        wide = ring.round_plan(n, cap, clip)
        assert (wide.ring_bits, wide.fraction_bits, wide.n_sites) == (64, 32, ring.MAX_SITES)
        assert wide == ring.plan(ring.MAX_SITES, cap, clip)  # format /2's layout
    with pytest.raises(ConfigError, match=r"33 sites .* leave the 32-bit ring 15 fraction bits, "
                                          r"under its floor of 16; lower max_weight to at most"):
        ring.narrow_plan(33, SMALL_CAP, SMALL_CLIP)
    cap = ring.largest_weight_cap(33, SMALL_CLIP, ring.MIN_NARROW_FRACTION_BITS, 32)
    assert ring.narrow_plan(33, cap, SMALL_CLIP).fraction_bits == ring.MIN_NARROW_FRACTION_BITS
    with pytest.raises(ConfigError, match="under its floor"):
        ring.narrow_plan(33, cap + 1, SMALL_CLIP)
    # no fraction bit at all fits (a spec the wide ring refuses too: ring.plan's error)
    assert ring.narrow_fraction_bits(3, 2 ** 30, 1.0) == -1
    with pytest.raises(ConfigError, match="leave the 32-bit ring 0 fraction bits"):
        ring.narrow_plan(3, 2 ** 30, 1.0)


def test_round_one_and_distributed_noise_keep_the_wide_ring() -> None:
    first = ring.round_plan(4, DEMO_CAP, DEMO_CLIP, first=True)
    assert (first.ring_bits, first.fraction_bits) == (64, ring.FIRST_FRACTION_BITS)
    assert first.clip == ring.first_round_clip(DEMO_CAP)
    noisy = ring.round_plan(4, DEMO_CAP, DEMO_CLIP, noise=True)
    assert noisy == ring.plan(ring.MAX_SITES, DEMO_CAP, DEMO_CLIP)


def test_the_keystream_is_4_bytes_an_element_and_pair_masks_overwrite_their_buffer() -> None:
    plan = ring.round_plan(3, 100, 1.0)
    seed = bytes(range(32))
    n = masks.BLOCK + 3  # across a keystream block
    stream = Cipher(algorithms.AES256(seed), modes.CTR(bytes(16))).encryptor().update(
        bytes(4 * n))
    assert np.array_equal(masks.expand(seed, n, plan), np.frombuffer(stream, dtype="<u4"))
    sites = make_sites(4, np.random.default_rng(5))
    me, seeds = sites[0].address, sites[0].seeds(2)
    used = np.full(1000, 77, dtype=np.uint32)
    assert masks.pair_masks(1000, me, seeds, out=used) is used
    fresh = np.zeros(1000, dtype=np.uint32)
    for peer, s in seeds.items():
        masks.add_pair_mask(fresh, s, 1 if masks.adds_first(me, peer) else -1)
    assert np.array_equal(used, fresh)  # the first pair's mask written, the rest added
    assert np.array_equal(masks.pair_masks(1000, me, seeds, dtype=np.uint32), fresh)
    # encoding + pair masks is mask_update's vector, bit for bit
    change = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 1e-3
    enc = encoding.encode(change, 50, plan, seed=3)
    into = masks.pair_masks(1000, me, seeds, dtype=np.uint32)
    encoding.encode(change, 50, plan, seed=3, out=into)
    assert np.array_equal(into, masks.mask_update(enc.values, me, seeds, plan))
    with pytest.raises(ConfigError, match="uint32 vector of 1000 elements"):
        encoding.encode(change, 50, plan, seed=3, out=np.zeros(1000, dtype=np.uint64))


def test_a_curious_leader_sees_uniform_32_bit_vectors() -> None:
    dim = 1 << 14
    rng = np.random.default_rng(11)
    sites = make_sites(6, rng)
    plan = ring.round_plan(6, 100, 1.0)
    assert plan.ring_bits == 32
    present = sites[:4]  # two dropped: their seeds are revealed
    changes = {s.address: np.full(dim, 0.001 * (i + 1), dtype=np.float32)
               for i, s in enumerate(present)}
    rnd = play(sites, plan, changes, {s.address: 100 for s in present})
    leader = present[0]
    for site in present[1:]:
        view = rnd.masked[site.address].copy()
        own = leader.seeds(1)[site.address]
        masks.add_pair_mask(view, own, -1 if masks.adds_first(site.address, leader.address)
                            else 1)
        for r in rnd.reveals:
            if r.revealer == site.address:
                masks.add_pair_mask(view, r.seed,
                                    -1 if masks.adds_first(site.address, r.missing) else 1)
        assert uniform_z(view, 32) < 6.0
        assert uniform_z(view - rnd.encoded[site.address].values, 32) < 6.0
        assert uniform_z(rnd.encoded[site.address].values, 32) > 100
    result = aggregate.aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1)
    assert np.allclose(result.mean, 0.0025, atol=plan.mean_error(400, 4))


def test_push_payloads_of_either_ring_pass_and_older_formats_are_refused_by_name() -> None:
    spec = wire.MaskedSpec(5)
    narrow = np.arange(5, dtype=np.uint32) * np.uint32(2 ** 30)
    wide = np.arange(5, dtype=np.uint64) * np.uint64(2 ** 61)
    for v in (narrow, wide):
        data = wire.to_bytes(v)
        assert len(data) in spec.payload_sizes()
        state = serde.view_state(bytearray(data), spec=spec, reject_nonfinite=True)
        signed = np.int32 if v.dtype == np.uint32 else np.int64
        assert np.array_equal(state[wire.FORMAT].numpy().view(v.dtype), v)
        assert state[wire.FORMAT].numpy().dtype == signed
    old = serde.encode({"swarmnode-secagg/2": torch.from_numpy(wide.view(np.int64))})
    with pytest.raises(PayloadRejected, match=r"format swarmnode-secagg/2; this node takes "
                                              r"swarmnode-secagg/3"):
        serde.view_state(bytearray(old), spec=spec, reject_nonfinite=True)
    with pytest.raises(PayloadRejected, match="shape"):
        serde.view_state(bytearray(wire.to_bytes(narrow[:4])), spec=spec,
                         reject_nonfinite=True)


def test_the_leader_refuses_an_update_in_the_other_ring() -> None:
    rng = np.random.default_rng(4)
    sites = make_sites(3, rng)
    plan = ring.round_plan(3, 10, 1.0)
    changes = {s.address: (rng.standard_normal(64) * 0.01).astype(np.float32) for s in sites}
    rnd = play(sites, plan, changes, {s.address: 5 for s in sites})
    some = sites[1].address
    masked = dict(rnd.masked, **{some: rnd.masked[some].astype(np.uint64)})
    with pytest.raises(AggregateRejected, match=r"not a 1-D uint32 vector \(the round's 32-bit"):
        aggregate.aggregate(rnd.roster, rnd.weights, masked, rnd.reveals, plan, 1)


def test_32_bit_evidence_round_trips_and_is_verified() -> None:
    rng = np.random.default_rng(21)
    sites = make_sites(5, rng)
    plan = ring.round_plan(5, 50, 1.0)
    present = sites[:4]
    changes = {s.address: (rng.standard_normal(64) * 0.05).astype(np.float32) for s in present}
    rnd = play(sites, plan, changes, {s.address: 50 for s in present})
    masked = {a.lower(): v for a, v in rnd.masked.items()}
    reveals = [dropout.SeedReveal(r.revealer.lower(), r.missing.lower(), r.round, 0, r.seed)
               for r in rnd.reveals]
    ev = Evidence(1, False, bytes(range(32)), None, masked, reveals, b"model bytes")
    f = io.BytesIO()
    ev.write_to(f)
    back = Evidence.from_bytes(f.getvalue(), 64)
    assert {v.dtype for v in back.masked.values()} == {np.dtype(np.uint32)}
    hashes = {a: wire.update_hash(v) for a, v in back.masked.items()}
    fresh = aggregate.aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1)
    assert np.array_equal(audit.verify_sum([a.lower() for a in rnd.roster], hashes,
                                           back.masked, back.reveals, plan, None, 1),
                          fresh.ring_sum)
    # a stated sum (older leaders wrote one) in the narrow ring is checked as the wide one's
    stated = Evidence.from_bytes(Evidence(1, False, bytes(32), fresh.ring_sum, masked, reveals,
                                          b"m").to_bytes(), 64)
    assert stated.ring_sum is not None and stated.ring_sum.dtype == np.uint32
    args = ([a.lower() for a in rnd.roster], hashes, stated.masked, stated.reveals, plan)
    assert np.array_equal(audit.verify_sum(*args, stated.ring_sum, 1), fresh.ring_sum)
    with pytest.raises(AggregateRejected, match="not built from exactly"):
        audit.verify_sum(*args, stated.ring_sum + np.uint32(1), 1)
    mixed = dict(masked)
    first = next(iter(mixed))
    mixed[first] = mixed[first].astype(np.uint64)
    with pytest.raises(PayloadRejected, match="not all uint32 or all uint64"):
        Evidence.from_bytes(Evidence(1, False, bytes(32), None, mixed, reveals,
                                     b"m").to_bytes(), 64)


def test_the_bound_check_takes_the_norm_the_decoding_pass_summed() -> None:
    rng = np.random.default_rng(8)
    sites = make_sites(4, rng)
    plan = ring.round_plan(4, 20, 2.0)
    changes = {s.address: (rng.standard_normal(5000) * 0.1).astype(np.float32) for s in sites}
    weights = {s.address: 20 for s in sites}
    rnd = play(sites, plan, changes, weights)
    got = aggregate.unmasked_sum(rnd.roster, weights.keys(), rnd.masked, rnd.reveals, plan, 1)
    squares = 0.0
    for start in range(0, got.shape[0], 1000):  # as a leader decodes it, piece by piece
        piece = encoding.decode_sum(got[start: start + 1000], plan)
        squares += float(np.einsum("i,i->", piece, piece))
    aggregate.check_bound(got, 80, 4, plan, squares_=squares)
    tight = ring.RingPlan(plan.ring_bits, plan.fraction_bits, plan.n_sites, plan.weight_cap,
                          math.sqrt(squares) / 80 / 2)
    with pytest.raises(AggregateRejected, match="did not clip"):
        aggregate.check_bound(got, 80, 4, tight, squares_=squares)
