"""The registry, the error messages, clipping and the streaming mean."""

from __future__ import annotations

import math

import pytest
import torch

from swarmnode import merge as merging
from swarmnode.errors import ConfigError, MergeError
from swarmnode.merge import StreamingMean, clip_updates, get, merge, names, register, update_norm
from swarmnode.types import Update

RULES = ["coordmedian", "geomedian", "mean", "trimmedmean"]


def updates_for(n: int, seed: int = 0, weights: list[float] | None = None) -> list[Update]:
    generator = torch.Generator().manual_seed(seed)
    weights = weights if weights is not None else [float(i + 1) for i in range(n)]
    return [
        Update(
            {
                "fc.weight": torch.randn(3, 4, generator=generator),
                "fc.bias": torch.randn(3, generator=generator, dtype=torch.float64),
                "bn.num_batches_tracked": torch.tensor(i, dtype=torch.int64),
            },
            weights[i],
            f"hospital-{i}",
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- registry


def test_registry_lists_the_rules_and_gets_them_by_name() -> None:
    assert names() == RULES
    assert get("mean") is merging.mean
    assert get(" GeoMedian ") is merging.geomedian
    assert merging.options_of(get("trimmedmean")) == {"trim": 0.1}
    assert merging.options_of(get("geomedian")) == {"max_iter": 100, "eps": 1e-6, "tol": 1e-7}


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("meen", "mean"), ("geomedain", "geomedian"), ("trimmed_mean", "trimmedmean")],
)
def test_unknown_rule_says_did_you_mean_and_lists_the_rules(typo: str, meant: str) -> None:
    with pytest.raises(ConfigError) as caught:
        get(typo)
    message = str(caught.value)
    assert f"unknown merge rule '{typo}'" in message
    assert f"Did you mean '{meant}'?" in message
    assert "Known rules: coordmedian, geomedian, mean, trimmedmean" in message
    with pytest.raises(ConfigError, match="Did you mean"):
        merge(typo, updates_for(2))


def test_unknown_rule_without_a_close_name_still_lists_the_rules() -> None:
    with pytest.raises(ConfigError) as caught:
        get("krum")
    assert "Did you mean" not in str(caught.value)
    assert "Known rules: coordmedian, geomedian, mean, trimmedmean" in str(caught.value)


def test_unknown_option_is_named_with_the_rules_options() -> None:
    with pytest.raises(ConfigError, match="no option 'trim_ratio'. Did you mean 'trim'"):
        merge("trimmedmean", updates_for(3), trim_ratio=0.2)
    with pytest.raises(ConfigError, match="'mean' has no option 'trim'.*Its options: none"):
        merge("mean", updates_for(3), trim=0.2)


@pytest.mark.parametrize(
    ("rule", "options", "option"),
    [
        ("trimmedmean", {"trim": 0.5}, "trim"),
        ("trimmedmean", {"trim": -0.1}, "trim"),
        ("trimmedmean", {"trim": math.nan}, "trim"),
        ("geomedian", {"max_iter": 0}, "max_iter"),
        ("geomedian", {"eps": 0.0}, "eps"),
        ("geomedian", {"tol": -1.0}, "tol"),
    ],
)
def test_options_out_of_range_are_config_errors(rule: str, options: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=f"option {option}=.* out of range"):
        merge(rule, updates_for(3), **options)


def test_register_refuses_a_taken_name_and_bad_names() -> None:
    with pytest.raises(ConfigError, match="'mean' is already registered"):
        register("mean")(lambda updates: {})
    with pytest.raises(ConfigError, match="lower-case"):
        register("Mean")


def test_a_registered_rule_is_merged_by_name() -> None:
    def first(updates, *, scale: float = 1.0):
        return {k: v * scale for k, v in updates[0].state.items()}

    register("test-first")(first)
    try:
        merged = merge("test-first", updates_for(2), scale=2.0)
        torch.testing.assert_close(merged["fc.bias"], updates_for(2)[0].state["fc.bias"] * 2)
    finally:
        merging.registry._RULES.pop("test-first")


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("rule", RULES)
def test_empty_list_is_a_merge_error(rule: str) -> None:
    with pytest.raises(MergeError, match="no updates to merge"):
        merge(rule, [])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf, "many"])
def test_bad_weight_names_the_node(rule: str, weight: object) -> None:
    updates = updates_for(3)
    updates[1] = Update(updates[1].state, weight, "hospital-b")  # type: ignore[arg-type]
    with pytest.raises(MergeError, match="node 'hospital-b' has weight"):
        merge(rule, updates)


@pytest.mark.parametrize("rule", RULES)
def test_mismatched_shape_names_the_tensor_and_the_node(rule: str) -> None:
    updates = updates_for(3)
    state = dict(updates[2].state, **{"fc.weight": torch.zeros(4, 3)})
    updates[2] = Update(state, 1.0, "hospital-c")
    with pytest.raises(MergeError) as caught:
        merge(rule, updates)
    message = str(caught.value)
    assert "tensor 'fc.weight' of node 'hospital-c' has shape (4, 3)" in message
    assert "node 'hospital-0' has (3, 4)" in message


@pytest.mark.parametrize("rule", RULES)
def test_mismatched_dtype_and_names_are_merge_errors(rule: str) -> None:
    updates = updates_for(2)
    wrong_dtype = dict(updates[1].state, **{"fc.bias": updates[1].state["fc.bias"].float()})
    with pytest.raises(MergeError, match="'fc.bias' of node 'x' has dtype torch.float32"):
        merge(rule, [updates[0], Update(wrong_dtype, 1.0, "x")])
    missing = {k: v for k, v in updates[1].state.items() if k != "fc.bias"}
    with pytest.raises(MergeError, match="node 'x' has no tensor 'fc.bias'"):
        merge(rule, [updates[0], Update(missing, 1.0, "x")])
    extra = dict(updates[1].state, extra=torch.zeros(1))
    with pytest.raises(MergeError, match="node 'x' has a tensor 'extra'"):
        merge(rule, [updates[0], Update(extra, 1.0, "x")])


@pytest.mark.parametrize("rule", RULES)
def test_non_finite_values_and_duplicate_nodes_are_refused(rule: str) -> None:
    updates = updates_for(3)
    bad = dict(updates[1].state, **{"fc.weight": torch.full((3, 4), math.nan)})
    with pytest.raises(MergeError, match="'fc.weight' of node 'hospital-1' holds NaN or Inf"):
        merge(rule, [updates[0], Update(bad, 1.0, "hospital-1")])
    with pytest.raises(MergeError, match="node 'hospital-0' contributed twice"):
        merge(rule, [updates[0], updates[1], updates[0]])


def test_unnamed_updates_are_named_by_position() -> None:
    updates = [Update({"p": torch.zeros(2)}, 1.0), Update({"p": torch.zeros(3)}, 1.0)]
    with pytest.raises(MergeError, match="'p' of update #1 has shape"):
        merge("mean", updates)
    with pytest.raises(MergeError, match="not a swarmnode.types.Update"):
        merge("mean", [{"p": torch.zeros(2)}])  # type: ignore[list-item]


# ---------------------------------------------------------------- streaming mean


@pytest.mark.parametrize(
    "weights",
    [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 1.0], [2.0, 0.0, 0.0, 0.0], [7.0]],
)
def test_streaming_mean_equals_mean(weights: list[float]) -> None:
    updates = updates_for(len(weights), seed=3, weights=weights)
    stream = StreamingMean()
    for update in updates:
        stream.add(update)
    assert stream.count == len(weights)
    assert stream.nodes == tuple(u.node for u in updates)
    assert stream.total_weight == sum(weights)
    expected = merging.mean(updates)
    got = stream.result()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor)
    # the all-zero case is the plain average, the others the weighted one
    w = torch.tensor(weights, dtype=torch.float64)
    w = w if w.sum() > 0 else torch.ones_like(w)
    stacked = torch.stack([u.state["fc.bias"] for u in updates])
    torch.testing.assert_close(got["fc.bias"], (w[:, None] * stacked).sum(0) / w.sum())


def test_streaming_mean_result_can_be_read_while_adding() -> None:
    updates = updates_for(3)
    stream = StreamingMean()
    stream.add(updates[0])
    torch.testing.assert_close(stream.result()["fc.weight"], updates[0].state["fc.weight"])
    stream.add(updates[1])
    stream.add(updates[2])
    torch.testing.assert_close(stream.result()["fc.weight"], merging.mean(updates)["fc.weight"])


def test_streaming_mean_refuses_a_mismatch_and_keeps_its_state() -> None:
    updates = updates_for(3)
    stream = StreamingMean()
    stream.add(updates[0])
    stream.add(updates[1])
    wrong = Update(dict(updates[2].state, **{"fc.weight": torch.zeros(2, 2)}), 1.0, "late")
    with pytest.raises(MergeError, match="'fc.weight' of node 'late' has shape"):
        stream.add(wrong)
    with pytest.raises(MergeError, match="node 'hospital-1' contributed twice"):
        stream.add(updates[1])
    assert stream.count == 2
    torch.testing.assert_close(stream.result()["fc.bias"], merging.mean(updates[:2])["fc.bias"])
    with pytest.raises(MergeError, match="no updates to merge"):
        StreamingMean().result()


def test_streaming_mean_holds_one_accumulator_per_tensor() -> None:
    stream = StreamingMean()
    for update in updates_for(6):
        stream.add(update)
    assert sorted(stream._acc) == ["bn.num_batches_tracked", "fc.bias", "fc.weight"]
    assert stream._acc["fc.weight"].shape == (3, 4)


# ---------------------------------------------------------------- clipping


def test_clip_scales_large_deltas_to_the_norm_over_all_float_tensors() -> None:
    reference = {"a": torch.zeros(2), "b": torch.ones(1, dtype=torch.float64)}
    big = Update(
        {
            "a": torch.tensor([3.0, 0.0]),
            "b": torch.tensor([5.0], dtype=torch.float64),
            "n": torch.tensor(9),
        },
        1.0,
        "big",
    )  # delta (3, 0 | 4): norm 5
    small = Update(
        {
            "a": torch.tensor([0.3, 0.0]),
            "b": torch.tensor([1.4], dtype=torch.float64),
            "n": torch.tensor(1),
        },
        1.0,
        "small",
    )  # norm 0.5
    assert update_norm(big.state, reference) == pytest.approx(5.0)
    clipped_big, clipped_small = clip_updates([big, small], reference, max_norm=1.0)
    torch.testing.assert_close(clipped_big.state["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped_big.state["b"], torch.tensor([1.8], dtype=torch.float64))
    assert clipped_big.state["b"].dtype == torch.float64
    assert int(clipped_big.state["n"]) == 9
    assert update_norm(clipped_big.state, reference) == pytest.approx(1.0)
    assert clipped_big.node == "big" and clipped_big.weight == 1.0
    assert clipped_small is small  # within the bound: untouched


@pytest.mark.parametrize("rule", RULES)
def test_merge_with_clip_norm_equals_clip_then_rule(rule: str) -> None:
    updates = updates_for(4, seed=5)
    reference = {k: torch.zeros_like(v) for k, v in updates[0].state.items()}
    merged = merge(rule, updates, clip_norm=0.5, reference=reference)
    expected = get(rule)(clip_updates(updates, reference, 0.5))
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor)
    for update in clip_updates(updates, reference, 0.5):
        assert update_norm(update.state, reference) <= 0.5 + 1e-6


def test_clip_errors_name_what_is_wrong() -> None:
    updates = updates_for(2)
    with pytest.raises(MergeError, match="needs the reference model"):
        merge("mean", updates, clip_norm=1.0)
    with pytest.raises(ConfigError, match="clip_norm=0"):
        merge("mean", updates, clip_norm=0, reference=updates[0].state)
    with pytest.raises(MergeError, match="reference model has no tensor 'fc.bias'"):
        clip_updates(updates, {"fc.weight": torch.zeros(3, 4)}, 1.0)
    with pytest.raises(MergeError, match="'fc.weight' of node 'hospital-0' has shape"):
        clip_updates(updates, {"fc.weight": torch.zeros(4), "fc.bias": torch.zeros(3)}, 1.0)
