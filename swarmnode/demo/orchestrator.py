"""`swarmnode demo`: a whole swarm on one machine, from nothing but the repo.

It starts a dev chain, makes a consortium CA and one certificate per hospital, deploys the contract
with the training spec, authorises the hospitals, starts one node service and one trainer process
per hospital, shows the rounds as they happen, and ends with local-only vs swarm vs central quality
and the proof that every node holds the model whose digest is on chain.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from swarmnode.demo.swarm import LocalSwarm
from swarmnode.demo.tasks import DEFAULT_TASK, get_task
from swarmnode.errors import ConfigError, NodeError

if TYPE_CHECKING:
    from swarmnode.containers.consortium import ContainerConsortium

__all__ = [
    "NODE_KEYS",
    "SUMMARY_KEYS",
    "DemoOptions",
    "SwarmHarness",
    "demo_consortium",
    "demo_options",
    "run_demo",
    "run_demo_containers",
    "show_summary",
    "summarize",
]


# The summary `swarmnode demo --json` writes, with processes or with containers.
SUMMARY_KEYS = frozenset({
    "nodes", "killed", "central_auc", "central_accuracy", "chain_final_digest", "all_nodes_agree",
    "rounds", "merge", "contract", "seconds", "example", "headline", "swarm_vs_best_local",
    "report", "secure_aggregation",
})
NODE_KEYS = frozenset({
    "name", "samples", "labels", "final_digest", "local_auc", "local_accuracy", "swarm_auc",
    "swarm_accuracy", "rounds_joined", "train_seconds",
})


class SwarmHarness(Protocol):
    """What the demo needs of a swarm: processes (:class:`LocalSwarm`) or containers
    (:class:`swarmnode.containers.consortium.ContainerConsortium`)."""

    n: int
    names: list[str]
    accounts: list[Any]
    contract: Any
    data: Any
    seed: int
    epochs: int | None
    merge: str
    work: Path

    def trainer_indices(self) -> list[int]: ...
    def trainer_exit(self, i: int) -> int | None: ...
    def trainer_failure(self, i: int) -> str: ...
    def kill_node(self, i: int) -> None: ...
    def result(self, i: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DemoOptions:
    nodes: int = 3
    merge: str = "mean"
    workdir: Path = Path("demo-run")
    seed: int = 0
    sync_frequency: int | None = None  # None: the example's
    min_peers: int = 2
    grace_s: int = 2
    deadline_s: int = 6
    kill_leader_round: int | None = None
    timeout_s: float = 600.0
    epochs: int | None = None  # None: the example's
    example: str = DEFAULT_TASK  # digits or breast-cancer (swarmnode.demo.tasks)
    policy: str = "inactive"  # the trainers' end-of-training policy (reproducible rounds)
    topology: str = "leader"  # the spec's: leader or sharded
    secure_aggregation: bool = False  # the spec's (the leader learns only the sum)


def demo_options(*, containers: bool = False, nodes: int = 3, merge: str = "mean",
                 topology: str = "leader", example: str | None = None,
                 secure_aggregation: bool = False, **given: Any) -> DemoOptions:
    """The demo's options from ``swarmnode demo``'s flags (``given``: the other DemoOptions
    fields), refused with what to change where they do not go together. The example defaults to
    digits for processes and breast-cancer for containers; secure aggregation trains with
    min_peers 3 (with 2 the leader would learn the other site's update from the sum)."""
    if secure_aggregation and (nodes < 3 or topology != "leader" or merge != "mean"):
        raise ConfigError("--secure-aggregation needs 3 or more hospitals (--nodes 3), the "
                          "leader topology and merge rule mean (the leader sees only the sum)")
    if containers and topology != "leader":
        raise ConfigError("--topology applies to the demo's processes; the container demo "
                          "trains with the leader topology (drop --topology or --containers)")
    return DemoOptions(nodes=nodes, merge=merge, topology=topology,
                       example=example or ("breast-cancer" if containers else "digits"),
                       secure_aggregation=secure_aggregation,
                       min_peers=3 if secure_aggregation else 2, **given)


def run_demo(opts: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    t0 = time.monotonic()
    task = get_task(opts.example)
    sync_frequency = opts.sync_frequency or task.sync_frequency
    with LocalSwarm(opts.workdir, opts.nodes, merge=opts.merge, sync_frequency=sync_frequency,
                    min_peers=opts.min_peers, grace_s=opts.grace_s, deadline_s=opts.deadline_s,
                    seed=opts.seed, epochs=opts.epochs, task=task.name,
                    topology=opts.topology,
                    secure_aggregation=opts.secure_aggregation) as swarm:
        console.print(f"[bold]swarmnode demo[/]: {opts.nodes} hospitals, example {task.name} "
                      f"({task.default_split} split), merge rule {opts.merge} ({opts.topology} "
                      "topology), dev chain at "
                      f"{swarm.rpc_url}, contract {swarm.contract.address}")
        for i, name in enumerate(swarm.names):
            shard = swarm.data.hospitals[i]
            console.print(f"  {name}: {len(shard.y)} samples, {task.describe_labels(shard.y)}")
        for i in range(opts.nodes):
            swarm.start_node(i)
        swarm.wait_enrolled(list(range(opts.nodes)))
        console.print(f"{opts.nodes} node services enrolled ({time.monotonic() - t0:.1f} s); "
                      "training starts")
        for i in range(opts.nodes):
            swarm.start_trainer(i, policy=opts.policy)
        return summarize(swarm, opts, console, t0)


def _container_example(opts: DemoOptions) -> None:
    if opts.example != "breast-cancer":
        raise ConfigError(f"the container demo runs the breast-cancer example (its ml image trains "
                          f"examples/breast_cancer/train.py), not {opts.example}; use "
                          "--example breast-cancer with --containers")


def demo_consortium(opts: DemoOptions) -> ContainerConsortium:
    """The container demo's consortium (not entered yet: ``with`` writes its sites): the
    breast-cancer example, the options' hospitals, merge rule, seed, timings and secure
    aggregation. Needs a running Docker engine."""
    from swarmnode.containers.consortium import ContainerConsortium

    _container_example(opts)
    return ContainerConsortium(opts.workdir, opts.nodes, merge=opts.merge, seed=opts.seed,
                               sync_frequency=opts.sync_frequency or 4, min_peers=opts.min_peers,
                               grace_s=opts.grace_s, deadline_s=opts.deadline_s,
                               secure_aggregation=opts.secure_aggregation)


def run_demo_containers(opts: DemoOptions, console: Console | None = None) -> dict[str, Any]:
    """The same demo with each hospital as containers (``compose/hospital.yaml``: ml + node) and
    the sentinel's chain, on a Docker engine (installed and started when none runs)."""
    from swarmnode.containers.engine import ensure_engine
    from swarmnode.containers.images import build_images

    console = console or Console()
    _container_example(opts)  # before starting an engine
    t0 = time.monotonic()
    engine = ensure_engine()
    try:
        for img in build_images():
            console.print(f"image {img.tag}: {img.size / 1e6:.0f} MB"
                          f"{' (built)' if img.built else ''}")
        with demo_consortium(opts) as swarm:
            secure = (f", secure aggregation (min_peers {opts.min_peers}: each leader "
                      "receives only masked updates)" if opts.secure_aggregation else "")
            console.print(f"[bold]swarmnode demo --containers[/]: {opts.nodes} hospitals "
                          f"(compose projects {swarm.project(0)}..), merge rule {opts.merge}"
                          f"{secure}")
            swarm.up()
            console.print(f"{opts.nodes} hospitals up, nodes enrolled and healthy, contract "
                          f"{swarm.contract.address} ({time.monotonic() - t0:.1f} s); training")
            return summarize(swarm, opts, console, t0)
    finally:
        engine.stop()


def summarize(swarm: SwarmHarness, opts: DemoOptions, console: Console,
              t0: float) -> dict[str, Any]:
    """Follow the rounds until every trainer is done, then the demo's summary."""
    rounds, killed = _follow(swarm, opts, console)
    return _summary(swarm, rounds, killed, time.monotonic() - t0)


def _summary(swarm: SwarmHarness, rounds: list[dict[str, Any]], killed: set[int],
             seconds: float) -> dict[str, Any]:
    task = get_task(getattr(swarm, "task", get_task("breast-cancer")).name)
    X_all, y_all = swarm.data.pooled()
    central = task.train_local(X_all, y_all, seed=swarm.seed, epochs=swarm.epochs)
    central_scores = task.evaluate(central, swarm.data.X_test, swarm.data.y_test)
    results = [swarm.result(i) for i in range(swarm.n) if i not in killed]
    head = task.headline
    best_local = max((r["local"][head] for r in results), default=0.0)
    swarm_score = results[0]["swarm"][head] if results else 0.0
    report_dir = swarm.work / "report"
    try:
        from swarmnode.chain.report import report

        csv_path, _png = report(swarm.contract, report_dir, names={
            a.address.lower(): n for a, n in zip(swarm.accounts, swarm.names, strict=True)},
            metric_name="accuracy")  # the demo's trainers report accuracy (demo/trainer.py)
        report_path = str(csv_path.parent)
    except Exception as exc:  # the plot is a convenience: never fail the demo over it
        report_path = f"(no report: {exc})"
    final_events = swarm.contract.events(names={"TrainingFinished"})
    chain_digest = final_events[-1].args["digest"].hex() if final_events else ""
    agree = bool(chain_digest) and all(r["final_digest"] == chain_digest for r in results)
    summary = {
        "nodes": [
            {"name": r["name"], "samples": r["samples"],
             "labels": r.get("labels") or f"{r['malignant']} malignant",
             "final_digest": r["final_digest"], "local_auc": r["local"]["auc"],
             "local_accuracy": r["local"]["accuracy"], "swarm_auc": r["swarm"]["auc"],
             "swarm_accuracy": r["swarm"]["accuracy"], "rounds_joined": r["rounds"],
             "train_seconds": r["seconds"]}
            for r in results
        ],
        "killed": [swarm.names[i] for i in sorted(killed)],
        "central_auc": central_scores["auc"],
        "central_accuracy": central_scores["accuracy"],
        "chain_final_digest": chain_digest,
        "all_nodes_agree": agree,
        "rounds": rounds,
        "merge": swarm.merge,
        "contract": swarm.contract.address,
        "seconds": round(seconds, 1),
        "example": task.name,
        "headline": head,
        "swarm_vs_best_local": swarm_score - best_local,
        "report": report_path,
        "secure_aggregation": _secure_evidence(swarm),
    }
    assert set(summary) == SUMMARY_KEYS and all(set(n) == NODE_KEYS for n in summary["nodes"])
    return summary


def _secure_evidence(swarm: SwarmHarness) -> dict[str, int] | None:
    """With secure aggregation: what the node services' logs say each leader received (masked
    updates, plain ones) and summed; None without it."""
    if not getattr(swarm, "secure_aggregation", False):
        return None
    masked = plain = sums = 0
    for i in range(swarm.n):
        path = swarm.log(i, "node")  # type: ignore[attr-defined]
        text = path.read_text(errors="replace") if path.exists() else ""
        masked += len(re.findall(r"round \d+: masked update from ", text))
        plain += len(re.findall(r"round \d+: update from ", text))
        sums += len(re.findall(r"round \d+: summed \d+ masked updates", text))
    return {"masked_updates_received": masked, "plain_updates_received": plain,
            "rounds_summed": sums}


def _expected_rounds(swarm: SwarmHarness, opts: DemoOptions) -> list[int]:
    """The merges each site takes part in while it trains: its batches / the sync frequency."""
    task = get_task(getattr(swarm, "task", get_task("breast-cancer")).name)
    epochs = swarm.epochs or task.epochs
    sync = opts.sync_frequency or task.sync_frequency
    return [max(1, math.ceil(math.ceil(len(h.y) / task.batch_size) * epochs / sync))
            for h in swarm.data.hospitals]


def _site_bars(swarm: SwarmHarness, opts: DemoOptions,
               console: Console) -> tuple[Progress, dict[str, Any]]:
    """A progress bar per site: the merges it joined out of those its training needs."""
    bars = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[state]}"), console=console)
    tasks = {name: bars.add_task(name, total=total, state="training")
             for name, total in zip(swarm.names, _expected_rounds(swarm, opts), strict=True)}
    return bars, tasks


def _follow(swarm: SwarmHarness, opts: DemoOptions,
            console: Console) -> tuple[list[dict[str, Any]], set[int]]:
    """Print each round as the chain records it (and a progress bar per site, on a terminal),
    until every trainer has exited."""
    bars, tasks = _site_bars(swarm, opts, console)
    with bars if console.is_terminal else nullcontext():
        out = _follow_events(swarm, opts, bars.console if console.is_terminal else console,
                             bars, tasks)
    return out


def _follow_events(swarm: SwarmHarness, opts: DemoOptions, console: Console, bars: Progress,
                   tasks: dict[str, Any]) -> tuple[list[dict[str, Any]], set[int]]:
    by_addr = {a.address: n for a, n in zip(swarm.accounts, swarm.names, strict=True)}
    seen_block = 0
    rounds: dict[int, dict[str, Any]] = {}
    killed: set[int] = set()
    deadline = time.monotonic() + opts.timeout_s
    while True:
        for ev in swarm.contract.events(from_block=seen_block):
            seen_block = max(seen_block, ev.block + 1)
            a = ev.args
            if ev.name == "LeaderElected":
                r = rounds.setdefault(a["round"], {"round": a["round"], "leaders": []})
                r["leaders"].append(by_addr.get(a["leader"], a["leader"]))
                if opts.kill_leader_round == a["round"] and not killed:
                    idx = swarm.names.index(by_addr[a["leader"]])
                    swarm.kill_node(idx)
                    killed.add(idx)
                    console.print(f"[red]round {a['round']}: killed the leader, "
                                  f"{swarm.names[idx]}'s node service[/]")
            elif ev.name == "LeaderFailed":
                console.print(f"round {a['round']}: leader {by_addr.get(a['leader'])} missed the "
                              "deadline; re-elected on chain")
            elif ev.name == "MergeCommitted":
                r = rounds.setdefault(a["round"], {"round": a["round"], "leaders": []})
                r.update(leader=by_addr.get(a["leader"], a["leader"]), digest=a["digest"].hex(),
                         members=[by_addr.get(m, m) for m in a["members"]])
                console.print(f"round {a['round']:>3}: leader {r['leader']:<11} merged "
                              f"{len(a['members'])} updates, digest {a['digest'].hex()[:12]}")
                for member in r["members"]:
                    if member in tasks:
                        t = bars.tasks[tasks[member]]
                        bars.update(tasks[member], completed=t.completed + 1,
                                    total=max(t.total or 0, t.completed + 1))
            elif ev.name == "NodeFinished":
                console.print(f"{by_addr.get(a['node'])} finished local training")
                if by_addr.get(a["node"]) in tasks:
                    bars.update(tasks[by_addr[a["node"]]], state="finished; waiting for the rest")
            elif ev.name == "FinalRound":
                console.print(f"every trainer is done: round {a['round']} is the final round")
            elif ev.name == "TrainingFinished":
                console.print(f"[green]training finished at round {a['round']}[/]")
        exits = {i: swarm.trainer_exit(i) for i in swarm.trainer_indices() if i not in killed}
        for i, code in exits.items():
            if code == 0 and swarm.names[i] in tasks:
                task_id = tasks[swarm.names[i]]
                bars.update(task_id, completed=max(bars.tasks[task_id].completed,
                                                   bars.tasks[task_id].total or 0),
                            state="done: holds the final model")
        if all(code is not None for code in exits.values()):
            break
        for i, code in exits.items():
            if code not in (None, 0):
                raise NodeError(f"trainer {swarm.names[i]} failed (exit {code}): "
                                f"{swarm.trainer_failure(i)}")
        if time.monotonic() > deadline:
            raise NodeError(f"the demo did not finish within {opts.timeout_s:.0f} s; see the logs "
                            f"under {swarm.work / 'logs'}")
        time.sleep(0.2)
    return [rounds[k] for k in sorted(rounds)], killed


def show_summary(summary: dict[str, Any], console: Console) -> None:
    if not console.is_terminal:  # piped or logged: do not squeeze the tables into 80 columns
        console = Console(width=120)
    table = Table(title="Test-set quality on one shared test set: local-only vs swarm vs central")
    for col in ("site", "samples", "labels", "local AUC", "swarm AUC", "local acc",
                "swarm acc", "final model digest"):
        table.add_column(col, no_wrap=True)
    for n in summary["nodes"]:
        table.add_row(n["name"], str(n["samples"]), n["labels"], f"{n['local_auc']:.4f}",
                      f"{n['swarm_auc']:.4f}", f"{n['local_accuracy']:.3f}",
                      f"{n['swarm_accuracy']:.3f}", n["final_digest"][:16])
    for name in summary.get("killed", []):
        table.add_row(name, "", "", "", "", "", "", "(node killed)")
    table.add_row("central (pooled)", "", "", f"{summary['central_auc']:.4f}", "",
                  f"{summary['central_accuracy']:.3f}", "", "")
    table.add_row("[bold]on chain[/]", "", "", "", "", "", "", summary["chain_final_digest"][:16])
    console.print(table)
    rounds = summary["rounds"]
    per_row = 4
    rt = Table(title=f"{len(rounds)} rounds: leader (members merged) digest")
    for _ in range(per_row):
        rt.add_column("#", justify="right", no_wrap=True)
        rt.add_column("leader", no_wrap=True)
    cells = []
    for r in rounds:
        leaders = r.get("leaders", [])
        leader = r.get("leader", "-")
        if len(leaders) > 1:
            leader = f"{leader} (re-elected)"
        cells += [str(r["round"]),
                  f"{leader} ({len(r.get('members', []))}) {r.get('digest', '')[:6]}"]
    for i in range(0, len(cells), 2 * per_row):
        row = cells[i:i + 2 * per_row]
        rt.add_row(*(row + [""] * (2 * per_row - len(row))))
    console.print(rt)
    verdict = ("[green]every node holds the final model whose digest is on chain[/]"
               if summary["all_nodes_agree"] else "[red]nodes DISAGREE with the chain[/]")
    head = {"auc": "AUC", "accuracy": "accuracy"}.get(summary["headline"], summary["headline"])
    gap = summary["swarm_vs_best_local"]
    console.print(f"{summary['example']}: swarm {head} {'+' if gap >= 0 else ''}{gap:.4f} against "
                  "the best hospital's own model")
    console.print(f"per-round validation loss and metric of every site: {summary['report']}")
    secure = summary.get("secure_aggregation")
    if secure is not None:
        never = secure["plain_updates_received"] == 0 and secure["masked_updates_received"] > 0
        console.print(
            f"secure aggregation: {secure['rounds_summed']} rounds summed from "
            f"{secure['masked_updates_received']} masked updates; "
            + ("[green]the leader never held a plain update[/]" if never else
               f"[red]{secure['plain_updates_received']} plain updates were received[/]"))
    console.print(f"{verdict}  ({summary['seconds']} s)")
