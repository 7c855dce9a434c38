"""Gas per node per round of a SwarmTraining, the contracts' sizes, and the wall time of a round.

One round per node is its check-in (which carries its metrics of the round before: no metrics
transaction), plus the draw and the leader's commitMerge shared by all nodes (the check-in that
completes the round closes it; the draw, in a later block, pins the leader drawn from the closing
block's hash). Measured on a fresh anvil with 3 and 8 nodes over several rounds, after the sites
joined; writes ``results/gas.json`` (with the deployed runtime size of both contracts) and prints a
table. Exits 1 if a configuration goes over its budget (90k gas per node per round at 3 sites,
75k at 8) or a contract's runtime over 20,480 bytes (4 KiB below EIP-170's 24,576).

    .venv/bin/python benchmarks/gas.py [--rounds 3] [--out results/gas.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.compile import load_artifact
from swarmnode.chain.launcher import DevChain, anvil_binary

BUDGET = {3: 90_000, 8: 75_000}
MAX_RUNTIME_BYTES = 20_480
ROOT = Path(__file__).resolve().parents[1]
SPEC = json.dumps({"merge_method": "mean", "min_peers": 2, "sync_frequency": 32}, sort_keys=True)


def measure(url: str, nodes: int, rounds: int, secure: bool = False,
            dp: bool = False) -> dict[str, Any]:
    """Deploy, enrol ``nodes`` nodes and run ``rounds`` full rounds; gas and timings.
    ``secure``: each check-in carries a masked update's hash (secure aggregation); ``dp``: each
    site's metrics carry its epsilon at its delta (every site trains with DP)."""
    w3 = connect(url)
    admin = SwarmContract.deploy(w3, dev_account(0), SPEC, min(2, nodes), 5, 60)
    sizes = {name: len(w3.eth.get_code(addr)) for name, addr in
             (("SwarmRegistry", admin.registry.address), ("SwarmTraining", admin.address))}
    handles = [admin.with_account(dev_account(i)) for i in range(1, nodes + 1)]
    for i, h in enumerate(handles):
        admin.authorize(h.account_address, hashlib.sha256(h.account_address.encode()).digest())
        h.enroll(f"10.0.0.{i + 1}:7100")
    by_address = {h.account_address: h for h in handles}
    checkin: list[int] = []
    elect_checkin: list[int] = []
    commit: list[int] = []
    draw: list[int] = []
    per_node: list[float] = []
    wall: list[float] = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        round_gas = 0
        for i, h in enumerate(handles):
            privacy = (2.5 * r + 0.01 * i, 1e-5) if dp else None
            carried = (r - 1, 0.6931 / r + 0.01 * i, 0.80 + 0.01 * r, privacy) if r > 1 else None
            masked = hashlib.sha256(b"%d/%d" % (r, i)).digest() if secure else None
            res = h.checkin(r, 400 + 37 * i, metrics=carried, masked_hash=masked)
            (elect_checkin if i == nodes - 1 else checkin).append(res.gas_used)
            round_gas += res.gas_used
        res = handles[0].draw(r)
        draw.append(res.gas_used)
        round_gas += res.gas_used
        info = admin.round(r)
        assert info.leader is not None, f"round {r} was not elected by the last check-in"
        digest = hashlib.sha256(f"merged model of round {r}".encode()).digest()
        res = by_address[info.leader].commit_merge(r, digest, info.participants)
        commit.append(res.gas_used)
        round_gas += res.gas_used
        wall.append(time.perf_counter() - t0)
        per_node.append(round_gas / nodes)
    return {
        "checkin": round(statistics.mean(checkin + elect_checkin)),
        "checkin_plain": round(statistics.mean(checkin)) if checkin else None,
        "checkin_electing": round(statistics.mean(elect_checkin)),
        "draw": round(statistics.mean(draw)),
        "commitMerge": round(statistics.mean(commit)),
        "per_node_per_round": round(statistics.mean(per_node)),
        "round_wall_s": round(statistics.median(wall), 4),
        "round_txs": nodes + 2,  # check-ins (with metrics), the draw, the commit
        "rounds": rounds,
        "budget": BUDGET[nodes],
    }, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gas.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    secure: dict[str, Any] = {}
    dp: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    with DevChain() as chain:
        for n in (3, 8):
            results[str(n)], sizes = measure(chain.url, n, args.rounds)
            secure[str(n)], _ = measure(chain.url, n, args.rounds, secure=True)
            dp[str(n)], _ = measure(chain.url, n, args.rounds, dp=True)
    anvil_version = subprocess.run([str(anvil_binary()), "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0]
    artifact = load_artifact("SwarmTraining")
    report = {
        "nodes": results,
        "nodes_secure_aggregation": secure,
        "nodes_dp": dp,
        "budget_per_node_per_round": {str(k): v for k, v in BUDGET.items()},
        "bytecode_bytes": sizes,
        "max_runtime_bytes": MAX_RUNTIME_BYTES,
        "notes": "gas_used per transaction; per_node_per_round = (sum of check-ins incl. the "
                 "electing one, each carrying its metrics of the round before from round 2 on "
                 "+ draw + commitMerge) / nodes; nodes_secure_aggregation: the same with each "
                 "check-in carrying its masked update's hash; nodes_dp: the same with each "
                 "site's metrics carrying its epsilon at its delta (PrivacyReported); "
                 "bytecode_bytes = deployed runtime code; "
                 "round_wall_s = "
                 "median wall time of one round's chain calls made sequentially from one "
                 "process against anvil with automine",
        "compiler": artifact["compiler"],
        "evmVersion": artifact["evmVersion"],
        "chain": anvil_version,
        "machine": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title="SwarmTraining gas per round (budget per node: 90k at 3, 75k at 8)",
                  caption="electing: the check-in that completes the round; round: wall time")
    for col in ("nodes", "checkin", "electing", "draw", "commit", "per node",
                "round"):
        table.add_column(col, justify="right")
    over = False
    rows = [*results.items(), *((f"{n} secagg", r) for n, r in secure.items()),
            *((f"{n} dp", r) for n, r in dp.items())]
    for n, r in rows:
        over |= r["per_node_per_round"] >= r["budget"]
        table.add_row(n, f"{r['checkin']:,}", f"{r['checkin_electing']:,}",
                      f"{r['draw']:,}", f"{r['commitMerge']:,}",
                      f"{r['per_node_per_round']:,}", f"{r['round_wall_s'] * 1000:.0f} ms")
    console = Console()
    console.print(table)
    for name, size in sizes.items():
        over |= size > MAX_RUNTIME_BYTES
        console.print(f"{name}: {size:,} bytes of runtime code (limit {MAX_RUNTIME_BYTES:,})")
    console.print(f"wrote {args.out}")
    if over:
        console.print("[red]over budget[/]")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
