"""Three real node services on the real contracts, in one process (swarmnode.testing.inproc): the
rounds commit, every site ends with the chain's final model, and each merged model is the weighted
mean of what the sites sent, computed here with numpy from the safetensors bytes they sent."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load

from swarmnode.chain.models import RoundStatus
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm

SITES = 3
ROUNDS = 4
WEIGHTS = (30, 20, 10)
INITIAL = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "scale": torch.ones(2, 2, 2)}


def step(site, k, model):  # type: ignore[no-untyped-def]
    """A trainer: from the model it holds, a site-specific deterministic move."""
    if k >= ROUNDS:
        return None
    base = model if model is not None else INITIAL
    gen = torch.Generator().manual_seed(1000 * site.index + k)
    state = {n: t + 0.1 * (site.index + 1) * torch.randn(t.shape, generator=gen)
             for n, t in base.items()}
    return state, WEIGHTS[site.index]


def test_three_sites_merge_by_weighted_mean_and_end_with_the_chains_final_model() -> None:
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=SITES,
                                   merge_method="mean")
    started = time.monotonic()
    with InProcessSwarm(SITES, spec, min_peers=SITES) as swarm:
        sites = swarm.run(step, timeout=180)
        chain = swarm.admin
        final = swarm.final_round()
        assert final is not None and chain.training_finished()
        final_digest = swarm.final_digest()
        assert final_digest is not None

        # every sync ran in a committed round, all three sites in the same rounds
        rounds = [[s.outcome.round for s in site.syncs] for site in sites]
        assert rounds[0] == rounds[1] == rounds[2] == list(range(1, ROUNDS + 1)), rounds
        for r in range(1, final + 1):
            assert chain.round(r).status is RoundStatus.COMMITTED, r

        for r in range(1, ROUNDS + 1):
            sent = [site.syncs[r - 1] for site in sites]
            assert all(s.outcome.contributed and not s.outcome.abandoned for s in sent)
            info = chain.round(r)
            assert sorted(info.participants) == sorted(site.address for site in sites)
            # every site holds the committed model: its bytes hash to the chain's digest
            for s in sent:
                assert s.outcome.digest == info.digest
                assert hashlib.sha256(bytes(s.outcome.data)).digest() == info.digest
            # the product's merge against numpy's weighted mean of the bytes the sites sent
            updates = [st_load(s.payload) for s in sent]
            merged = st_load(bytes(sent[0].outcome.data))
            assert set(merged) == set(INITIAL)
            total = float(sum(s.weight for s in sent))
            for name in INITIAL:
                expected = sum(u[name].astype(np.float64) * s.weight
                               for u, s in zip(updates, sent, strict=True)) / total
                assert merged[name].dtype == np.float32
                np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6)
            # and the next round started from it (a site's update moved away from the merge)
            assert not np.array_equal(merged["w"], updates[0]["w"])

        # every site ends with the chain's final model: the last round's merge, re-committed
        for site in sites:
            assert site.final is not None and site.final.round == final
            assert site.final_digest == final_digest
            assert hashlib.sha256(bytes(site.final.data)).digest() == final_digest
        assert final_digest == chain.round(ROUNDS).digest
        assert swarm.network.pushes >= ROUNDS * (SITES - 1)
    print(f"in-process swarm: {ROUNDS} rounds + final in {time.monotonic() - started:.1f} s")


def test_the_in_memory_transport_runs_the_receivers_checks() -> None:
    """A push is refused by the receiving node as over the network: not a participant, a digest
    that does not match, a payload off the spec."""
    from swarmnode.errors import PayloadRejected, PeerRefused
    from swarmnode.transport import serde

    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    with InProcessSwarm(2, spec, min_peers=2) as swarm:
        a, b = swarm.sites
        client = a.service.pool.client(b.address)
        payload = serde.encode(INITIAL)
        with pytest.raises(PeerRefused, match="not a participant"):
            client.push_update(1, 5, payload, timeout=5.0)
        b.service.chain.checkin(1, 5)
        a.service.chain.checkin(1, 5)  # closes round 1: both are participants now
        with pytest.raises(PayloadRejected):
            client.push_update(1, 5, payload, timeout=5.0, digest=b"\0" * 32)
        off_spec = serde.encode({**INITIAL, "b": torch.zeros(4)})
        with pytest.raises(PayloadRejected):
            client.push_update(1, 5, off_spec, timeout=5.0)
