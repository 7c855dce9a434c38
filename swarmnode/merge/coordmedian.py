"""Weighted coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018. https://arxiv.org/abs/1803.01498

For every coordinate the result is the smallest value whose cumulative weight (values sorted
ascending) reaches half the total weight (the lower weighted median; with equal weights and an even
count, the lower of the two middle values). A node with more than half the total weight therefore
decides every coordinate. When every weight is 0, every update counts equally. Non-floating tensors
take the elementwise max (logical or for bool). Floating results keep the input dtype.

Vectorised: the n values of each coordinate are stacked along a new dim, sorted, and the weights'
cumulative sum is searched for the half-way point, all coordinates at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swarmnode.merge._common import check_updates, per_coordinate
from swarmnode.merge.registry import register
from swarmnode.types import StateDict, Update

__all__ = ["coordmedian"]

# Cumulative weights within this relative distance of half the total count as reaching it, so a
# rounding error in the cumulative sum cannot move an exact tie to the next value.
_TIE_TOLERANCE = 1e-12


def _equal_weights_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Lower median of each column when all weights are equal: the ceil(n/2)-th smallest value."""
    n = values.shape[0]
    return torch.kthvalue(values, (n + 1) // 2, dim=0).values


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Lower weighted median of each column of ``values`` [n, k] with ``weights`` [n]."""
    ordered, order = torch.sort(values, dim=0)
    cumulative = weights[order].cumsum(dim=0)  # [n, k] float64
    half = cumulative[-1] * (0.5 * (1 - _TIE_TOLERANCE))
    position = torch.searchsorted(cumulative.T.contiguous(), half[:, None])  # first cum >= half
    position = position.clamp_max(values.shape[0] - 1)
    return ordered.gather(0, position.T).squeeze(0)


@register("coordmedian")
def coordmedian(updates: Sequence[Update]) -> StateDict:
    """Weighted coordinate-wise (lower) median of the updates."""
    items, checked = check_updates(updates, "coordmedian")
    block_rule = _equal_weights_median if checked.equal else _weighted_median
    return per_coordinate(items, checked, block_rule)
