"""Secure aggregation in a swarm of real node services (swarmnode.testing.inproc: the real
contracts on eth-tester, each site's NodeService, in-memory transport): each member checks in
with the hash of its masked update and pushes only that; the round's leader sums the masked
updates, removes the masks of sites that never checked in with the survivors' seed reveals, and
commits the weighted mean. Checked against the float arithmetic of what the trainers handed
their nodes, and against what each leader received."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from swarmnode.chain.models import RoundStatus
from swarmnode.node.secure import FIRST_FRACTION_BITS, MASKED
from swarmnode.privacy import encoding, ring
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site, decode

INITIAL = {"w": torch.zeros(24, 16), "b": torch.zeros(16)}
CLIP = 10.0


def _spec(min_peers: int = 3) -> TrainingSpec:
    plain = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=min_peers,
                                    merge_method="mean", merge_options={"clip_norm": CLIP})
    return dataclasses.replace(plain, max_weight=100, secure_aggregation=True)


def _stepper(rounds: int):  # type: ignore[no-untyped-def]
    def step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        if k >= rounds:
            return None
        base = model if model is not None else INITIAL
        gen = torch.Generator().manual_seed(1000 * site.index + k)
        return ({n: t + 0.1 * (site.index + 1) * torch.randn(t.shape, generator=gen)
                 for n, t in base.items()}, 10 + 7 * site.index)
    return step


def _record_pushes(swarm: InProcessSwarm) -> list[tuple[str, int, str, torch.Tensor]]:
    """What every leader's service was handed as a member's update: (leader, round, sender,
    tensor), recorded at the service's entry point, after the transport's checks."""
    got: list[tuple[str, int, str, torch.Tensor]] = []
    for site in swarm.sites:
        service = site.service
        accept = service.accept_update

        def spy(round, sender, weight, state, digest, evict=None,  # type: ignore[no-untyped-def]
                _accept=accept, _me=service.me):
            got.append((_me, round, sender, {n: t.clone() for n, t in state.items()}))
            return _accept(round, sender, weight, state, digest, evict)

        service.accept_update = spy  # type: ignore[method-assign]
    return got


def _check_means(sites: list[Site], contributors: Mapping[int, list[int]]) -> None:
    """Each committed round's merged model is the weighted mean of what its contributors'
    trainers sent (every site starts a round from the same committed model, so the mean of
    the changes added to it is the mean of the models), within the encoding's stated error
    (round 1 encodes the parameters whole, in 16 fractional bits; the others in the narrow
    ring's bits for their mask set) and float32's rounding."""
    by_round: dict[int, dict[int, tuple[dict[str, torch.Tensor], int]]] = {}
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for site in sites:
        for sent in site.syncs:
            r = sent.outcome.round
            if sent.outcome.contributed:
                by_round.setdefault(r, {})[site.index] = (decode(sent.payload), sent.weight)
            if sent.outcome.data is not None:
                merged[r] = decode(sent.outcome.data)
    for r, who in contributors.items():
        got = by_round[r]
        assert sorted(got) == who, (r, sorted(got))
        total = sum(w for _, w in got.values())
        # the round's ring: at most len(sites) in its mask set, so at least these bits
        bits = FIRST_FRACTION_BITS if r == 1 else ring.round_plan(len(sites), 100,
                                                                  CLIP).fraction_bits
        atol = len(got) * 2.0 ** -bits / total + 1e-6
        for name in INITIAL:
            want = sum(s[name].double() * w for s, w in got.values()) / total
            torch.testing.assert_close(merged[r][name].double(), want, rtol=0, atol=atol)


def test_a_secure_swarm_commits_the_weighted_mean_and_leaders_hold_only_masked_updates() -> None:
    started = time.monotonic()
    rounds = 3
    with InProcessSwarm(3, _spec(), grace_s=2, deadline_s=20) as swarm:
        pushes = _record_pushes(swarm)
        sites = swarm.run(_stepper(rounds), timeout=240)
        final = swarm.final_digest()
        assert final is not None and [s.final_digest for s in sites] == [final] * 3
        _check_means(sites, {r: [0, 1, 2] for r in range(1, rounds + 1)})
        hashes = {r: swarm.admin.masked_hashes(r) for r in range(1, rounds + 1)}
        # a round over at a node: the masked updates it received for it are gone (a leader
        # holds them in memory, one round's at most)
        for site in swarm.sites:
            assert site.service.secure is not None
            assert not [r for r in range(1, rounds + 3) if site.service.secure.senders(r)]
    assert all(len(h) == 3 for h in hashes.values())  # every check-in carried its hash
    # what a leader received of a member is a masked vector, never its update: decoded as if
    # it were a plain encoding, it is ring noise (spread over the whole ring), not a change
    # bounded by the clip norm (no coordinate of one site's is over max_weight x clip_norm);
    # and no float of the member's model is in it. Round 1 (no starting model) is pushed in
    # the wide ring (8 bytes a parameter), the others in the narrow one (4: format /3)
    assert len(pushes) >= 2 * rounds
    for leader, r, sender, state in pushes:
        assert leader != sender and list(state) == [MASKED]
        plan = ring.round_plan(3, 100, CLIP, first=r == 1)
        assert state[MASKED].dtype == (torch.int64 if r == 1 else torch.int32)
        assert plan.ring_bits == (64 if r == 1 else 32)
        vector = state[MASKED].numpy().view(plan.dtype)
        assert vector.shape == (24 * 16 + 16,)
        as_plain = encoding.decode_sum(vector.copy(), plan)
        assert float(np.abs(as_plain).max()) > plan.weight_cap * CLIP
        mine = next(s for s in sites if s.address == sender)
        synced = [x.payload for x in mine.syncs if x.outcome.round == r]
        if not synced:  # the final round: the finished sites push a masked zero
            continue
        sent = decode(synced[0])
        floats = torch.cat([sent["b"].reshape(-1), sent["w"].reshape(-1)]).double().numpy()
        assert not np.isin(as_plain, floats).any()
    print(f"3 sites, {rounds} rounds with secure aggregation: {time.monotonic() - started:.1f} s")


def test_the_same_secure_run_gives_the_same_final_digest() -> None:
    digests = []
    for _ in range(2):
        with InProcessSwarm(3, _spec(), grace_s=2, deadline_s=20) as swarm:
            swarm.run(_stepper(2), timeout=240)
            digests.append(swarm.final_digest())
    assert digests[0] is not None and digests[0] == digests[1]


@pytest.mark.parametrize("policy", ["snapshot", "active"])
def test_a_finished_site_adds_nothing_to_a_secure_sum_whatever_its_policy(policy: str) -> None:
    """A finished site that kept adding weight would add a contribution the others can predict
    (``active``: no change; ``snapshot``: the same weights every round, removed by subtracting
    two rounds' sums): with two sites still training, each would learn the other's update. So
    with secure aggregation it checks in with weight 0 and each round after its finish is the
    weighted mean of the sites still training alone."""
    def step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        return _stepper(1 if site.index == 0 else 3)(site, k, model)

    with InProcessSwarm(4, _spec(), grace_s=2, deadline_s=20, policy=policy) as swarm:
        sites = swarm.run(step, timeout=300)
        final = swarm.final_digest()
        assert final is not None and [s.final_digest for s in sites] == [final] * 4
        contributors: dict[int, list[int]] = {}
        for site in sites:
            for sent in site.syncs:
                if sent.outcome.contributed and sent.outcome.data is not None:
                    contributors.setdefault(sent.outcome.round, []).append(site.index)
        # rounds where fewer than three sites added weight commit their starting model (the
        # round core's rule, tested on its own); the others are summed
        summed = {r: sorted(who) for r, who in contributors.items() if len(who) >= 3}
        first = max(sent.outcome.round for sent in sites[0].syncs)
        after = {r: who for r, who in summed.items() if r > first}
        # rounds summed after site 0 finished, each the mean of the sites still training alone
        # (site 0's weights, had they been added, would make the merged model differ)
        assert after and all(who == [1, 2, 3] for who in after.values()), contributors
        _check_means(sites, summed)
        me = sites[0].address
        weights = [(int(e.args["round"]), int(e.args["weight"]))
                   for e in swarm.admin.events(names={"CheckedIn"}) if e.args["node"] == me]
    # its one sync's weight, then (if it joins the final round) weight 0
    assert weights and weights[0][1] == 10, weights
    assert all(w == 0 for _, w in weights[1:]), weights


def test_once_too_few_sites_still_train_to_sum_they_finish_with_the_last_summed_model() -> None:
    """3 sites, site 0 done after one sync: the two others could never be summed again (each
    would learn the other's update from the sum), so rather than train on while every round
    keeps its starting model, they finish at their next sync and take the final model: the
    last summed one."""
    def step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        return _stepper(1 if site.index == 0 else 8)(site, k, model)

    with InProcessSwarm(3, _spec(), grace_s=2, deadline_s=20) as swarm:
        sites = swarm.run(step, timeout=300)
        final = swarm.final_digest()
        assert final is not None and [s.final_digest for s in sites] == [final] * 3
        summed = [swarm.admin.round(r) for r in range(1, swarm.final_round() + 1)]
    committed = [r.digest for r in summed if r.status is RoundStatus.COMMITTED]
    assert committed and committed[-1] == final
    for site in sites[1:]:
        # they stopped long before their data ran out: at most the round site 0 finished in,
        # one more that ran while its finish landed, and the sync that finished them
        assert 2 <= len(site.syncs) <= 4, [s.outcome.round for s in site.syncs]
        assert site.syncs[-1].outcome.digest == final
    # site 0 added weight once (round 1, or round 2 if its check-in missed round 1): no other
    # round was summed
    assert len(set(committed)) <= 2, [d.hex()[:8] for d in committed]


def test_a_site_that_never_checks_in_is_unmasked_by_the_survivors_reveals() -> None:
    """Site 4 dies before its round-2 check-in: it is in round 2's mask set (it joined in round
    1), so the three others reveal their round-2 seeds with it and the round completes with
    the mean of the three."""
    started = time.monotonic()
    with InProcessSwarm(4, _spec(), grace_s=2, deadline_s=20,
                        faults={3: {"exit": "before-checkin:2"}}) as swarm:
        sites = swarm.run(_stepper(3), timeout=240)
        assert sites[3].died == 2
        final = swarm.final_digest()
        assert final is not None and [s.final_digest for s in sites[:3]] == [final] * 3
        assert set(swarm.admin.masked_hashes(2)) == {s.address for s in sites[:3]}
        info = swarm.admin.round(2)
        assert info.digest is not None and sites[3].address not in info.participants
    # round 1's mask set is the first min_peers members; site 4 joined in round 1 past them
    _check_means(sites, {1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]})
    print(f"dropout before check-in: {time.monotonic() - started:.1f} s")


def test_a_site_that_checked_in_and_never_pushed_abandons_that_round_only() -> None:
    """Site 4 checks in for round 2 (or the first later round it is a member in) and dies before
    pushing: no leader can remove its masks without unmasking it, so that round is abandoned
    (nothing revealed) and the next completes without it."""
    started = time.monotonic()
    with InProcessSwarm(4, _spec(), grace_s=2, deadline_s=6,
                        faults={3: {"exit": "before-push:2+"}}) as swarm:
        sites = swarm.run(_stepper(5), timeout=240)  # 5: site 4 is a member of one of 2-5
        died = sites[3].died
        assert died is not None
        assert swarm.admin.round(died).status is RoundStatus.ABANDONED
        assert swarm.admin.masked_hashes(died).keys() >= {sites[3].address}  # it checked in
        later = swarm.admin.round(died + 1)
        assert later.status is RoundStatus.COMMITTED and sites[3].address not in \
            later.participants
        final = swarm.final_digest()
        assert final is not None and [s.final_digest for s in sites[:3]] == [final] * 3
    print(f"checked in, never pushed (round {died} abandoned): "
          f"{time.monotonic() - started:.1f} s")


def test_a_round_without_a_starting_model_has_room_for_whole_parameters() -> None:
    """Round 1 encodes the parameters themselves: at the spec's largest sensible weight cap the
    ring still holds a parameter vector of norm over 5 million (a 25M-parameter model at its
    initialisation is in the hundreds), and the plan fits the ring for 256 sites."""
    from swarmnode.node.secure import first_round_clip
    from swarmnode.privacy import ring

    for cap in (100, 100_000):
        clip = first_round_clip(cap)
        assert clip > 5e6
        ring.plan(ring.MAX_SITES, cap, clip, fraction_bits=FIRST_FRACTION_BITS)


# a point of order 8 on Curve25519: X25519 with it gives the all-zero secret (keys.pair_key
# refuses it); the registry takes any 32 bytes
LOW_ORDER_KEY = (325606250916557431795983626356110631294008115727848805560023387167927233504
                 ).to_bytes(32, "little")
# SwarmTraining's creation code as committed before its join refused low-order keys
# (LowOrderMaskKey; commit 8df8a54): a training deployed then takes any non-zero key
BEFORE_LOW_ORDER_CHECK = (Path(__file__).parent / "data"
                          / "SwarmTraining-before-LowOrderMaskKey.bytecode").read_text().strip()


def test_a_member_with_a_low_order_key_or_a_key_posted_again_does_not_halt_the_training(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: a 4th member joins (in round 1, so it is in round 2's mask set by join order)
    with a low-order key it posted in the registry, and never checks in; site 2 posts a new key
    in the registry during the training. The honest sites take their pair keys from the keys
    of the join, leave the low-order member out of every mask set, and finish with one final
    digest. Before: every honest check-in of round 2 failed making a pair key with the 4th
    member, and the key posted again changed site 2's pair keys at the others' end only.
    Today's contract refuses that join (tests/chain/test_secure_join.py); the training here is
    deployed with the contract from before, as one deployed then still runs, and the nodes'
    exclusion (privacy.roster) is what keeps it going."""
    from swarmnode.chain import client
    from swarmnode.chain.accounts import dev_account
    from swarmnode.privacy.keys import SiteKey
    from swarmnode.testing.inproc import _FUNDS

    assert BEFORE_LOW_ORDER_CHECK != client.BYTECODE
    monkeypatch.setattr(client, "BYTECODE", BEFORE_LOW_ORDER_CHECK)
    started = time.monotonic()
    with InProcessSwarm(3, _spec(), grace_s=2, deadline_s=20) as swarm:
        monkeypatch.undo()
        bad = swarm.admin.with_account(dev_account(4))
        swarm.w3.eth.send_transaction({"from": swarm.w3.eth.accounts[0],
                                       "to": bad.account_address, "value": _FUNDS})
        swarm.admin.authorize(bad.account_address, b"\x05" * 32)
        bad.registry.enroll("bad.inproc:7441")
        bad.registry.set_public_key(LOW_ORDER_KEY)
        bad.join()
        assert swarm.admin.mask_key(bad.account_address) == LOW_ORDER_KEY
        reposter = swarm.sites[1]
        joined_with = swarm.admin.mask_key(reposter.address)
        step = _stepper(3)

        def repost(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
            if site is reposter and k == 1:  # before its round-2 check-in
                site.service.chain.registry.set_public_key(SiteKey.generate().public_bytes)
            return step(site, k, model)

        sites = swarm.run(repost, timeout=240)
        final = swarm.final_digest()
        assert final is not None and [s.final_digest for s in sites] == [final] * 3
        assert swarm.admin.registry.site(reposter.address).public_key != joined_with
        assert swarm.admin.mask_key(reposter.address) == joined_with
        honest = {s.address.lower() for s in sites}
        for s in sites:
            roster = s.service.secure.roster(2)  # type: ignore[union-attr]
            assert roster is not None and {a.lower() for a in roster} == honest
        assert set(swarm.admin.masked_hashes(2)) == {s.address for s in sites}
    _check_means(sites, {r: [0, 1, 2] for r in range(1, 4)})
    print(f"low-order member and a key posted again: {time.monotonic() - started:.1f} s")
