"""The round machine's secure-aggregation decisions and the mask-set rule, driven by synthetic
chain observations (no sockets, no chain). The in-process swarm test
(tests/node/test_inproc_secure.py) runs them with real node services and contracts."""

from __future__ import annotations

import pytest

from swarmnode.chain.models import RoundInfo, RoundStatus
from swarmnode.errors import ConfigError
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
from swarmnode.privacy.roster import mask_set

A, B, C, E = "0xA", "0xB", "0xC", "0xE"
ABC = frozenset({"0xa", "0xb", "0xc"})  # participants checked in with weight above 0
T = Timing(grace_s=2.0, deadline_s=10.0, collect_s=5.0, min_peers=3, poll_s=0.05, retry_s=0.5)


def info(status=RoundStatus.OPEN, participants=(), leader=None, attempt=1,
         elected_at=0, first=0, round=2) -> RoundInfo:
    return RoundInfo(round=round, status=status, leader=leader, attempt=attempt,
                     participants=tuple(participants), digest=None, elected_at=elected_at,
                     first_checkin_at=first, is_final=False)


def test_the_mask_set_is_a_join_order_prefix_fixed_before_the_round() -> None:
    members = [(A, 1), (B, 1), (C, 1)]
    # round 1: the first min_peers members, once that many joined; not fixed before
    assert mask_set(members[:2], 1, 3) is None
    assert mask_set(members, 1, 3) == (A, B, C)
    assert mask_set([*members, (E, 1)], 1, 3) == (A, B, C)  # a 4th join changes nothing
    # round 2: every member that joined before it opened; a join during round 2 is left out
    assert mask_set([*members, (E, 1)], 2, 3) == (A, B, C, E)
    assert mask_set([*members, (E, 2)], 2, 3) == (A, B, C)
    assert mask_set([*members, (E, 2)], 3, 3) == (A, B, C, E)
    with pytest.raises(ConfigError, match="not in join order"):
        mask_set([(A, 2), (B, 1), (C, 1)], 2, 3)
    with pytest.raises(ConfigError, match="round 0"):
        mask_set(members, 0, 3)


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
    assert m.decide(Observation(101, elected, frozenset({B, C}),
                                secure=SecureView(roster, adding=ABC))) == Reveals(2, 1, (A, B, C))
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
