"""Check a training's audit log on chain: every round's events agree with the protocol's rules.

Anyone with read access to the chain can run it; it needs no node and no parameters. With a model
file it also proves that the file is the swarm's final model (its SHA-256 is the final digest).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from swarmnode.chain.client import SwarmContract

__all__ = ["AuditReport", "audit"]


@dataclass
class AuditReport:
    rounds_committed: int = 0
    rounds_abandoned: int = 0
    reelections: int = 0
    final_round: int | None = None
    final_digest: bytes | None = None
    problems: list[str] = field(default_factory=list)
    model_matches: bool | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.model_matches is not False

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "rounds_committed": self.rounds_committed,
            "rounds_abandoned": self.rounds_abandoned, "reelections": self.reelections,
            "final_round": self.final_round,
            "final_digest": self.final_digest.hex() if self.final_digest else None,
            "model_matches_final_digest": self.model_matches, "problems": self.problems,
        }


def audit(contract: SwarmContract, model_digest: bytes | None = None) -> AuditReport:
    """Replay the training's events, with its registry's, and check each round against the
    protocol's rules (v2: identities in the registry, rounds and metrics in the training)."""
    report = AuditReport()
    registry = contract.registry
    if contract.address not in registry.trainings():
        report.problems.append(f"the registry {registry.address} does not list this training")
    authorized: set[str] = set()
    revoked: set[str] = set()
    enrolled: set[str] = set()
    joined: set[str] = set()
    checked_in: dict[int, set[str]] = defaultdict(set)
    leader: dict[int, str] = {}
    committed: dict[int, bytes] = {}
    for ev in contract.events():
        a = ev.args
        if ev.name == "Authorized":
            authorized.add(a["site"])
        elif ev.name == "Revoked":
            revoked.add(a["site"])
        elif ev.name == "Enrolled":
            if a["site"] not in authorized:
                report.problems.append(f"{a['site']} enrolled without an authorisation")
            enrolled.add(a["site"])
        elif ev.name == "Joined":
            if a["node"] not in enrolled or a["node"] in revoked:
                report.problems.append(f"{a['node']} joined without a live enrolment")
            joined.add(a["node"])
        elif ev.name == "CheckedIn":
            if a["node"] in revoked:
                report.problems.append(f"round {a['round']}: revoked {a['node']} checked in")
            if a["node"] not in joined:
                report.problems.append(f"round {a['round']}: {a['node']} checked in unjoined")
            checked_in[a["round"]].add(a["node"])
        elif ev.name == "LeaderElected":
            if a["leader"] not in checked_in[a["round"]]:
                report.problems.append(f"round {a['round']}: leader {a['leader']} did not check in")
            report.reelections += a["attempt"] > 1
            leader[a["round"]] = a["leader"]
        elif ev.name == "MergeCommitted":
            r = a["round"]
            if leader.get(r) != a["leader"]:
                report.problems.append(f"round {r}: committed by {a['leader']}, not its leader")
            strangers = set(a["members"]) - checked_in[r]
            if strangers:
                report.problems.append(f"round {r}: members {sorted(strangers)} did not check in")
            committed[r] = a["digest"]
            report.rounds_committed += 1
        elif ev.name == "MetricsReported":
            r = a["round"]
            if r not in committed or a["node"] not in checked_in[r]:
                report.problems.append(
                    f"round {r}: metrics from {a['node']}, which did not take part in a "
                    "committed round")
        elif ev.name == "RoundAbandoned":
            report.rounds_abandoned += 1
        elif ev.name == "TrainingFinished":
            report.final_round, report.final_digest = a["round"], a["digest"]
            if committed.get(a["round"]) != a["digest"]:
                report.problems.append(
                    f"final round {a['round']}: digest differs from its MergeCommitted digest"
                )
    if model_digest is not None:
        report.model_matches = report.final_digest == model_digest
        if report.final_digest is None:
            report.problems.append("the training has not finished: there is no final digest yet")
    return report
