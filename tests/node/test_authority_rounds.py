"""The peer authority's round cache against a caller that names rounds no one runs: on the
in-process swarm's real contracts (eth-tester), a hostile enrolled site asking about far-future
rounds must not push the rounds in use out of the cache (then every honest push or pull would
read the chain, and past its few reads per block be refused as a non-participant)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract
from swarmnode.node.peers import ChainAuthority
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm

INITIAL = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}


@contextmanager
def _counted_chain() -> Iterator[tuple[InProcessSwarm, SwarmContract, list[int]]]:
    """A two-site in-process swarm and site 1's chain client, whose round reads are listed."""
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    with InProcessSwarm(2, spec, min_peers=2, grace_s=2, deadline_s=8) as swarm:
        chain: SwarmContract = swarm.admin.with_account(dev_account(1))
        reads: list[int] = []
        real = chain.round

        def counted(r: int):  # type: ignore[no-untyped-def]
            reads.append(r)
            return real(r)

        chain.round = counted  # type: ignore[method-assign]
        yield swarm, chain, reads


def test_far_future_rounds_named_by_a_hostile_site_do_not_evict_the_round_in_use() -> None:
    with _counted_chain() as (swarm, chain, reads):
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


def test_a_non_participant_costs_a_few_round_reads_per_block_and_a_check_in_counts_at_once(
) -> None:
    """A caller the round does not name (an outsider's pushes) makes the authority read the
    round again a few times per block at most, however many requests it sends: before, every
    request read the chain (a hostile site could make a leader hammer its RPC node). A member
    whose check-in was mined a moment ago, in a block the leader has not seen yet, is a
    participant at once: an open round is read again for it (a view kept from before the
    check-in must not refuse its push until the next block)."""
    with _counted_chain() as (swarm, chain, reads):
        outsider = dev_account(5).address
        one, two = (dev_account(i).address for i in (1, 2))
        current = chain.current_round()  # open: nobody checked in yet
        # without a block source: a few reads per time slot (a quarter second)
        plain = ChainAuthority(chain)
        for _ in range(50):
            assert not plain.is_participant(current, outsider)
        assert len(reads) <= 6, reads  # 3 a slot, 6 across a slot's end; before: 50
        reads.clear()
        block = [100]  # the latest block this node knows: it stays put below (a slow watcher)
        authority = ChainAuthority(chain, block=lambda: block[0])
        for _ in range(50):
            assert not authority.is_participant(current, outsider)
        for r in range(current + 1, current + 20):  # ever new rounds: nothing more this block
            assert not authority.is_participant(r, outsider)
        assert len(reads) == 3, reads
        # both check in (the second closes the round) while this node still knows block 100:
        # the outsider spent its reads of this block, not theirs
        swarm.admin.with_account(dev_account(1)).checkin(current, 10)
        swarm.admin.with_account(dev_account(2)).checkin(current, 20)
        assert authority.is_participant(current, one) and authority.is_participant(current, two)
        reads.clear()
        for _ in range(50):  # elected: its participants are fixed; read once per block
            assert not authority.is_participant(current, outsider)
        assert reads == [], reads
        block[0] += 1
        assert not authority.is_participant(current, outsider)
        assert reads == [current], reads


def test_a_certificate_claiming_new_addresses_costs_a_few_node_reads_per_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder of a consortium certificate that claims ever new addresses (each a chain read
    of that address's record) gets a few reads per block, then a refusal saying why, and the
    records kept stay bounded; an honest site's claims, with its own certificate, still bind.
    Before: every claim read the chain and was kept for good."""
    from pathlib import Path

    from swarmnode.errors import PeerRefused
    from swarmnode.node import peers
    from swarmnode.transport.dataplane import bind_address

    monkeypatch.setattr(peers, "_MAX_NODES", 8)
    with _counted_chain() as (swarm, chain, _):
        node_reads: list[str] = []
        real = chain.node

        def counted(address: str):  # type: ignore[no-untyped-def]
            node_reads.append(address)
            return real(address)

        chain.node = counted  # type: ignore[method-assign]
        one, two = swarm.sites
        hostile_cert = Path(one.service.config.cert).read_bytes()
        honest_cert = Path(two.service.config.cert).read_bytes()
        block = [100]
        authority = ChainAuthority(chain, block=lambda: block[0])
        refused = 0
        for i in range(20):  # new addresses, none of them the certificate's
            try:
                bind_address(authority, f"0x{0x1000 + i:040x}", hostile_cert)
            except PeerRefused as exc:
                refused += 1
                assert "try again in the next block" in str(exc) or "not an enrolled" in str(exc)
        assert len(node_reads) == 3, node_reads
        assert refused == 20
        # the honest site's claim is its certificate's own budget, not the hostile one's
        assert bind_address(authority, two.address, honest_cert) == two.address
        for _ in range(5):  # and is then answered from the cache
            assert bind_address(authority, two.address, honest_cert) == two.address
        assert len(node_reads) == 4, node_reads
        for _ in range(10):  # ten more blocks of claims: 3 reads each, 8 records kept at most
            block[0] += 1
            for i in range(5):
                with pytest.raises(PeerRefused):
                    bind_address(authority, f"0x{block[0] * 16 + i:040x}", hostile_cert)
        assert len(node_reads) == 4 + 30, len(node_reads)
        assert len(authority._nodes) <= 8
