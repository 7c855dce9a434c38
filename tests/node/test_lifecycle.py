"""A node's course across rounds (swarmnode.node.lifecycle): missed check-ins, the end-of-training
policies, the final outcome and which metrics go on chain."""

from __future__ import annotations

import pytest

from swarmnode.errors import ConfigError
from swarmnode.node import lifecycle
from swarmnode.node.lifecycle import EndStep, Metrics


def test_a_missed_checkin_contributes_to_the_next_round() -> None:
    assert lifecycle.missed_checkin(contributed=False, abandoned=False, weight=10)
    assert not lifecycle.missed_checkin(contributed=True, abandoned=False, weight=10)
    assert not lifecycle.missed_checkin(contributed=False, abandoned=True, weight=10)
    assert not lifecycle.missed_checkin(contributed=False, abandoned=False, weight=0)


def test_a_weight_over_the_cap_counts_at_the_cap() -> None:
    assert lifecycle.capped_weight(50, cap=40) == 40
    assert lifecycle.capped_weight(30, cap=40) == 30


def test_inactive_follows_only_in_the_final_round_with_weight_zero_and_the_latest_model() -> None:
    assert lifecycle.end_step("inactive", 5, None, 30) == EndStep(False, 0, "latest", False)
    assert lifecycle.end_step("inactive", 5, 6, 30) == EndStep(False, 0, "latest", False)
    assert lifecycle.end_step("inactive", 6, 6, 30) == EndStep(True, 0, "latest", True)
    assert not lifecycle.adopts_merged("inactive")


@pytest.mark.parametrize("policy", ["snapshot", "active"])
def test_snapshot_and_active_keep_contributing_but_drive_only_the_final_round(
        policy: str) -> None:
    assert lifecycle.end_step(policy, 5, None, 30) == EndStep(True, 30, "current", False)
    assert lifecycle.end_step(policy, 6, 6, 30) == EndStep(True, 30, "current", True)
    assert lifecycle.adopts_merged(policy) is (policy == "active")


@pytest.mark.parametrize("policy", ["inactive", "snapshot", "active"])
def test_with_secure_aggregation_a_finished_site_adds_weight_zero_whatever_its_policy(
        policy: str) -> None:
    assert lifecycle.effective_policy(policy, secure=False) == policy
    secure = lifecycle.effective_policy(policy, secure=True)
    assert lifecycle.end_step(secure, 5, None, 30).weight == 0
    assert lifecycle.end_step(secure, 6, 6, 30) == EndStep(True, 0, "latest", True)
    with pytest.raises(ConfigError, match="'snapshoot'"):
        lifecycle.effective_policy("snapshoot", secure=True)


def test_an_unknown_policy_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="'snapshoot'.*inactive, snapshot, active"):
        lifecycle.end_step("snapshoot", 1, None, 1)


def test_the_final_model_is_the_round_before_the_current_one_checked_on_chain() -> None:
    assert lifecycle.final_round(9) == 8
    d, e = b"\x01" * 32, b"\x02" * 32
    assert lifecycle.holds_final(d, d)
    assert not lifecycle.holds_final(d, e)  # a stale model: fetch it
    assert not lifecycle.holds_final(d, None)
    assert not lifecycle.holds_final(None, None)  # nothing committed: never "held"


def test_metrics_only_for_committed_rounds_the_node_took_part_in() -> None:
    assert lifecycle.eligible_metrics(3, True, True, 0.5, 0.9) == Metrics(3, 0.5, 0.9)
    assert lifecycle.eligible_metrics(3, True, True, None, 0.9) == Metrics(3, 0.0, 0.9)
    assert lifecycle.eligible_metrics(3, False, True, 0.5, 0.9) is None  # abandoned
    assert lifecycle.eligible_metrics(3, True, False, 0.5, 0.9) is None  # late: not a member
    assert lifecycle.eligible_metrics(3, True, True, None, None) is None  # nothing measured


def test_the_newest_eligible_metrics_are_pending_until_a_checkin_carries_them() -> None:
    m3, m4 = Metrics(3, 0.5, 0.9), Metrics(4, 0.4, 0.92)
    pending = lifecycle.pending_after(None, m3)
    assert pending == m3
    assert lifecycle.pending_after(pending, None) == m3  # a round without metrics: kept
    assert lifecycle.pending_after(m3, m4) == m4  # newer replaces older
    assert lifecycle.pending_after(m4, m3) == m4  # never an older one over a newer
    assert lifecycle.pending_after_sent(m4, m4) is None
    assert lifecycle.pending_after_sent(m4, m3) == m4  # newer came meanwhile: still pending
    assert lifecycle.pending_after_sent(m4, None) == m4


@pytest.mark.parametrize(("joined", "authorized", "revoked", "finished", "may"), [
    (True, True, False, False, True),  # took part: always
    (False, True, False, False, False),  # did not join, the training runs: it could still join
    (False, True, False, True, True),  # did not join, the training finished: the final model
    (False, False, False, True, False),  # never authorised in the consortium
    (True, True, True, True, False),  # revoked: never
    (False, True, True, True, False),
])
def test_who_may_have_the_final_model(joined: bool, authorized: bool, revoked: bool,
                                      finished: bool, may: bool) -> None:
    assert lifecycle.may_take_final(joined, authorized, revoked, finished) is may
