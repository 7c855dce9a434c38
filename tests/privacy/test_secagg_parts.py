"""The parts of the secure-aggregation core: ring width and bounds, encoding, keys, the
check-in hash, the leader's refusals (an abandoned round above all) and the members' audit."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from secagg_sim import CHAIN_ID, TRAINING, make_sites, play

from swarmnode.errors import (
    AggregateRejected,
    ConfigError,
    IdentityError,
    NonFiniteValues,
    PayloadRejected,
    RoundAbandoned,
    RoundError,
)
from swarmnode.privacy import audit, dropout, encoding, keys, masks, ring, wire
from swarmnode.privacy.aggregate import aggregate
from swarmnode.transport import serde


# -- ring ------------------------------------------------------------------------------------------
def test_ring_width_follows_sites_weight_cap_clip_and_precision() -> None:
    # n (floor(w C 2^f) + 1) must stay below 2^(k-1)
    assert ring.required_bits(1, 1, 1.0, 0) == 3  # |sum| <= 2: 3 bits signed
    assert ring.required_bits(4, 2 ** 16, 8.0, 32) == 2 + 16 + 3 + 32 + 1 + 1
    # each doubling of sites, weight cap or clip costs one bit
    base = ring.required_bits(16, 1000, 2.0)
    assert ring.required_bits(32, 1000, 2.0) == base + 1
    assert ring.required_bits(16, 2000, 2.0) == base + 1
    assert ring.required_bits(16, 1000, 4.0) == base + 1
    assert ring.required_bits(16, 1000, 2.0, 33) == base + 1


def test_the_largest_weight_cap_is_exactly_the_boundary() -> None:
    for n, clip in ((256, 1.0), (256, 8.0), (3, 0.37), (100, 10.0)):
        cap = ring.largest_weight_cap(n, clip)
        assert ring.required_bits(n, cap, clip) <= 64 < ring.required_bits(n, cap + 1, clip)
    # the pinned layout: max_weight x clip_norm up to about 2^23 at 256 sites
    assert 2 ** 22 < ring.largest_weight_cap(ring.MAX_SITES, 1.0) < 2 ** 23


def test_a_ring_too_narrow_is_refused_with_what_to_change() -> None:
    with pytest.raises(ConfigError, match=r"need a 66-bit ring.*lower max_weight to at most"):
        ring.plan(16, 2 ** 24, 16.0)
    with pytest.raises(ConfigError, match="set merge option clip_norm"):
        ring.plan(3, 10, 0.0)
    with pytest.raises(ConfigError, match="set max_weight"):
        ring.plan(3, 0, 1.0)
    plan = ring.plan(16, 2 ** 16, 8.0)
    assert plan.sum_error() == 16 * 2.0 ** -32
    assert plan.mean_error(32) == plan.sum_error() / 32
    assert plan.bytes_per_element == 8 and ring.plan(3, 1, 1.0, 8, 32).bytes_per_element == 4


# -- encoding --------------------------------------------------------------------------------------
def test_encoding_clips_to_the_l2_bound_and_keeps_the_direction() -> None:
    plan = ring.plan(3, 10, 2.0)
    change = np.array([3.0, -4.0, 0.0], dtype=np.float32)  # norm 5
    enc = encoding.encode(change, 10, plan, seed=1)
    assert enc.clipped and enc.norm == 5.0
    decoded = encoding.decode_sum(enc.values, plan)
    assert np.allclose(decoded, 10 * change * 2.0 / 5.0, atol=2.0 ** -32)
    small = encoding.encode(change / 10, 3, plan, seed=1)
    assert not small.clipped
    assert np.allclose(encoding.decode_sum(small.values, plan), 3 * change / 10, atol=2.0 ** -32)


def test_stochastic_rounding_is_seeded_and_unbiased() -> None:
    plan = ring.plan(3, 1, 16.0, fraction_bits=4)  # coarse units of 1/16 show the rounding
    change = np.full(200_000, 0.3 / 16, dtype=np.float32)  # norm 8.4 < 16: no clipping
    a = encoding.encode(change, 1, plan, seed=5).values
    assert np.array_equal(a, encoding.encode(change, 1, plan, seed=5).values)
    assert not np.array_equal(a, encoding.encode(change, 1, plan, seed=6).values)
    assert set(np.unique(a).tolist()) == {0, 1}  # floor or floor + 1 unit
    # unbiased: the mean encodes the value (binomial: 5 sigma)
    p = float(change[0]) * 16
    assert abs(a.mean() - p) < 5 * math.sqrt(p * (1 - p) / a.shape[0])


def test_negative_values_decode_two_complement_style() -> None:
    for bits in (64, 40):
        plan = ring.plan(3, 4, 1.0, 20, bits)
        enc = encoding.encode(np.array([-0.5, 0.25, -0.125], np.float32), 4, plan, seed=0)
        assert np.array_equal(encoding.decode_sum(enc.values, plan), [-2.0, 1.0, -0.5])
        assert encoding.decode_mean(enc.values, plan, 4).tolist() == [-0.5, 0.25, -0.125]


def test_bad_inputs_to_the_encoder_are_refused() -> None:
    plan = ring.plan(3, 10, 1.0)
    with pytest.raises(NonFiniteValues, match="NaN or Inf"):
        encoding.encode(np.array([1.0, np.nan], np.float32), 1, plan, seed=0)
    with pytest.raises(ConfigError, match=r"1\.\.10"):
        encoding.encode(np.zeros(2, np.float32), 11, plan, seed=0)
    with pytest.raises(ConfigError, match="1-D float"):
        encoding.encode(np.zeros((2, 2), np.float32), 1, plan, seed=0)


# -- keys ------------------------------------------------------------------------------------------
A, B, C = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "c3" * 20


def _pair(mine: keys.SiteKey, theirs: keys.SiteKey, me: str, peer: str, *,
          chain_id: int = CHAIN_ID, training: str = TRAINING) -> bytes:
    return keys.pair_key(mine, theirs.public_bytes, chain_id=chain_id, training=training, me=me,
                         peer=peer)


def test_pair_keys_are_symmetric_and_bound_to_their_context() -> None:
    ka, kb = keys.SiteKey.generate(), keys.SiteKey.generate()
    k = _pair(ka, kb, A, B)
    assert len(k) == 32 and k == _pair(kb, ka, B, A)
    assert k == _pair(ka, kb, A.upper().replace("0X", "0x"), B)  # address case does not matter
    others = {_pair(ka, kb, A, B, chain_id=1), _pair(ka, kb, A, B, training="0x" + "77" * 20),
              _pair(ka, kb, A, C), _pair(ka, kb, C, B)}
    assert k not in others and len(others) == 4
    # the shared secret matters, not just the context
    assert k != _pair(keys.SiteKey.generate(), kb, A, B)
    # a site's key survives a restart from its private bytes
    again = keys.SiteKey.from_private_bytes(ka.private_bytes())
    assert again.public_bytes == ka.public_bytes and _pair(again, kb, A, B) == k


def test_bad_keys_and_addresses_are_refused() -> None:
    ka = keys.SiteKey.generate()
    with pytest.raises(IdentityError, match="low-order point"):
        keys.pair_key(ka, bytes(32), chain_id=1, training=TRAINING, me=A, peer=B)
    with pytest.raises(IdentityError, match="32 raw bytes"):
        keys.pair_key(ka, b"short", chain_id=1, training=TRAINING, me=A, peer=B)
    with pytest.raises(ConfigError, match="with itself"):
        keys.pair_key(ka, ka.public_bytes, chain_id=1, training=TRAINING, me=A, peer=A)
    with pytest.raises(ConfigError, match="not an Ethereum address"):
        keys.pair_key(ka, ka.public_bytes, chain_id=1, training="site-a", me=A, peer=B)


def test_round_seeds_differ_by_round_and_attempt() -> None:
    key = bytes(range(32))
    seeds = {keys.round_seed(key, r, a) for r in range(4) for a in range(3)}
    assert len(seeds) == 12 and {len(s) for s in seeds} == {32}
    assert keys.round_seed(key, 1, 0) == keys.round_seed(key, 1, 0)
    with pytest.raises(ConfigError, match="round -1"):
        keys.round_seed(key, -1)


# -- the check-in hash -----------------------------------------------------------------------------
def test_the_update_hash_is_the_pushed_payloads_digest() -> None:
    plan = ring.plan(3, 10, 1.0)
    v = np.arange(5, dtype=np.uint64) * np.uint64(2 ** 61)
    data = wire.to_bytes(v)
    # the canonical bytes are the payload a site pushes: the transport's digest is the hash
    pushed = serde.encode({wire.FORMAT: torch.from_numpy(v.view(np.int64))})
    assert data == pushed and data.startswith(wire.header(5))
    assert len(data) == len(wire.header(5)) + 5 * 8 and wire.FORMAT.encode() in wire.header(5)
    assert wire.update_hash(v) == hashlib.sha256(data).digest() == serde.digest(pushed)
    state = serde.view_state(bytearray(data), spec=serde.ParamSpec(wire.params(5)),
                             reject_nonfinite=True)
    assert np.array_equal(state[wire.FORMAT].numpy().view(np.uint64), v)
    assert np.array_equal(wire.from_bytes(data, plan, 5), v)
    w = v.copy()
    w[3] ^= np.uint64(1)
    assert wire.update_hash(w) != wire.update_hash(v)
    with pytest.raises(PayloadRejected, match="not a masked update of 6"):
        wire.from_bytes(data, plan, 6)
    # the narrow ring: 4 bytes an element, one int32 tensor of the same name
    narrow = ring.plan(3, 1, 1.0, 8, 32)
    small = np.array([1, 2 ** 32 - 1], dtype=np.uint32)
    data = wire.to_bytes(small)
    assert np.array_equal(wire.from_bytes(data, narrow, 2), small)
    assert len(data) == len(wire.header(2, 32)) + 2 * 4
    assert data == serde.encode({wire.FORMAT: torch.from_numpy(small.view(np.int32))})
    with pytest.raises(PayloadRejected, match="not a masked update of 2 elements of the 32"):
        wire.from_bytes(wire.to_bytes(small.astype(np.uint64)), narrow, 2)  # 8 bytes each
    odd = ring.plan(3, 1, 1.0, 8, 30)  # a ring narrower than its type: values are checked
    with pytest.raises(PayloadRejected, match="outside the 30-bit ring"):
        wire.from_bytes(data, odd, 2)


# -- the leader's refusals -------------------------------------------------------------------------
def _round(n: int = 5, dropped: int = 1, seed: int = 21):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    sites = make_sites(n, rng)
    plan = ring.plan(n, 50, 1.0)
    present = sites[: n - dropped]
    changes = {s.address: (rng.standard_normal(64) * 0.05).astype(np.float32) for s in present}
    return sites, plan, play(sites, plan, changes, {s.address: 50 for s in present})


def test_a_site_that_checked_in_and_never_pushed_abandons_the_round() -> None:
    sites, plan, rnd = _round()
    silent = sites[2].address
    pushed = {a: v for a, v in rnd.masked.items() if a != silent}
    with pytest.raises(RoundAbandoned) as caught:
        aggregate(rnd.roster, rnd.weights, pushed, rnd.reveals, plan, 1)
    message = str(caught.value)
    assert silent in message and "abandoned" in message and "nothing is revealed" in message
    assert isinstance(caught.value, RoundError) and caught.value.exit_code == 62
    # and no honest site reveals a seed with a site that checked in
    reveals = dropout.reveal_seeds(sites[0].address, rnd.roster, rnd.weights.keys(), 1, 0,
                                   sites[0].seeds(1))
    assert {r.missing for r in reveals} == {sites[4].address}


def test_fewer_than_three_check_ins_abandon_the_round_and_reveal_nothing() -> None:
    sites, plan, _ = _round(n=4, dropped=0)
    checked = [s.address for s in sites[:2]]
    with pytest.raises(RoundAbandoned, match="at least 3"):
        dropout.reveal_seeds(sites[0].address, [s.address for s in sites], checked, 1, 0,
                             sites[0].seeds(1))


def test_reveals_are_exactly_for_the_dropouts() -> None:
    sites, plan, rnd = _round()
    missing = sites[4].address
    with pytest.raises(AggregateRejected, match=r"1 seed reveals are missing"):
        aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals[1:], plan, 1)
    # a reveal for a site that checked in is refused outright
    leak = dropout.SeedReveal(sites[0].address, sites[1].address, 1, 0,
                              sites[0].seeds(1)[sites[1].address])
    with pytest.raises(AggregateRejected, match="not a dropout"):
        aggregate(rnd.roster, rnd.weights, rnd.masked, [*rnd.reveals, leak], plan, 1)
    # a wrong seed leaves noise, which the bound check refuses
    wrong = [dropout.SeedReveal(r.revealer, r.missing, 1, 0, bytes(32)) if i == 0 else r
             for i, r in enumerate(rnd.reveals)]
    with pytest.raises(AggregateRejected, match="over the bound"):
        aggregate(rnd.roster, rnd.weights, rnd.masked, wrong, plan, 1)
    # an update from a site that did not check in
    with pytest.raises(AggregateRejected, match="did not check in"):
        aggregate(rnd.roster, rnd.weights, {**rnd.masked, missing: rnd.masked[sites[0].address]},
                  rnd.reveals, plan, 1)
    assert aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1).dropouts == (
        missing,)


def test_a_site_that_skipped_clipping_is_caught_by_the_bound() -> None:
    sites, plan, rnd = _round(dropped=0)
    cheat = sites[1]
    loud = ring.plan(5, 50, 1000.0)  # encodes with a clip 1000x the spec's
    enc = encoding.encode(np.full(64, 10.0, np.float32), 50, loud, seed=0)
    masked = {**rnd.masked, cheat.address: masks.mask_update(enc.values, cheat.address,
                                                               cheat.seeds(1), plan)}
    with pytest.raises(AggregateRejected, match="did not clip"):
        aggregate(rnd.roster, rnd.weights, masked, rnd.reveals, plan, 1)


# -- the members' audit ----------------------------------------------------------------------------
def test_any_member_can_check_the_sum_against_the_hashes() -> None:
    sites, plan, rnd = _round()
    result = aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1)
    hashes = {a: wire.update_hash(v) for a, v in rnd.masked.items()}
    audit.verify_sum(rnd.roster, hashes, rnd.masked, rnd.reveals, plan, result.ring_sum, 1)
    # a sum with one update left out
    one = sites[0].address
    partial = result.ring_sum - encodings_of(rnd, one)
    with pytest.raises(AggregateRejected, match="not built from exactly"):
        audit.verify_sum(rnd.roster, hashes, rnd.masked, rnd.reveals, plan, partial, 1)
    # an update swapped after the check-in
    swapped = {**rnd.masked, one: rnd.masked[one] + np.uint64(1)}
    with pytest.raises(AggregateRejected, match=f"{one}'s masked update does not match"):
        audit.verify_sum(rnd.roster, hashes, swapped, rnd.reveals, plan, result.ring_sum, 1)
    # an update without a hash on chain
    with pytest.raises(AggregateRejected, match="not those of the sites that checked in"):
        audit.verify_sum(rnd.roster, {a: h for a, h in hashes.items() if a != one},
                         rnd.masked, rnd.reveals, plan, result.ring_sum, 1)


def encodings_of(rnd, site: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    return rnd.encoded[site].values


# -- the node's fused paths: the same results as the plain ones ------------------------------------
def test_encoding_pieces_into_a_vector_is_the_flat_encoding_added() -> None:
    rng = np.random.default_rng(3)
    plan = ring.plan(3, 10, 2.0)
    a = rng.standard_normal(70_000).astype(np.float32)
    b = a + rng.standard_normal(70_000).astype(np.float32) * np.float32(1e-3)
    flat = np.subtract(a, b, dtype=np.float64)
    # pieces cut across the encoder's chunks, one of them whole (no starting value)
    cut = [0, 5, encoding.STEP + 7, 70_000]
    parts = [(a[i:j], b[i:j]) for i, j in zip(cut, cut[1:], strict=False)]
    parts[0] = (flat[:5].copy(), None)
    alone = encoding.encode(flat, 7, plan, seed=11)
    masks_ = rng.integers(0, 2**64 - 1, 70_000, dtype=np.uint64, endpoint=True)
    into = masks_.copy()
    got = encoding.encode(encoding.Pieces(parts), 7, plan, seed=11, out=into)
    assert got.values is into and got.norm == pytest.approx(alone.norm, rel=1e-12)
    assert np.array_equal(into - masks_, alone.values)  # added modulo 2^64, bit for bit
    with pytest.raises(ConfigError, match="uint64 vector of 70000"):
        encoding.encode(flat, 7, plan, seed=11, out=np.zeros(5, np.uint64))


def test_encoding_into_a_vector_clipped_or_refused_leaves_only_its_own_encoding() -> None:
    # the encoder encodes as it sums the norm; clipped (or near the clip) it takes that pass
    # back and encodes again: what it adds is the encoding alone, and a refused change adds
    # nothing
    rng = np.random.default_rng(4)
    plan = ring.plan(3, 10, 1.0)
    a = rng.standard_normal(150_000)
    masks_ = rng.integers(0, 2**64 - 1, 150_000, dtype=np.uint64, endpoint=True)
    norm = float(np.linalg.norm(a))
    for within in (10.0, 1 - 3e-7, 1e-3):  # clipped, within SCREEN under the clip, far under
        change = a * (within / norm)
        alone = encoding.encode(change, 9, plan, seed=5)
        into = masks_.copy()
        got = encoding.encode(change, 9, plan, seed=5, out=into)
        assert got.norm == alone.norm and got.clipped == alone.clipped == (within > 1)
        assert np.array_equal(into - masks_, alone.values)
    bad = a * 1e-3
    bad[100_000] = np.inf
    into = masks_.copy()
    with pytest.raises(NonFiniteValues, match="NaN or Inf"):
        encoding.encode(bad, 9, plan, seed=5, out=into)
    assert np.array_equal(into, masks_)


def test_pair_masks_into_a_used_vector_overwrite_it() -> None:
    sites = make_sites(3, np.random.default_rng(0))
    me, seeds = sites[0].address, sites[0].seeds(4)
    used = np.full(1000, 12345, dtype=np.uint64)
    assert masks.pair_masks(1000, me, seeds, out=used) is used
    assert np.array_equal(used, masks.pair_masks(1000, me, seeds))


def test_a_running_sum_gives_the_same_ring_sum_and_is_not_changed() -> None:
    sites, plan, rnd = _round()
    fresh = aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1)
    from swarmnode.privacy.aggregate import check_bound, unmasked_sum

    running = np.zeros_like(next(iter(rnd.masked.values())))
    for v in rnd.masked.values():
        running += v
    before = running.copy()
    got = unmasked_sum(rnd.roster, rnd.weights.keys(), rnd.masked, rnd.reveals, plan, 1,
                       summed=running)
    assert np.array_equal(got, fresh.ring_sum)
    assert rnd.reveals and np.array_equal(running, before)  # reveals removed from a copy
    # the bound judged on the ring sum (decoded a chunk at a time) as on the decoded sum
    total = sum(rnd.weights.values())
    check_bound(got, total, len(rnd.weights), plan)
    tight = ring.plan(plan.n_sites, plan.weight_cap, 1e-6)
    for form in (got, encoding.decode_sum(got, plan)):
        with pytest.raises(AggregateRejected, match="did not clip"):
            check_bound(form, total, len(rnd.weights), tight)


def test_evidence_is_streamed_and_its_sum_is_optional() -> None:
    import io

    from swarmnode.privacy.evidence import Evidence

    sites, plan, rnd = _round()
    masked = {a.lower(): v for a, v in rnd.masked.items()}
    reveals = [dropout.SeedReveal(r.revealer.lower(), r.missing.lower(), r.round, 0, r.seed)
               for r in rnd.reveals]
    ev = Evidence(1, False, bytes(range(32)), None, masked, reveals, b"model bytes")
    f = io.BytesIO()
    n = ev.write_to(f)
    assert n == len(f.getvalue()) and f.getvalue() == ev.to_bytes()
    size = next(iter(masked.values())).shape[0]
    back = Evidence.from_bytes(f.getvalue(), size)
    assert back.ring_sum is None and back.digest == ev.digest and back.model == ev.model
    assert {k: v.tolist() for k, v in back.masked.items()} == {
        k: v.tolist() for k, v in masked.items()}
    assert set(back.reveals) == set(reveals) and len(back.reveals) == len(reveals)
    # evidence that states its sum (older leaders) keeps it
    stated = np.arange(size, dtype=np.uint64)
    import dataclasses
    old = Evidence.from_bytes(dataclasses.replace(ev, ring_sum=stated).to_bytes(), size)
    assert old.ring_sum is not None and np.array_equal(old.ring_sum, stated)
    # and the sum a member recomputes is the leader's
    hashes = {a: wire.update_hash(v) for a, v in rnd.masked.items()}
    fresh = aggregate(rnd.roster, rnd.weights, rnd.masked, rnd.reveals, plan, 1)
    assert np.array_equal(audit.verify_sum(rnd.roster, hashes, rnd.masked, rnd.reveals, plan,
                                           None, 1), fresh.ring_sum)
