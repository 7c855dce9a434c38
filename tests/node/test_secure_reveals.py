"""Who a site reveals its round seeds to, and which: NodeService.reveal_seeds (the handler the
data plane and the in-process transport call) on real node services and the real contracts
(eth-tester), the rounds driven by hand through the chain. A seed goes only to the round's
elected leader, only once its check-ins are closed, only from a site that checked in, and only
for a mask-set site that never checked in (the seed it masked with: the dropout's own side of
the pair computes the same one)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swarmnode.chain.accounts import dev_account
from swarmnode.demo.swarm import wait_until
from swarmnode.errors import PeerRefused, RoundError
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm

INITIAL = {"w": torch.zeros(4, 3)}


def _elect(swarm: InProcessSwarm, round: int, who: list[int]) -> str:
    """Sites ``who`` check in for ``round`` (weight 10), one of them closes it; the leader."""
    for i in who:
        swarm.admin.with_account(dev_account(i + 1)).checkin(round, 10,
                                                             masked_hash=bytes([i + 1]) * 32)
    chain = swarm.admin.with_account(dev_account(who[0] + 1))
    chain.elect(round)
    return wait_until(lambda: chain.round(round).leader, 30, f"round {round}'s leader draw")


def test_seeds_go_to_the_elected_leader_only_and_only_for_sites_that_never_checked_in() -> None:
    plain = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=3, merge_method="mean",
                                    merge_options={"clip_norm": 10.0})
    spec = dataclasses.replace(plain, max_weight=100, secure_aggregation=True)
    with InProcessSwarm(4, spec, grace_s=0, deadline_s=60) as swarm:
        services = [s.service for s in swarm.sites]
        addresses = [s.address for s in swarm.sites]
        # round 1: its mask set is the first 3 members; it commits, so round 2's set is all 4
        leader = _elect(swarm, 1, [0, 1, 2])
        swarm.admin.with_account(
            dev_account(addresses.index(leader) + 1)).commit_merge(1, b"\x01" * 32,
                                                                   addresses[:3])
        assert services[0].secure.roster(2) is not None  # type: ignore[union-attr]
        # round 2: site 4 never checks in. Open: nothing is revealed to anyone
        swarm.admin.with_account(dev_account(1)).checkin(2, 10, masked_hash=b"\x01" * 32)
        with pytest.raises(RoundError, match="not closed"):
            services[0].reveal_seeds(2, addresses[1])
        leader = _elect(swarm, 2, [1, 2])
        others = [a for a in addresses[:3] if a != leader]
        # not the leader: refused, whichever checked-in site asks
        for asker in others:
            with pytest.raises(PeerRefused, match="not the round's elected leader"):
                services[addresses.index(others[0])].reveal_seeds(2, asker)
        # the leader: each survivor's seed with site 4 alone, the very seed it masked with
        for i in range(3):
            got = services[i].reveal_seeds(2, leader)
            theirs = services[3].secure.seeds(2, [addresses[i]])  # type: ignore[union-attr]
            assert got == [(addresses[3].lower(), theirs[addresses[i]])]
        # the site that did not check in reveals nothing
        with pytest.raises(RoundError, match="did not check in"):
            services[3].reveal_seeds(2, leader)
