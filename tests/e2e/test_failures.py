"""Parts that fail mid-training, against real processes (anvil, node services, trainers, mTLS).

Each scenario ends with every live site holding the same final model, whose digest is on chain;
each test measures how long the swarm took to get past the failure and prints it (`-s`), and the
README's failure table reports those times. Faults are real where the OS can make them (SIGSTOP,
SIGKILL, a chain stopped and started) and injected at an exact protocol point otherwise
(the ``exit`` fault of the node's test-only ``faults:`` config: the process exits with no
clean-up at that point).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from swarmnode.chain.client import RoundInfo, RoundStatus
from swarmnode.demo.swarm import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


def _wait(predicate, timeout: float, what: str, swarm: LocalSwarm):  # type: ignore[no-untyped-def]
    return swarm.wait_until(predicate, timeout, what, poll=0.05)  # fine steps: times are measured


def _start(swarm: LocalSwarm, faults: dict[int, dict[str, str]] | None = None) -> None:
    """Start every site; ``faults``: by site, the ``faults:`` section of its node.yaml."""
    sites = range(swarm.n)
    for i in sites:
        swarm.start_node(i, faults=(faults or {}).get(i))
    swarm.wait_enrolled(list(sites))
    for i in sites:
        swarm.start_trainer(i)


def _drawn(swarm: LocalSwarm, round: int) -> RoundInfo:
    c = swarm.contract
    return _wait(lambda: (r := c.round(round)).status is RoundStatus.ELECTED and r.leader and r,
                 120, f"round {round}'s leader", swarm)


def _all_end_with_the_final_model(swarm: LocalSwarm, sites: list[int]) -> str:
    _wait(lambda: all(swarm.trainers[i].poll() is not None for i in sites), 300,
          "the trainers", swarm)
    final = swarm.contract.events(names={"TrainingFinished"})[-1].args["digest"].hex()
    assert {swarm.result(i)["final_digest"] for i in sites} == {final}
    return final


def test_a_paused_leader_is_replaced_and_catches_up_when_it_wakes(tmp_path: Path) -> None:
    """The leader freezes (SIGSTOP: alive, its sockets open, answering nothing) before it commits;
    the members re-elect one deadline later and the round completes without it. Woken up, it
    takes the committed model and goes on: every site, the frozen one too, ends with the final
    model."""
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=1, deadline_s=4,
                    epochs=3) as swarm:
        # round 2's leader holds its commit back 20 s, so the freeze surely lands before it
        _start(swarm, {i: {"stall_commit": "2:1:20"} for i in range(3)})
        info = _drawn(swarm, 2)
        leader = swarm.index_of(info.leader)
        swarm.pause_node(leader)
        paused = time.monotonic()
        c = swarm.contract
        _wait(lambda: c.round(2).status is RoundStatus.COMMITTED, 90, "round 2's commit", swarm)
        recovered = time.monotonic() - paused
        swarm.resume_node(leader)
        print(f"\npaused leader: round 2 committed by another {recovered:.1f} s after the pause")
        assert c.round(2).leader != info.leader
        assert recovered < swarm.deadline_s + 15, recovered
        _all_end_with_the_final_model(swarm, [0, 1, 2])


def test_the_leader_dies_right_after_committing(tmp_path: Path) -> None:
    """The round-2 leader exits the moment its commit is mined. The members hold the merged model
    (fetched before the commit) or pull it from one that does; the others go on without it."""
    exit_after_commit = {"exit": "after-commit:2"}
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=1, deadline_s=4,
                    epochs=3) as swarm:
        _start(swarm, {i: exit_after_commit for i in range(3)})
        c = swarm.contract
        def exited() -> list[int]:
            return [i for i, p in swarm.nodes.items() if p.poll() is not None]

        (dead,) = _wait(exited, 120, "the leader's exit", swarm)
        died = time.monotonic()
        assert swarm.nodes[dead].returncode == 137
        assert c.round(2).status is RoundStatus.COMMITTED
        assert c.round(2).leader == swarm.accounts[dead].address
        _wait(lambda: c.round(3).status is RoundStatus.COMMITTED, 90, "round 3's commit", swarm)
        print(f"\nleader dead after its commit: round 3 committed {time.monotonic() - died:.1f} s "
              "later")
        survivors = [i for i in range(3) if i != dead]
        _all_end_with_the_final_model(swarm, survivors)
        digest2 = c.round(2).digest
        assert digest2 is not None
        for i in survivors:  # both took round 2's model: it was not lost with its leader
            assert "round 2: no participant can serve" not in swarm.log(i, "node").read_text()


def test_members_that_die_after_and_before_pushing_do_not_stall_the_round(
        tmp_path: Path) -> None:
    """Of four sites, one dies right after its update reached the leader, another right before
    sending its own. The leader merges what it has once the collect window closes (the first
    one's update included, the second's not), and the two survivors train to the end. (Each
    fault fires in round 2, or in the first later round where that site is not the leader.)"""
    with LocalSwarm(tmp_path / "swarm", 4, min_peers=2, grace_s=1, deadline_s=4,
                    epochs=3) as swarm:
        _start(swarm, {2: {"exit": "after-push:2+"},
                       3: {"exit": "before-push:2+"}})
        c = swarm.contract
        _wait(lambda: all(swarm.nodes[i].poll() is not None for i in (2, 3)), 180,
              "both faulty sites to die", swarm)
        died = time.monotonic()
        rounds = {}
        for i in (2, 3):
            found = re.search(r"round (\d+): test fault: the process dies",
                              swarm.log(i, "node").read_text())
            assert found, swarm.tail(i, "node")
            rounds[i] = int(found.group(1))
        last = max(rounds.values())
        _wait(lambda: c.round(last).status is RoundStatus.COMMITTED, 90,
              f"round {last}'s commit", swarm)
        print(f"\nmembers dead around the push: round {last} committed "
              f"{time.monotonic() - died:.1f} s after the second death")
        commits = {e.args["round"]: e.args["members"] for e in c.events(names={"MergeCommitted"})}
        assert swarm.accounts[2].address in commits[rounds[2]]  # its update made it in
        assert swarm.accounts[3].address not in commits[rounds[3]]  # it never sent one
        _all_end_with_the_final_model(swarm, [0, 1])


def test_the_chain_restarts_in_the_middle_of_a_round(tmp_path: Path) -> None:
    """The chain node (state kept) stops while round 3 is elected and its leader is merging (held
    up 9 s), and comes back 5 s later: no trainer ends, no node process exits, the round completes
    (its deadline passed during the outage: by a re-elected leader; the first one, done merging,
    takes that model) and every site ends with the final model."""
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=1, deadline_s=4, epochs=3,
                    state_file=True) as swarm:
        stall = {"stall_commit": "3:1:9"}  # its leader hangs 9 s before merging
        _start(swarm, {i: stall for i in range(3)})
        info = _drawn(swarm, 3)
        swarm.chain.stop()
        stopped = time.monotonic()
        _wait(lambda: time.monotonic() - stopped > 5, 10, "an outage of 5 s", swarm)
        assert all(p.poll() is None for p in [*swarm.trainers.values(), *swarm.nodes.values()])
        swarm.chain.start()
        c = swarm.contract
        _wait(lambda: c.round(3).status is RoundStatus.COMMITTED, 90, "round 3's commit", swarm)
        print(f"\nchain restart mid-round: round 3 committed {time.monotonic() - stopped:.1f} s "
              "after the chain stopped (5 s outage)")
        assert c.round(3).leader != info.leader  # the stalled leader was replaced
        assert all(p.poll() is None for p in swarm.nodes.values()), "a node process exited"
        _all_end_with_the_final_model(swarm, [0, 1, 2])


def test_a_round_whose_every_leader_fails_does_not_end_the_training(tmp_path: Path) -> None:
    """Every leader of round 3 hangs 6 s, past its 4 s deadline (what a chain stall does to a
    round: nobody can commit in time), so the contract abandons it. The training goes on: the
    final round is fixed only once a site finished (before, all three sites ended absent, the
    abandoning transaction fixed the next round as the final one and one check-in closed it:
    every trainer stopped early), the sites merge together again, and every site ends with the
    final model. (A site hung longer than a deadline may still be set aside meanwhile and, if the
    others finish first, take the final model without its last epochs: that is the absent rule.)"""
    stall = {"stall_commit": "3:1:6,3:2:6,3:3:6"}
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=1, deadline_s=4, epochs=4,
                    state_file=True) as swarm:
        _start(swarm, {i: stall for i in range(3)})
        c = swarm.contract
        _wait(lambda: c.round(3).status is RoundStatus.ABANDONED, 180, "round 3 abandoned", swarm)
        assert len({e.args["leader"] for e in c.events(names={"LeaderFailed"})
                    if e.args["round"] == 3}) == 3
        _all_end_with_the_final_model(swarm, [0, 1, 2])
        events = c.events(names={"NodeFinished", "FinalRound", "RoundAbandoned"})
        story = "\n".join(f"{e.block} {e.name} {e.args}" for e in events)
        abandoned = next(e.block for e in events if e.name == "RoundAbandoned")
        finished = [e.block for e in events if e.name == "NodeFinished"]
        fixed = [e.block for e in events if e.name == "FinalRound"]
        assert len(fixed) == 1 and fixed[0] > abandoned, story
        assert finished and min(finished) <= fixed[0], story  # fixed for a finished site
        assert c.final_round() > 4
        merged_after = [e.args["members"] for e in c.events(names={"MergeCommitted"})
                        if e.args["round"] > 3]
        assert any(len(m) >= 2 for m in merged_after), merged_after


def test_a_chain_that_mines_only_every_few_seconds(tmp_path: Path) -> None:
    """No instant mining: a block every 3 s (anvil --block-time 3 standing in for geth or a PoA
    network), so every transaction waits for the next block and the leader is only known a block
    after a round closes. The swarm trains to the end and every site holds the final model."""
    # a sync every 8 batches: half the rounds of the default, enough to see several
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=3, deadline_s=30, epochs=1,
                    sync_frequency=8, block_time=3.0, instant_mining=False) as swarm:
        started = time.monotonic()
        _start(swarm)
        _all_end_with_the_final_model(swarm, [0, 1, 2])
        rounds = swarm.contract.current_round()
        took = time.monotonic() - started
        print(f"\n3 s blocks: {rounds} rounds in {took:.0f} s ({took / rounds:.1f} s per round)")
        assert rounds >= 2
