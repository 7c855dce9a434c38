"""The round state machine, driven by synthetic chain observations (no sockets, no chain)."""

from __future__ import annotations

import pytest

from swarmnode.chain.models import RoundInfo, RoundStatus
from swarmnode.node.machine import (
    CheckIn,
    Done,
    Draw,
    Elect,
    MarkAbsent,
    Merge,
    Observation,
    Pull,
    Push,
    Reduce,
    Reelect,
    RoundMachine,
    Scatter,
    Stage,
    Timing,
    Wait,
)

A, B, C = "0xA", "0xB", "0xC"
T = Timing(grace_s=2.0, deadline_s=10.0, collect_s=5.0, min_peers=2, poll_s=0.05, retry_s=0.5)
D = b"\x11" * 32


def info(status=RoundStatus.OPEN, participants=(), leader=None, attempt=0, digest=None,
         elected_at=0, first=0, round=1) -> RoundInfo:
    return RoundInfo(round=round, status=status, leader=leader, attempt=attempt,
                     participants=tuple(participants), digest=digest, elected_at=elected_at,
                     first_checkin_at=first, is_final=False)


def test_member_round_happy_path() -> None:
    m = RoundMachine(A, 1, weight=10, timing=T)
    assert m.decide(Observation(100, info())) == CheckIn(1, 10)
    m.on_checked_in()
    act = m.decide(Observation(100.1, info(participants=[A], first=100)))
    assert isinstance(act, Wait) and m.stage is Stage.ELECTION
    elected = info(RoundStatus.ELECTED, [A, B], leader=B, elected_at=101, first=100)
    assert m.decide(Observation(101, elected)) == Push(1, B, 0)
    m.on_pushed(0)
    assert isinstance(m.decide(Observation(102, elected)), Wait)
    assert m.stage is Stage.COMMIT
    committed = info(RoundStatus.COMMITTED, [A, B], leader=B, digest=D, elected_at=101)
    assert m.decide(Observation(103, committed)) == Pull(1, D, (B,))
    m.on_pulled(D)
    assert m.decide(Observation(103, committed)) == Done(1)


def test_the_closer_draws_the_leader_at_once_the_others_only_if_it_does_not() -> None:
    """An elected round has no leader until the block after its close is mined: the node whose
    transaction closed it sends the draw; the others wait on events, then draw themselves if the
    leader is still unknown draw_wait_s after the close (the closer died in between)."""
    undrawn = info(RoundStatus.ELECTED, [A, B, C], leader=None, attempt=1, elected_at=100,
                   first=99)
    closer = RoundMachine(A, 1, weight=1, timing=T)
    closer.on_checked_in()
    closer.on_closed()
    assert closer.decide(Observation(100, undrawn)) == Draw(1)
    closer.on_drawn()
    assert isinstance(closer.decide(Observation(100.1, undrawn)), Wait)
    other = RoundMachine(B, 1, weight=1, timing=T)
    other.on_checked_in()
    waiting = other.decide(Observation(100.5, undrawn))
    assert isinstance(waiting, Wait) and waiting.reason == "waiting for the leader draw"
    assert other.stage is Stage.ELECTION
    assert other.decide(Observation(100 + T.draw_wait_s, undrawn)) == Draw(1)
    assert isinstance(other.decide(Observation(100.1 + T.draw_wait_s, undrawn)), Wait)  # limited
    follower = RoundMachine(C, 1, weight=1, timing=T, drive=False)  # a finished node's: never
    follower.on_checked_in()
    assert isinstance(follower.decide(Observation(100 + 10 * T.draw_wait_s, undrawn)), Wait)
    drawn = info(RoundStatus.ELECTED, [A, B, C], leader=C, attempt=1, elected_at=100, first=99)
    assert other.decide(Observation(103, drawn)) == Push(1, C, 1)


def test_grace_path_elects_only_after_grace_with_quorum() -> None:
    m = RoundMachine(A, 1, weight=1, timing=T)
    m.on_checked_in()
    alone = info(participants=[A], first=100)
    assert isinstance(m.decide(Observation(105, alone)), Wait)  # 1 < min_peers, never elects
    two = info(participants=[A, B], first=100)
    early = m.decide(Observation(101, two))
    assert isinstance(early, Wait) and early.reason == "grace period"
    assert m.decide(Observation(102.0, two)) == Elect(1)
    # rate-limited: not again within retry_s
    assert isinstance(m.decide(Observation(102.1, two)), Wait)
    assert m.decide(Observation(102.6, two)) == Elect(1)


def test_leader_merges_when_everyone_is_in_or_quorum_after_collect() -> None:
    m = RoundMachine(A, 1, weight=1, timing=T)
    m.on_checked_in()
    e = info(RoundStatus.ELECTED, [A, B, C], leader=A, elected_at=100, first=99)
    assert isinstance(m.decide(Observation(101, e, frozenset())), Wait)
    assert m.stage is Stage.COLLECT
    assert m.decide(Observation(101, e, frozenset({B, C}))) == Merge(1, 0, (A, B, C))
    m2 = RoundMachine(A, 1, weight=1, timing=T)
    m2.on_checked_in()
    assert isinstance(m2.decide(Observation(104, e, frozenset({B}))), Wait)  # before collect_s
    assert m2.decide(Observation(105, e, frozenset({B}))) == Merge(1, 0, (A, B))
    m2.on_merged(0, D)
    assert isinstance(m2.decide(Observation(105.1, e, frozenset({B}))), Wait)
    done = info(RoundStatus.COMMITTED, [A, B, C], leader=A, digest=D)
    assert m2.decide(Observation(106, done)) == Done(1)


def test_leader_below_quorum_keeps_waiting() -> None:
    m = RoundMachine(A, 1, weight=1, timing=T)
    m.on_checked_in()
    e = info(RoundStatus.ELECTED, [A, B, C], leader=A, elected_at=100)
    solo = Timing(2, 10, 5, min_peers=3)
    m3 = RoundMachine(A, 1, weight=1, timing=solo)
    m3.on_checked_in()
    assert isinstance(m3.decide(Observation(109, e, frozenset({B}))), Wait)


def test_member_reelects_after_deadline_then_pushes_to_new_leader() -> None:
    m = RoundMachine(A, 1, weight=5, timing=T)
    m.on_checked_in()
    e = info(RoundStatus.ELECTED, [A, B, C], leader=B, elected_at=100)
    assert m.decide(Observation(100, e)) == Push(1, B, 0)
    m.on_pushed(0)
    assert isinstance(m.decide(Observation(109.9, e)), Wait)
    assert m.decide(Observation(110, e)) == Reelect(1, 0, B)
    again = info(RoundStatus.ELECTED, [A, B, C], leader=C, attempt=1, elected_at=111)
    assert m.decide(Observation(111, again)) == Push(1, C, 1)


def test_after_a_chain_stall_the_leader_gets_time_to_commit_before_a_reelection() -> None:
    """The chain stalled past the leader's deadline: nobody could commit, so the leader is not
    judged failed until the chain has answered again for half a deadline (T: 10 s)."""
    m = RoundMachine(A, 1, weight=5, timing=T)
    m.on_checked_in()
    m.on_pushed(0)
    e = info(RoundStatus.ELECTED, [A, B, C], leader=B, elected_at=100)
    assert isinstance(m.decide(Observation(115, e, chain_up_s=0.5)), Wait)
    assert isinstance(m.decide(Observation(117, e, chain_up_s=4.9)), Wait)
    assert m.decide(Observation(118, e, chain_up_s=5.0)) == Reelect(1, 0, B)


def test_after_a_chain_stall_silent_sites_get_a_deadline_to_check_in() -> None:
    m = RoundMachine(A, 5, weight=1, timing=T)
    m.on_checked_in()
    alone = info(RoundStatus.OPEN, [A], first=100, round=5)
    assert isinstance(m.decide(Observation(103, alone, absent=(C,), chain_up_s=9.0)), Wait)
    assert m.decide(Observation(104, alone, absent=(C,), chain_up_s=10.0)) == MarkAbsent(5, (C,))


def test_failed_push_is_retried_then_deadline_reelects() -> None:
    m = RoundMachine(A, 1, weight=5, timing=T)
    m.on_checked_in()
    e = info(RoundStatus.ELECTED, [A, B], leader=B, elected_at=100)
    assert m.decide(Observation(100, e)) == Push(1, B, 0)  # push fails: no on_pushed
    assert isinstance(m.decide(Observation(100.2, e)), Wait)
    assert m.decide(Observation(100.6, e)) == Push(1, B, 0)
    assert m.decide(Observation(110.0, e)) == Reelect(1, 0, B)


def test_late_joiner_takes_merged_model_without_contributing() -> None:
    m = RoundMachine(C, 1, weight=5, timing=T)
    e = info(RoundStatus.ELECTED, [A, B], leader=A, elected_at=100)
    act = m.decide(Observation(101, e))
    assert isinstance(act, Wait) and m.late and m.stage is Stage.COMMIT
    # a late node never re-elects, even after the deadline
    assert isinstance(m.decide(Observation(200, e)), Wait)
    done = info(RoundStatus.COMMITTED, [A, B], leader=A, digest=D)
    assert m.decide(Observation(201, done)) == Pull(1, D, (A, B))


def test_checkin_that_lost_the_race_becomes_late() -> None:
    m = RoundMachine(C, 1, weight=5, timing=T)
    assert m.decide(Observation(100, info())) == CheckIn(1, 5)
    m.on_checkin_too_late()
    assert isinstance(m.decide(Observation(100, info(RoundStatus.ELECTED, [A, B], A))), Wait)


def test_abandoned_round_is_done() -> None:
    m = RoundMachine(A, 1, weight=5, timing=T)
    assert m.decide(Observation(1, info(RoundStatus.ABANDONED))) == Done(1, abandoned=True)


def test_observation_of_another_round_is_refused() -> None:
    m = RoundMachine(A, 2, weight=5, timing=T)
    with pytest.raises(Exception, match="round 1"):
        m.decide(Observation(1, info(round=1)))


def test_absent_nodes_are_set_aside_after_the_grace_period() -> None:
    m = RoundMachine(A, 5, weight=1, timing=T)
    m.on_checked_in()
    alone = info(participants=[A], first=100, round=5)
    early = m.decide(Observation(101, alone, absent=(C,)))
    assert isinstance(early, Wait) and early.reason == "grace period"
    from swarmnode.node.machine import MarkAbsent

    assert m.decide(Observation(102, alone, absent=(C,))) == MarkAbsent(5, (C,))
    # 1 participant < min_peers: no elect() attempt, just wait for the contract to elect
    assert isinstance(m.decide(Observation(102.1, alone, absent=(C,))), Wait)


def test_a_follower_never_turns_rounds_over() -> None:
    """drive=False (a finished site before the final round): no elect; but it sets sites the
    contract lets go aside (once all live sites finished, nobody else would)."""
    m = RoundMachine(A, 5, weight=1, timing=T, drive=False)
    m.on_checked_in()
    two = info(participants=[A, B], first=100, round=5)
    for now in (103, 104, 110):
        assert isinstance(m.decide(Observation(now, two)), Wait)
    assert m.decide(Observation(111, two, absent=(C,))) == MarkAbsent(5, (C,))
    assert isinstance(m.decide(Observation(111.1, two, absent=(C,))), Wait)


def test_a_failed_commit_is_retried_but_rate_limited() -> None:
    m = RoundMachine(A, 1, weight=1, timing=T)
    m.on_checked_in()
    e = info(RoundStatus.ELECTED, [A, B], leader=A, elected_at=100)
    assert m.decide(Observation(101, e, frozenset({B}))) == Merge(1, 0, (A, B))
    assert isinstance(m.decide(Observation(101.1, e, frozenset({B}))), Wait)
    assert m.decide(Observation(101.6, e, frozenset({B}))) == Merge(1, 0, (A, B))


def test_a_refused_merged_model_ends_the_round_without_it() -> None:
    """The committed model holds NaN/Inf (a hostile leader): the member does not pull it again
    and again; the round ends for it as an abandoned one (its trainer keeps its parameters)."""
    m = RoundMachine(A, 1, weight=10, timing=T)
    m.on_checked_in()
    m.on_pushed(0)
    committed = info(RoundStatus.COMMITTED, [A, B], leader=B, digest=D, elected_at=101)
    assert m.decide(Observation(103, committed)) == Pull(1, D, (B,))
    m.on_refused(D)
    assert m.decide(Observation(103.5, committed)) == Done(1, abandoned=True)


# -- the rules that left the driver --------------------------------------------------------------
def test_a_push_gets_what_is_left_of_the_deadline_within_bounds_and_prefetches() -> None:
    t = Timing(grace_s=2, deadline_s=60, collect_s=30, min_peers=2, transfer_s=120,
               min_transfer_s=5)
    e = info(RoundStatus.ELECTED, [A, B], leader=B, elected_at=100)
    push = RoundMachine(A, 1, weight=5, timing=t).decide(Observation(110, e))
    assert isinstance(push, Push) and push.timeout_s == 52.0  # 50 s left + 2
    assert push.prefetch  # the merged model is fetched as soon as the leader has it
    late = RoundMachine(A, 1, weight=5, timing=t).decide(Observation(159, e))
    assert isinstance(late, Push) and late.timeout_s == 5.0  # never less than min_transfer_s
    long = Timing(grace_s=2, deadline_s=600, collect_s=300, min_peers=2, transfer_s=120)
    early = RoundMachine(A, 1, weight=5, timing=long).decide(Observation(100, e))
    assert isinstance(early, Push) and early.timeout_s == 120.0  # never more than transfer_s


def test_a_weight_zero_participant_sends_nothing_and_waits_for_the_commit() -> None:
    m = RoundMachine(A, 1, weight=0, timing=T)
    m.on_checked_in()
    e = info(RoundStatus.ELECTED, [A, B], leader=B, elected_at=100)
    act = m.decide(Observation(101, e))
    assert isinstance(act, Wait) and m.stage is Stage.COMMIT and m.pushed_attempt == 0


def test_a_pull_asks_the_leader_first_then_the_other_participants() -> None:
    m = RoundMachine(C, 1, weight=5, timing=T)
    m.on_checked_in()
    done = info(RoundStatus.COMMITTED, [A, C, B], leader=B, digest=D)
    assert m.decide(Observation(200, done)) == Pull(1, D, (B, A))


def test_a_failed_pull_is_retried_then_given_up_a_deadline_later() -> None:
    """Nobody serves the committed model (its leader died before any member had a copy): the
    member tries again every retry_s and, a deadline (chain time) after the first failure, ends
    the round without it, keeping its own parameters."""
    m = RoundMachine(A, 1, weight=5, timing=T)
    m.on_checked_in()
    m.on_pushed(0)
    done = info(RoundStatus.COMMITTED, [A, B], leader=B, digest=D)
    assert m.decide(Observation(200, done)) == Pull(1, D, (B,))
    m.on_pull_failed(200)
    assert isinstance(m.decide(Observation(200.1, done)), Wait)  # not before retry_s
    assert m.decide(Observation(200.5, done)) == Pull(1, D, (B,))
    m.on_pull_failed(200.5)
    assert m.decide(Observation(210, done)) == Pull(1, D, (B,))  # a deadline is 10 s: not yet
    m.on_pull_failed(210)
    gave_up = m.decide(Observation(210.1, done))
    assert gave_up == Done(1, abandoned=True) and gave_up.why == "unservable"
    assert m.stage is Stage.DONE
    assert m.decide(Observation(300, done)) == Done(1, abandoned=True)  # stays given up


def test_a_pull_that_succeeds_after_failures_ends_the_round_with_the_model() -> None:
    m = RoundMachine(A, 1, weight=5, timing=T)
    m.on_checked_in()
    done = info(RoundStatus.COMMITTED, [A, B], leader=B, digest=D)
    m.decide(Observation(200, done))
    m.on_pull_failed(200)
    m.on_pulled(D)
    assert m.decide(Observation(215, done)) == Done(1)


def test_a_vetoed_merge_is_not_merged_again_the_deadline_re_elects() -> None:
    m = RoundMachine(A, 1, weight=1, timing=T)
    m.on_checked_in()
    e = info(RoundStatus.ELECTED, [A, B], leader=A, elected_at=100)
    assert m.decide(Observation(101, e, frozenset({B}))) == Merge(1, 0, (A, B))
    m.on_vetoed(0)
    for now in (101.6, 105, 109.9):
        assert isinstance(m.decide(Observation(now, e, frozenset({B}))), Wait)
    # past the deadline the leader re-elects too: as the only participant (the others set
    # aside) nobody else would, and the round would never end
    assert m.decide(Observation(120, e, frozenset({B}))) == Reelect(1, 0, A)
    alone = RoundMachine(A, 2, weight=1, timing=T)
    alone.on_checked_in()
    only = info(RoundStatus.ELECTED, [A], leader=A, elected_at=100, round=2)
    assert alone.decide(Observation(100.5, only)) == Merge(2, 0, (A,))
    alone.on_vetoed(0)
    assert isinstance(alone.decide(Observation(105, only)), Wait)
    assert alone.decide(Observation(110.5, only)) == Reelect(2, 0, A)
    again = info(RoundStatus.ELECTED, [A, B], leader=A, attempt=1, elected_at=111)
    assert m.decide(Observation(121, again, frozenset({B}))) == Merge(1, 1, (A, B))


def test_the_checkin_carries_the_pending_metrics() -> None:
    from swarmnode.node.lifecycle import Metrics

    m = RoundMachine(A, 4, weight=10, timing=T, metrics=Metrics(3, 0.5, 0.9))
    assert m.decide(Observation(100, info(round=4))) == CheckIn(4, 10, Metrics(3, 0.5, 0.9))
    assert RoundMachine(A, 4, weight=10, timing=T).decide(
        Observation(100, info(round=4))) == CheckIn(4, 10, None)


def test_absent_sites_are_looked_for_only_after_the_grace_and_every_few_seconds() -> None:
    from swarmnode.node.machine import absent_check_due

    t = Timing(grace_s=2.0, deadline_s=10.0, collect_s=5.0, min_peers=2, absent_check_s=2.0)
    open_ = info(participants=[A], first=100)
    never = -float("inf")
    assert not absent_check_due(A, open_, 101.9, t, never)  # grace period
    assert absent_check_due(A, open_, 102.0, t, never)
    assert not absent_check_due(A, open_, 103.0, t, last_checked=102.0)  # at most every 2 s
    assert absent_check_due(A, open_, 104.0, t, last_checked=102.0)
    assert not absent_check_due(B, open_, 104.0, t, never)  # not checked in
    assert not absent_check_due(A, info(participants=[A]), 104.0, t, never)  # no first check-in
    elected = info(RoundStatus.ELECTED, [A], leader=A, first=100)
    assert not absent_check_due(A, elected, 104.0, t, never)


def test_the_leader_waits_at_most_a_quarter_deadline_for_a_replica_capped_at_5_s() -> None:
    assert T.replicate_s == 2.5
    assert Timing(grace_s=2, deadline_s=60, collect_s=30, min_peers=2).replicate_s == 5.0


def test_a_nested_fetch_runs_in_its_own_round_object(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """While round 2 runs, the driver fetches round 1's model (as a weight-0 leader does for the
    base): that nested run has its own Round, and the running round stays the current one with
    its own stage times."""
    from swarmnode.node.collector import Collectors
    from swarmnode.node.driver import RoundDriver
    from swarmnode.node.store import ModelStore

    d1, d2 = b"\x01" * 32, b"\x02" * 32
    store = ModelStore(tmp_path)
    store.put(1, d1, b"model-1")
    assert store.flush()  # written: a put of a newer round drops an older one still unwritten
    store.put(2, d2, b"model-2")
    nested = []

    class Chain:
        def round(self, r: int) -> RoundInfo:
            if r == 2 and not nested:
                nested.append(driver.run_round(1, {}, b"", 0, contribute=False))
            return info(RoundStatus.COMMITTED, [A, B], leader=B, digest={1: d1, 2: d2}[r],
                        round=r)

    driver = RoundDriver(A, Chain(), None, store, Collectors("mean", {}), T,  # type: ignore[arg-type]
                         None, max_bytes=1 << 20, round_timeout_s=10)
    outcome = driver.run_round(2, {}, b"", 5)
    assert [o.round for o in nested] == [1] and outcome.round == 2 and outcome.digest == d2
    assert driver.current is not None and driver.current.number == 2
    assert driver.machine is driver.current.machine and driver.machine.stage is Stage.DONE
    assert outcome.stages.keys() == driver.current.stages.keys()


# -- sharded attempts (topology sharded) -----------------------------------------------------------
def _sharded(m: RoundMachine, now: float, rinfo: RoundInfo, shard_in=()):  # type: ignore[no-untyped-def]
    return m.decide(Observation(now, rinfo, sharded=True, shard_in=frozenset(shard_in)))


def test_a_sharded_member_scatters_merges_its_slice_once_all_are_in_then_waits() -> None:
    elected = info(RoundStatus.ELECTED, [A, B, C], leader=B, attempt=1, elected_at=100,
                   first=99)
    m = RoundMachine(A, 1, weight=10, timing=T)
    m.on_checked_in()
    act = _sharded(m, 100.5, elected)
    assert isinstance(act, Scatter) and (act.round, act.attempt) == (1, 1)
    assert m.stage is Stage.PUSH and act.timeout_s >= T.min_transfer_s
    assert isinstance(_sharded(m, 100.6, elected), Wait)  # a failed scatter is retried later
    assert isinstance(_sharded(m, 101.2, elected), Scatter)
    m.on_scattered(1)
    act = _sharded(m, 101.3, elected, shard_in=[A, B])  # C's slice of our share is missing
    assert isinstance(act, Wait) and m.stage is Stage.COLLECT and "2/3" in act.reason
    assert _sharded(m, 101.4, elected, shard_in=[A, B, C]) == Reduce(1, 1)
    m.on_reduced(1)
    act = _sharded(m, 101.5, elected, shard_in=[A, B, C])
    assert isinstance(act, Wait) and m.stage is Stage.COMMIT  # a member: the leader commits
    # a slice lost for good stalls the attempt: the members re-elect at the leader's deadline
    assert _sharded(m, 110.5, elected, shard_in=[A, B, C]) == Reelect(1, 1, B)


def test_a_sharded_leader_assembles_and_commits_after_merging_its_own_slice() -> None:
    elected = info(RoundStatus.ELECTED, [A, B, C], leader=A, attempt=1, elected_at=100,
                   first=99)
    m = RoundMachine(A, 1, weight=10, timing=T)
    m.on_checked_in()
    assert isinstance(_sharded(m, 100.5, elected), Scatter)
    m.on_scattered(1)
    assert _sharded(m, 101, elected, shard_in=[A, B, C]) == Reduce(1, 1)
    m.on_reduced(1)
    act = _sharded(m, 101.1, elected, shard_in=[A, B, C])
    assert act == Merge(1, 1, (A, B, C), sharded=True) and act.sharded
    m.on_merged(1, D)
    assert isinstance(_sharded(m, 101.2, elected), Wait)
    # the leader never re-elects itself, even past the deadline
    assert isinstance(_sharded(m, 111, elected), Wait)
    # an assembly that failed (a missing slice, NaN) waits for the re-election
    m2 = RoundMachine(A, 1, weight=10, timing=T)
    m2.on_checked_in()
    m2.on_scattered(1)
    m2.on_reduced(1)
    m2.on_vetoed(1)
    assert isinstance(_sharded(m2, 101, elected), Wait)


def test_a_sharded_round_scatters_and_reduces_before_its_leader_is_drawn() -> None:
    """The owners are the participants, fixed at the close: everyone scatters and merges its
    slice while the draw block is still to come, the closer drawing once it has nothing else
    to do (the others' gathers wait for its slice, only the commit for the leader); only the
    merge and the commit wait for the leader, and nobody re-elects an undrawn leader."""
    undrawn = info(RoundStatus.ELECTED, [A, B, C], attempt=1, elected_at=100, first=99)
    closer = RoundMachine(A, 1, weight=10, timing=T)
    closer.on_checked_in()
    closer.on_closed()
    assert isinstance(_sharded(closer, 100.1, undrawn), Scatter)
    closer.on_scattered(1)
    assert _sharded(closer, 100.2, undrawn, shard_in=[A, B, C]) == Reduce(1, 1)
    closer.on_reduced(1)
    assert _sharded(closer, 100.3, undrawn, shard_in=[A, B, C]) == Draw(1)
    closer.on_drawn()
    assert isinstance(_sharded(closer, 100.4, undrawn, shard_in=[A, B, C]), Wait)
    waiting = RoundMachine(C, 1, weight=10, timing=T)  # a closer still waiting for slices
    waiting.on_checked_in()
    waiting.on_closed()
    waiting.on_scattered(1)
    assert _sharded(waiting, 100.2, undrawn, shard_in=[A]) == Draw(1)
    other = RoundMachine(B, 1, weight=10, timing=T)
    other.on_checked_in()
    assert isinstance(_sharded(other, 100.1, undrawn), Scatter)
    other.on_scattered(1)
    assert _sharded(other, 100.3, undrawn, shard_in=[A, B, C]) == Reduce(1, 1)
    other.on_reduced(1)
    act = _sharded(other, 100.4, undrawn, shard_in=[A, B, C])
    assert isinstance(act, Wait) and other.stage is Stage.ELECTION and "draw" in act.reason
    # still undrawn well past the draw wait: drawn again, never re-elected (no leader to blame)
    assert _sharded(other, 100 + T.draw_wait_s, undrawn) == Draw(1)
    assert isinstance(_sharded(other, 100 + T.deadline_s + 1, undrawn), Draw | Wait)
    # drawn: the leader assembles and commits, the others wait for its commit
    drawn = info(RoundStatus.ELECTED, [A, B, C], leader=B, attempt=1, elected_at=100,
                 first=99)
    assert _sharded(other, 101, drawn, shard_in=[A, B, C]) == Merge(1, 1, (A, B, C),
                                                                     sharded=True)
    assert isinstance(_sharded(closer, 101, drawn, shard_in=[A, B, C]), Wait)
    # the leader topology still waits for the draw
    plain = RoundMachine(C, 1, weight=10, timing=T)
    plain.on_checked_in()
    assert isinstance(plain.decide(Observation(100.1, undrawn)), Wait)


def test_a_weight_0_participant_sends_no_slices_but_still_merges_its_own() -> None:
    elected = info(RoundStatus.ELECTED, [A, B], leader=B, attempt=1, elected_at=100, first=99)
    m = RoundMachine(A, 1, weight=0, timing=T)
    m.on_checked_in()
    assert _sharded(m, 100.5, elected, shard_in=[A, B]) == Reduce(1, 1)


def test_the_attempt_after_a_re_election_gathers_whole_updates() -> None:
    """The driver reports sharded=False for it (rules.runs_sharded): the leader topology's
    push, whatever this node did in the sharded attempt."""
    m = RoundMachine(A, 1, weight=10, timing=T)
    m.on_checked_in()
    first = info(RoundStatus.ELECTED, [A, B, C], leader=B, attempt=1, elected_at=100, first=99)
    assert isinstance(_sharded(m, 100.5, first), Scatter)
    second = info(RoundStatus.ELECTED, [A, B, C], leader=C, attempt=2, elected_at=111,
                  first=99)
    assert m.decide(Observation(111.5, second)) == Push(1, C, 2)
