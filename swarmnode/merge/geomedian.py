"""Weighted geometric median by the smoothed Weiszfeld algorithm (robust federated aggregation).

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions on
Signal Processing 70, 2022 (RFA). https://arxiv.org/abs/1912.13445
Weiszfeld, "Sur le point pour lequel la somme des distances de n points donnés est minimum",
Tohoku Mathematical Journal 43, 1937.

Each update's floating tensors are flattened and joined into one vector x_i; the result is the
point z that minimises ``sum(w_i * ||z - x_i||)``, found from the weighted mean by Weiszfeld's
iteration ``z <- sum(b_i x_i) / sum(b_i)`` with ``b_i = w_i / max(eps, ||z - x_i||)``. It stops
after ``max_iter`` iterations or when the objective improves by less than ``tol`` (relative). A node
with more than half the total weight is the median itself. When every weight is 0, every update
counts equally.

Options: ``max_iter`` (default 100), ``eps`` (default 1e-6: the smoothing floor on distances, so a
point that coincides with the estimate does not divide by zero), ``tol`` (default 1e-7: stop once an
iteration improves the objective by less than this fraction).

Non-floating tensors take the elementwise max (logical or for bool). Floating results keep their
dtype; the points are held in float32, or float64 when any floating tensor is float64, and the
distances are summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from swarmnode.merge._common import check_updates, merge_nonfloat, option_error
from swarmnode.merge.registry import register
from swarmnode.types import StateDict, Update

__all__ = ["geomedian", "weiszfeld"]


def weiszfeld(
    points: torch.Tensor, weights: torch.Tensor, *, max_iter: int, eps: float, tol: float
) -> torch.Tensor:
    """Weighted geometric median of the rows of ``points`` [n, d]; ``weights`` [n] sum to > 0.

    Distances and the objective are summed in float64 whatever the points' dtype: in float32 their
    rounding noise would stop the iteration early, at a point that depends on the device.
    """
    alpha = weights.to(torch.float64) / weights.to(torch.float64).sum()

    def distances_to(median: torch.Tensor) -> torch.Tensor:  # one row at a time: less memory
        return torch.stack(
            [torch.linalg.vector_norm(row - median, dtype=torch.float64) for row in points]
        )

    median = alpha.to(points.dtype) @ points
    distances = distances_to(median)
    objective = float(alpha @ distances)
    for _ in range(max_iter):
        beta = alpha / distances.clamp_min(eps)
        median = (beta / beta.sum()).to(points.dtype) @ points
        distances = distances_to(median)
        new_objective = float(alpha @ distances)
        converged = objective - new_objective <= tol * objective
        objective = new_objective
        if converged:
            break
    return median


def _check_options(max_iter: int, eps: float, tol: float) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise option_error("geomedian", "max_iter", max_iter, "use a whole number >= 1")
    if not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
        raise option_error("geomedian", "eps", eps, "use a small positive number such as 1e-6")
    if not isinstance(tol, int | float) or not math.isfinite(tol) or tol < 0:
        raise option_error("geomedian", "tol", tol, "use a number >= 0 such as 1e-7")


@register("geomedian")
def geomedian(
    updates: Sequence[Update], *, max_iter: int = 100, eps: float = 1e-6, tol: float = 1e-7
) -> StateDict:
    """Weighted geometric median of the updates' joined floating tensors (Weiszfeld)."""
    _check_options(max_iter, eps, tol)
    items, checked = check_updates(updates, "geomedian")
    floats = {n: s for n, s in checked.specs.items() if s.dtype.is_floating_point}
    dtype = (
        torch.float64 if any(s.dtype == torch.float64 for s in floats.values()) else torch.float32
    )
    out: StateDict = {}
    with torch.no_grad():
        if floats:
            total = sum(math.prod(spec.shape) for spec in floats.values())
            points = torch.empty(len(items), total, dtype=dtype, device=checked.device)
            for i, update in enumerate(items):  # filled in place: no stacked copy per tensor
                offset = 0
                for name, spec in floats.items():
                    size = math.prod(spec.shape)
                    points[i, offset : offset + size] = update.state[name].reshape(-1)
                    offset += size
            median = weiszfeld(
                points, checked.weights.to(checked.device), max_iter=max_iter, eps=eps, tol=tol
            )
            del points
            offset = 0
            for name, spec in floats.items():
                size = math.prod(spec.shape)
                part = median[offset : offset + size]
                # a copy: outputs must not share storage (safetensors refuses shared tensors)
                out[name] = part.reshape(spec.shape).to(spec.dtype, copy=True)
                offset += size
        for name, spec in checked.specs.items():
            if not spec.dtype.is_floating_point:
                out[name] = merge_nonfloat(items, name, checked.device)
    return {name: out[name] for name in checked.specs}
