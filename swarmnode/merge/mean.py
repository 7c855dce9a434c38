"""Weighted mean of the nodes' parameters: federated averaging (FedAvg).

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017. https://arxiv.org/abs/1602.05629

``mean(updates)`` returns ``sum(w_i * x_i) / sum(w_i)`` per floating tensor. When every weight is 0,
every update counts equally (plain average). Non-floating tensors (int buffers, bool masks) take
the elementwise max (logical or). Floating results keep the input dtype; the sums run in float32
(float64 for float64 tensors).

The leader must not hold every participant's model at once: :class:`StreamingMean` folds updates
in as they arrive and keeps one accumulator per tensor, so a merge needs two models in memory (the
accumulator and the update being added). ``mean`` is that fold over a list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swarmnode.errors import MergeError
from swarmnode.merge._common import (
    TensorSpec,
    check_new_node,
    check_same,
    check_weight,
    compute_dtype,
    spec_of,
    who,
)
from swarmnode.merge.registry import register
from swarmnode.types import StateDict, Update

__all__ = ["StreamingMean", "mean"]


class StreamingMean:
    """Weighted mean of updates added one at a time; ``result()`` equals ``mean()`` of them all.

    Memory: one accumulator per tensor. While every weight seen so far is 0 the accumulator holds
    the unweighted sum (the all-zero-weights fallback); the first positive weight replaces it with
    the weighted sum, since zero-weight updates add nothing to a weighted mean.
    """

    def __init__(self, rule: str = "mean", into: dict[str, torch.Tensor] | None = None) -> None:
        """``into``: tensors to accumulate in instead of fresh memory (views of the output
        buffer, so the merged model is computed where it is sent from); used for a name when its
        dtype is the accumulator's (float32, float64, integers, bool) and its shape matches."""
        self._rule = rule
        self._into = dict(into or {})
        self._specs: dict[str, TensorSpec] | None = None
        self._first = ""
        self._device = torch.device("cpu")
        self._acc: StateDict = {}
        self._total = 0.0
        self._nodes: list[str] = []
        self._seen: set[str] = set()
        self._checked: dict[str, TensorSpec] | None = None  # the first update :meth:`check` saw
        self._checked_first = ""

    @property
    def count(self) -> int:
        """How many updates were added."""
        return len(self._nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes whose updates were added, in order of arrival."""
        return tuple(self._nodes)

    @property
    def total_weight(self) -> float:
        """The sum of the weights added so far."""
        return self._total

    def check(self, update: Update, index: int | None = None) -> None:
        """MergeError if :meth:`add` would refuse ``update`` (bad weight, or tensors that do not
        match the first update checked or added); changes nothing. A caller that folds updates
        later, in its own order, checks each one as it arrives."""
        index = self.count if index is None else index
        check_weight(update, index, self._rule)
        specs = spec_of(update, index, self._rule)
        reference = self._specs if self._specs is not None else self._checked
        if reference is None:
            self._checked, self._checked_first = specs, who(update, index)
        else:
            first = self._first if self._specs is not None else self._checked_first
            check_same(specs, reference, update, index, first, self._rule)

    def add(self, update: Update) -> None:
        """Fold one update in; MergeError (state unchanged) if it does not match the first one."""
        index = self.count
        weight = check_weight(update, index, self._rule)
        specs = spec_of(update, index, self._rule)
        if self._specs is not None:
            check_same(specs, self._specs, update, index, self._first, self._rule)
        check_new_node(update, self._seen, self._rule)
        if self._specs is None:
            self._specs = specs
            self._first = who(update, index)
            tensors = list(update.state.values())
            self._device = tensors[0].device if tensors else torch.device("cpu")
        restart = weight > 0 and self._total == 0  # drop the unweighted fallback sum
        with torch.no_grad():
            for name, spec in specs.items():
                x = update.state[name].to(self._device)
                if not spec.dtype.is_floating_point:
                    if index == 0:
                        self._acc[name] = self._fresh(name, x, x.dtype)
                    elif spec.dtype == torch.bool:
                        torch.logical_or(self._acc[name], x, out=self._acc[name])
                    else:
                        torch.maximum(self._acc[name], x, out=self._acc[name])
                    continue
                cdtype = compute_dtype(spec.dtype)
                if index == 0 or restart:
                    acc = self._fresh(name, x, cdtype)
                    if weight > 0:
                        acc.mul_(weight)
                    self._acc[name] = acc
                elif weight > 0:
                    self._acc[name].add_(x.to(cdtype), alpha=weight)
                elif self._total == 0:
                    self._acc[name].add_(x.to(cdtype))
        self._total += weight
        self._nodes.append(update.node)

    def _fresh(self, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A copy of ``x`` as ``dtype``: in the caller's tensor for ``name`` when it fits."""
        into = self._into.get(name)
        if (into is not None and into.dtype == dtype and into.shape == x.shape
                and into.device == x.device):
            into.copy_(x)
            return into
        return x.to(dtype, copy=True)

    def result_in_place(self) -> StateDict:
        """Like :meth:`result`, computed inside the accumulator where the dtype allows (a model's
        worth of memory less at the leader); the accumulator is spent: add nothing afterwards."""
        if self._specs is None:
            return self.result()
        divisor = self._total if self._total > 0 else float(self.count)
        out: StateDict = {}
        with torch.no_grad():
            for name, spec in self._specs.items():
                acc = self._acc.pop(name)
                if spec.dtype.is_floating_point:
                    acc.div_(divisor)
                    out[name] = acc if acc.dtype == spec.dtype else acc.to(spec.dtype)
                else:
                    out[name] = acc
        self._specs = None
        return out

    def result(self) -> StateDict:
        """The weighted mean of everything added so far (the accumulator is left as it is)."""
        if self._specs is None:
            raise MergeError(
                f"merge '{self._rule}': no updates to merge; at least one node must contribute "
                "(check min_peers and that the participants reached the leader)"
            )
        divisor = self._total if self._total > 0 else float(self.count)
        out: StateDict = {}
        with torch.no_grad():
            for name, spec in self._specs.items():
                acc = self._acc[name]
                if spec.dtype.is_floating_point:
                    out[name] = (acc / divisor).to(spec.dtype)
                else:
                    out[name] = acc.clone()
        return out


@register("mean")
def mean(updates: Sequence[Update]) -> StateDict:
    """Weighted mean of the updates (equal weights when all weights are 0)."""
    acc = StreamingMean("mean")
    for update in updates:
        acc.add(update)
    return acc.result()
