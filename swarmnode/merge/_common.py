"""Checks and helpers shared by the merge rules (not public: import the rules from swarmnode.merge).

What every rule agrees on:

* weights are finite and >= 0; when ALL weights are 0 every update counts equally;
* every update has the same tensor names, shapes and dtypes, with finite floating values;
* floating tensors are merged in float32 (float64 for float64 inputs) and cast back to their dtype;
* non-floating tensors (int buffers such as BatchNorm's ``num_batches_tracked``, bool masks) are not
  averaged: the result is their elementwise max (logical or for bool);
* results live on the device of the first update's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from swarmnode.errors import ConfigError, MergeError
from swarmnode.types import StateDict, Update

# A stacked [n, m] tensor is processed in column blocks of about this many elements, so the sort
# indices and weight tables of a rule stay bounded for very large tensors.
BLOCK_ELEMENTS = 1 << 24


def who(update: Update, index: int) -> str:
    """How error messages name an update: its node, or its position when it has no node name."""
    return f"node '{update.node}'" if update.node else f"update #{index}"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating tensor is merged in: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one named tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def check_type(update: Update, index: int, rule: str) -> None:
    """MergeError unless ``update`` is an :class:`Update`."""
    if not isinstance(update, Update):
        raise MergeError(
            f"merge '{rule}': item #{index} is a {type(update).__name__}, not a "
            "swarmnode.types.Update; wrap each node's state dict as Update(state, weight, node)"
        )


def check_weight(update: Update, index: int, rule: str) -> float:
    """The update's weight as a float; MergeError unless it is finite and >= 0."""
    check_type(update, index, rule)
    try:
        weight = float(update.weight)
    except (TypeError, ValueError):
        raise MergeError(
            f"merge '{rule}': {who(update, index)} has weight {update.weight!r}, which is not a "
            "number; the weight is the local sample count times the node weight"
        ) from None
    if math.isnan(weight) or math.isinf(weight) or weight < 0:
        raise MergeError(
            f"merge '{rule}': {who(update, index)} has weight {weight!r}; weights must be finite "
            "and >= 0 (local sample count times node weight): check that node's node_weight "
            "setting and sample count"
        )
    return weight


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a non-empty floating tensor is finite: its smallest and largest
    are (min and max propagate NaN, and an Inf is one of them). One pass and no temporary: a
    tenth of ``isfinite(t).all()``'s CPU time."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def spec_of(update: Update, index: int, rule: str) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of an update's tensors; MergeError on values no rule can merge."""
    check_type(update, index, rule)
    if not isinstance(update.state, Mapping):
        raise MergeError(
            f"merge '{rule}': {who(update, index)} has a state of type "
            f"{type(update.state).__name__}; pass a dict of tensor name -> torch.Tensor"
        )
    specs: dict[str, TensorSpec] = {}
    for name, tensor in update.state.items():
        if not isinstance(tensor, torch.Tensor):
            raise MergeError(
                f"merge '{rule}': tensor '{name}' of {who(update, index)} is a "
                f"{type(tensor).__name__}, not a torch.Tensor"
            )
        if tensor.is_complex():
            raise MergeError(
                f"merge '{rule}': tensor '{name}' of {who(update, index)} is complex "
                f"({tensor.dtype}); merge rules support real floating, integer and bool tensors"
            )
        if tensor.is_floating_point() and tensor.numel() and not _finite(tensor):
            raise MergeError(
                f"merge '{rule}': tensor '{name}' of {who(update, index)} holds NaN or Inf; "
                "that node's training diverged: lower its learning rate or leave it out"
            )
        specs[name] = TensorSpec(tuple(tensor.shape), tensor.dtype)
    return specs


def check_same(
    specs: Mapping[str, TensorSpec],
    expected: Mapping[str, TensorSpec],
    update: Update,
    index: int,
    first: str,
    rule: str,
) -> None:
    """MergeError naming the tensor and node unless ``specs`` equals ``expected`` (``first``'s)."""
    node = who(update, index)
    hint = "every node must train the same model (same architecture, same parameter dtypes)"
    for name in expected:
        if name not in specs:
            raise MergeError(
                f"merge '{rule}': {node} has no tensor '{name}', which {first} has; {hint}"
            )
    for name in specs:
        if name not in expected:
            raise MergeError(
                f"merge '{rule}': {node} has a tensor '{name}', which {first} lacks; {hint}"
            )
    for name, spec in expected.items():
        got = specs[name]
        if got.shape != spec.shape:
            raise MergeError(
                f"merge '{rule}': tensor '{name}' of {node} has shape {got.shape}, but {first} "
                f"has {spec.shape}; {hint}"
            )
        if got.dtype != spec.dtype:
            raise MergeError(
                f"merge '{rule}': tensor '{name}' of {node} has dtype {got.dtype}, but {first} "
                f"has {spec.dtype}; {hint}"
            )


def check_new_node(update: Update, seen: set[str], rule: str) -> None:
    """MergeError when a named node contributes twice to one merge (it would count double)."""
    if update.node and update.node in seen:
        raise MergeError(
            f"merge '{rule}': node '{update.node}' contributed twice to this merge; each node "
            "sends one update per round"
        )
    if update.node:
        seen.add(update.node)


@dataclass(frozen=True)
class Checked:
    """What a batch of updates was found to hold."""

    specs: dict[str, TensorSpec]  # the first update's tensors, in its order
    weights: torch.Tensor  # float64 [n]; all ones when every weight was 0
    equal: bool  # every weight is the same (rules may take a faster path)
    device: torch.device


def check_updates(updates: Iterable[Update], rule: str) -> tuple[list[Update], Checked]:
    """Validate a whole batch of updates; MergeError naming the node (and tensor) otherwise."""
    items = list(updates)
    if not items:
        raise MergeError(
            f"merge '{rule}': no updates to merge; at least one node must contribute "
            "(check min_peers and that the participants reached the leader)"
        )
    weights = [check_weight(u, i, rule) for i, u in enumerate(items)]
    expected = spec_of(items[0], 0, rule)
    seen: set[str] = set()
    check_new_node(items[0], seen, rule)
    first = who(items[0], 0)
    for index, update in enumerate(items[1:], start=1):
        check_same(spec_of(update, index, rule), expected, update, index, first, rule)
        check_new_node(update, seen, rule)
    w = torch.tensor(weights, dtype=torch.float64)
    if not bool((w > 0).any()):
        w = torch.ones_like(w)
    tensors = list(items[0].state.values())
    device = tensors[0].device if tensors else torch.device("cpu")
    return items, Checked(expected, w, bool((w == w[0]).all()), device)


def stack(
    updates: list[Update], name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Tensor ``name`` of every update, flattened and stacked: shape [n, numel]."""
    return torch.stack([u.state[name].to(device=device, dtype=dtype).reshape(-1) for u in updates])


def merge_nonfloat(updates: list[Update], name: str, device: torch.device) -> torch.Tensor:
    """Elementwise max of a non-floating tensor (logical or for bool)."""
    stacked = torch.stack([u.state[name].to(device) for u in updates])
    return stacked.any(dim=0) if stacked.dtype == torch.bool else stacked.amax(dim=0)


def column_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of the rows of ``values`` [n, k], added one row after another: every column is
    summed in the same order whatever its position, so a column's result does not depend on how
    many columns share the block (a sharded merge, topology 'sharded', merges slices of a tensor
    and must give the whole merge's bytes; ``sum(0)`` and ``@`` pick their summation order by
    shape)."""
    acc = values[0].clone()
    for row in values[1:]:
        acc += row
    return acc


def per_coordinate(
    updates: list[Update],
    checked: Checked,
    block_rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> StateDict:
    """Merge every tensor coordinate by coordinate.

    ``block_rule(values, weights)`` maps a [n, k] block of one tensor (compute dtype) and the
    float64 weights [n] (on the same device) to the k merged values.
    """
    n = len(updates)
    weights = checked.weights.to(checked.device)
    out: StateDict = {}
    with torch.no_grad():
        for name, spec in checked.specs.items():
            if not spec.dtype.is_floating_point:
                out[name] = merge_nonfloat(updates, name, checked.device)
                continue
            values = stack(updates, name, compute_dtype(spec.dtype), checked.device)
            step = max(1, BLOCK_ELEMENTS // n)
            blocks = [
                block_rule(values[:, i : i + step], weights)
                for i in range(0, values.shape[1], step)
            ]
            merged = torch.cat(blocks) if blocks else values.new_empty(0)
            out[name] = merged.reshape(spec.shape).to(spec.dtype)
    return out


def option_error(rule: str, option: str, value: object, allowed: str) -> ConfigError:
    """The ConfigError for a merge option out of range."""
    return ConfigError(
        f"merge rule '{rule}': option {option}={value!r} is out of range; {allowed} "
        "(check merge_options in the training settings)"
    )
