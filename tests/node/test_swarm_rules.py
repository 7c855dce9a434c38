"""The swarm's protocol rules, on the in-process swarm (swarmnode.testing.inproc): real node
services, round machines, drivers, collectors and merges, the real contracts on eth-tester, an
in-memory transport that runs the receiver's checks; faults reach each site's driver as a node's
``faults:`` config does. These tests ran as multi-process swarms (tests/e2e) until issue 18: their
subject is a rule, not the process boundary, which the multi-process tests keep (SIGTERM, kill -9,
SIGSTOP, restarts, slow blocks, the demo, reproducible digests).

Trainers are step functions: a site-specific deterministic move from the model the site holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.models import RoundStatus
from swarmnode.demo.swarm import wait_until
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site
from swarmnode.transport import serde

INITIAL = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
WEIGHTS = (40, 25, 15, 10)  # site 0 holds the most data


def _spec(min_peers: int) -> TrainingSpec:
    return TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=min_peers,
                                   merge_method="mean")


def _trainer(syncs: dict[int, int], *, delay: dict[int, float] | None = None,
             poison: int | None = None) -> Callable[..., Any]:
    """``syncs``: by site, how many syncs it trains for; ``delay``: by site, host seconds per
    step (a slow trainer); ``poison``: a site whose every value is +-1e37 (finite, but enough,
    times its weight, to overflow a float32 sum to Inf)."""

    def step(site: Site, k: int, model: dict[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        if k >= syncs[site.index]:
            return None
        if delay and delay.get(site.index):
            time.sleep(delay[site.index])
        base = model if model is not None else INITIAL
        gen = torch.Generator().manual_seed(1000 * site.index + k)
        state = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        if site.index == poison:
            state = {n: torch.where(t >= 0, 1e37, -1e37) for n, t in state.items()}
        return state, WEIGHTS[site.index]

    return step


def _chain_time_passes(swarm: InProcessSwarm, when: int, timeout: float = 30) -> None:
    """Mine empty blocks until the chain's time is past ``when``: eth-tester's clock runs a
    second ahead per transaction (a block each), so after set-up it is ahead of the host's, and
    the swarm's clock mines only once the host catches up."""
    tester = swarm.w3.provider.ethereum_tester  # type: ignore[attr-defined]

    def past() -> bool:
        with swarm.lock:
            if swarm.w3.eth.get_block("latest")["timestamp"] > when:
                return True
            tester.mine_blocks(1)
            return False

    wait_until(past, timeout, f"chain time {when}", poll=0.25)


def _final(swarm: InProcessSwarm) -> bytes:
    """The digest of TrainingFinished (the chain's final model)."""
    return swarm.admin.events(names={"TrainingFinished"})[-1].args["digest"]


def _all_hold_the_final_model(swarm: InProcessSwarm, sites: list[int]) -> bytes:
    final = _final(swarm)
    assert final == swarm.final_digest()
    assert [swarm.sites[i].final_digest for i in sites] == [final] * len(sites)
    return final


def test_min_peers_holds_the_first_round_until_enough_nodes_join() -> None:
    """Two of three sites check in to round 1 of a min_peers=3 training; past the grace period
    they try to elect and the contract refuses: no leader, the round stays open. The third
    site's check-in lets it close; every site ends with the final model."""
    seen: dict[str, Any] = {}

    def begin(site: Site) -> None:
        if site.index != 2:
            return
        c = swarm.admin
        wait_until(lambda: len(c.round(1).participants) == 2, 60, "two check-ins")
        first = c.round(1).first_checkin_at
        _chain_time_passes(swarm, first + 1 + 3)  # the 1 s grace period, and 3 s more
        seen["status"] = c.round(1).status
        seen["elected"] = c.events(names={"LeaderElected"})

    with InProcessSwarm(3, _spec(3), min_peers=3, grace_s=1, deadline_s=6) as swarm:
        swarm.run(_trainer({0: 3, 1: 3, 2: 3}), begin=begin, timeout=180)
        assert seen["status"] is RoundStatus.OPEN
        assert seen["elected"] == []
        assert swarm.admin.round(1).status is RoundStatus.COMMITTED
        assert len(swarm.admin.round(1).participants) == 3
        _all_hold_the_final_model(swarm, [0, 1, 2])


def test_late_joiner_takes_the_merged_model_then_contributes() -> None:
    """A site that starts once round 3 is committed takes the latest merged model (its trainer's
    hello), checks in only after it, contributes to a merge and ends with the final model."""
    got: dict[str, Any] = {}

    def begin(site: Site) -> None:
        if site.index == 2:
            wait_until(lambda: swarm.admin.round(3).status is RoundStatus.COMMITTED, 120,
                       "round 3's commit")

    train = _trainer({0: 10, 1: 10, 2: 2})

    def step(site: Site, k: int, model: dict[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        if site.index == 2 and k == 0:
            got["model"] = None if model is None else serde.digest(serde.encode(model))
        return train(site, k, model)

    with InProcessSwarm(3, _spec(2), min_peers=2, grace_s=1, deadline_s=6) as swarm:
        sites = swarm.run(step, begin=begin, timeout=240)
        c = swarm.admin
        late = sites[2]
        joined = int(late.hello["latest_round"])
        assert joined >= 3  # started from the latest merged model
        assert got["model"] == c.round(joined).digest  # ... and trained from it
        me = late.address
        checkins = [e.args["round"] for e in c.events(names={"CheckedIn"}) if e.args["node"] == me]
        assert checkins and min(checkins) > joined
        merged_with_me = [e.args["round"] for e in c.events(names={"MergeCommitted"})
                          if me in e.args["members"]]
        assert merged_with_me, "the late joiner never contributed to a merge"
        _all_hold_the_final_model(swarm, [0, 1, 2])


@pytest.mark.parametrize("policy", ["snapshot", "active"])
def test_sites_that_finish_early_follow_until_the_longest_one_is_done(policy: str) -> None:
    """With snapshot/active, the sites that finished keep contributing but never turn rounds over
    by themselves: the final round comes only after the largest site (slow: 1.5 s a step, past
    the 1 s grace period) has finished training, and it is never set aside as absent. (A 30 s
    deadline: eth-tester's clock runs a second per transaction, so a few host seconds of the
    others' rounds are many chain seconds of silence; the absent rule counts deadlines.)"""
    step = _trainer({0: 5, 1: 2, 2: 2}, delay={0: 1.5})
    with InProcessSwarm(3, _spec(2), min_peers=2, grace_s=1, deadline_s=30,
                        policy=policy) as swarm:
        swarm.run(step, timeout=180)
        _all_hold_the_final_model(swarm, [0, 1, 2])
        events = swarm.admin.events(names={"NodeFinished", "FinalRound", "NodeAbsent"})
        order = [(e.name, e.args.get("node")) for e in events]
        biggest = swarm.sites[0].address
        assert ("NodeAbsent", biggest) not in order, order
        assert order.index(("NodeFinished", biggest)) < order.index(("FinalRound", None)), order
        assert len(swarm.sites[0].syncs) == 5  # it trained to its end
        # once the others finished, only the training site turned rounds over: every round
        # elected after that and before the final one waited for its check-in
        c = swarm.admin
        done = max(e.block for e in events
                   if e.name == "NodeFinished" and e.args["node"] != biggest)
        final = c.final_round()
        assert final is not None
        later = sorted({e.args["round"] for e in c.events(names={"LeaderElected"})
                        if e.block > done and e.args["round"] < final})
        assert later, "no round ran between the others' finish and the final round"
        missed = [r for r in later if biggest not in c.round(r).participants]
        assert not missed, f"rounds {missed} were turned over without the training site"


def test_deadlines_follow_chain_time_not_the_host_clock() -> None:
    """The chain's clock runs an hour ahead of the host's: a leader that hangs (10 s, past its
    4 s deadline) is re-elected one deadline (chain time) after its election, not an hour later;
    woken, it takes the committed model and every site ends with the final model.

    The grace is long (6 s; all three check in at once, so it costs nothing when the host keeps
    up): the re-elected leader needs a second update besides its own, and the hung leader cannot
    push until it wakes, so round 2 can commit only if all three sites are in it. With a 1 s
    grace a loaded host (CI) let the third site miss round 2 and the round was, rightly,
    abandoned."""
    hang = {"stall_commit": "2:1:10"}
    with InProcessSwarm(3, _spec(2), min_peers=2, grace_s=6, deadline_s=4,
                        faults={i: hang for i in range(3)}, chain_ahead_s=3600) as swarm:
        swarm.run(_trainer({0: 4, 1: 4, 2: 4}), timeout=180)
        c = swarm.admin
        r2 = c.round(2)
        assert len(r2.participants) == 3, r2
        assert r2.status is RoundStatus.COMMITTED
        elected = [e for e in c.events(names={"LeaderElected"}) if e.args["round"] == 2]
        committed = [e for e in c.events(names={"MergeCommitted"}) if e.args["round"] == 2]
        first, commit = elected[0], committed[-1]
        at = swarm.w3.eth.get_block(first.block)["timestamp"]
        assert at > time.time() + 3000  # the chain is an hour ahead of this host
        took = swarm.w3.eth.get_block(commit.block)["timestamp"] - at
        assert took < 4 + 10, took  # chain seconds from the election to the re-elected commit
        assert r2.attempt == 2 and r2.leader != first.args["leader"]
        assert commit.args["leader"] == r2.leader
        _all_hold_the_final_model(swarm, [0, 1, 2])


def test_a_member_sending_huge_values_cannot_overflow_the_merge(
        caplog: pytest.LogCaptureFixture) -> None:
    """A site whose update would overflow the leader's float32 sum (finite values near 1e37 x its
    weight) is refused by name; no merge overflows to Inf, and every site ends with the chain's
    final model, which is finite. (Steering the mean with large finite values is what norm
    clipping and the robust rules are for.)"""
    caplog.set_level(logging.WARNING, logger="swarmnode")
    with InProcessSwarm(3, _spec(2), min_peers=2, grace_s=1, deadline_s=4) as swarm:
        sites = swarm.run(_trainer({0: 4, 1: 4, 2: 4}, poison=2), timeout=180)
        final = _all_hold_the_final_model(swarm, [0, 1, 2])
        hostile = sites[2].address
        assert f"the update of {hostile} holds values up to" in caplog.text
        assert "would overflow to Inf" in caplog.text
        for site in sites:
            assert site.final is not None and site.final.data is not None
            data = bytes(site.final.data)
            state = serde.decode(data, expected_digest=final, spec=None, max_bytes=1 << 30,
                                 reject_nonfinite=True)  # finite, or raises
            assert state and all(bool(torch.isfinite(t).all()) for t in state.values())
        # it never counted in a merge (the final round's members are everyone, at weight 0)
        final_round = swarm.final_round()
        assert final_round is not None
        commits = [e.args for e in swarm.admin.events(names={"MergeCommitted"})
                   if e.args["round"] < final_round]
        assert commits and all(hostile not in m["members"] for m in commits), commits


def test_a_round_whose_every_leader_fails_does_not_end_the_training() -> None:
    """Every leader of round 3 hangs 7 s, past its 5 s deadline (what a chain stall does to a
    round: nobody can commit in time), so the contract abandons it. The training goes on: the
    final round is fixed only once a site finished (not by the abandoning transaction), the
    sites merge together again, and every site ends with the final model."""
    stall = {"stall_commit": "3:1:7,3:2:7,3:3:7"}
    # grace 2 s: every site checks in before the election even on a loaded machine (round 3
    # needs all three as participants, one leader each)
    with InProcessSwarm(3, _spec(2), min_peers=2, grace_s=2, deadline_s=5,
                        faults={i: stall for i in range(3)}) as swarm:
        swarm.run(_trainer({0: 7, 1: 7, 2: 7}), timeout=240)
        c = swarm.admin
        assert c.round(3).status is RoundStatus.ABANDONED
        assert len({e.args["leader"] for e in c.events(names={"LeaderFailed"})
                    if e.args["round"] == 3}) == 3
        _all_hold_the_final_model(swarm, [0, 1, 2])
        events = c.events(names={"NodeFinished", "FinalRound", "RoundAbandoned"})
        story = "\n".join(f"{e.block} {e.name} {e.args}" for e in events)
        abandoned = next(e.block for e in events if e.name == "RoundAbandoned")
        finished = [e.block for e in events if e.name == "NodeFinished"]
        fixed = [e.block for e in events if e.name == "FinalRound"]
        assert len(fixed) == 1 and fixed[0] > abandoned, story
        assert finished and min(finished) <= fixed[0], story  # fixed for a finished site
        final_round = c.final_round()
        assert final_round is not None and final_round > 4
        merged_after = [e.args["members"] for e in c.events(names={"MergeCommitted"})
                        if e.args["round"] > 3]
        assert any(len(m) >= 2 for m in merged_after), merged_after


def test_members_that_die_after_and_before_pushing_do_not_stall_the_round() -> None:
    """Of four sites, one dies right after its update reached the leader, another right before
    sending its own (the ``exit`` fault: the site is gone, nobody reaches it). The leader merges
    what it has once the collect window closes (the first one's update included, the second's
    not), and the two survivors train to the end. (Each fault fires in round 2, or in the first
    later round where that site is not the leader.)"""
    faults = {2: {"exit": "after-push:2+"}, 3: {"exit": "before-push:2+"}}
    with InProcessSwarm(4, _spec(2), min_peers=2, grace_s=2, deadline_s=5,
                        faults=faults) as swarm:
        sites = swarm.run(_trainer({i: 6 for i in range(4)}), timeout=240)
        c = swarm.admin
        rounds = {i: sites[i].died for i in (2, 3)}
        assert all(r is not None and r >= 2 for r in rounds.values()), rounds
        assert sites[0].died is None and sites[1].died is None
        commits = {e.args["round"]: e.args["members"] for e in c.events(names={"MergeCommitted"})}
        assert sites[2].address in commits[rounds[2]]  # its update made it in
        assert sites[3].address not in commits[rounds[3]]  # it never sent one
        last = max(r for r in rounds.values() if r is not None)
        assert c.round(last).status is RoundStatus.COMMITTED
        assert max(commits) > last  # the survivors went on merging
        _all_hold_the_final_model(swarm, [0, 1])


def test_the_leader_dies_right_after_committing(caplog: pytest.LogCaptureFixture) -> None:
    """The round-2 leader dies the moment its commit is mined (the ``exit`` fault; nobody reaches
    it any more). The members hold the merged model (fetched before the commit: the leader
    commits only once a member holds a copy) or pull it from one that does; the others go on
    without it and end with the final model."""
    caplog.set_level(logging.WARNING, logger="swarmnode")
    # grace 2 s: both survivors are round 2's members even on a loaded machine
    with InProcessSwarm(3, _spec(2), min_peers=2, grace_s=2, deadline_s=5,
                        faults={i: {"exit": "after-commit:2"} for i in range(3)}) as swarm:
        sites = swarm.run(_trainer({0: 5, 1: 5, 2: 5}), timeout=180)
        c = swarm.admin
        (dead,) = [s for s in sites if s.died is not None]
        assert dead.died == 2
        r2 = c.round(2)
        assert r2.status is RoundStatus.COMMITTED and r2.leader == dead.address
        assert c.round(3).status is RoundStatus.COMMITTED
        survivors = [s for s in sites if s is not dead]
        for s in survivors:  # both took round 2's model: it was not lost with its leader
            (got,) = [x.outcome for x in s.syncs if x.outcome.round == 2]
            assert got.digest == r2.digest
        assert "round 2: no participant can serve" not in caplog.text
        _all_hold_the_final_model(swarm, [s.index for s in survivors])


def test_a_member_revoked_while_its_leader_merges_is_left_out_at_the_re_election(
        caplog: pytest.LogCaptureFixture) -> None:
    """The leader of round 2 hangs 2 s before merging (a test fault, on every site: whichever is
    drawn); a participant is revoked in the registry meanwhile. The leader's view of it (cached
    up to 5 s) still lists it, so its commit is refused (MemberRevoked): the attempt is given up,
    the deadline re-elects, that leader merges without the revoked site, and the two others
    finish with the chain's final model (before the fix the leader sent the same refused commit
    until its round timeout). The revoked site's trainer stops with an error, as a revoked
    site's does. (An 8 s deadline: the refused commit must come before it in chain time, which
    eth-tester runs ahead of the host's. Moved from a three-process test: its subject is the
    rule, not the process boundary.)"""
    caplog.set_level(logging.WARNING, logger="swarmnode")
    hanging = threading.Event()
    seen: dict[str, Any] = {}

    class Hang(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "test fault: hanging before the commit" in record.getMessage():
                seen.setdefault("thread", record.threadName)
                hanging.set()

    def revoke_while_it_hangs() -> None:
        if not hanging.wait(180):
            return  # run() times out and says where the sites are
        c = swarm.admin
        leader = c.round(2).leader
        victim = next(p for p in c.round(2).participants if p != leader)
        seen["leader"], seen["victim"] = leader, victim
        c.registry.with_account(dev_account(0)).revoke(victim)

    hang = {"stall_commit": "2:1:2"}
    handler = Hang(logging.WARNING)
    logging.getLogger("swarmnode").addHandler(handler)
    try:
        # a 3 s grace period: all three check in to round 2 on a loaded host (with the leader
        # and the revoked site its only participants, no live participant may re-elect it)
        with InProcessSwarm(3, _spec(2), min_peers=2, grace_s=3, deadline_s=8,
                            faults={i: hang for i in range(3)}) as swarm:
            watcher = threading.Thread(target=revoke_while_it_hangs, daemon=True)
            watcher.start()
            sites = swarm.run(_trainer({0: 3, 1: 3, 2: 3}), timeout=180,
                              expected=lambda site, exc: site.address == seen.get("victim"))
            watcher.join(30)
            assert "victim" in seen, "round 2's leader never hung: the path under test did not run"
            leader, victim = seen["leader"], seen["victim"]
            (lead,) = [s for s in sites if s.address == leader]
            assert seen["thread"] == f"trainer-{lead.name}"
            refused = [r.getMessage() for r in caplog.records
                       if r.threadName == f"trainer-{lead.name}"
                       and "round 2: commit refused" in r.getMessage()]
            assert refused and "MemberRevoked" in refused[0], \
                f"the leader's commit was not refused as revoked: {refused}"
            c = swarm.admin
            assert c.node(victim).state == "revoked"
            commits = [e for e in c.events(names={"MergeCommitted"}) if e.args["round"] == 2]
            assert commits and victim not in commits[-1].args["members"]
            assert c.round(2).attempt >= 2  # committed by the re-elected leader
            others = [s.index for s in sites if s.address != victim]
            _all_hold_the_final_model(swarm, others)
    finally:
        logging.getLogger("swarmnode").removeHandler(handler)
