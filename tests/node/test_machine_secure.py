"""The round machine's secure-aggregation decisions and the mask-set rule, driven by synthetic
chain observations (no sockets, no chain). The in-process swarm test
(tests/node/test_inproc_secure.py) runs them with real node services and contracts."""

from __future__ import annotations

import pytest

from swarmnode.chain.models import RoundInfo, RoundStatus
from swarmnode.errors import ConfigError, IdentityError
from swarmnode.node.machine import (
    CheckIn,
    Merge,
    Observation,
    Push,
    Reveals,
    RoundMachine,
    SecureView,
    Stage,
    Timing,
    Wait,
)
from swarmnode.privacy.keys import SiteKey, pair_key, usable_public
from swarmnode.privacy.roster import mask_set

A, B, C, E = "0xA", "0xB", "0xC", "0xE"
KEY = SiteKey.generate().public_bytes  # a usable key (the one every member joined with here)
S1, S2, T_ADDR = "0x" + "1" * 40, "0x" + "2" * 40, "0x" + "7" * 40
ABC = frozenset({"0xa", "0xb", "0xc"})  # participants checked in with weight above 0
T = Timing(grace_s=2.0, deadline_s=10.0, collect_s=5.0, min_peers=3, poll_s=0.05, retry_s=0.5)


def info(status=RoundStatus.OPEN, participants=(), leader=None, attempt=1,
         elected_at=0, first=0, round=2) -> RoundInfo:
    return RoundInfo(round=round, status=status, leader=leader, attempt=attempt,
                     participants=tuple(participants), digest=None, elected_at=elected_at,
                     first_checkin_at=first, is_final=False)


def test_the_mask_set_is_a_join_order_prefix_fixed_before_the_round() -> None:
    members = [(A, 1, KEY), (B, 1, KEY), (C, 1, KEY)]
    # round 1: the first min_peers members, once that many joined; not fixed before
    assert mask_set(members[:2], 1, 3) is None
    assert mask_set(members, 1, 3) == (A, B, C)
    assert mask_set([*members, (E, 1, KEY)], 1, 3) == (A, B, C)  # a 4th join changes nothing
    # round 2: every member that joined before it opened; a join during round 2 is left out
    assert mask_set([*members, (E, 1, KEY)], 2, 3) == (A, B, C, E)
    assert mask_set([*members, (E, 2, KEY)], 2, 3) == (A, B, C)
    assert mask_set([*members, (E, 2, KEY)], 3, 3) == (A, B, C, E)
    with pytest.raises(ConfigError, match="not in join order"):
        mask_set([(A, 2, KEY), (B, 1, KEY), (C, 1, KEY)], 2, 3)
    with pytest.raises(ConfigError, match="round 0"):
        mask_set(members, 0, 3)


_P = 2**255 - 19
_ORDER_8 = (325606250916557431795983626356110631294008115727848805560023387167927233504,
            39382357235489614581723060781553021112529911719440698176882885853963445705823)


def _u(value: int) -> bytes:
    return value.to_bytes(32, "little")


# every encoding of a low-order point: u = 0, 1, p - 1, the two of order 8, u + p where it
# fits in 255 bits, each also with the top bit set (X25519 ignores it)
LOW_ORDER = [_u(v | top) for v in (0, 1, _P - 1, *_ORDER_8, _P, _P + 1)
             for top in (0, 1 << 255)]


def test_a_key_no_pair_key_can_be_made_with_is_unusable_as_pair_key_finds_it() -> None:
    """usable_public refuses exactly what keys.pair_key refuses (X25519 gives the all-zero
    secret): checked against the real exchange, and every random key is usable."""
    me = SiteKey.generate()
    for bad in [*LOW_ORDER, None, b"", b"\x01" * 31]:
        assert not usable_public(bad)
    for bad in LOW_ORDER:
        with pytest.raises(IdentityError, match="low-order"):
            pair_key(me, bad, chain_id=1, training=T_ADDR, me=S1, peer=S2)
    for _ in range(200):
        good = SiteKey.generate().public_bytes
        assert usable_public(good)
        pair_key(me, good, chain_id=1, training=T_ADDR, me=S1, peer=S2)


def test_a_member_with_no_usable_key_is_left_out_of_every_mask_set() -> None:
    """A member whose join-time key is low-order or none is in no round's mask set, and still
    holds its place in the join order (K_r counts it): the others' sets do not shift."""
    for bad in (LOW_ORDER[3], None, bytes(32)):
        members = [(A, 1, KEY), (B, 1, bad), (C, 1, KEY), (E, 1, KEY)]
        assert mask_set(members[:2], 1, 3) is None  # still waits for 3 members
        assert mask_set(members, 1, 3) == (A, C)  # the first 3 joins, B left out
        assert mask_set(members, 2, 3) == (A, C, E)
        assert mask_set([*members[:3], (E, 2, KEY)], 2, 3) == (A, C)


def test_a_site_checks_in_masked_only_once_the_mask_set_is_fixed_and_holds_it() -> None:
    m = RoundMachine(A, 2, weight=5, timing=T, secure=True)
    act = m.decide(Observation(100, info(), secure=SecureView(None)))
    assert isinstance(act, Wait) and "mask set" in act.reason and m.stage is Stage.CHECKIN
    assert m.decide(Observation(100, info(), secure=SecureView((A, B, C)))) == CheckIn(
        2, 5, None, masked=True)
    # a site outside the set (it joined during the round) takes the merged model only
    late = RoundMachine(E, 2, weight=5, timing=T, secure=True)
    act = late.decide(Observation(100, info(), secure=SecureView((A, B, C))))
    assert isinstance(act, Wait) and late.late and late.stage is Stage.COMMIT
    # weight 0 in the set: it checks in masked (a masked zero: its masks cancel the others')
    zero = RoundMachine(B, 2, weight=0, timing=T, secure=True)
    assert zero.decide(Observation(100, info(), secure=SecureView((A, B, C)))) == CheckIn(
        2, 0, None, masked=True)


def test_a_weight_0_member_pushes_its_masked_zero() -> None:
    m = RoundMachine(B, 2, weight=0, timing=T, secure=True)
    m.on_checked_in()
    elected = info(RoundStatus.ELECTED, [A, B, C, E], leader=A, elected_at=100, first=90)
    view = SecureView((A, B, C, E), adding=frozenset({"0xa", "0xc", "0xe"}))
    assert m.decide(Observation(101, elected, secure=view)) == Push(2, A, 1)


def test_the_leader_merges_only_with_every_masked_update_never_on_a_quorum() -> None:
    m = RoundMachine(A, 2, weight=5, timing=T, secure=True)
    m.on_checked_in()
    elected = info(RoundStatus.ELECTED, [A, B, C], leader=A, elected_at=100, first=90)
    view = SecureView((A, B, C), adding=ABC)
    act = m.decide(Observation(101, elected, frozenset({"0xb"}), secure=view))
    assert isinstance(act, Wait) and "masked updates (2/3)" in act.reason
    # past the collect window a plain leader merges its quorum; a secure one cannot (C's masks
    # would stay in the sum): it waits, and the members re-elect at the deadline
    act = m.decide(Observation(106, elected, frozenset({"0xb"}), secure=view))
    assert isinstance(act, Wait) and m.stage is Stage.COLLECT
    assert m.decide(Observation(107, elected, frozenset({B, C}), secure=view)) == Merge(
        2, 1, (A, B, C))


def test_the_leader_asks_every_survivor_for_its_reveals_when_a_mask_set_site_is_missing() -> None:
    m = RoundMachine(A, 2, weight=5, timing=T, secure=True)
    m.on_checked_in()
    elected = info(RoundStatus.ELECTED, [A, B, C], leader=A, elected_at=100, first=90)
    roster = (A, B, C, E)  # E never checked in
    asked = m.decide(Observation(101, elected, frozenset({B, C}),
                                 secure=SecureView(roster, adding=ABC)))
    assert asked == Reveals(2, 1, (A, B, C))
    # the reveals are waited for while the deadline allows (9 s left + 2), not 120 s each
    assert isinstance(asked, Reveals) and asked.timeout_s == 11.0
    act = m.decide(Observation(101.1, elected, frozenset({B, C}),
                               secure=SecureView(roster, frozenset({"0xa", "0xb"}), ABC)))
    assert isinstance(act, Wait) and "reveals" in act.reason  # rate-limited retry
    assert m.decide(Observation(101.7, elected, frozenset({B, C}),
                                secure=SecureView(roster, frozenset({"0xa", "0xb"}), ABC))) == \
        Reveals(2, 1, (C,))
    assert m.decide(Observation(102.3, elected, frozenset({B, C}),
                                secure=SecureView(roster, frozenset({"0xa", "0xb", "0xc"}), ABC))) \
        == Merge(2, 1, (A, B, C))


def test_a_participant_outside_the_mask_set_is_left_out_of_the_sum() -> None:
    """A site that checked in though the rule left it out (not an honest node): the others did
    not mask with it, so the leader sums without it and commits without it."""
    m = RoundMachine(A, 2, weight=5, timing=T, secure=True)
    m.on_checked_in()
    elected = info(RoundStatus.ELECTED, [A, B, C, E], leader=A, elected_at=100, first=90)
    assert m.decide(Observation(101, elected, frozenset({B, C}),
                                secure=SecureView((A, B, C), adding=ABC))) == Merge(
        2, 1, (A, B, C))


def test_with_too_few_sites_to_sum_the_starting_model_is_committed_again() -> None:
    """Fewer than 3 sites of the mask set checked in (the others set aside after an abandoned
    round, say): no sum is formed (the sum of two gives each away); the leader commits the
    starting model again and the members push nothing."""
    elected = info(RoundStatus.ELECTED, [A, B], leader=A, elected_at=100, first=90)
    view = SecureView((A, B, C), adding=frozenset({"0xa", "0xb"}))
    leader = RoundMachine(A, 2, weight=5, timing=T, secure=True)
    leader.on_checked_in()
    assert leader.decide(Observation(101, elected, secure=view)) == Merge(2, 1, (A, B),
                                                                          keep=True)
    member = RoundMachine(B, 2, weight=5, timing=T, secure=True)
    member.on_checked_in()
    act = member.decide(Observation(101, elected, secure=view))
    assert isinstance(act, Wait) and member.stage is Stage.COMMIT


def test_weight_0_sites_do_not_count_towards_the_three_a_sum_needs() -> None:
    """A, B and C checked in, C with weight 0 (a node_weight-0 site, a finished site of another
    policy): C's masked zero adds nothing, so the sum of the masked updates is A's plus B's and
    the leader A would read B's update from it. B must not push; A commits the starting model
    again. With a third site adding weight (E), the sum goes on."""
    elected = info(RoundStatus.ELECTED, [A, B, C], leader=A, elected_at=100, first=90)
    view = SecureView((A, B, C), adding=frozenset({"0xa", "0xb"}))
    member = RoundMachine(B, 2, weight=5, timing=T, secure=True)
    member.on_checked_in()
    act = member.decide(Observation(101, elected, secure=view))
    assert isinstance(act, Wait) and member.stage is Stage.COMMIT
    leader = RoundMachine(A, 2, weight=5, timing=T, secure=True)
    leader.on_checked_in()
    assert leader.decide(Observation(101, elected, frozenset({B, C}), secure=view)) == Merge(
        2, 1, (A, B, C), keep=True)
    four = info(RoundStatus.ELECTED, [A, B, C, E], leader=A, elected_at=100, first=90)
    view4 = SecureView((A, B, C, E), adding=frozenset({"0xa", "0xb", "0xe"}))
    member = RoundMachine(B, 2, weight=5, timing=T, secure=True)
    member.on_checked_in()
    assert member.decide(Observation(101, four, secure=view4)) == Push(2, A, 1)
    zero = RoundMachine(C, 2, weight=0, timing=T, secure=True)  # its masks must cancel
    zero.on_checked_in()
    assert zero.decide(Observation(101, four, secure=view4)) == Push(2, A, 1)
    # weights not known (no view of them): nothing is pushed rather than too much
    member = RoundMachine(B, 2, weight=5, timing=T, secure=True)
    member.on_checked_in()
    act = member.decide(Observation(101, four, secure=SecureView((A, B, C, E))))
    assert isinstance(act, Wait) and member.stage is Stage.COMMIT
