"""What distributed noise costs in accuracy on the demo's data, and the epsilon it buys.

    .venv/bin/python benchmarks/distributed_noise.py [--task breast-cancer] [--z 0 0.3 1]

The demo's hospitals (the task's default split) train its model with its settings and merge
every ``sync_frequency`` batches by secure aggregation's arithmetic, run with the product's own
functions: each site's change from the round's starting model clipped, weighted and encoded
(privacy.encoding), plus its discrete Gaussian share (privacy.noise, n = the number of sites),
summed in the ring and decoded to the weighted mean. The masks are left out: they cancel exactly
in the ring sum (tests/privacy), so the merged model is bit for bit what the swarm would commit.
Every site starts from one common model, so every round is noised (in a swarm, round 1 sums
the parameters whole without noise: not covered). ``max_weight`` is the largest shard (the
tightest honest cap: noise scales with it) and ``clip_norm`` is chosen from the change norms of
a noise-free run (their median by default). Prints the test score and the swarm's epsilon
(privacy.accountant: against any one participant, k - 1 of k shares) per noise multiplier.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from swarmnode.demo import model as bc_model
from swarmnode.demo.tasks import get_task
from swarmnode.privacy import accountant, encoding, noise, ring


def run(task_name: str, z: float, clip: float | None, seed: int = 0) -> dict[str, float]:
    task = get_task(task_name)
    data = task.split(3, seed)
    sites = data.hospitals
    weights = [len(s.y) for s in sites]
    cap = max(weights)
    torch.manual_seed(seed)
    start = task.make_model(data.X_test.shape[1], seed)
    base = {k: v.detach().clone() for k, v in start.state_dict().items()}
    floats = [k for k in sorted(base) if base[k].is_floating_point()]
    size = sum(base[k].numel() for k in floats)
    models = [task.make_model(data.X_test.shape[1], seed) for _ in sites]
    opts = [task.make_optimizer(m) for m in models]
    loaders = [bc_model.make_loader(s.X, s.y, task.batch_size, seed + i)
               for i, s in enumerate(sites)]
    steps = [sum(1 for _ in loader) * task.epochs for loader in loaders]
    rounds = math.ceil(max(steps) / task.sync_frequency)
    iters = [iter(()) for _ in sites]
    norms: list[float] = []
    plan = ring.plan(ring.MAX_SITES, cap, clip if clip is not None else 1e3)
    dn = noise.DistributedNoise(z) if z > 0 else None
    for r in range(rounds):
        total = np.zeros(size, dtype=np.uint64)
        for i, (m, opt) in enumerate(zip(models, opts, strict=True)):
            m.load_state_dict(base)
            m.train()
            for _ in range(task.sync_frequency):
                try:
                    xb, yb = next(iters[i])
                except StopIteration:
                    iters[i] = iter(loaders[i])
                    xb, yb = next(iters[i])
                opt.zero_grad()
                task.loss_fn(m(xb), yb).backward()
                opt.step()
            state = m.state_dict()
            change = np.concatenate([(state[k] - base[k]).double().reshape(-1).numpy()
                                     for k in floats])
            norms.append(float(np.linalg.norm(change)))
            enc = encoding.encode(change, weights[i], plan, seed * 1000 + r * 10 + i)
            total += enc.values
            if dn is not None:
                rng = noise.generator(b"k" * 32, b"bench", bytes([i]), r)
                total += noise.share(dn, plan, size, len(sites), rng)
        mean = encoding.decode_mean(total, plan, sum(weights))
        at = 0
        for k in floats:
            n = base[k].numel()
            part = torch.from_numpy(mean[at: at + n].copy()).reshape(base[k].shape)
            base[k] = (base[k].double() + part).to(base[k].dtype)
            at += n
    final = task.make_model(data.X_test.shape[1], seed)
    final.load_state_dict(base)
    try:
        scores = task.evaluate(final, data.X_test, data.y_test)
    except ValueError as exc:  # e.g. a noised BatchNorm running_var below 0: NaN outputs
        scores = {task.headline: math.nan, "accuracy": math.nan}
        print(f"z {z}: the merged model does not evaluate ({exc}); "
              f"{_negative_vars(base)}", flush=True)
    out = {"z": z, "clip_norm": plan.clip, "max_weight": cap, "rounds": rounds,
           "median_change_norm": float(np.median(norms)), "params": size,
           task.headline: scores[task.headline], "accuracy": scores["accuracy"]}
    if dn is not None:
        one = noise.round_noise(1, [str(i) for i in range(len(sites))],
                                {str(i): w for i, w in enumerate(weights)}, dn, plan, size, True)
        summary = accountant.summarise(
            [dataclass_round(one, k + 1) for k in range(rounds)], 1e-5)
        out |= {"epsilon_per_round": summary.rounds[0].epsilon, "epsilon_total": summary.total,
                "delta": 1e-5}
    return out


def _negative_vars(state: dict[str, torch.Tensor]) -> str:
    bad = {k: int((v < 0).sum()) for k, v in state.items() if k.endswith("running_var")}
    return f"running_var entries below 0: {bad}" if bad else "no BatchNorm variances"


def dataclass_round(r: accountant.RoundNoise, number: int) -> accountant.RoundNoise:
    import dataclasses
    return dataclasses.replace(r, round=number)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", default="breast-cancer")
    p.add_argument("--z", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0])
    p.add_argument("--clip", type=float, default=None, help="clip_norm (else the median "
                   "change norm of a noise-free run)")
    args = p.parse_args()
    started = time.monotonic()
    clip = args.clip
    if clip is None:
        clip = run(args.task, 0.0, None)["median_change_norm"]
    for z in args.z:
        print(json.dumps(run(args.task, z, clip)), flush=True)
    print(f"{time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
