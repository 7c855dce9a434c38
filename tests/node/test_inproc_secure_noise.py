"""Distributed noise in a secure swarm of real node services (swarmnode.testing.inproc): every
mask-set site adds its share of discrete Gaussian noise under its masks; the merged model
carries the noise of the shares that arrived (measured against the trainers' exact weighted
mean); the nodes log each round's epsilon; the chain's record alone gives the same numbers
(privacy.ledger, what `swarmnode report` prints)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from swarmnode.cli.chain_cmds import _print_privacy
from swarmnode.privacy import noise
from swarmnode.privacy.ledger import from_chain
from swarmnode.privacy.noise import DistributedNoise
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site, decode

INITIAL = {"w": torch.zeros(24, 16), "b": torch.zeros(16)}
Z = 0.05  # a sum's noise sigma = Z x max_weight x clip_norm = 50 in model units


def _spec() -> TrainingSpec:
    plain = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=3,
                                    merge_method="mean", merge_options={"clip_norm": 10.0})
    return dataclasses.replace(plain, max_weight=100, secure_aggregation=True,
                               distributed_noise=DistributedNoise(Z, 1e-5))


def _stepper(rounds: int):  # type: ignore[no-untyped-def]
    """Each site moves the model it is handed by 0.1 (index + 1) x Gaussian, weight 20 (one
    weight: every round's sensitivity is the same, so epsilon moves with the shares alone)."""
    def step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        if k >= rounds:
            return None
        base = model if model is not None else INITIAL
        gen = torch.Generator().manual_seed(1000 * site.index + k)
        return ({n: t + 0.1 * (site.index + 1) * torch.randn(t.shape, generator=gen)
                 for n, t in base.items()}, 20)
    return step


def test_noise_shares_reach_the_model_and_each_round_reports_its_epsilon(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """4 sites; site 4 dies before its round-3 check-in: round 2 carries (on a calm machine) 4
    of 4 shares, rounds 3-4 only 3 of 4 (the dropout took its share), so their epsilon is
    higher; round 1 (no starting model) adds no noise and is listed as not covered. Each
    merged round's distance from the exact weighted mean is the noise the accountant assumed
    (std within 20%). Asserted per round from what the chain says took part, so a site that
    misses a check-in on a loaded machine changes the numbers, not the verdict."""
    started = time.monotonic()
    spec = _spec()
    caplog.set_level(logging.INFO, logger="swarmnode.node")
    with InProcessSwarm(4, spec, grace_s=4, deadline_s=8,
                        faults={3: {"exit": "before-checkin:3"}}) as swarm:
        sites = swarm.run(_stepper(4), timeout=600)
        assert sites[3].died == 3
        final = swarm.final_digest()
        assert final is not None and [s.final_digest for s in sites[:3]] == [final] * 3
        summary = from_chain(swarm.admin)
        plan = sites[0].service.secure.plan  # type: ignore[union-attr]
        _print_privacy(swarm.admin, tmp_path)  # what `swarmnode report` prints and writes
    assert summary is not None
    assert json.loads((tmp_path / "privacy.json").read_text()) == json.loads(
        json.dumps(summary.to_dict()))
    by = {r.round: r for r in summary.rounds}
    noised = [r for r in summary.rounds if r.covered and r.summed]
    assert noised, summary.rounds
    text = caplog.text
    for r in noised:
        # any one participant faces k - 1 shares of sigma^2 / n; sensitivity 20 x C x 2^f +
        # sqrt d (every weight is 20)
        want = Z * 100 / 20 * math.sqrt((r.shares - 1) / r.expected)
        assert r.noise_multiplier == pytest.approx(want, rel=1e-4), r
        # the nodes said so in their logs (leader at its sum, members at their pull), in
        # numbers equal to the chain's
        assert r.line() in text, r
    # site 4 died at its round-3 check-in: every summed round from 3 on lacks its share
    lowered = [r for r in noised if r.round >= 3]
    assert lowered and all(r.shares < r.expected for r in lowered), noised
    assert "dropout(s) took their shares, lowering the noise" in text
    for a in noised:  # one sensitivity: fewer shares, higher epsilon
        assert all(a.epsilon < b.epsilon for b in noised if a.shares > b.shares)
    first = min(r.round for r in summary.rounds if r.summed)
    assert not by[first].covered and summary.uncovered == (first,)
    assert re.search(rf"round {first}: no starting model, the parameters were summed whole",
                     text)
    assert summary.total > max(r.epsilon for r in noised)
    # the noise is in the model: distance from the trainers' exact weighted mean
    sent: dict[int, dict[int, tuple[dict[str, torch.Tensor], int]]] = {}
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for site in sites:
        for s in site.syncs:
            r = s.outcome.round
            if s.outcome.contributed:
                sent.setdefault(r, {})[site.index] = (decode(s.payload), s.weight)
            if s.outcome.data is not None:
                merged[r] = decode(s.outcome.data)
    size = sum(t.numel() for t in INITIAL.values())
    sigma = noise.sigma(spec.distributed_noise, plan, size) * plan.unit  # model units
    assert sigma == pytest.approx(Z * 100 * 10.0, rel=1e-3)
    for r in (x.round for x in noised):
        total = sum(w for _, w in sent[r].values())
        want = {n: sum(m[n].double() * w for m, w in sent[r].values()) / total for n in INITIAL}
        gap = torch.cat([(merged[r][n].double() - want[n]).reshape(-1) for n in INITIAL])
        expect = sigma * math.sqrt(by[r].shares / by[r].expected) / total
        assert abs(float(gap.std()) / expect - 1) < 0.2, (r, float(gap.std()), expect)
    print(f"4 sites, 4 rounds with distributed noise and a dropout: "
          f"{time.monotonic() - started:.1f} s; {summary.line()}")
