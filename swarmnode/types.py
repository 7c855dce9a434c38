"""Values shared across packages. Frozen dataclasses: they travel between layers unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StateDict", "Update"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """One node's contribution to a merge: its parameters and its weight.

    ``weight`` is the node's local sample count times its node weight; 0 means "take part, add
    nothing" (the ``inactive`` end-of-training policy).
    """

    state: StateDict
    weight: float
    node: str = ""
