"""The peer authority's round cache against a caller that names rounds no one runs: on the
in-process swarm's real contracts (eth-tester), a hostile enrolled site asking about far-future
rounds must not push the rounds in use out of the cache (then every honest push or pull would
read the chain, and past its few reads per block be refused as a non-participant)."""

from __future__ import annotations

import torch

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract
from swarmnode.node.peers import ChainAuthority
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm

INITIAL = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}


def test_far_future_rounds_named_by_a_hostile_site_do_not_evict_the_round_in_use() -> None:
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    with InProcessSwarm(2, spec, min_peers=2, grace_s=2, deadline_s=8) as swarm:
        chain: SwarmContract = swarm.admin.with_account(dev_account(1))
        reads: list[int] = []
        real = chain.round

        def counted(r: int):  # type: ignore[no-untyped-def]
            reads.append(r)
            return real(r)

        chain.round = counted  # type: ignore[method-assign]
        hostile = dev_account(5).address
        one, two = (dev_account(i).address for i in (1, 2))
        current = chain.current_round()
        swarm.admin.with_account(dev_account(1)).checkin(current, 10)
        swarm.admin.with_account(dev_account(2)).checkin(current, 20)  # elected
        block = [100]
        authority = ChainAuthority(chain, block=lambda: block[0])
        assert authority.is_participant(current, one)  # read once: the participants are fixed
        # the hostile site names 3 new far-future rounds a block (its read bound) for 5 blocks
        far = 1 << 40
        for _ in range(5):
            for _ in range(3):
                far += 1
                assert not authority.is_participant(far, hostile)
            block[0] += 1
        reads.clear()
        for _ in range(10):  # the members' pushes and pulls: answered from the cache
            assert authority.is_participant(current, one)
            assert authority.is_participant(current, two)
        assert reads == [], reads
