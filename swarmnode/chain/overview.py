"""A read-only summary of one training on chain: settings, nodes, rounds (``swarmnode status``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from swarmnode.chain.client import FIXED_POINT, SwarmContract
from swarmnode.chain.models import ContractSettings, NodeInfo, RoundInfo, RoundStatus

__all__ = ["Overview", "RoundSummary", "overview"]


@dataclass(frozen=True)
class RoundSummary:
    """A round with the mean of the metrics its nodes reported (None when none did)."""

    info: RoundInfo
    mean_loss: float | None
    mean_metric: float | None
    reports: int


@dataclass(frozen=True)
class Overview:
    contract: str
    chain: str
    settings: ContractSettings
    current_round: int
    final_round: int | None
    training_finished: bool
    active_count: int
    nodes: tuple[NodeInfo, ...]
    rounds: tuple[RoundSummary, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: bytes as hex, statuses as lower-case names."""
        s = self.settings
        return {
            "contract": self.contract,
            "chain": self.chain,
            "settings": {
                "spec_hash": s.spec_hash.hex(),
                "min_peers": s.min_peers,
                "grace_s": s.grace_s,
                "deadline_s": s.deadline_s,
                "admin": s.admin,
            },
            "current_round": self.current_round,
            "final_round": self.final_round,
            "training_finished": self.training_finished,
            "active_count": self.active_count,
            "nodes": [
                {
                    "address": n.address,
                    "endpoint": n.endpoint,
                    "fingerprint": n.fingerprint.hex(),
                    "state": n.state,
                    "last_seen": n.last_seen,
                    "last_checkin_round": n.last_checkin_round,
                }
                for n in self.nodes
            ],
            "rounds": [
                {
                    "round": r.info.round,
                    "status": r.info.status.name.lower(),
                    "leader": r.info.leader,
                    "attempt": r.info.attempt,
                    "participants": list(r.info.participants),
                    "digest": r.info.digest.hex() if r.info.digest else None,
                    "is_final": r.info.is_final,
                    "mean_loss": r.mean_loss,
                    "mean_metric": r.mean_metric,
                    "metric_reports": r.reports,
                }
                for r in self.rounds
            ],
        }


def overview(contract: SwarmContract, last_rounds: int = 20) -> Overview:
    """Read the contract's views (and its metric events) into one :class:`Overview`."""
    current = contract.current_round()
    finished = contract.training_finished()
    # After the final commit the current round is one past the final round: nothing to show.
    last = current - 1 if finished else current
    first = max(1, last - last_rounds + 1)
    metrics: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for event in contract.events(names={"MetricsReported"}):
        metrics[int(event.args["round"])].append((event.args["loss"], event.args["metric"]))
    rounds = []
    for r in range(first, last + 1):
        info = contract.round(r)
        if info.status is RoundStatus.OPEN and not info.participants and r != current:
            continue
        reported = metrics.get(r, [])
        n = len(reported)
        rounds.append(RoundSummary(
            info=info,
            mean_loss=sum(x for x, _ in reported) / n / FIXED_POINT if n else None,
            mean_metric=sum(y for _, y in reported) / n / FIXED_POINT if n else None,
            reports=n,
        ))
    return Overview(
        contract=contract.address,
        chain=contract.chain,
        settings=contract.settings(),
        current_round=current,
        final_round=contract.final_round(),
        training_finished=finished,
        active_count=contract.active_count(),
        nodes=tuple(contract.nodes()),
        rounds=tuple(rounds),
    )
