"""The demo trainer, turned hostile: every floating parameter it sends is +-1e37 (finite, but
enough, times its sample-count weight, to overflow a float32 sum to Inf)."""

from __future__ import annotations

import sys

import torch

from swarmnode import callback
from swarmnode.demo.trainer import main

_honest = callback.SwarmCallback._state_cpu


def _poisoned(self: callback.SwarmCallback) -> dict[str, torch.Tensor]:
    return {k: torch.where(v >= 0, 1e37, -1e37).to(v.dtype) if v.is_floating_point() else v
            for k, v in _honest(self).items()}


callback.SwarmCallback._state_cpu = _poisoned  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
