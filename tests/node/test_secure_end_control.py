"""The quality study's control ``secure_end_control`` (NodeService, InProcessSwarm): a plain
training whose nodes end as secure aggregation's do (lifecycle.secure_sums_over: once fewer than
three sites still train, the others finish at their next sync) and whose leaders, as secure
ones, commit a round's starting model again when fewer than three sites add weight
(guards.sums). Real node services on the real contracts (swarmnode.testing.inproc); asserted on
the chain's record and on what the trainers were handed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from swarmnode.chain.models import RoundStatus
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site

INITIAL = {"w": torch.zeros(8, 4), "b": torch.zeros(4)}
LONG = 8  # syncs of the sites that keep training


def _spec() -> TrainingSpec:
    """Secure aggregation's settings (mean, clip, weight cap, min_peers 3), in the clear."""
    plain = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=3, merge_method="mean",
                                    merge_options={"clip_norm": 10.0})
    return dataclasses.replace(plain, max_weight=100)


def _step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
    """Site 0 is done after one sync, the others would sync LONG times."""
    if k >= (1 if site.index == 0 else LONG):
        return None
    base = model if model is not None else INITIAL
    gen = torch.Generator().manual_seed(100 * site.index + k)
    return ({n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()},
            10 + 7 * site.index)


def _run(control: bool) -> tuple[list[Site], bytes, list[RoundStatus], list[bytes | None]]:
    with InProcessSwarm(3, _spec(), grace_s=2, deadline_s=20,
                        secure_end_control=control) as swarm:
        sites = swarm.run(_step, timeout=300)
        final, last = swarm.final_digest(), swarm.final_round()
        assert final is not None and last is not None
        assert [s.final_digest for s in sites] == [final] * 3
        rounds = [swarm.admin.round(r) for r in range(1, last + 1)]
        statuses = [r.status for r in rounds]
        digests = [r.digest if r.status is RoundStatus.COMMITTED else None for r in rounds]
        assert swarm.admin.round(last).digest == final
    return sites, final, statuses, digests


def test_the_control_ends_a_clear_swarm_at_the_first_finish() -> None:
    sites, final, statuses, digests = _run(control=True)
    # the two sites still training finished at their next sync, long before their data ran
    # out: at most the round site 0 finished in, one more that ran while its finish landed,
    # and the sync that finished them; that sync handed their trainers the final model
    for site in sites[1:]:
        assert 2 <= len(site.syncs) <= 4, [s.outcome.round for s in site.syncs]
        assert site.syncs[-1].outcome.digest == final
        assert site.service.ended_early is not None
        assert "a control in the clear" in site.service.ended_early
    assert sites[0].service.ended_early is None  # it finished as its trainer did
    assert len(statuses) <= 4 and statuses[-1] is RoundStatus.COMMITTED, statuses
    # round 1 was the only one three sites added weight to: every later committed round (the
    # two others' merges included) kept its model, so the final model is round 1's
    assert statuses[0] is RoundStatus.COMMITTED and len(statuses) >= 2, statuses
    assert all(d == digests[0] for d in digests if d is not None), [
        None if d is None else d.hex()[:12] for d in digests]
    assert final == digests[0]


def test_without_the_control_the_clear_swarm_merges_the_two_others_to_the_end() -> None:
    """What the control changes: the same plain swarm without it trains on with two sites."""
    sites, final, statuses, digests = _run(control=False)
    for site in sites[1:]:
        assert len(site.syncs) == LONG, [s.outcome.round for s in site.syncs]
        assert site.service.ended_early is None
    assert len(statuses) >= LONG
    assert all(s is RoundStatus.COMMITTED for s in statuses[1:]), statuses
    assert final != digests[0]  # the two others' merges moved the model on
