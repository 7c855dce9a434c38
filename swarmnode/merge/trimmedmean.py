"""Weighted coordinate-wise trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018. https://arxiv.org/abs/1803.01498

Option ``trim`` (default 0.1, 0 <= trim < 0.5): for every coordinate the values are sorted, weight
mass ``trim * total`` is cut from each end, and the rest is averaged by weight. Each value covers
the interval of cumulative weight ``[c_before, c_after]``; the part of it inside
``[trim * total, (1 - trim) * total]`` is its weight in the average, so a value on the boundary
counts in part. With equal weights and ``trim * n`` a whole number k this is the classic trimmed
mean that drops the k smallest and k largest values; ``trim=0`` is the weighted mean.

When every weight is 0, every update counts equally. Non-floating tensors take the elementwise max
(logical or for bool). Floating results keep the input dtype. Vectorised: stack, sort, cumulative
weights, all coordinates at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from swarmnode.merge._common import check_updates, column_sum, option_error, per_coordinate
from swarmnode.merge.registry import register
from swarmnode.types import StateDict, Update

__all__ = ["trimmedmean"]


def _kept(cumulative: torch.Tensor, weights: torch.Tensor, trim: float) -> torch.Tensor:
    """Weight each sorted value keeps after cutting mass ``trim * total`` from both ends."""
    total = cumulative[-1]
    low, high = total * trim, total * (1 - trim)
    return (torch.minimum(cumulative, high) - torch.maximum(cumulative - weights, low)).clamp_min(0)


@register("trimmedmean")
def trimmedmean(updates: Sequence[Update], *, trim: float = 0.1) -> StateDict:
    """Weighted coordinate-wise trimmed mean, cutting weight mass ``trim`` from each end."""
    if not isinstance(trim, int | float) or math.isnan(trim) or not 0 <= trim < 0.5:
        raise option_error("trimmedmean", "trim", trim, "use a fraction with 0 <= trim < 0.5")
    items, checked = check_updates(updates, "trimmedmean")

    if checked.equal:
        # Sorting does not reorder equal weights: one kept-weight vector serves every column.
        w = checked.weights.to(checked.device)
        kept_once = _kept(w.cumsum(0), w, trim)

        def block_rule(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            ordered = torch.sort(values, dim=0).values
            kept = kept_once.to(values.dtype)
            return column_sum(kept[:, None] * ordered) / kept.sum()

    else:

        def block_rule(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            ordered, order = torch.sort(values, dim=0)
            sorted_weights = weights[order]
            kept = _kept(sorted_weights.cumsum(0), sorted_weights, trim).to(values.dtype)
            return column_sum(kept * ordered) / column_sum(kept)

    return per_coordinate(items, checked, block_rule)
