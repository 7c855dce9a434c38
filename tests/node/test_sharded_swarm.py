"""The sharded topology on real node services (swarmnode.testing.inproc): every participant merges
one slice, the leader assembles and commits, and the rounds end with the very digests the leader
topology commits for the same updates; no site sends a whole update to the leader."""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import pytest
import torch

from swarmnode.chain.models import RoundStatus
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm

SITES = 4
ROUNDS = 3
WEIGHTS = (30, 20, 10, 5)
INITIAL = {"w": torch.zeros(40, 33), "b": torch.zeros(33), "h": torch.zeros(17).half(),
           "n": torch.tensor(0)}


def step(site, k, model):  # type: ignore[no-untyped-def]
    """A trainer: from the model it holds, a site-specific deterministic move."""
    if k >= ROUNDS:
        return None
    base = model if model is not None else INITIAL
    gen = torch.Generator().manual_seed(1000 * site.index + k)
    state = {n: (t + 0.1 * (site.index + 1) * torch.randn(t.shape, generator=gen)).to(t.dtype)
             if t.is_floating_point() else t + site.index + 1 for n, t in base.items()}
    return state, WEIGHTS[site.index]


@functools.cache
def _run(topology: str, method: str = "mean",
         compression: str = "none") -> tuple[list[bytes | None], dict[str, int]]:
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=SITES,
                                   merge_method=method)
    spec = dataclasses.replace(TrainingSpec.from_json(spec.to_json().replace(
        '"sync_frequency"', f'"topology":"{topology}","sync_frequency"')),
        compression=compression)
    with InProcessSwarm(SITES, spec, min_peers=SITES) as swarm:
        sites = swarm.run(step, timeout=240)
        chain = swarm.admin
        final = swarm.final_round()
        assert final is not None and chain.training_finished()
        digests = []
        for r in range(1, ROUNDS + 1):
            info = chain.round(r)
            assert info.status is RoundStatus.COMMITTED, r
            assert info.attempt == 1, r  # merged at the first attempt: no re-election
            for site in sites:
                got = site.syncs[r - 1].outcome
                assert got.digest == info.digest and not got.abandoned
                assert hashlib.sha256(bytes(got.data)).digest() == info.digest
            digests.append(info.digest)
        for site in sites:
            assert site.final_digest == swarm.final_digest()
        return digests, {"pushes": swarm.network.pushes, "pulls": swarm.network.pulls,
                         "push_bytes": swarm.network.push_bytes}


def test_a_sharded_swarm_commits_the_leader_topologys_digests() -> None:
    leader, whole = _run("leader")
    sharded, moves = _run("sharded")
    assert sharded == leader
    # every site sent each other site one slice a round (N-1 slice pushes per site), and
    # fetched each other owner's merged slice: no whole update went to a leader
    assert moves["pushes"] >= ROUNDS * SITES * (SITES - 1)
    assert moves["pulls"] >= ROUNDS * SITES * (SITES - 1)
    assert whole["pushes"] < moves["pushes"]



def test_sharded_with_bf16_slices_commits_the_leader_topologys_bf16_digests() -> None:
    """compression bf16 under the sharded topology: from round 2 each slice travels as its
    bfloat16 change from the round's starting model (with the sender's error feedback), each
    owner folds starting model + decoded change, the merged slices travel float32; every round
    commits the very digest the leader topology commits with bf16 updates (rounding element by
    element: a slice's code is the whole update's code there), every site ends with it, and the
    slices carry fewer bytes than float32 slices."""
    leader, _ = _run("leader", compression="bf16")
    sharded, moves = _run("sharded", compression="bf16")
    plain, plain_moves = _run("sharded")
    assert sharded == leader
    assert sharded[0] == plain[0]  # round 1 has no starting model: its slices travel whole
    assert sharded[1:] != plain[1:]  # later rounds' slices travel rounded
    # round 1 whole, rounds 2-3 at about half: about 2/3 of the float32 slices' bytes
    assert moves["push_bytes"] < 0.8 * plain_moves["push_bytes"], (moves, plain_moves)
    assert moves["pushes"] >= ROUNDS * SITES * (SITES - 1)


@pytest.mark.parametrize("compression", ["fp16", "int8"])
def test_sharded_with_fp16_or_int8_slices_ends_with_one_digest_everywhere(
        compression: str) -> None:
    """fp16 and int8 take the same path (int8's blocks and scales are cut per slice, so its
    merged bytes are not the leader topology's; every site still ends with the digest the
    leader commits, which _run checks round by round)."""
    sharded, moves = _run("sharded", compression=compression)
    plain, plain_moves = _run("sharded")
    assert sharded[0] == plain[0] and sharded[1:] != plain[1:]
    assert moves["push_bytes"] < 0.8 * plain_moves["push_bytes"], (moves, plain_moves)


def test_a_site_lost_mid_exchange_costs_one_deadline_then_the_round_merges_whole() -> None:
    """Of four sites, one dies right after its slices reached their owners (round 2, or the
    first later round where it is not the leader): it never merges its own slice, so that
    attempt cannot be assembled. The members re-elect at the deadline; the next attempt gathers
    whole updates at its leader (rules.runs_sharded) and commits without the lost site; the
    three others train to the end, sharded again."""
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2,
                                   merge_method="mean")
    spec = TrainingSpec.from_json(spec.to_json().replace(
        '"sync_frequency"', '"topology":"sharded","sync_frequency"'))
    with InProcessSwarm(SITES, spec, min_peers=2, grace_s=1, deadline_s=4,
                        faults={3: {"exit": "after-push:2+"}}) as swarm:
        sites = swarm.run(step, timeout=240)
        c = swarm.admin
        died = sites[3].died
        assert died is not None and died >= 2
        info = c.round(died)
        assert info.status is RoundStatus.COMMITTED and info.attempt >= 2, info
        committed = {e.args["round"]: e.args for e in c.events(names={"MergeCommitted"})}
        assert sites[3].address not in committed[died]["members"]
        later = [r for r in committed if r > died]
        assert later and all(c.round(r).attempt == 1 for r in later)  # sharded again
        final = swarm.final_digest()
        for site in sites[:3]:
            assert site.final_digest == final


def test_a_merged_slice_is_still_served_once_the_round_moved_on() -> None:
    """ShardExchange.held: the slice this node merged, for its own index only, without waiting
    (NodeService.merged_shard serves it after the commit, so a member slower than the leader
    still assembles from the slices)."""
    from swarmnode.node.sharding import ShardExchange
    from swarmnode.transport import serde
    from swarmnode.types import Update

    spec = serde.ParamSpec.from_state(INITIAL)
    owners = ["0x" + c * 40 for c in "ab"]
    ex = ShardExchange(spec, "mean", {}, me=owners[1])
    mine = ex.mine(4, owners)
    assert ex.held(4, 1, mine) is None  # nothing merged yet
    c = ex.collector(4, 1, owners, owners[1:])
    payload = serde.encode({n: t + 1 for n, t in INITIAL.items()})
    c.add(Update(ex.layout(4, owners).cut(payload, mine), 3.0, owners[1]))
    done = ex.reduce(4, 1, owners, owners[1:])
    assert ex.held(4, 1, mine) is done
    assert ex.held(4, 1, 1 - mine) is None and ex.held(4, 2, mine) is None


def test_owners_serving_nan_slices_cost_a_retry_not_a_poisoned_model() -> None:
    """Two owners serve their merged slices of round 2 with every float NaN (all bytes 0xff)
    to whoever asks, while each assembles with its own honest slice. Whoever leads, its
    assembly holds a NaN slice of another owner, so it is not committed; the members re-elect
    at the deadline and the next attempt merges whole updates at its leader. Every site ends
    round 2 with the chain's digest, whose model is finite, and the training with one
    digest."""
    from swarmnode.transport import serde

    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=SITES,
                                   merge_method="mean")
    spec = TrainingSpec.from_json(spec.to_json().replace(
        '"sync_frequency"', '"topology":"sharded","sync_frequency"'))
    served: list[str | None] = []

    def lie(service):  # type: ignore[no-untyped-def]
        honest = service.merged_shard

        def lying(round, attempt, index, timeout, to=None):  # type: ignore[no-untyped-def]
            held = honest(round, attempt, index, timeout, to)
            if held is None or round != 2:
                return held
            raw = bytearray(bytes(held))
            head = 8 + int.from_bytes(raw[:8], "little")
            raw[head:] = b"\xff" * (len(raw) - head)  # NaN in every float
            served.append(to)
            return bytes(raw)

        service.merged_shard = lying

    with InProcessSwarm(SITES, spec, min_peers=SITES, grace_s=1, deadline_s=4) as swarm:
        for site in swarm.sites[1:3]:
            lie(site.service)
        sites = swarm.run(step, timeout=240)
        info = swarm.admin.round(2)
        assert served and info.status is RoundStatus.COMMITTED and info.attempt >= 2, info
        for site in sites:
            got = site.syncs[1].outcome
            assert got.round == 2 and got.digest == info.digest and not got.abandoned
            assert hashlib.sha256(bytes(got.data)).digest() == info.digest
        model = serde.view_state(sites[0].syncs[1].outcome.data,
                                 spec=serde.ParamSpec.from_state(INITIAL),
                                 reject_nonfinite=False)
        assert all(bool(torch.isfinite(t).all()) for t in model.values()
                   if t.is_floating_point())
        final = swarm.final_digest()
        assert all(site.final_digest == final for site in sites)
