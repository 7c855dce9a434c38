"""Values shared across packages. Frozen dataclasses: they travel between layers unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["StateDict", "Update"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """One node's contribution to a merge: its parameters and its weight.

    ``weight`` is the node's local sample count times its node weight; 0 means "take part, add
    nothing" (the ``inactive`` end-of-training policy). ``evict``, when set, drops the bytes
    behind ``state`` from resident memory (they stay readable): a merge calls it once it is done
    reading the update for now (checked and set aside, or folded in).
    """

    state: StateDict
    weight: float
    node: str = ""
    evict: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def drop_resident(self) -> None:
        if self.evict is not None:
            self.evict()
