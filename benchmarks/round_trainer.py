"""A synthetic trainer for benchmarks/round.py: P float32 parameters, one sync per step.

    python benchmarks/round_trainer.py --local-api unix:///.../node.sock --params 1000000 \\
        --nodes 4 --rounds 6 --index 0 --out t0.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from swarmnode.callback import SwarmCallback

TENSOR = 1 << 20  # parameters per tensor (a model is many tensors, as real ones are)


class Synthetic(torch.nn.Module):
    def __init__(self, params: int) -> None:
        super().__init__()
        sizes = [TENSOR] * (params // TENSOR) + ([params % TENSOR] if params % TENSOR else [])
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.ParameterList(
            torch.nn.Parameter(torch.rand(n, generator=gen)) for n in sizes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local-api", required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = Synthetic(a.params)
    swarm = SwarmCallback(model, sync_frequency=1, min_peers=a.nodes,
                          num_samples=100 + a.index, local_api=a.local_api, timeout=600.0)
    swarm.on_train_begin()  # round 1
    syncs = []
    for _ in range(a.rounds - 1):
        with torch.no_grad():
            for w in model.w:
                w.add_(0.001 * (a.index + 1))  # a training step
        t0 = time.perf_counter()
        swarm.on_batch_end()
        total = time.perf_counter() - t0
        reply = getattr(swarm, "last_reply", {})  # older swarmnode: timings only
        syncs.append({"round": reply.get("round"), "total_s": total,
                      "node_s": reply.get("seconds", 0.0), "stages": reply.get("stages", {}),
                      "leader": reply.get("leader")})
    swarm.on_train_end()
    a.out.write_text(json.dumps({"syncs": syncs, "final_digest": swarm.state.final_digest}))


if __name__ == "__main__":
    main()
