"""The merge and commit rules (swarmnode.node.rules) and the fault plan, on plain values."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from swarmnode.errors import PayloadRejected, RoundError
from swarmnode.node import rules
from swarmnode.node.faults import ExitAt, Faults, Stall
from swarmnode.node.rules import Source

A, B, C, D = "0xA", "0xB", "0xC", "0xD"
NODE = Path(__file__).resolve().parents[2] / "swarmnode" / "node"


# -- membership and weights of the commit ------------------------------------------------------
def test_contributors_are_the_participants_with_weight() -> None:
    weights = {A: 5, B: 0, C: 3}  # D checked in nowhere (no weight on chain)
    assert rules.contributors([A, B, C, D], weights) == (A, C)


def test_zero_weight_participants_count_as_collected_without_pushing() -> None:
    weights = {A: 5, B: 0, C: 3}
    assert rules.collected([A, B, C], senders={A}, weights=weights) == {A, B}
    assert rules.collected([A, B, C], senders={A, C}, weights=weights) == {A, B, C}


def test_commit_members_are_the_merged_and_the_zero_weight_less_the_revoked() -> None:
    weights = {A: 5, B: 0, C: 3, D: 2}
    members = rules.commit_members([C, A, B, D], senders={A, C}, weights=weights,
                                   revoked=lambda p: p == C)
    assert members == (A, B)  # check-in order; D's update never came, C was revoked
    assert rules.commit_members([A, B], {A}, {A: 1, B: 0}, lambda p: False) == (A, B)


def test_an_update_counts_only_with_the_weight_checked_in() -> None:
    rules.check_update_weight(3, A, sent=7, on_chain=7)
    with pytest.raises(RoundError, match="did not check in"):
        rules.check_update_weight(3, A, sent=7, on_chain=None)
    with pytest.raises(RoundError, match="did not check in"):
        rules.check_update_weight(3, A, sent=7, on_chain=-1)
    with pytest.raises(PayloadRejected, match="sent weight 9 but checked in with 7"):
        rules.check_update_weight(3, A, sent=9, on_chain=7)


# -- base re-commit and the NaN veto -------------------------------------------------------------
def test_a_round_without_weight_recommits_the_base_else_merges_equally() -> None:
    assert rules.commit_source(12.0, None) is Source.MERGED
    assert rules.commit_source(12.0, False) is Source.MERGED
    assert rules.commit_source(0.0, None) is Source.BASE  # ask for the base
    assert rules.commit_source(0.0, True) is Source.BASE
    assert rules.commit_source(0.0, False) is Source.EQUAL  # no earlier model


def test_the_nan_veto_blocks_a_non_finite_merge_never_a_base() -> None:
    assert rules.may_commit(Source.MERGED, finite=True)
    assert not rules.may_commit(Source.MERGED, finite=False)
    assert not rules.may_commit(Source.EQUAL, finite=False)
    assert rules.may_commit(Source.BASE, finite=False)  # accepted when it was committed


# -- replicate before commit and prefetch ----------------------------------------------------------
def test_the_leader_commits_once_a_pusher_holds_the_model_or_replicate_s_passed() -> None:
    assert not rules.replica_held({B, C}, served=set(), waited_s=1.0, replicate_s=5.0)
    assert not rules.replica_held({B}, served={D}, waited_s=1.0, replicate_s=5.0)  # not a pusher
    assert rules.replica_held({B, C}, served={C}, waited_s=0.0, replicate_s=5.0)
    assert rules.replica_held({B}, served=set(), waited_s=5.0, replicate_s=5.0)
    assert rules.replica_held(set(), served=set(), waited_s=0.0, replicate_s=5.0)  # alone


def test_a_prefetch_stops_when_held_fetched_reelected_or_past_the_deadline() -> None:
    def goes(**kw: object) -> bool:
        args = dict(held=False, fetched=False, leader_now=B, leader=B, elapsed_s=1.0,
                    deadline_s=10.0) | kw
        return rules.prefetch_goes_on(**args)  # type: ignore[arg-type]

    assert goes()
    assert goes(leader_now=None)  # not observed yet
    assert not goes(held=True)
    assert not goes(fetched=True)
    assert not goes(leader_now=C)  # re-elected
    assert not goes(leader_now="")  # re-elected, new leader not drawn yet
    assert not goes(elapsed_s=10.0)


# -- faults --------------------------------------------------------------------------------------
def test_fault_plan_parses_and_decides() -> None:
    f = Faults.parse("2:1, 3:2:6", "after-push:4+")
    assert f.stalls == (Stall(2, 1, None), Stall(3, 2, 6.0))
    assert f.stall(2, 1) == Stall(2, 1, None) and f.stall(2, 2) is None
    assert f.exit == ExitAt("after-push", 4, True)
    assert not f.exits("after-push", 3) and f.exits("after-push", 4) and f.exits("after-push", 9)
    assert not f.exits("before-push", 4)
    once = Faults.parse(exit="after-commit:2")
    assert once.exits("after-commit", 2) and not once.exits("after-commit", 3)
    assert Faults.parse() == Faults()
    for stall, exit_ in (("2", ""), ("a:b", ""), ("", "during-push:2"), ("", "after-push:x")):
        with pytest.raises(ValueError):
            Faults.parse(stall, exit_)


def test_no_module_of_the_node_reads_the_environment() -> None:
    """Faults come as an object; no module under swarmnode/node/ touches os.environ/getenv."""
    for path in sorted(NODE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                pytest.fail(f"{path.name}:{node.lineno} reads the environment")


def test_the_round_core_imports_no_web3() -> None:
    code = ("import sys; import swarmnode.node.machine, swarmnode.node.rules, "
            "swarmnode.node.lifecycle, swarmnode.node.faults; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('web3', 'eth_account') "
            "or m == 'swarmnode.chain.client'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_a_first_attempt_with_two_sites_and_some_weight_runs_sharded() -> None:
    from swarmnode.node.rules import runs_sharded

    assert runs_sharded("sharded", 1, ["a", "b"], ["a"])
    assert not runs_sharded("leader", 1, ["a", "b"], ["a", "b"])
    assert not runs_sharded("sharded", 2, ["a", "b"], ["a", "b"])  # after a re-election
    assert not runs_sharded("sharded", 1, ["a"], ["a"])  # alone: nothing to share
    assert not runs_sharded("sharded", 1, ["a", "b"], [])  # nobody adds weight: re-commit
