"""Hand examples (three tensors and an expected tensor), robustness, buffers and dtypes per rule."""

from __future__ import annotations

import math

import pytest
import torch

from swarmnode.merge import coordmedian, geomedian, merge, names, trimmedmean
from swarmnode.merge import mean as weighted_mean
from swarmnode.types import Update


def three(a: list[float], b: list[float], c: list[float], weights=(1.0, 1.0, 1.0)) -> list[Update]:
    return [
        Update({"p": torch.tensor(x, dtype=torch.float64)}, w, node)
        for x, w, node in zip((a, b, c), weights, ("a", "b", "c"), strict=True)
    ]


def assert_merged(got: dict[str, torch.Tensor], expected: list[float]) -> None:
    torch.testing.assert_close(got["p"], torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------- hand examples


def test_mean_by_hand() -> None:
    updates = three([1, 2], [3, 4], [5, 9], weights=(1, 1, 2))
    assert_merged(weighted_mean(updates), [(1 + 3 + 10) / 4, (2 + 4 + 18) / 4])  # [3.5, 6]


def test_mean_all_zero_weights_is_the_plain_average() -> None:
    assert_merged(weighted_mean(three([1, 2], [3, 4], [5, 9], weights=(0, 0, 0))), [3, 5])


def test_mean_zero_weight_update_adds_nothing() -> None:
    assert_merged(weighted_mean(three([1, 2], [3, 4], [500, 900], weights=(1, 3, 0))), [2.5, 3.5])


def test_coordmedian_by_hand() -> None:
    updates = three([1, 10, 5], [2, 20, 5], [100, 0, 7])
    assert_merged(coordmedian(updates), [2, 10, 5])


def test_coordmedian_heavy_node_decides() -> None:
    updates = three([1, 10, 5], [2, 20, 5], [100, 0, 7], weights=(1, 1, 2))  # c holds half
    # c holds exactly half: it decides where its value is the smallest (coordinate 1), elsewhere
    # half the weight is reached before c's value
    assert_merged(coordmedian(updates), [2, 0, 5])
    updates = three([1, 10, 5], [2, 20, 5], [100, 0, 7], weights=(1, 1, 2.5))
    assert_merged(coordmedian(updates), [100, 0, 7])


def test_coordmedian_even_count_takes_the_lower_middle() -> None:
    updates = three([1], [2], [3]) + [
        Update({"p": torch.tensor([4.0], dtype=torch.float64)}, 1, "d")
    ]
    assert_merged(coordmedian(updates), [2])


def test_trimmedmean_by_hand() -> None:
    # weights 1, 1, 3 (total 5), trim 0.2 cuts mass 1 from each end of the sorted values 1, 2, 10:
    # 1 is cut; 2 keeps its whole weight 1; 10 keeps 2 of its 3 -> (2*1 + 10*2) / 3
    updates = three([1, 0], [2, 0], [10, 6], weights=(1, 1, 3))
    assert_merged(trimmedmean(updates, trim=0.2), [22 / 3, 6 * 2 / 3])


def test_trimmedmean_equal_weights_drops_one_from_each_end() -> None:
    updates = three([1, 30], [2, 10], [100, 20])
    assert_merged(trimmedmean(updates, trim=1 / 3), [2, 20])
    assert_merged(trimmedmean(updates, trim=0.0), [103 / 3, 20])  # trim 0 is the mean


def test_geomedian_by_hand_collinear_is_the_middle_point() -> None:
    updates = three([0, 0], [1, 1], [10, 10])
    assert_merged(geomedian(updates, tol=0.0, max_iter=10000, eps=1e-12), [1, 1])


def test_geomedian_by_hand_equilateral_triangle_is_the_centroid() -> None:
    updates = three([0, 0], [2, 0], [1, math.sqrt(3)])
    assert_merged(geomedian(updates, tol=0.0), [1, math.sqrt(3) / 3])


def test_geomedian_by_hand_heavy_point_wins() -> None:
    updates = three([0, 0], [4, 0], [0, 3], weights=(1, 1, 2))  # c holds half of the weight
    assert_merged(geomedian(updates, tol=0.0, max_iter=10000, eps=1e-12), [0, 3])


# ---------------------------------------------------------------- robustness


def honest_and_one_outlier() -> list[Update]:
    generator = torch.Generator().manual_seed(0)
    updates = [
        Update({"p": 1.0 + 0.01 * torch.randn(50, generator=generator)}, 10.0, f"honest-{i}")
        for i in range(5)
    ]
    updates.append(Update({"p": torch.full((50,), 1000.0)}, 10.0, "attacker"))
    return updates


@pytest.mark.parametrize(
    ("rule", "options"),
    [("coordmedian", {}), ("geomedian", {}), ("trimmedmean", {"trim": 0.2})],
)
def test_robust_rules_resist_one_outlier_where_mean_does_not(rule: str, options: dict) -> None:
    updates = honest_and_one_outlier()
    assert float(merge("mean", updates)["p"].min()) > 100  # one attacker drags the mean away
    robust = merge(rule, updates, **options)["p"]
    assert float((robust - 1.0).abs().max()) < 0.05


def test_clipping_tames_the_outlier_for_the_mean() -> None:
    updates = honest_and_one_outlier()
    reference = {"p": torch.ones(50)}
    merged = merge("mean", updates, clip_norm=1.0, reference=reference)["p"]
    assert float((merged - 1.0).abs().max()) < 1.0 / 6 + 0.05  # the attacker moves it <= 1/6


# ---------------------------------------------------------------- buffers and dtypes


def buffered(i: int, weight: float) -> Update:
    return Update(
        {
            "bn.running_mean": torch.full((3,), float(i)),
            "bn.running_var": torch.full((2, 3), float(i + 1)),
            "bn.num_batches_tracked": torch.tensor(10 * i + 5, dtype=torch.int64),
            "mask": torch.tensor([i == 0, i == 1, False]),
            "codes": torch.tensor([i, 7 - i], dtype=torch.int32),
        },
        weight,
        f"n{i}",
    )


@pytest.mark.parametrize("rule", names())
def test_non_floating_tensors_take_the_elementwise_max(rule: str) -> None:
    merged = merge(rule, [buffered(0, 1.0), buffered(2, 5.0), buffered(1, 0.0)])
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    assert int(merged["bn.num_batches_tracked"]) == 25
    assert merged["mask"].tolist() == [True, True, False]
    assert merged["codes"].dtype == torch.int32
    assert merged["codes"].tolist() == [2, 7]
    assert merged["bn.running_mean"].dtype == torch.float32
    assert list(merged) == list(buffered(0, 1.0).state)  # the first update's order


@pytest.mark.parametrize("rule", names())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_low_precision_inputs_keep_their_dtype(rule: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    full = [torch.randn(4, 6, generator=generator) for _ in range(5)]
    weights = [1.0, 2.0, 3.0, 1.0, 2.0]
    low = [
        Update({"w": x.to(dtype)}, w, f"n{i}")
        for i, (x, w) in enumerate(zip(full, weights, strict=True))
    ]
    as_float32 = [Update({"w": u.state["w"].float()}, u.weight, u.node) for u in low]
    got = merge(rule, low)["w"]
    expected = merge(rule, as_float32)["w"]  # the same values, computed and kept in float32
    assert got.dtype == dtype
    if dtype == torch.float64:  # computed in float64: closer than float32 can say
        # geomedian iterates (Weiszfeld) until the step is below tol; in float32 it stops early
        # (float32 cannot resolve tol=1e-7), so its float32 reference is only near the optimum
        tight = rule != "geomedian"
        torch.testing.assert_close(got.float(), expected, rtol=1e-5 if tight else 1e-2,
                                   atol=1e-6 if tight else 1e-3)
    else:  # computed in float32, rounded once at the end
        torch.testing.assert_close(got, expected.to(dtype), rtol=0, atol=0)


def test_empty_tensors_and_empty_states_merge() -> None:
    for rule in names():
        updates = [
            Update({"e": torch.zeros(0, 3)}, 1.0, "a"),
            Update({"e": torch.zeros(0, 3)}, 2.0, "b"),
        ]
        assert merge(rule, updates)["e"].shape == (0, 3)
        assert merge(rule, [Update({}, 1.0, "a"), Update({}, 1.0, "b")]) == {}


def test_a_single_update_is_returned_unchanged() -> None:
    x = torch.randn(7, dtype=torch.float64)
    for rule in names():
        torch.testing.assert_close(merge(rule, [Update({"x": x}, 3.0, "only")])["x"], x)


def test_rules_leave_their_inputs_untouched() -> None:
    updates = [buffered(i, float(i)) for i in range(3)]
    before = [{k: v.clone() for k, v in u.state.items()} for u in updates]
    inputs = {t.untyped_storage().data_ptr() for u in updates for t in u.state.values()}
    for rule in names():
        merged = merge(rule, updates)
        outputs = [t.untyped_storage().data_ptr() for t in merged.values()]
        assert len(set(outputs)) == len(outputs), rule  # no shared storage (safetensors needs it)
        assert not inputs & set(outputs), rule  # and no view of an input
        merged["bn.running_mean"].add_(1.0)
    for update, saved in zip(updates, before, strict=True):
        for name, tensor in saved.items():
            assert torch.equal(update.state[name], tensor)
