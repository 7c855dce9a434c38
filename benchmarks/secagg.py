"""Secure-aggregation core benchmark: encode + mask at each site, sum + unmask at the leader.

    python benchmarks/secagg.py [--params 10000000] [--sites 4] [--reps 5]
                                [--out results/secagg.json]

Both rings a round can take (``ring.round_plan``, from the spec's ``max_weight`` W and
``clip_norm`` C and the mask set's size): ``narrow`` (Z_2^32, W 128 and C 50, as
benchmarks/round.py's secure rows) and ``wide`` (Z_2^64, W 1000 and C 10: too few fraction bits
for the narrow ring; every first round takes it too), each measured the same way below and
reported under ``rings``.

One round of ``--sites`` sites (real X25519 keys, HKDF pair keys, HMAC round seeds, AES-256-CTR
masks) over a float32 change of ``--params`` parameters, plus one extra roster site that dropped
before checking in, so every site masks with ``sites`` peers and the leader removes ``sites``
revealed masks. Measured per phase, median over ``--reps`` (CPU seconds from
``time.process_time``, the process's own; wall seconds beside them), and the phase's peak of
new numpy/Python memory (tracemalloc) over the model's float32 size:

* ``encode``: one site's clip + weight + stochastic rounding to ring elements (per site);
* ``mask``: one site's masks with its ``sites`` peers (per site);
* ``sum``: the leader adding ``sites`` masked updates;
* ``unmask``: the leader removing the ``sites`` revealed dropout masks (one run);
* ``decode``, ``check_bound``: the ring sum to float64, and the norm check;
* ``aggregate_all``: ``aggregate.aggregate`` end to end (sum, unmask, decode, check);
* the node's own steps (``node.secure.SecureAggregation``) over a state dict of float32
  tensors (1 Mparam each) and its starting model: ``flatten`` (the change as one float64
  vector), ``pair_masks`` (a site's masks summed: made ahead, off the check-in's path),
  ``mask_add`` (the encoded update plus those masks), ``hash`` (the check-in's hash),
  ``payload`` (the pushed safetensors bytes), ``unflatten`` (the leader: starting model + mean
  change, in the tensors' dtypes). The check-in waits for flatten + encode + mask_add + hash.

Reported as CPU seconds per million parameters per site (encode, mask) and per million
parameters per update (sum) or per revealed seed (unmask). Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from swarmnode.node.secure import SecureAggregation  # noqa: E402
from swarmnode.privacy import aggregate, dropout, encoding, keys, masks, ring, wire  # noqa: E402

CHAIN_ID, TRAINING = 31337, "0x" + "5a" * 20


def _timed(fn: Callable[[], Any], reps: int) -> tuple[dict[str, float], Any]:
    cpu, wall, peaks, out = [], [], [], None
    for _ in range(reps):
        out = None
        tracemalloc.start()
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return {"cpu_s": round(statistics.median(cpu), 4), "wall_s": round(statistics.median(wall), 4),
            "peak_bytes": max(peaks)}, out


def run(params: int, sites: int, reps: int, weight_cap: int, clip: float) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    addresses = ["0x" + rng.bytes(20).hex() for _ in range(sites + 1)]  # the last drops out
    site_keys = {a: keys.SiteKey.generate() for a in addresses}
    seeds = {
        a: {b: keys.round_seed(keys.pair_key(site_keys[a], site_keys[b].public_bytes,
                                             chain_id=CHAIN_ID, training=TRAINING, me=a, peer=b),
                               1)
            for b in addresses if b != a}
        for a in addresses
    }
    present, missing = addresses[:sites], addresses[sites]
    plan = ring.round_plan(sites + 1, weight_cap, clip)
    weight = weight_cap
    change = (rng.standard_normal(params) * 1e-3).astype(np.float32)
    weights = {a: weight for a in present}

    enc_stats, enc = _timed(lambda: encoding.encode(change, weight, plan, seed=0), reps)
    me = present[0]
    mask_stats, _ = _timed(lambda: masks.mask_update(enc.values, me, seeds[me], plan), reps)
    masked = {}
    for i, a in enumerate(present):  # every site's real masked update (not timed)
        e = encoding.encode(change, weight, plan, seed=i).values
        masked[a] = masks.mask_update(e, a, seeds[a], plan)
    reveals = [r for a in present
               for r in dropout.reveal_seeds(a, addresses, present, 1, 0, seeds[a])]
    assert {r.missing for r in reveals} == {missing} and len(reveals) == sites

    def leader_sum() -> np.ndarray:
        total = np.zeros(params, dtype=plan.dtype)
        for v in masked.values():
            total += v
        if plan.reduces:
            total &= plan.modulus_mask
        return total

    sum_stats, total = _timed(leader_sum, reps)

    def unmask() -> None:
        for r in reveals:
            masks.add_pair_mask(total, r.seed, -1 if masks.adds_first(r.revealer, missing)
                                else 1)

    unmask_stats, _ = _timed(unmask, 1)  # once: it changes ``total``
    decode_stats, weighted = _timed(lambda: encoding.decode_sum(total, plan), reps)
    check_stats, _ = _timed(
        lambda: aggregate.check_bound(weighted, sum(weights.values()), sites, plan), reps)
    full_stats, result = _timed(
        lambda: aggregate.aggregate(addresses, weights, masked, reveals, plan, 1), reps)
    assert np.array_equal(result.ring_sum, total)
    assert np.allclose(result.mean, change, atol=max(1e-6, 2 * plan.unit))

    # the node's own steps, over a state dict of float32 tensors and its starting model
    sizes = [min(1 << 20, params - at) for at in range(0, params, 1 << 20)]
    base_flat = rng.standard_normal(params).astype(np.float32)
    base = {f"t{i:04d}": torch.from_numpy(t.copy())
            for i, t in enumerate(np.split(base_flat, np.cumsum(sizes)[:-1]))}
    state = {n: t + torch.from_numpy(c.copy()) for (n, t), c in
             zip(base.items(), np.split(change, np.cumsum(sizes)[:-1]), strict=True)}
    layout = {n: (tuple(t.shape), "float32") for n, t in state.items()}
    node = SecureAggregation(me, None, site_keys[me], layout,  # type: ignore[arg-type]
                             clip=clip, weight_cap=weight_cap, min_peers=2)
    flatten_stats, flat = _timed(lambda: node.flatten(state, base), reps)
    pair_stats, pair = _timed(
        lambda: masks.pair_masks(params, me, seeds[me], dtype=plan.dtype), reps)

    def mask_add() -> np.ndarray:
        v = enc.values + pair
        if plan.ring_bits < 64:
            v &= plan.modulus_mask
        return v

    add_stats, vector = _timed(mask_add, reps)
    assert vector.dtype == plan.dtype
    assert np.array_equal(vector, masks.mask_update(enc.values, me, seeds[me], plan))
    hash_stats, _ = _timed(lambda: wire.update_hash(vector), reps)
    payload_stats, _ = _timed(lambda: SecureAggregation.payload(vector), reps)
    unflatten_stats, _ = _timed(lambda: node.unflatten(flat, base, state), reps)
    mparams = params / 1e6
    model_bytes = params * 4
    return {
        "params": params,
        "sites": sites,
        "dropouts": 1,
        "reps": reps,
        "max_weight": weight_cap,
        "clip_norm": clip,
        "ring_bits": plan.ring_bits,
        "fraction_bits": plan.fraction_bits,
        "prg": "AES-256-CTR (cryptography)",
        "phases": {"encode": enc_stats, "mask": mask_stats, "sum": sum_stats,
                   "unmask": unmask_stats, "decode": decode_stats, "check_bound": check_stats,
                   "aggregate_all": full_stats, "flatten": flatten_stats,
                   "pair_masks": pair_stats, "mask_add": add_stats, "hash": hash_stats,
                   "payload": payload_stats, "unflatten": unflatten_stats},
        "cpu_s_per_mparam": {
            "encode_per_site": round(enc_stats["cpu_s"] / mparams, 5),
            "mask_per_site": round(mask_stats["cpu_s"] / mparams, 5),
            "mask_per_peer": round(mask_stats["cpu_s"] / mparams / sites, 5),
            "encode_and_mask_per_site": round(
                (enc_stats["cpu_s"] + mask_stats["cpu_s"]) / mparams, 5),
            "leader_sum_per_update": round(sum_stats["cpu_s"] / mparams / sites, 5),
            "leader_unmask_per_revealed_seed": round(
                unmask_stats["cpu_s"] / mparams / len(reveals), 5),
            "leader_decode": round(decode_stats["cpu_s"] / mparams, 5),
            "leader_check_bound": round(check_stats["cpu_s"] / mparams, 5),
            "leader_aggregate_all": round(full_stats["cpu_s"] / mparams, 5),
            "flatten_per_site": round(flatten_stats["cpu_s"] / mparams, 5),
            "pair_masks_per_site": round(pair_stats["cpu_s"] / mparams, 5),
            "checkin_path_per_site": round((flatten_stats["cpu_s"] + enc_stats["cpu_s"]
                                            + add_stats["cpu_s"] + hash_stats["cpu_s"])
                                           / mparams, 5),
            "payload_per_site": round(payload_stats["cpu_s"] / mparams, 5),
            "leader_unflatten": round(unflatten_stats["cpu_s"] / mparams, 5),
        },
        "peak_memory_x_model_float32": {
            name: round(s["peak_bytes"] / model_bytes, 2)
            for name, s in (("encode", enc_stats), ("mask", mask_stats), ("sum", sum_stats),
                            ("unmask", unmask_stats), ("decode", decode_stats),
                            ("aggregate_all", full_stats), ("flatten", flatten_stats),
                            ("pair_masks", pair_stats), ("payload", payload_stats),
                            ("unflatten", unflatten_stats))
        },
    }


RINGS = {"narrow": (128, 50.0), "wide": (1000, 10.0)}  # (max_weight, clip_norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results/secagg.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "params": args.params, "sites": args.sites, "reps": args.reps,
        "rings": {name: run(args.params, args.sites, args.reps, w, c)
                  for name, (w, c) in RINGS.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }
    result["benchmark_wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"benchmark_wall_s": result["benchmark_wall_s"], **{
        name: {k: r[k] for k in ("ring_bits", "fraction_bits", "cpu_s_per_mparam",
                                 "peak_memory_x_model_float32")}
        for name, r in result["rings"].items()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
