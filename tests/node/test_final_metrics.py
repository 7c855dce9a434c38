"""The final round's metrics: the trainer's evaluation of the final model reaches the chain (no
check-in follows the final round to carry it), so `swarmnode report` ends with that round
(issue 21: the report's final round was missing). In-process swarm: real node services, the real
contracts on eth-tester, the local API's own dispatch."""

from __future__ import annotations

import torch

from swarmnode.chain.report import collect
from swarmnode.node.service import _LocalApi
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site

STATE = {"w": torch.zeros(3, 2)}


def test_the_final_models_metrics_are_recorded_for_the_final_round() -> None:
    spec = TrainingSpec.from_state(STATE, sync_frequency=1, min_peers=2, merge_method="mean")

    def step(site: Site, k: int, model):  # type: ignore[no-untyped-def]
        if k >= 3:
            return None
        base = model if model is not None else STATE
        return {n: t + 0.1 * (site.index + 1) for n, t in base.items()}, 10

    with InProcessSwarm(2, spec, min_peers=2, grace_s=1, deadline_s=6) as swarm:
        first, second = swarm.sites
        # before the training finished, the chain refuses it: logged, not a failure
        assert first.service.report_final_metrics(0.5, 0.5) is False
        swarm.run(step)
        final = swarm.final_round()
        assert final is not None and swarm.final_digest() is not None
        assert first.service.report_final_metrics(None, None) is False  # nothing measured
        reply, payload = _LocalApi(first.service).call(
            "final_metrics", {"loss": 0.125, "metric": 0.875}, None)
        assert reply == {"recorded": True} and payload is None
        assert second.service.report_final_metrics(0.25, 0.75) is True
        rows = [r for r in collect(swarm.admin) if r.round == final]
        assert {(r.address, r.loss, r.metric) for r in rows} == {
            (first.address, 0.125, 0.875), (second.address, 0.25, 0.75)}
        assert max(r.round for r in collect(swarm.admin)) == final
