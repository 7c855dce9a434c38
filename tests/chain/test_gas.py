"""The gas budget: one round costs under 135k gas per node (benchmarks/gas.py has the details).

It was 120k before the leader draw moved to the closing block's hash: the draw transaction that
pins the leader costs 42k gas per round, shared by the nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Swarm

BUDGET = 135_000


def test_one_round_costs_under_budget_per_node(make_swarm: Callable[..., Swarm]) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    gas = [node.checkin(1, 400 + i).gas_used for i, node in enumerate(swarm.nodes)]
    info = swarm.admin.round(1)
    gas.append(swarm.nodes[0].draw(1).gas_used)  # pins the leader drawn from the closing block
    gas.append(swarm.leader(1).commit_merge(1, b"\x5a" * 32, info.participants).gas_used)
    gas += [node.report_metrics(1, 0.6931, 0.85).gas_used for node in swarm.nodes]
    per_node = sum(gas) / len(swarm.nodes)
    assert per_node < BUDGET, f"{per_node:.0f} gas per node per round (budget {BUDGET})"
