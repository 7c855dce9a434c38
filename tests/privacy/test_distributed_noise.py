"""Distributed noise on the masked sum: the discrete Gaussian sampler against its exact pmf, each
site's share and the ring bound, the spec option and its guards, and the accountant against the
analytic Gaussian mechanism."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import brentq

from swarmnode.errors import AggregateRejected, ConfigError
from swarmnode.privacy import accountant, encoding, masks, noise, ring
from swarmnode.privacy.aggregate import check_bound, unmasked_sum
from swarmnode.privacy.discrete_gaussian import discrete_gaussian, pmf
from swarmnode.privacy.noise import DistributedNoise
from swarmnode.spec import TrainingSpec

# -- the sampler -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma2", [0.25, 2.0, 9.0, 400.0])
def test_samples_follow_the_exact_pmf(sigma2: float) -> None:
    """Chi-square of 200,000 samples against N_Z(0, sigma2)'s exact pmf (bins with fewer than 5
    expected pooled, with the tails); mean and variance within 5 standard errors."""
    rng = np.random.default_rng(20)
    n = 200_000
    x = discrete_gaussian(sigma2, n, rng)
    assert x.dtype == np.int64 and x.shape == (n,)
    reach = int(12 * math.sqrt(sigma2)) + 12
    support = np.arange(-reach, reach + 1)
    p = pmf(sigma2, support)
    assert abs(p.sum() - 1) < 1e-12
    counts = np.bincount(np.clip(x, -reach, reach) + reach, minlength=support.shape[0])
    expected = p * n
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], n - expected[big].sum())
    assert stats.chisquare(observed, wanted).pvalue > 1e-4
    var = float((p * support.astype(float) ** 2).sum())  # the exact variance (< sigma2)
    assert var <= sigma2 * (1 + 1e-12)
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    # the sample variance's standard error: sqrt((m4 - var^2) / n)
    m4 = float((p * support.astype(float) ** 4).sum())
    assert abs(x.var() - var) < 5 * math.sqrt((m4 - var * var) / n)


def test_tails_match_the_exact_pmf() -> None:
    """P(|X| > 2 sigma) and P(|X| > 3 sigma) within 5 standard errors of the exact values."""
    sigma2 = 100.0
    n = 400_000
    x = discrete_gaussian(sigma2, n, np.random.default_rng(7))
    support = np.arange(-200, 201)
    p = pmf(sigma2, support)
    for k in (2, 3):
        exact = float(p[np.abs(support) > k * 10].sum())
        seen = float(np.mean(np.abs(x) > k * 10))
        assert abs(seen - exact) < 5 * math.sqrt(exact * (1 - exact) / n), (k, seen, exact)


def test_a_ring_sized_sigma_keeps_its_variance_and_whole_numbers() -> None:
    """At the sigma a real round uses (~2^40 ring units) the samples are int64 with the right
    spread (variance within 2%) and not all multiples of anything (every integer is reachable)."""
    sigma = float(1 << 40)
    x = discrete_gaussian(sigma * sigma, 100_000, np.random.default_rng(3))
    assert abs(x.std() / sigma - 1) < 0.02
    assert abs(x.mean()) < 5 * sigma / math.sqrt(x.shape[0])
    assert len({int(v) % 7 for v in x[:100]}) == 7


def test_the_sampler_refuses_bad_inputs() -> None:
    rng = np.random.default_rng(0)
    assert not discrete_gaussian(0.0, 5, rng).any()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="variance"):
            discrete_gaussian(bad, 5, rng)
    with pytest.raises(ConfigError, match="2\\^56"):
        discrete_gaussian(float(1 << 120), 5, rng)


# -- a site's share --------------------------------------------------------------------------------

PLAN = ring.plan(ring.MAX_SITES, 100, 10.0)
NOISE = DistributedNoise(1.0, 1e-5)


def test_the_generator_is_secret_per_site_and_round_and_repeatable() -> None:
    """Same key, training, site and round: the same share (a vector masked again is the same);
    any of them different: another share."""
    training, a, b = b"\x01" * 20, b"\x02" * 20, b"\x03" * 20

    def draw(secret: bytes, site: bytes, round: int) -> np.ndarray:
        return noise.share(NOISE, PLAN, 50, 5, noise.generator(secret, training, site, round))

    first = draw(b"k" * 32, a, 4)
    assert np.array_equal(first, draw(b"k" * 32, a, 4))
    for other in (draw(b"j" * 32, a, 4), draw(b"k" * 32, b, 4), draw(b"k" * 32, a, 5)):
        assert not np.array_equal(first, other)


def test_the_shares_of_a_masked_sum_carry_sigma_squared() -> None:
    """n sites each add a share of variance sigma^2/n under their masks: the unmasked sum is the
    updates' sum plus noise of variance sigma^2 (within 5%), and the leader's bound check with
    the noise bound passes where the one without it refuses."""
    n, d = 5, 4000
    plan = ring.plan(ring.MAX_SITES, 10, 1.0)
    z = DistributedNoise(0.5)
    sigma = noise.sigma(z, plan, d)
    sites = [f"0x{i:040x}" for i in range(1, n + 1)]
    rng = np.random.default_rng(1)
    changes = {s: rng.normal(size=d) * 1e-3 for s in sites}
    seeds = {(a, b): bytes([i, j]) * 16 for i, a in enumerate(sites) for j, b in enumerate(sites)}
    masked = {}
    clean = np.zeros(d, dtype=np.uint64)
    for i, s in enumerate(sites):
        values = encoding.encode(changes[s], 10, plan, i).values
        clean += values
        rng_i = noise.generator(b"s" * 32, b"t", s.encode(), 1)
        values = values + noise.share(z, plan, d, n, rng_i)
        pair = {p: seeds[tuple(sorted((s, p)))] for p in sites if p != s}
        masked[s] = masks.mask_update(values, s, pair, plan)
    total = unmasked_sum(sites, sites, masked, [], plan, 1)
    added = (total - clean).view(np.int64).astype(np.float64)
    assert abs(added.var() / sigma ** 2 - 1) < 0.05
    weighted = encoding.decode_sum(total, plan)
    with pytest.raises(AggregateRejected, match="over the bound"):
        check_bound(weighted, 50, n, plan)
    check_bound(weighted, 50, n, plan, noise=noise.sum_noise_bound(sigma, d))


# -- the spec option and its guards ----------------------------------------------------------------

PARAMS = {"w": torch.zeros(24, 16), "b": torch.zeros(16)}


def _spec(**kw: object) -> TrainingSpec:
    plain = TrainingSpec.from_state(PARAMS, sync_frequency=1, min_peers=3, merge_method="mean",
                                    merge_options={"clip_norm": 10.0})
    return dataclasses.replace(plain, **({"max_weight": 100, "secure_aggregation": True} | kw))


def test_the_spec_pins_the_noise_in_its_json_and_hash() -> None:
    plain = _spec()
    noisy = _spec(distributed_noise=DistributedNoise(1.5, 1e-6))
    assert "distributed_noise" not in plain.to_json()  # older specs keep their hash
    assert '"distributed_noise":{"delta":1e-06,"noise_multiplier":1.5}' in noisy.to_json()
    assert noisy.digest != plain.digest  # pinned on chain with the spec's hash
    assert TrainingSpec.from_json(noisy.to_json()) == noisy


def test_noise_without_secure_aggregation_is_refused_at_deploy() -> None:
    with pytest.raises(ConfigError, match="distributed_noise needs secure_aggregation"):
        _spec(secure_aggregation=False, max_weight=None,
              distributed_noise=DistributedNoise(1.0))


def test_noise_the_ring_cannot_hold_is_refused_with_the_weight_to_use() -> None:
    _spec(max_weight=500_000, merge_options={"clip_norm": 10.0})  # fits without noise
    with pytest.raises(ConfigError, match="lower max_weight x clip_norm to at most"):
        _spec(max_weight=500_000, merge_options={"clip_norm": 10.0},
              distributed_noise=DistributedNoise(100.0))


@pytest.mark.parametrize("raw, what", [
    ({"noise_multiplier": 0}, "noise_multiplier must be"),
    ({"noise_multiplier": "1"}, "noise_multiplier must be"),
    ({"noise_multiplier": 1, "delta": 1}, "delta must be"),
    ({"delta": 1e-5}, "needs noise_multiplier"),
    ({"noise_multiplier": 1, "sigma": 2}, "unknown fields"),
    (1.0, "must be an object"),
])
def test_bad_noise_settings_say_what_is_wrong(raw: object, what: str) -> None:
    text = _spec().to_json().replace('"format"', f'"distributed_noise":{_json(raw)},"format"')
    with pytest.raises(ConfigError, match=what):
        TrainingSpec.from_json(text)


def _json(value: object) -> str:
    import json
    return json.dumps(value)


# -- the accountant --------------------------------------------------------------------------------


def _exact(z: float, delta: float) -> float:
    """The Gaussian mechanism's exact epsilon (Balle and Wang 2018, analytic Gaussian)."""
    def gap(e: float) -> float:
        return (stats.norm.cdf(0.5 / z - e * z) - math.exp(e) * stats.norm.cdf(-0.5 / z - e * z)
                - delta)
    return brentq(gap, 0.0, 200.0)


@pytest.mark.parametrize("z", [0.8, 1.0, 2.0, 5.0])
def test_one_round_is_a_gaussian_mechanism_bounded_by_its_exact_epsilon(z: float) -> None:
    """RDP gives an upper bound: never below the exact epsilon, and within 15% of it."""
    exact = _exact(z, 1e-5)
    got = accountant.epsilon([z], 1e-5)
    assert exact <= got <= 1.15 * exact, (z, exact, got)


def test_rounds_compose_as_one_gaussian_of_the_combined_noise() -> None:
    """k rounds of multiplier z are one Gaussian of z / sqrt(k) in RDP (Gaussian composition)."""
    assert accountant.epsilon([4.0] * 16, 1e-5) == pytest.approx(
        accountant.epsilon([1.0], 1e-5), rel=1e-9)
    assert accountant.epsilon([], 1e-5) == 0.0


def test_dropouts_lower_the_noise_and_raise_epsilon() -> None:
    """Noise multiplier z, 5 sites: with every share in, any one participant faces 4 shares;
    each dropout takes one, and epsilon rises round by round; the log line says so."""
    plan, d = ring.plan(ring.MAX_SITES, 100, 10.0), 400
    roster = [f"0x{i:040x}" for i in range(5)]
    z = DistributedNoise(2.0, 1e-5)
    rounds = [noise.round_noise(r, roster, {s: 100 for s in roster[:6 - r]}, z, plan, d, True)
              for r in (1, 2, 3)]
    assert [r.shares for r in rounds] == [5, 4, 3]
    summary = accountant.summarise(rounds, z.delta)
    eps = [r.epsilon for r in summary.rounds]
    assert eps[0] < eps[1] < eps[2]
    # with every share in and the largest weight at max_weight: z sqrt((n-1)/n)
    assert summary.rounds[0].noise_multiplier == pytest.approx(2.0 * math.sqrt(4 / 5))
    assert eps[0] == pytest.approx(accountant.epsilon([2.0 * math.sqrt(4 / 5)], 1e-5))
    assert summary.rounds[0].outsider < eps[0]
    assert "noise shares 4 of 5; 1 dropout(s) took their shares" in summary.rounds[1].line()
    assert summary.total == pytest.approx(accountant.epsilon(
        [r.noise_multiplier() for r in rounds], 1e-5))
    assert summary.total > max(eps)


def test_lighter_rounds_and_rounds_without_a_sum_or_a_starting_model() -> None:
    """A round whose largest weight is below max_weight has a smaller sensitivity (weights are
    public), so a smaller epsilon; a round with 2 adding sites releases nothing (0); a round
    without a starting model is listed as not covered and left out of the total."""
    plan, d = ring.plan(ring.MAX_SITES, 100, 10.0), 400
    roster = [f"0x{i:040x}" for i in range(4)]
    z = DistributedNoise(1.0)
    full = noise.round_noise(2, roster, {s: 100 for s in roster}, z, plan, d, True)
    light = noise.round_noise(3, roster, {s: 50 for s in roster}, z, plan, d, True)
    two = noise.round_noise(4, roster, {roster[0]: 9, roster[1]: 9, roster[2]: 0}, z, plan, d,
                            True)
    first = noise.round_noise(1, roster, {s: 100 for s in roster}, z, plan, d, False)
    s = accountant.summarise([first, full, light, two], z.delta)
    by = {r.round: r for r in s.rounds}
    assert by[3].epsilon < by[2].epsilon
    assert by[4].epsilon == 0.0 and not by[4].summed and two.shares == 3
    assert by[1].epsilon == math.inf and s.uncovered == (1,)
    assert s.total == pytest.approx(accountant.epsilon(
        [full.noise_multiplier(), light.noise_multiplier()], z.delta))
    assert "round(s) 1 summed the parameters whole" in s.line()
    assert s.to_dict()["rounds"][0]["epsilon"] == "inf"


def test_swarmnode_spec_writes_the_noise_and_refuses_it_alone(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from swarmnode.cli import app

    weights = tmp_path / "initial.safetensors"
    save_file({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, str(weights))
    out = tmp_path / "spec.json"
    args = ["spec", str(weights), "--sync-frequency", "4", "--out", str(out), "--min-peers", "3",
            "--clip-norm", "5", "--max-weight", "500", "--noise-multiplier", "0.7"]
    result = CliRunner().invoke(app, [*args, "--secure-aggregation", "--dp-delta", "1e-6"])
    assert result.exit_code == 0, result.output
    assert TrainingSpec.from_json(out.read_text()).distributed_noise == DistributedNoise(0.7,
                                                                                         1e-6)
    out.unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 10 and not out.exists()
    assert "distributed_noise needs secure_aggregation" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--secure-aggregation", "--dp-delta", "2"])
    assert result.exit_code == 10 and "delta must be a number in (0, 1)" in " ".join(
        result.output.split())
