"""Merge rules: pure functions from the nodes' updates to the merged state dict.

One rule per module, registered by name, each citing its paper:

=============== ===================================================== ==========================
name            rule                                                  options
=============== ===================================================== ==========================
``mean``        weighted mean, FedAvg (also :class:`StreamingMean`)    none
``coordmedian`` weighted coordinate-wise (lower) median               none
``geomedian``   weighted geometric median, Weiszfeld / RFA            max_iter, eps, tol
``trimmedmean`` weighted coordinate-wise trimmed mean                 trim
=============== ===================================================== ==========================

A rule is ``rule(updates: Sequence[Update], **options) -> StateDict``. Every rule:

* weighs update i by ``Update.weight`` (local sample count times node weight); weights must be
  finite and >= 0, and when ALL weights are 0 every update counts equally;
* needs the same tensor names, shapes and dtypes in every update (else MergeError naming the tensor
  and the node), finite floating values, and at least one update;
* merges floating tensors in float32 (float64 for float64 tensors) and casts back to the input
  dtype, on the device of the first update;
* does not average non-floating tensors (int buffers such as BatchNorm's ``num_batches_tracked``,
  bool masks): it takes their elementwise max (logical or for bool).

:func:`merge` looks a rule up by name, checks its options, and can clip each update's distance
from a reference model first (:func:`clip_updates`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from swarmnode.errors import MergeError
from swarmnode.merge.clip import clip_updates, update_norm
from swarmnode.merge.coordmedian import coordmedian
from swarmnode.merge.geomedian import geomedian
from swarmnode.merge.mean import StreamingMean, mean
from swarmnode.merge.registry import (
    MergeRule,
    check_options,
    coerce_options,
    get,
    names,
    options_of,
    register,
)
from swarmnode.merge.trimmedmean import trimmedmean
from swarmnode.types import StateDict, Update

__all__ = [
    "MergeRule",
    "StreamingMean",
    "check_options",
    "coerce_options",
    "clip_updates",
    "coordmedian",
    "geomedian",
    "get",
    "mean",
    "merge",
    "names",
    "options_of",
    "register",
    "trimmedmean",
    "update_norm",
]


def merge(
    name: str,
    updates: Iterable[Update],
    *,
    clip_norm: float | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> StateDict:
    """Merge ``updates`` with the rule called ``name`` and its ``options``.

    With ``clip_norm``, each update's delta from ``reference`` (the model the round started from)
    is first scaled to L2 norm <= ``clip_norm``.
    """
    rule = get(name)
    options = coerce_options(name, options)
    items = list(updates)
    if clip_norm is not None:
        if reference is None:
            raise MergeError(
                f"merge '{name}': clip_norm={clip_norm} needs the reference model (the model "
                "the round started from) to measure each update's change; pass reference="
            )
        items = clip_updates(items, reference, clip_norm)
    return rule(items, **options)
