"""A secure round's leader commits as soon as a member holds the merged model, as in a plain
round: it does not sit out its replica wait (5 s, or a quarter of the deadline) because the
addresses it kept of the masked updates' senders are spelt differently (lowercase) from those
the peer API names the members that fetched the model by (checksummed). Measured on real node
services in one process (swarmnode.testing.inproc), from what every leader logs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import pytest
import torch

from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site

INITIAL = {"w": torch.zeros(8, 4)}


def _step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]  # noqa: E501
    if k >= 3:
        return None
    base = model if model is not None else INITIAL
    return {n: t + 0.01 * (site.index + 1) for n, t in base.items()}, 10


def test_a_secure_leader_commits_once_a_member_fetched_the_merged_model(
        caplog: pytest.LogCaptureFixture) -> None:
    plain = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=3, merge_method="mean",
                                    merge_options={"clip_norm": 10.0})
    spec = dataclasses.replace(plain, max_weight=100, secure_aggregation=True)
    caplog.set_level(logging.INFO, logger="swarmnode")
    with InProcessSwarm(3, spec, grace_s=2, deadline_s=20) as swarm:
        sites = swarm.run(_step, timeout=240)
        final = swarm.final_digest()
    assert final is not None and [s.final_digest for s in sites] == [final] * 3
    summed = [r.getMessage() for r in caplog.records if "summed" in r.getMessage()]
    waited = [r.getMessage() for r in caplog.records
              if "no member fetched the merged model" in r.getMessage()]
    assert len(summed) >= 2, summed  # secure rounds were led and logged
    assert waited == [], waited
