"""A synthetic trainer for benchmarks/round.py: P float32 parameters, one sync per step.

    python benchmarks/round_trainer.py --local-api unix:///.../node.sock --params 1000000 \\
        --nodes 4 --rounds 6 --index 0 --out t0.json

Its training step is cheap (one in-place add per tensor: the benchmark is about the model's size,
not its training). Besides the syncs' timings it reports its own memory: ``rss_train`` (resident
bytes once the model is built and has taken one step: what it needs to train) and ``hwm`` (peak
resident bytes from then to the end, VmHWM reset with ``/proc/self/clear_refs``), and per sync the
seconds spent writing the parameters for the node (``serialise_s``) and loading the merged model
into the module (``load_s``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from swarmnode.callback import SwarmCallback
from swarmnode.transport import serde

TENSOR = 1 << 20  # parameters per tensor (a model is many tensors, as real ones are)


class Synthetic(torch.nn.Module):
    def __init__(self, params: int) -> None:
        super().__init__()
        sizes = [TENSOR] * (params // TENSOR) + ([params % TENSOR] if params % TENSOR else [])
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.ParameterList(
            torch.nn.Parameter(torch.rand(n, generator=gen)) for n in sizes)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class _Timed(serde.Encoded):
    """The callback's payload, timing how long writing it for the node takes."""

    spent = 0.0

    def write_to(self, fd: int) -> None:
        t0 = time.perf_counter()
        super().write_to(fd)
        _Timed.spent += time.perf_counter() - t0


def _instrument(swarm: SwarmCallback) -> dict[str, float]:
    """Time the callback's serialising and loading (benchmark only: wraps its internals)."""
    spent = {"load": 0.0}
    load = swarm._load

    def timed_load(payload: serde.Buffer) -> None:
        t0 = time.perf_counter()
        load(payload)
        spent["load"] += time.perf_counter() - t0

    swarm._payload = lambda: _Timed(swarm._state_cpu())  # type: ignore[method-assign]
    swarm._load = timed_load  # type: ignore[method-assign]
    return spent


def _step(model: Synthetic, index: int) -> None:
    with torch.no_grad():
        for w in model.w:
            w.add_(0.001 * (index + 1))  # a training step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local-api", required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clip-norm", type=float, default=None,
                   help="The swarm's merge option clip_norm (secure aggregation needs it).")
    a = p.parse_args()
    torch.set_num_threads(1)
    model = Synthetic(a.params)
    _step(model, a.index)
    swarm = SwarmCallback(model, sync_frequency=1, min_peers=a.nodes,
                          num_samples=100 + a.index, local_api=a.local_api, timeout=1800.0,
                          merge_options=None if a.clip_norm is None
                          else {"clip_norm": a.clip_norm})
    spent = _instrument(swarm)
    rss_train = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    swarm.on_train_begin()  # round 1
    syncs = []
    for _ in range(a.rounds - 1):
        _step(model, a.index)
        serialised, loaded = _Timed.spent, spent["load"]
        t0 = time.perf_counter()
        swarm.on_batch_end()
        total = time.perf_counter() - t0
        reply = getattr(swarm, "last_reply", {})  # older swarmnode: timings only
        syncs.append({"round": reply.get("round"), "total_s": total,
                      "node_s": reply.get("seconds", 0.0), "stages": reply.get("stages", {}),
                      "leader": reply.get("leader"), "serialise_s": _Timed.spent - serialised,
                      "load_s": spent["load"] - loaded})
    swarm.on_train_end()
    a.out.write_text(json.dumps({"syncs": syncs, "final_digest": swarm.state.final_digest,
                                 "rss_train": rss_train, "hwm": _status("VmHWM"),
                                 "model_bytes": 4 * a.params}))


if __name__ == "__main__":
    main()
