"""Does the swarm learn? Local-only vs swarm vs central, over seeds, splits and merge rules.

    python benchmarks/quality.py [--seeds 1] [--jobs 2] [--no-real]
        ->  results/quality.md, .json, .png
    python benchmarks/quality.py --compression [--seeds 1]
        ->  results/quality_compression.md, .json
    python benchmarks/quality.py --secure [--seeds 1]
        ->  results/quality_secure.md, .json

For each demo example (``swarmnode.demo.tasks``: digits, breast-cancer) and each of its splits
(digits: each hospital holds only some digits / every digit, uneven sizes; breast-cancer: uneven
sizes with a hospital that has one malignant case / uneven case mixes), for seeds 0..S-1:

* local-only: each hospital's model trained on its own shard (the same settings);
* central: one model trained on the pooled shards;
* swarm: the hospitals training together with each merge rule (mean, coordmedian, geomedian,
  trimmedmean) at their default options, and with ``mean`` under each end-of-training policy
  (inactive, snapshot, active).

Every swarm cell runs the real runtime in one process (:mod:`swarmnode.testing.inproc`): three
real node services, each with its round machine, driver, collector and merge, its model store and
its own chain account, on the real contracts (SwarmRegistry + SwarmTraining) deployed on
eth-tester's in-process EVM. Each hospital's trainer starts from the same weights, trains
``sync_frequency`` batches, syncs (weight = its sample count) and goes on from the merged model
the chain committed; a hospital whose data is used up finishes with the policy. The score is the
final model's, the one whose digest the chain holds (every site holds it; checked). What is left
out: the network and TLS (models move as safetensors bytes through an in-memory transport that
runs the receivers' identity, participation, size, digest, spec and NaN checks) and anvil
(eth-tester instead). The cells run in ``--jobs`` processes. The full runtime (anvil, node
processes, mTLS gRPC, trainer processes: ``swarmnode demo``) runs seed 0 of each example's
default split with ``mean``, and the study records its score next to the in-process one.

A round costs 0.4-0.7 CPU-seconds here (py-evm runs every transaction and read; the digits CNN
trains), and one seed is ~2,600 rounds (4 splits x 6 swarms), about 25 CPU-minutes: the default
is 1 seed, ~15 minutes on 2 free cores. ``--seeds 5`` is the full study; the results file says
how many seeds ran. ``--syncs N`` runs the whole pipeline in a minute or two (scores meaningless).

``--compression`` runs instead the compression rows: each example and split with ``mean``, its
updates sent whole (float32) and as each compressed change (the spec's ``compression``: bf16,
fp16, int8; :mod:`swarmnode.transport.compression`), the same seeds in the same sitting: the swarm's
score next to float32's, and the update bytes the members pushed per round (counted where the
in-memory transport hands them to the leader) next to float32's.

``--secure`` runs the secure-aggregation rows the same way, four per example and split, all
``mean``: the study's (updates in the clear, ``min_peers`` 2, no clip); *clear*, in the clear with
secure aggregation's settings (``min_peers`` 3, so every round waits for the three hospitals
where the study's go on with two; clip norm SECURE_CLIP_NORM; weight cap SECURE_MAX_WEIGHT);
*clear, secure's end*, the same with secure aggregation's end rule; and with secure aggregation
(``secure_aggregation: true``: each site's change masked, the leaders summing masked updates; the
same settings as *clear*). Secure aggregation's score is compared with all three; the issue's
"within 0.005 of plain mean" is judged against *clear*, which differs from it in the masking and
in the rule that comes with it: no round is summed with fewer than three sites adding weight, so
the two hospitals still training finish at their next sync once the first is done
(lifecycle.secure_sums_over) and the swarm's model is the one of the first hospital's finish.
*clear, secure's end* runs those rules in the clear, applied by the nodes themselves (the
in-process swarm's ``secure_end_control``, a control for this study, not a spec setting): the
end rule, and a round with fewer than three sites adding weight (the round a hospital finishes
in) keeps its starting model (guards.sums), so secure aggregation against it is what the
masking and its fixed-point encoding cost. The secure rows also run on *equal shards* (not a
split of the study: each example's first split's samples dealt into three equal shards, so the
hospitals finish together and the end rule changes nothing), left out of the must-hold's lines.

Counting as the Nature paper (Warnat-Herresthal et al., 2021) does: a (site, seed) comparison is
won when the swarm's score is at least that site's local-only score.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swarmnode.demo import model as bc_model  # noqa: E402
from swarmnode.demo.data import DemoData  # noqa: E402
from swarmnode.demo.swarm import SECURE_CLIP_NORM, SECURE_MAX_WEIGHT  # noqa: E402
from swarmnode.demo.tasks import TASKS, Task  # noqa: E402
from swarmnode.spec import TrainingSpec  # noqa: E402
from swarmnode.transport import serde  # noqa: E402

# The rules compared: mean and the three robust rules at their default options. With 3 sites a
# rule tolerates one attacker only if no single site's weight escapes it: coordmedian and
# geomedian (breakdown point 1/2) do; trimmedmean only when `trim` is at least the largest site's
# share of the weight (then, with 3 sites, it is the coordinate median); at its default trim (0.1)
# an attacker keeps most of its weight.
RULES = ("mean", "coordmedian", "geomedian", "trimmedmean")
ROBUST_AT_3 = ("coordmedian", "geomedian")  # tolerate 1 attacker of 3 sites
POLICIES = ("inactive", "snapshot", "active")
HOSPITALS = 3
MIN_PEERS = 2  # as `swarmnode demo`: a round goes on without a site that is done


def swarm(task: Task, data: DemoData, seed: int, rule: str = "mean", policy: str = "inactive",
          syncs: int | None = None, compression: str = "none",
          traffic: dict[str, int] | None = None,
          secure: bool = False, secure_settings: bool = False,
          secure_end: bool = False) -> tuple[torch.nn.Module, int]:
    """The hospitals as a swarm of real node services in this process (see the module
    docstring); the final model (the chain's final digest) and the training's final round.
    ``syncs``: stop each trainer after that many syncs (the tests' short runs);
    ``compression``: the spec's; ``traffic``: filled with the pushes and their payload bytes;
    ``secure``: with secure aggregation (SECURE_CLIP_NORM, SECURE_MAX_WEIGHT, min_peers 3);
    ``secure_settings``: those settings in the clear (secure aggregation off); ``secure_end``:
    in the clear, the nodes also end as secure aggregation's do (InProcessSwarm's
    ``secure_end_control``: lifecycle.secure_sums_over, applied by each node)."""
    from swarmnode.testing.inproc import InProcessSwarm, Site

    n_features = data.X_test.shape[1]
    models = [task.make_model(n_features, seed) for _ in data.hospitals]
    optimizers = [task.make_optimizer(m) for m in models]

    def batches(i: int) -> Iterator[Any]:
        loader = bc_model.make_loader(data.hospitals[i].X, data.hospitals[i].y,
                                      task.batch_size, seed)
        for _ in range(task.epochs):
            yield from loader

    streams = [batches(i) for i in range(len(data.hospitals))]

    def step(site: Site, k: int, merged: dict[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
        model = models[site.index]
        if merged is not None:
            model.load_state_dict(merged)
        if syncs is not None and k >= syncs:
            return None
        block = list(itertools.islice(streams[site.index], task.sync_frequency))
        if not block:
            return None
        task.train_epoch(model, block, optimizers[site.index])
        return model.state_dict(), len(data.hospitals[site.index].y)

    settings = secure or secure_settings
    min_peers = SECURE_MIN_PEERS if settings else MIN_PEERS
    spec = TrainingSpec.from_state(models[0].state_dict(), sync_frequency=task.sync_frequency,
                                   min_peers=min_peers, merge_method=rule)
    spec = dataclasses.replace(spec, compression=compression)
    if settings:
        spec = dataclasses.replace(spec, merge_options={"clip_norm": SECURE_CLIP_NORM},
                                   max_weight=SECURE_MAX_WEIGHT, secure_aggregation=secure)
    with InProcessSwarm(len(data.hospitals), spec, min_peers=min_peers, policy=policy,
                        secure_end_control=secure_end and not secure) as sw:
        sites = sw.run(step, timeout=3600)
        digest = sw.final_digest()
        if digest is None or any(s.final_digest != digest for s in sites):
            raise RuntimeError(f"{task.name} seed {seed} {rule}/{policy}: the sites do not all "
                               "hold the chain's final model")
        final, rounds = sites[0].final, sw.final_round()
        if traffic is not None:
            traffic.update(pushes=sw.network.pushes, push_bytes=sw.network.push_bytes,
                           model_bytes=len(serde.encode(models[0].state_dict())))
        assert final is not None and final.data is not None and rounds is not None
        state = {k: v.clone() for k, v in
                 serde.view_state(final.data, spec=None, reject_nonfinite=True).items()}
    model = task.make_model(n_features, seed)
    model.load_state_dict(state)
    model.eval()
    return model, int(rounds)


def swarm_cell(example: str, split: str, seed: int, rule: str, policy: str,
               syncs: int | None = None) -> dict[str, Any]:
    """One swarm of the study (a worker process runs it): its score on the seed's test set."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)  # the node services' round logs: not here
    task = TASKS[example]
    data = task.split(HOSPITALS, seed, split)
    t0 = time.monotonic()
    model, rounds = swarm(task, data, seed, rule, policy, syncs)
    score = task.evaluate(model, data.X_test, data.y_test)[task.headline]
    return {"example": example, "split": split, "seed": seed, "rule": rule, "policy": policy,
            "score": float(score), "rounds": rounds, "seconds": round(time.monotonic() - t0, 1)}


COMPRESSIONS = ("none", "bf16", "fp16", "int8")
# the secure rows: the study's plain mean; in the clear with secure aggregation's settings
# (min_peers 3, clip, weight cap); the same, ending as secure aggregation does (the nodes'
# secure_end_control); with secure aggregation
SECURE_ROWS = ("none", "clear", "clear-end", "secure")
SECURE_MIN_PEERS = 3  # secure aggregation refuses fewer (with 2 a leader learns the other's)
# the secure rows' extra split: each example's first split's samples pooled and dealt into equal
# shards (seeded), so the hospitals train as many syncs and finish together (secure
# aggregation's end rule then changes nothing); not one of the study's splits
EQUAL_SPLIT = "equal shards"


def split_data(task: Task, split: str, seed: int) -> DemoData:
    """The hospitals' data of ``split`` (EQUAL_SPLIT: see there) for ``seed``."""
    if split != EQUAL_SPLIT:
        return task.split(HOSPITALS, seed, split)
    data = task.split(HOSPITALS, seed, next(iter(task.splits)))
    X = np.concatenate([h.X for h in data.hospitals])
    y = np.concatenate([h.y for h in data.hospitals])
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), HOSPITALS)
    return dataclasses.replace(data, hospitals=tuple(
        h._replace(X=X[i], y=y[i]) for h, i in zip(data.hospitals, parts, strict=True)))


def compression_cell(example: str, split: str, seed: int, compression: str,
                     syncs: int | None = None) -> dict[str, Any]:
    """One swarm of the compression rows: mean, inactive policy, updates sent as
    ``compression``; its score and the bytes its members pushed."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    task = TASKS[example]
    data = split_data(task, split, seed)
    t0 = time.monotonic()
    traffic: dict[str, int] = {}
    secure = compression == "secure"  # a row of --secure: plain-text bytes, masked updates
    end = compression == "clear-end"  # a row of --secure: its settings and end, in the clear
    clear = compression == "clear" or end  # a row of --secure: its settings, in the clear
    model, rounds = swarm(task, data, seed, "mean", "inactive", syncs,
                          "none" if secure or clear else compression, traffic, secure=secure,
                          secure_settings=clear, secure_end=end)
    score = task.evaluate(model, data.X_test, data.y_test)[task.headline]
    return {"example": example, "split": split, "seed": seed, "compression": compression,
            "score": float(score), "rounds": rounds, **traffic,
            "push_bytes_per_round": traffic["push_bytes"] / max(1, rounds),
            "seconds": round(time.monotonic() - t0, 1)}


def run_compression(seeds: int, jobs: int = 2, syncs: int | None = None,
                    report: Callable[[dict[str, Any]], None] | None = None,
                    rows: tuple[str, ...] = COMPRESSIONS) -> dict[str, Any]:
    """The compression rows (``rows``: COMPRESSIONS, or SECURE_ROWS for the secure rows): every
    example and split, float32 and each code, seeds 0..S-1. ``report``: called with the rows so
    far after each swarm (a cut run keeps what it did); float32 and bf16 first, the smaller
    example first (the secure rows: the three of a split together, so a cut run keeps whole
    comparisons)."""
    torch.set_num_threads(1)
    groups = (rows,) if rows == SECURE_ROWS else (rows[:2], rows[2:])
    cells = [(task.name, split, seed, c) for codes in groups
             for task in sorted(TASKS.values(), key=lambda t: t.name != "breast-cancer")
             for split in (*task.splits, *((EQUAL_SPLIT,) if rows == SECURE_ROWS else ()))
             for seed in range(seeds) for c in codes]
    done: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    t0 = time.monotonic()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compression_cell, *cell, syncs): cell for cell in cells}
        for future in as_completed(futures):
            got = done[futures[future]] = future.result()
            print(f"[{len(done)}/{len(cells)} {time.monotonic() - t0:6.0f} s] {got['example']} "
                  f"{got['split']} seed {got['seed']} {got['compression']}: {got['score']:.4f}"
                  f" in {got['rounds']} rounds, {got['push_bytes_per_round']:.0f} B/round, "
                  f"{got['seconds']} s", flush=True)
            if report is not None:
                report(_compression_result(cells, done, seeds, jobs, syncs, t0))
    return _compression_result(cells, done, seeds, jobs, syncs, t0)


def _compression_result(cells: list[tuple[str, str, int, str]],
                        done: dict[tuple[str, str, int, str], dict[str, Any]], seeds: int,
                        jobs: int, syncs: int | None, t0: float) -> dict[str, Any]:
    rows = []
    order = (*COMPRESSIONS, *SECURE_ROWS[1:])
    clear_of = {(e, sp, sd): c for (e, sp, sd, code), c in done.items() if code == "clear"}
    end_of = {(e, sp, sd): c for (e, sp, sd, code), c in done.items() if code == "clear-end"}
    for example, split, seed, code in sorted(cells, key=lambda c: (
            c[0], c[1], c[2], order.index(c[3]))):
        cell, plain = done.get((example, split, seed, code)), done.get((example, split, seed,
                                                                        "none"))
        if cell is None or plain is None:
            continue
        row = {**cell, "metric": TASKS[example].headline,
               "float32_score": plain["score"],
               "score_change": cell["score"] - plain["score"],
               "float32_push_bytes_per_round": plain["push_bytes_per_round"],
               "bytes_vs_float32": cell["push_bytes_per_round"]
               / plain["push_bytes_per_round"]}
        clear, end = clear_of.get((example, split, seed)), end_of.get((example, split, seed))
        if code in ("secure", "clear-end"):  # against the same settings in the clear (None:
            # not run yet)
            row["clear_score"] = None if clear is None else clear["score"]
            row["score_change_vs_clear"] = None if clear is None else \
                cell["score"] - clear["score"]
        if code == "secure":  # against the same settings and end in the clear: what the
            # masking and its fixed-point encoding cost
            row["clear_end_score"] = None if end is None else end["score"]
            row["score_change_vs_clear_end"] = None if end is None else \
                cell["score"] - end["score"]
        rows.append(row)
    bf16 = [r for r in rows if r["compression"] == "bf16"]
    equal = [r for r in rows if r["compression"] == "secure" and r["split"] == EQUAL_SPLIT]
    secure = [r for r in rows if r["compression"] == "secure" and r["split"] != EQUAL_SPLIT]
    vs_clear = [r["score_change_vs_clear"] for r in secure
                if r["score_change_vs_clear"] is not None]
    vs_end = [r["score_change_vs_clear_end"] for r in secure
              if r["score_change_vs_clear_end"] is not None]
    return {"seeds": seeds, "hospitals": HOSPITALS, "rule": "mean", "policy": "inactive",
            "swarm": "in-process runtime", "syncs": syncs, "jobs": jobs,
            "swarm_seconds": round(time.monotonic() - t0, 1), "cells": len(cells),
            "cells_done": len(done), "rows": rows,
            "bf16_largest_score_change": max((abs(r["score_change"]) for r in bf16),
                                             default=None),
            "bf16_within_0_005": bool(bf16) and all(abs(r["score_change"]) < 0.005
                                                    for r in bf16),
            # the must-hold, judged against the same settings in the clear (every secure row)
            "secure_largest_change_vs_clear": max(map(abs, vs_clear), default=None),
            "secure_within_0_005": bool(secure) and len(vs_clear) == len(secure)
            and all(abs(c) < 0.005 for c in vs_clear),
            # against the same settings and end in the clear: the masking's own cost
            "secure_largest_change_vs_clear_end": max(map(abs, vs_end), default=None),
            "secure_within_0_005_vs_clear_end": bool(secure) and len(vs_end) == len(secure)
            and all(abs(c) < 0.005 for c in vs_end),
            # against the study's plain mean (min_peers 2, no clip): settings differ too
            "secure_largest_change_vs_study_mean": max((abs(r["score_change"]) for r in secure),
                                                       default=None),
            # equal shards (not the study's splits): the hospitals finish together
            "secure_equal_shards_largest_change_vs_study_mean": max(
                (abs(r["score_change"]) for r in equal), default=None)}


_SECURE_INTRO = (
    "Secure aggregation's rows, all `mean`, four per example and split: *study mean* (in the "
    "clear, min_peers 2 and no clip, as the quality study); *clear* (in the clear with secure "
    "aggregation's settings: clip norm {clip}, weight cap {cap}, min_peers 3, so every round "
    "waits for the three hospitals); *clear, secure's end* (the same, and the nodes end the "
    "training as secure aggregation's do: below); *secure aggregation* (the same settings, each "
    "site's change masked, the leaders summing masked updates). The issue's must-hold, "
    "\"within 0.005 of plain mean on every example\", is judged against *clear* (the study's "
    "mean differs in min_peers and the clip as well; the change against it is shown beside). "
    "*clear* differs from secure aggregation in the masking and in one rule the masking brings: "
    "a round sums only when three sites add weight (with two, each learns the other's update "
    "from the sum), so once a hospital is done no round is summed and the two others finish at "
    "their next sync (lifecycle.secure_sums_over), where *clear* merges them to the end. *clear, "
    "secure's end* applies that rule in the clear, in the nodes themselves (the in-process "
    "swarm's `secure_end_control`, a control for this study, no spec setting: each node runs "
    "lifecycle's rule as a secure node does, and its leaders keep a round's starting model "
    "when fewer than three sites add weight, the round a hospital finishes in, as a secure "
    "round does: guards.sums), so *secure aggregation* minus *clear, secure's end* (*vs "
    "secure's end*) is what the masking and its fixed-point encoding cost. The secure rows' "
    "bytes are masked updates (format swarmnode-secagg/3: 32-bit ring words, float32's bytes, "
    "in a round with a starting model; 64-bit words, twice those, in the first). ")


def write_compression_markdown(result: dict[str, Any], path: Path) -> None:
    secure = any(r["compression"] == "secure" for r in result["rows"])
    base, label = ("study mean", {"none": "study mean", "clear": "clear",
                                  "clear-end": "clear, secure's end",
                                  "secure": "secure aggregation"}) \
        if secure else ("float32", {"none": "float32 (none)"})
    lines = [
        "# Secure aggregation: the swarm's score against plain `mean`" if secure else
        "# Compressed updates: the swarm's score and the bytes pushed per round",
        "",
        (_SECURE_INTRO.format(clip=SECURE_CLIP_NORM, cap=SECURE_MAX_WEIGHT) if secure else "")
        + f"Written by `benchmarks/quality.py {'--secure' if secure else '--compression'}`: "
        f"seed(s) 0..{result['seeds'] - 1}, "
        f"{result['hospitals']} hospitals, rule `{result['rule']}`, the in-process runtime (real "
        "node services and contracts; updates moving as safetensors bytes through the in-memory "
        f"transport, whose pushes are counted). Every row ran beside {base} in the same sitting. "
        "*bytes/round*: the update payload bytes the members pushed to the leaders, over the "
        "training's rounds (the first round's updates travel whole: no model was committed "
        f"before it). *change*: the score minus {base}'s, same example, split and seed"
        + ("; *vs clear*: the row's score minus *clear*'s; *vs secure's end*: secure "
           "aggregation's score minus *clear, secure's end*'s." if secure else ".")
        + (f" **A smoke run: each trainer stopped after {result['syncs']} syncs; these scores "
           "mean nothing.**" if result.get("syncs") else ""),
        "",
        f"| example | split | seed | metric | {'updates' if secure else 'compression'} | score "
        f"|{' vs clear | vs secure' + chr(39) + 's end |' if secure else ''} change vs {base} "
        f"| rounds | bytes/round | vs {base} |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if secure else ""),
    ]
    for r in result["rows"]:
        vs_clear = ""
        if secure:
            change, end = r.get("score_change_vs_clear"), r.get("score_change_vs_clear_end")
            vs_clear = (" – |" if r["compression"] not in ("secure", "clear-end") else
                        " (clear not run) |" if change is None else f" **{change:+.4f}** |")
            vs_clear += (" – |" if r["compression"] != "secure" else
                         " (not run) |" if end is None else f" **{end:+.4f}** |")
        lines.append(
            f"| {r['example']} | {r['split']} | {r['seed']} | {r['metric']} | "
            f"{label.get(r['compression'], r['compression'])} | "
            f"{r['score']:.4f} |{vs_clear} {r['score_change']:+.4f} | {r['rounds']} | "
            f"{r['push_bytes_per_round']:,.0f} | {r['bytes_vs_float32']:.3f}x |")
    if result["cells_done"] < result["cells"]:
        lines += ["", f"**Cut short: {result['cells_done']} of {result['cells']} swarms ran.**"]
    if result["bf16_largest_score_change"] is not None:
        lines += ["", "bfloat16's largest score change: "
                  f"{result['bf16_largest_score_change']:.4f} (less than 0.005 on every row: "
                  f"{result['bf16_within_0_005']})."]
    if result.get("secure_largest_change_vs_clear") is not None:
        lines += ["", "Secure aggregation's largest score change against *clear* (plain mean, "
                  "the same min_peers, clip and weight cap): "
                  f"{result['secure_largest_change_vs_clear']:.4f} (less than 0.005 on every "
                  f"row, the must-hold: {result['secure_within_0_005']}). Against the study's "
                  "plain mean (min_peers 2, no clip): "
                  f"{result['secure_largest_change_vs_study_mean']:.4f}."]
    if result.get("secure_largest_change_vs_clear_end") is not None:
        lines += ["", "Secure aggregation's largest score change against *clear, secure's end* "
                  "(the same settings and end rule in the clear: what the masking and its "
                  "encoding cost): "
                  f"{result['secure_largest_change_vs_clear_end']:.4f} (less than 0.005 on every "
                  f"row: {result['secure_within_0_005_vs_clear_end']})."]
    if result.get("secure_equal_shards_largest_change_vs_study_mean") is not None:
        lines += ["", f"*{EQUAL_SPLIT}* (not a split of the study: each example's first split's "
                  "samples dealt into equal shards, so the hospitals finish together; the "
                  "must-hold lines above leave these rows out): secure aggregation's largest "
                  "score change against the study's plain mean: "
                  f"{result['secure_equal_shards_largest_change_vs_study_mean']:.4f}."]
    path.write_text("\n".join(lines) + "\n")


def _cells(seeds: int) -> list[tuple[str, str, int, str, str]]:
    """Every swarm of the study, the longest first (digits before breast-cancer)."""
    cells = []
    for task in TASKS.values():
        for split in task.splits:
            for seed in range(seeds):
                cells += [(task.name, split, seed, rule, "inactive") for rule in RULES]
                cells += [(task.name, split, seed, "mean", p) for p in POLICIES[1:]]
    return cells


def _real_demo(task: Task, head: str) -> dict[str, Any]:
    """Seed 0 of the task's default split with mean through the real runtime."""
    from rich.console import Console

    from swarmnode.demo.orchestrator import DemoOptions, run_demo

    with tempfile.TemporaryDirectory(prefix="quality-real-") as tmp:
        t0 = time.monotonic()
        summary = run_demo(DemoOptions(nodes=3, workdir=Path(tmp) / "demo", example=task.name),
                           console=Console(file=open("/dev/null", "w")))  # noqa: SIM115
        key = "swarm_auc" if head == "auc" else "swarm_accuracy"
        return {"swarm": summary["nodes"][0][key], "rounds": len(summary["rounds"]),
                "all_nodes_agree": summary["all_nodes_agree"],
                "seconds": round(time.monotonic() - t0, 1)}


def run(seeds: int, real: bool, jobs: int = 2, syncs: int | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    done: dict[tuple[str, str, int, str, str], dict[str, Any]] = {}
    cells = _cells(seeds)
    t0 = time.monotonic()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(swarm_cell, *cell, syncs): cell for cell in cells}
        for future in as_completed(futures):
            got = future.result()
            done[futures[future]] = got
            print(f"[{len(done)}/{len(cells)} {time.monotonic() - t0:6.0f} s] {got['example']} "
                  f"{got['split']} seed {got['seed']} {got['rule']}/{got['policy']}: "
                  f"{got['score']:.4f} in {got['rounds']} rounds, {got['seconds']} s",
                  flush=True)
    swarm_seconds = round(time.monotonic() - t0, 1)
    cases: list[dict[str, Any]] = []
    for task in TASKS.values():
        head = task.headline
        for split in task.splits:
            case: dict[str, Any] = {"example": task.name, "split": split, "metric": head,
                                    "seeds": [], "rules": {r: [] for r in RULES}}
            policies: dict[str, list[float]] = {p: [] for p in POLICIES}
            for seed in range(seeds):
                data = task.split(HOSPITALS, seed, split)

                def score(model: torch.nn.Module, data: DemoData = data, task: Task = task,
                          head: str = head) -> float:
                    return task.evaluate(model, data.X_test, data.y_test)[head]

                local = [score(task.train_local(h.X, h.y, seed=seed)) for h in data.hospitals]
                X_all, y_all = data.pooled()
                central = score(task.train_local(X_all, y_all, seed=seed))
                row = {"seed": seed, "local": local, "central": central,
                       "sizes": [len(h.y) for h in data.hospitals], "swarm": {}, "rounds": {},
                       "seconds": {}}
                for rule in RULES:
                    cell = done[(task.name, split, seed, rule, "inactive")]
                    row["swarm"][rule] = cell["score"]
                    row["rounds"][rule] = cell["rounds"]
                    row["seconds"][rule] = cell["seconds"]
                    case["rules"][rule].append(cell["score"])
                row["policies"] = {p: done[(task.name, split, seed, "mean", p)]["score"]
                                   for p in POLICIES}
                for policy in POLICIES:
                    policies[policy].append(row["policies"][policy])
                case["seeds"].append(row)
                print(f"{task.name:<13} {split:<15} seed {seed}: local "
                      f"{' '.join(f'{v:.3f}' for v in local)}  central {central:.3f}  swarm "
                      + " ".join(f"{r} {row['swarm'][r]:.3f}" for r in RULES), flush=True)
            case["policies"] = {p: statistics.fmean(v) for p, v in policies.items()}
            _summarise(case)
            cases.append(case)
    out: dict[str, Any] = {"seeds": seeds, "hospitals": HOSPITALS, "swarm": "in-process runtime",
                           "cells": len(cells),
                           "swarm_rounds": sum(c["rounds"] for c in done.values()),
                           "swarm_seconds": swarm_seconds, "jobs": jobs,
                           "syncs": syncs, "cases": cases}
    if real:
        out["real_runtime"] = {}
        for task in TASKS.values():
            here = done[(task.name, task.default_split, 0, "mean", "inactive")]["score"]
            got = _real_demo(task, task.headline)
            got["in_process"] = here
            out["real_runtime"][task.name] = got
            print(f"real runtime, {task.name} seed 0 mean: {got}", flush=True)
    return out


def _summarise(case: dict[str, Any]) -> None:
    rows = case["seeds"]
    best_local = [max(r["local"]) for r in rows]
    central = [r["central"] for r in rows]
    case["summary"] = {
        "local_mean": statistics.fmean(v for r in rows for v in r["local"]),
        "best_local_mean": statistics.fmean(best_local),
        "central_mean": statistics.fmean(central),
        "central_sd": statistics.pstdev(central),
    }
    for rule in RULES:
        swarm = [r["swarm"][rule] for r in rows]
        wins = sum(r["swarm"][rule] >= v for r in rows for v in r["local"])
        case["summary"][rule] = {
            "mean": statistics.fmean(swarm),
            "sd": statistics.pstdev(swarm),
            "minus_central": statistics.fmean(swarm) - statistics.fmean(central),
            "minus_mean_rule": statistics.fmean(swarm) - statistics.fmean(case["rules"]["mean"]),
            "wins": wins,
            "comparisons": sum(len(r["local"]) for r in rows),
            "beats_best_local": sum(s >= b for s, b in zip(swarm, best_local, strict=True)),
        }


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        "# Does the swarm learn? Local-only vs swarm vs central",
        "",
        f"{result['seeds']} seed{'s' if result['seeds'] != 1 else ''} "
        f"(0..{result['seeds'] - 1}), 3 hospitals, written by `benchmarks/quality.py` "
        "(the method is in its docstring). Every swarm cell ran the real runtime in one "
        "process: three node services (round machine, driver, collector, merge, store) on the "
        "real contracts on eth-tester, models moving as safetensors bytes through an in-memory "
        "transport (no network, no TLS, no anvil); "
        f"{result.get('cells', '?')} swarms, {result.get('swarm_rounds', '?')} rounds in "
        f"{result.get('swarm_seconds', '?')} s on {result.get('jobs', '?')} processes. "
        + (f"**A smoke run: each trainer stopped after {result['syncs']} syncs; these scores "
           "mean nothing.** " if result.get("syncs") else "")
        + "Scores on one shared test set per seed: accuracy "
        "for digits, AUC for breast-cancer; mean ± standard deviation over the seeds. "
        "*wins*: (site, seed) comparisons where the swarm scores at least that site's "
        "local-only model (as the 2021 Nature paper counts them); *≥ best*: seeds where the "
        "swarm scores at least the best hospital's own model.",
        "",
        "![quality](quality.png)",
        "",
        "| example | split | metric | local (mean) | best local | central | rule | swarm | "
        "swarm − central | vs mean rule | wins | ≥ best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        s = case["summary"]
        for rule in RULES:
            r = s[rule]
            lines.append(
                f"| {case['example']} | {case['split']} | {case['metric']} | "
                f"{s['local_mean']:.3f} | {s['best_local_mean']:.3f} | "
                f"{s['central_mean']:.3f} ± {s['central_sd']:.3f} | {rule} | "
                f"{r['mean']:.3f} ± {r['sd']:.3f} | {r['minus_central']:+.3f} | "
                f"{r['minus_mean_rule']:+.3f} | {r['wins']}/{r['comparisons']} | "
                f"{r['beats_best_local']}/{len(case['seeds'])} |")
    lines += ["", "## Robust rules when nobody attacks", "",
              "The cost of each rule against `mean` (accuracy or AUC), its worst case over the "
              "examples and splits. With 3 sites a rule tolerates one attacker only if no single "
              "site's weight escapes it: coordmedian and geomedian (breakdown point 1/2) do; "
              "trimmedmean only when `trim` is at least the largest site's share of the weight "
              "(with 3 sites it is then the coordinate median); at its default trim (0.1) an "
              "attacker keeps most of its weight, and update clipping (`clip_norm`) is the "
              "defence.", "",
              "| rule | tolerates 1 of 3 | worst cost vs mean | where |", "|---|---|---|---|"]
    for rule in RULES[1:]:
        worst = min(result["cases"], key=lambda c, r=rule: c["summary"][r]["minus_mean_rule"])
        lines.append(f"| {rule} | {'yes' if rule in ROBUST_AT_3 else 'no'} | "
                     f"{worst['summary'][rule]['minus_mean_rule']:+.3f} | "
                     f"{worst['example']} {worst['split']} |")
    lines += ["", "Where every hospital lacks some classes (digits, missing-classes) the honest "
              "updates disagree coordinate by coordinate, and a coordinate-wise median takes the "
              "middle value of each: a smaller step than the mean's, so the swarm learns slower "
              "(measured on seed 0: with 48 epochs instead of 16 coordmedian reaches 0.962, mean "
              "0.978 with 16; a trimmed mean that keeps even 3% of the outer values, trim 0.34 "
              "with these sites' weights, recovers 0.967, and that 3% is exactly what an "
              "attacker would control). The geometric median moves the whole model towards the "
              "majority instead: it tolerates an attacker and costs no more than noise here, so "
              "it is the robust rule to choose when sites hold different kinds of cases "
              "(`merge_method=\"geomedian\"`).", ""]
    lines += ["", "## End-of-training policy (mean rule; a site that is done before the others)",
              "", "| example | split | inactive | snapshot | active |", "|---|---|---|---|---|"]
    for case in result["cases"]:
        p = case["policies"]
        lines.append(f"| {case['example']} | {case['split']} | {p['inactive']:.4f} | "
                     f"{p['snapshot']:.4f} | {p['active']:.4f} |")
    if "real_runtime" in result:
        lines += ["", "## The full runtime (seed 0, default split, mean)", "",
                  "`swarmnode demo`: anvil, node processes, mutual-TLS gRPC, trainer processes.",
                  "", "| example | swarm (full runtime) | swarm (in-process) | rounds | "
                  "all nodes agree | seconds |", "|---|---|---|---|---|---|"]
        for name, r in result["real_runtime"].items():
            lines.append(f"| {name} | {r['swarm']:.4f} | {r['in_process']:.4f} | {r['rounds']} "
                         f"| {r['all_nodes_agree']} | {r['seconds']} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        rows = case["seeds"]
        labels, means, sds, colors = [], [], [], []
        for i in range(len(rows[0]["local"])):
            v = [r["local"][i] for r in rows]
            labels.append(f"local {i + 1}")
            means.append(float(np.mean(v)))
            sds.append(float(np.std(v)))
            colors.append("#9aa5b1")
        for rule in RULES:
            v = case["rules"][rule]
            labels.append(f"swarm\n{rule}")
            means.append(float(np.mean(v)))
            sds.append(float(np.std(v)))
            colors.append("#2f6fbd")
        v = [r["central"] for r in rows]
        labels.append("central")
        means.append(float(np.mean(v)))
        sds.append(float(np.std(v)))
        colors.append("#3c9d5d")
        x = np.arange(len(labels))
        ax.bar(x, means, yerr=sds, color=colors, capsize=3)
        ax.set_xticks(x, labels, rotation=60, fontsize=8)
        low = min(m - s for m, s in zip(means, sds, strict=True))
        ax.set_ylim(max(0.0, low - 0.05), 1.0)
        ax.set_title(f"{case['example']}: {case['split']}", fontsize=10)
        ax.set_ylabel(case["metric"])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"local-only (grey) vs swarm (blue) vs central (green), "
                 f"{result['seeds']} seeds, mean ± sd")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=1,
                   help="Seeds 0..S-1 (default 1: ~15 min on 2 cores; 5: the full study).")
    p.add_argument("--jobs", type=int, default=2, help="Processes the swarm cells run in.")
    p.add_argument("--no-real", action="store_true", help="Skip the full-runtime runs.")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--compression", action="store_true",
                   help="Run the compression rows instead (float32, bf16, fp16, int8; mean): "
                        "results/quality_compression.md and .json.")
    p.add_argument("--secure", action="store_true",
                   help="Run the secure-aggregation rows instead (mean in the clear, in the "
                        "clear with secure aggregation's settings, the same with its end rule, "
                        "and with secure aggregation): results/quality_secure.md and .json.")
    p.add_argument("--syncs", type=int, default=None,
                   help="Stop each trainer after this many syncs: a quick run of the whole "
                        "pipeline (its scores mean nothing).")
    args = p.parse_args()
    if args.seeds < 1 or args.jobs < 1:
        p.error(f"--seeds and --jobs must be at least 1, got {args.seeds} and {args.jobs}")
    t0 = time.monotonic()
    if args.compression or args.secure:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "quality_secure" if args.secure else "quality_compression"

        def write(found: dict[str, Any]) -> None:
            found["seconds"] = round(time.monotonic() - t0, 1)
            (args.out / f"{name}.json").write_text(json.dumps(found, indent=1) + "\n")
            write_compression_markdown(found, args.out / f"{name}.md")

        write(run_compression(args.seeds, jobs=args.jobs, syncs=args.syncs, report=write,
                              rows=SECURE_ROWS if args.secure else COMPRESSIONS))
        print(f"wrote {args.out / name}.md in {time.monotonic() - t0:.0f} s")
        return
    result = run(args.seeds, real=not args.no_real, jobs=args.jobs, syncs=args.syncs)
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.out / "quality.md")
    write_plot(result, args.out / "quality.png")
    print(f"wrote {args.out / 'quality.md'} and quality.png in {result['seconds']} s")


if __name__ == "__main__":
    main()
