"""Every merge rule against a plain numpy reference written independently (loops allowed here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import trim_mean

from swarmnode.merge import coordmedian, geomedian, mean, trimmedmean
from swarmnode.types import Update

SHAPES = {"layer.weight": (3, 4), "layer.bias": (5,), "scale": ()}
WEIGHT_KINDS = ["random", "equal", "dominant", "some_zero", "all_zero", "integer"]
COUNTS = [1, 2, 3, 4, 5, 7]


# ---------------------------------------------------------------- numpy references


def ref_weights(weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    return np.ones_like(weights) if not (weights > 0).any() else weights


def ref_mean(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """points [n, m] -> [m]"""
    w = ref_weights(weights)
    total = np.zeros(points.shape[1])
    for i in range(len(w)):
        total += w[i] * points[i]
    return total / w.sum()


def ref_coordmedian(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per coordinate: the smallest value whose cumulative weight reaches half the total."""
    w = ref_weights(weights)
    out = np.empty(points.shape[1])
    for j in range(points.shape[1]):
        pairs = sorted(zip(points[:, j], w, strict=True), key=lambda p: p[0])
        cumulative = 0.0
        for value, weight in pairs:
            cumulative += weight
            if cumulative >= w.sum() / 2:
                out[j] = value
                break
    return out


def ref_coordmedian_replicated(points: np.ndarray, int_weights: np.ndarray) -> np.ndarray:
    """Integer weights: repeat each value by its weight; the lower median of the long list."""
    expanded = np.sort(np.repeat(points, int_weights, axis=0), axis=0)
    return expanded[math.ceil(len(expanded) / 2) - 1]


def ref_trimmedmean(points: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """Per coordinate: integrate the weighted quantile function over mass [trim, 1 - trim]."""
    w = ref_weights(weights)
    total = w.sum()
    low, high = trim * total, (1 - trim) * total
    out = np.empty(points.shape[1])
    for j in range(points.shape[1]):
        acc = kept_total = start = 0.0
        for value, weight in sorted(zip(points[:, j], w, strict=True), key=lambda p: p[0]):
            end = start + weight
            kept = max(0.0, min(end, high) - max(start, low))
            acc += kept * value
            kept_total += kept
            start = end
        out[j] = acc / kept_total
    return out


def ref_trimmedmean_replicated(points: np.ndarray, int_weights: np.ndarray, k: int) -> np.ndarray:
    """Integer weights: repeat each value by its weight, drop the k smallest and k largest."""
    expanded = np.sort(np.repeat(points, int_weights, axis=0), axis=0)
    return expanded[k : len(expanded) - k].mean(axis=0)


def ref_geomedian(points: np.ndarray, weights: np.ndarray, iterations: int = 20000) -> np.ndarray:
    """A data point if it passes Weber's vertex test, else plain Weiszfeld in float64."""
    w = ref_weights(weights)
    for k in range(len(w)):
        pull = np.zeros(points.shape[1])  # the other points' unit pulls on x_k
        for i in range(len(w)):
            distance = np.linalg.norm(points[i] - points[k])
            if i != k and distance > 0:
                pull += w[i] * (points[i] - points[k]) / distance
        if np.linalg.norm(pull) < w[k]:  # x_k is the unique minimiser
            return points[k].copy()
    z = (w[:, None] * points).sum(axis=0) / w.sum()
    for _ in range(iterations):
        d = np.array([np.linalg.norm(p - z) for p in points])
        beta = w / d
        z_new = (beta[:, None] * points).sum(axis=0) / beta.sum()
        if np.linalg.norm(z_new - z) < 1e-15:
            break
        z = z_new
    return z


def objective(points: np.ndarray, weights: np.ndarray, z: np.ndarray) -> float:
    w = ref_weights(weights)
    return float(sum(w[i] * np.linalg.norm(points[i] - z) for i in range(len(w))))


# ---------------------------------------------------------------- random inputs


def make_weights(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.uniform(0.1, 5.0, n)
    if kind == "equal":
        return np.full(n, 3.0)
    if kind == "dominant":
        w = rng.uniform(0.1, 1.0, n)
        w[rng.integers(n)] = 10.0 * n
        return w
    if kind == "some_zero":
        w = rng.uniform(0.1, 5.0, n)
        w[rng.random(n) < 0.4] = 0.0
        w[rng.integers(n)] = 1.5  # at least one positive
        return w
    if kind == "all_zero":
        return np.zeros(n)
    if kind == "integer":
        return rng.integers(1, 6, n).astype(np.float64)
    raise AssertionError(kind)


def make_points(n: int, rng: np.random.Generator, ties: bool) -> dict[str, np.ndarray]:
    """name -> [n, *shape]; with ties, values come from a small set so many coincide."""
    out = {}
    for name, shape in SHAPES.items():
        if ties:
            out[name] = rng.integers(0, 3, (n, *shape)).astype(np.float64)
        else:
            out[name] = rng.normal(0.0, 2.0, (n, *shape))
    return out


def as_updates(
    points: dict[str, np.ndarray], weights: np.ndarray, dtype: torch.dtype
) -> list[Update]:
    n = len(weights)
    return [
        Update(
            {name: torch.tensor(p[i], dtype=dtype) for name, p in points.items()},
            float(weights[i]),
            f"hospital-{i}",
        )
        for i in range(n)
    ]


def flat(points: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: p.reshape(p.shape[0], -1) for name, p in points.items()}


CASES = [
    (n, kind, ties, seed)
    for n in COUNTS
    for kind in WEIGHT_KINDS
    for ties in (False, True)
    for seed in (0, 1)
]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    )


# ---------------------------------------------------------------- the comparisons


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "kind", "ties", "seed"), CASES)
def test_coordinate_rules_match_numpy(
    n: int, kind: str, ties: bool, seed: int, dtype: torch.dtype
) -> None:
    rng = np.random.default_rng([n, seed, int(ties), WEIGHT_KINDS.index(kind)])
    points = make_points(n, rng, ties)
    if dtype == torch.float32:
        points = {k: v.astype(np.float32).astype(np.float64) for k, v in points.items()}
    weights = make_weights(kind, n, rng)
    updates = as_updates(points, weights, dtype)
    trim = 0.2
    results = {
        "mean": (mean(updates), ref_mean),
        "coordmedian": (coordmedian(updates), ref_coordmedian),
        "trimmedmean": (
            trimmedmean(updates, trim=trim),
            lambda p, w: ref_trimmedmean(p, w, trim),
        ),
    }
    for rule, (merged, reference) in results.items():
        assert list(merged) == list(SHAPES), rule
        for name, p in flat(points).items():
            got = merged[name]
            assert got.dtype == dtype and tuple(got.shape) == SHAPES[name], (rule, name)
            expected = reference(p, weights).reshape(SHAPES[name])
            np.testing.assert_allclose(got.numpy(), expected, **tolerance(dtype), err_msg=rule)


@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_weights_match_replicated_lists(n: int, seed: int) -> None:
    """Integer weight k means "this value k times": median and trimmed mean of the long list."""
    rng = np.random.default_rng([n, seed, 7])
    points = make_points(n, rng, ties=bool(seed % 2))
    weights = rng.integers(1, 6, n)
    total = int(weights.sum())
    k = int(rng.integers(0, (total - 1) // 2 + 1))  # drop k from each end: trim = k / total
    updates = as_updates(points, weights.astype(np.float64), torch.float64)
    median = coordmedian(updates)
    trimmed = trimmedmean(updates, trim=k / total)
    for name, p in flat(points).items():
        np.testing.assert_allclose(
            median[name].numpy().reshape(-1), ref_coordmedian_replicated(p, weights)
        )
        np.testing.assert_allclose(
            trimmed[name].numpy().reshape(-1),
            ref_trimmedmean_replicated(p, weights, k),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("n", [4, 5, 10])
def test_equal_weights_trimmedmean_is_scipy_trim_mean(n: int) -> None:
    rng = np.random.default_rng(n)
    points = make_points(n, rng, ties=False)
    trim = 2 / n if n >= 5 else 1 / n  # trim * n whole: scipy drops exactly that many
    merged = trimmedmean(as_updates(points, np.ones(n), torch.float64), trim=trim)
    for name, p in flat(points).items():
        expected = trim_mean(p, trim, axis=0)
        np.testing.assert_allclose(merged[name].numpy().reshape(-1), expected, rtol=1e-12)


@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_geomedian_matches_numpy_weiszfeld(n: int, kind: str) -> None:
    rng = np.random.default_rng([n, WEIGHT_KINDS.index(kind), 3])
    points = make_points(n, rng, ties=False)
    weights = make_weights(kind, n, rng)
    updates = as_updates(points, weights, torch.float64)
    merged = geomedian(updates, max_iter=20000, eps=1e-12, tol=0.0)
    joint = np.concatenate(list(flat(points).values()), axis=1)  # [n, d], the rule's order
    got = np.concatenate([merged[name].numpy().reshape(-1) for name in SHAPES])
    expected = ref_geomedian(joint, weights)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    for name in SHAPES:
        assert merged[name].dtype == torch.float64 and tuple(merged[name].shape) == SHAPES[name]


@pytest.mark.parametrize("n", [3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_geomedian_defaults_minimise_the_weighted_distance(n: int, seed: int) -> None:
    """With the default options (float32) the objective is within 1e-5 of scipy's optimum."""
    rng = np.random.default_rng([n, seed, 11])
    points = make_points(n, rng, ties=False)
    points = {k: v.astype(np.float32).astype(np.float64) for k, v in points.items()}
    weights = make_weights("random", n, rng)
    merged = geomedian(as_updates(points, weights, torch.float32))
    joint = np.concatenate(list(flat(points).values()), axis=1)
    got = np.concatenate([merged[name].numpy().reshape(-1) for name in SHAPES]).astype(np.float64)
    optimum = minimize(
        lambda z: objective(joint, weights, z),
        joint.mean(axis=0),
        method="Powell",
        options={"xtol": 1e-10, "ftol": 1e-12, "maxiter": 200000},
    )
    best = min(optimum.fun, objective(joint, weights, ref_geomedian(joint, weights)))
    assert objective(joint, weights, got) <= best * (1 + 1e-5)
    assert objective(joint, weights, got) < objective(joint, weights, ref_mean(joint, weights))


def test_geomedian_dominant_weight_is_that_point() -> None:
    """A point holding at least half the weight is the geometric median (Weber's majority rule)."""
    rng = np.random.default_rng(5)
    points = make_points(5, rng, ties=False)
    weights = np.array([1.0, 1.0, 4.5, 1.0, 1.0])
    merged = geomedian(as_updates(points, weights, torch.float64), tol=0.0, max_iter=5000)
    for name, p in points.items():
        np.testing.assert_allclose(merged[name].numpy(), p[2], atol=1e-6)


def test_geomedian_in_float32_agrees_with_float64() -> None:
    """Float32 points must not stop the iteration early on rounding noise (it sums in float64)."""
    rng = np.random.default_rng(9)
    points = {"w": rng.normal(0, 1, (6, 257, 129)), "b": rng.normal(0, 1, (6, 33))}
    points = {k: v.astype(np.float32).astype(np.float64) for k, v in points.items()}
    weights = np.array([1.0, 5.0, 2.0, 0.0, 3.0, 1.0])
    single = geomedian(as_updates(points, weights, torch.float32))
    double = geomedian(as_updates(points, weights, torch.float64))
    for name in points:
        np.testing.assert_allclose(single[name].double().numpy(), double[name].numpy(), atol=1e-5)
