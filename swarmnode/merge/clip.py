"""Update-norm clipping before any merge rule (norm bounding).

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019
(https://arxiv.org/abs/1911.07963); the same clipping bounds each node's influence in DP-FedAvg
(McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018).

An update's delta is ``state - reference`` over all its floating tensors jointly, where the
reference is the model every node started the round from (the last merged model). A delta whose L2
norm exceeds ``max_norm`` is scaled down to norm ``max_norm``; smaller ones pass unchanged.
Non-floating tensors (int buffers, bool masks) pass unchanged. Clipped tensors keep their dtype;
the norm is computed in float32 (float64 for float64 tensors).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from swarmnode.errors import MergeError
from swarmnode.merge._common import compute_dtype, option_error, spec_of
from swarmnode.types import StateDict, Update

__all__ = ["clip_updates", "update_norm"]


def _reference_tensor(
    reference: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor, node: str
) -> torch.Tensor:
    ref = reference.get(name)
    if ref is None:
        raise MergeError(
            f"clipping: the reference model has no tensor '{name}', which {node} sends; the "
            "reference must be the model the round started from (the last merged model)"
        )
    if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
        raise MergeError(
            f"clipping: tensor '{name}' of the reference model is not a floating tensor; the "
            "reference must be the model the round started from (the last merged model)"
        )
    if tuple(ref.shape) != tuple(tensor.shape):
        raise MergeError(
            f"clipping: tensor '{name}' of {node} has shape {tuple(tensor.shape)}, but the "
            f"reference model has {tuple(ref.shape)}; every node must train the same model"
        )
    return ref


def update_norm(state: StateDict, reference: Mapping[str, torch.Tensor], node: str = "") -> float:
    """L2 norm of ``state - reference`` over all floating tensors of ``state`` jointly."""
    label = f"node '{node}'" if node else "the update"
    squares = 0.0
    with torch.no_grad():
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                continue
            ref = _reference_tensor(reference, name, tensor, label)
            cdtype = compute_dtype(tensor.dtype)
            delta = tensor.to(cdtype) - ref.to(device=tensor.device, dtype=cdtype)
            squares += float(torch.linalg.vector_norm(delta)) ** 2
    return math.sqrt(squares)


def clip_updates(
    updates: Sequence[Update], reference: Mapping[str, torch.Tensor], max_norm: float
) -> list[Update]:
    """Each update with its delta from ``reference`` scaled to L2 norm <= ``max_norm``."""
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, int | float)
        or not math.isfinite(max_norm)
        or max_norm <= 0
    ):
        raise option_error("clip", "clip_norm", max_norm, "use a positive finite number")
    clipped: list[Update] = []
    for index, update in enumerate(updates):
        spec_of(update, index, "clip")  # types, dtypes, finite values
        norm = update_norm(update.state, reference, update.node)
        if norm <= max_norm:
            clipped.append(update)
            continue
        scale = max_norm / norm
        state: StateDict = {}
        with torch.no_grad():
            for name, tensor in update.state.items():
                if not tensor.is_floating_point():
                    state[name] = tensor
                    continue
                cdtype = compute_dtype(tensor.dtype)
                ref = reference[name].to(device=tensor.device, dtype=cdtype)
                state[name] = (ref + (tensor.to(cdtype) - ref) * scale).to(tensor.dtype)
        clipped.append(dataclasses.replace(update, state=state))
    return clipped
