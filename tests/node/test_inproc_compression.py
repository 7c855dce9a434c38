"""Compressed updates in a swarm of three real node services (swarmnode.testing.inproc): with the
spec's ``compression`` the members push fewer bytes, the leader merges the decoded updates (base +
rounded change, checked here against the bytes the trainers handed their nodes), every site ends
with the chain's final model, and the same run gives the same digest again."""

from __future__ import annotations

import dataclasses
import time

import torch

from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, decode
from swarmnode.transport import compression

SITES = 3
ROUNDS = 4
WEIGHTS = (30, 20, 10)
INITIAL = {"w": torch.zeros(96, 64), "b": torch.zeros(64),
           "bn.num_batches_tracked": torch.tensor(0)}


def step(site, k, model):  # type: ignore[no-untyped-def]
    """A trainer: from the model it holds, a site-specific deterministic move."""
    if k >= ROUNDS:
        return None
    base = model if model is not None else INITIAL
    gen = torch.Generator().manual_seed(1000 * site.index + k)
    state = {n: (t + 0.1 * (site.index + 1) * torch.randn(t.shape, generator=gen)
                 if t.is_floating_point() else t + 1) for n, t in base.items()}
    return state, WEIGHTS[site.index]


def _train(mode: str):  # type: ignore[no-untyped-def]
    spec = dataclasses.replace(TrainingSpec.from_state(INITIAL, sync_frequency=1,
                                                       min_peers=SITES, merge_method="mean"),
                               compression=mode)
    with InProcessSwarm(SITES, spec, min_peers=SITES) as swarm:
        sites = swarm.run(step, timeout=900)  # generous: a loaded 2-core host
        final = swarm.final_digest()
        assert final is not None
        assert [s.final_digest for s in sites] == [final] * SITES  # every site agrees
        rounds = [[decode(s.outcome.data) for s in site.syncs] for site in sites]
        sent = [[decode(s.payload) for s in site.syncs] for site in sites]
        return final, swarm.network.push_bytes, sites[0].final, rounds, sent


def test_compressed_updates_push_fewer_bytes_and_every_site_ends_with_one_digest() -> None:
    started = time.monotonic()
    plain_digest, plain_bytes, plain_final, _, _ = _train("none")
    results = {}
    for mode in ("bf16", "int8"):
        results[mode] = _train(mode)
    again_digest = _train("int8")[0]
    assert again_digest == results["int8"][0]  # the same run, the same merged bytes

    for mode, ratio in (("bf16", 0.7), ("int8", 0.5)):
        digest, pushed, final, rounds, sent = results[mode]
        assert digest != plain_digest  # the updates did travel rounded
        # round 1 travels whole (nothing committed before it), rounds 2.. as changes
        assert pushed < ratio * plain_bytes, (mode, pushed, plain_bytes)
        ours, theirs = decode(final.data), decode(plain_final.data)
        assert ours["w"].dtype == torch.float32  # the merged model stays float32
        assert torch.equal(ours["bn.num_batches_tracked"], theirs["bn.num_batches_tracked"])
        assert float((ours["w"] - theirs["w"]).abs().max()) < (0.01 if mode == "bf16" else 0.1)
        if mode != "bf16":
            continue
        # each merge after the first is the weighted mean of base + bf16(change + residual), the
        # base being the previous round's merged model, each site's residual what its earlier
        # roundings dropped (error feedback)
        residual = [{n: torch.zeros_like(t) for n, t in INITIAL.items()} for _ in sent]
        for r in range(1, ROUNDS):
            base = rounds[0][r - 1]
            for name in ("w", "b"):
                decoded = []
                for i, site in enumerate(sent):
                    change = site[r][name] - base[name] + residual[i][name]
                    coded = change.to(torch.bfloat16).float()
                    residual[i][name] = change - coded
                    decoded.append(base[name] + coded)
                want = sum(w * d for w, d in zip(WEIGHTS, decoded, strict=True)) / sum(WEIGHTS)
                torch.testing.assert_close(rounds[0][r][name], want, rtol=1e-5, atol=1e-6)
    ratio_bf16 = results["bf16"][1] / plain_bytes
    ratio_int8 = results["int8"][1] / plain_bytes
    print(f"pushed bytes vs float32 over {ROUNDS} rounds: bf16 {ratio_bf16:.3f}, int8 "
          f"{ratio_int8:.3f}; {time.monotonic() - started:.1f} s")
    assert compression.wire_bytes({"w": ((96, 64), "float32")}, "int8") < 0.3 * 96 * 64 * 4
