"""A read-only summary of one training on chain: settings, nodes, rounds (``swarmnode status``),
and each DP site's privacy spent (epsilon at its delta, as reported with its metrics)."""

from __future__ import annotations

import csv
import ipaddress
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmnode.chain import epsilon as chain_epsilon
from swarmnode.chain.client import FIXED_POINT, SwarmContract
from swarmnode.chain.models import ContractSettings, NodeInfo, RoundInfo, RoundStatus
from swarmnode.errors import ConfigError

__all__ = ["Overview", "RoundSummary", "SitePrivacy", "Waiting", "overview", "read_names",
           "site_name"]


def read_names(path: Path) -> dict[str, str]:
    """Site names by address from a CSV with ``name`` and ``address`` columns (the consortium's
    ``sites.csv``)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConfigError(f"cannot read the site names file {path}: {exc.strerror}") from None
    if rows and not {"name", "address"} <= set(rows[0]):
        raise ConfigError(f"{path} needs the columns name and address (has {', '.join(rows[0])})")
    return {r["address"].strip().lower(): r["name"].strip() for r in rows if r.get("address")}


def site_name(node: NodeInfo, names: dict[str, str] | None = None) -> str:
    """What to call a site: its name from ``names``, else the host of its endpoint when that is a
    DNS name (containers: the site's name), else its address."""
    if names and node.address.lower() in names:
        return names[node.address.lower()]
    host = node.endpoint.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host and host != "localhost":
            return host
    return node.address


@dataclass(frozen=True)
class Waiting:
    """What the current round waits for, and since when (chain time)."""

    round: int
    stage: str  # check-in, draw, merge, finished
    waiting_for: tuple[str, ...]  # site names
    since: int | None
    deadline: int | None = None
    checked_in: tuple[str, ...] = field(default_factory=tuple)
    leader: str | None = None

    def to_json(self, now: int) -> dict[str, Any]:
        return {
            "round": self.round,
            "stage": self.stage,
            "waiting_for": list(self.waiting_for),
            "since": self.since,
            "seconds": None if self.since is None else now - self.since,
            "deadline": self.deadline,
            "checked_in": list(self.checked_in),
            "leader": self.leader,
        }

    def describe(self, now: int) -> str:
        """One line for a log: what the round waits for, and for how long."""
        waited = "" if self.since is None else f" for {max(now - self.since, 0)} s"
        if self.stage == "check-in":
            who = ", ".join(self.waiting_for) or "nobody (the grace period)"
            joined = ", ".join(self.checked_in) or "none yet"
            return (f"round {self.round} waits{waited} for check-ins from {who} "
                    f"(checked in: {joined})")
        if self.stage == "draw":
            return f"round {self.round} waits{waited} for its leader to be drawn"
        if self.stage == "merge":
            left = "" if self.deadline is None else f", deadline in {self.deadline - now} s"
            return (f"round {self.round} waits{waited} for leader {self.leader} to merge and "
                    f"commit{left}")
        return f"round {self.round}: {self.stage}"


@dataclass(frozen=True)
class SitePrivacy:
    """A DP site's privacy spent, as it reported it with its metrics of ``round``."""

    round: int
    epsilon: float
    delta: float

    @property
    def label(self) -> str:
        return chain_epsilon.label(self.epsilon, self.delta)

    def to_json(self) -> dict[str, Any]:
        # JSON has no infinity: an infinite epsilon (no noise) is the string "inf"
        eps = "inf" if self.epsilon == float("inf") else self.epsilon
        return {"round": self.round, "epsilon": eps, "delta": self.delta}


@dataclass(frozen=True)
class RoundSummary:
    """A round with the mean of the metrics its nodes reported (None when none did), and the
    privacy its DP sites reported with theirs (by address)."""

    info: RoundInfo
    mean_loss: float | None
    mean_metric: float | None
    reports: int
    privacy: dict[str, SitePrivacy] = field(default_factory=dict)


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
    names: dict[str, str] = field(default_factory=dict)  # address -> site name
    waiting: Waiting | None = None
    now: int = 0  # the chain's time when read
    privacy: dict[str, SitePrivacy] = field(default_factory=dict)  # a DP site's latest report

    def name(self, address: str | None) -> str | None:
        return None if address is None else self.names.get(address, address)

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
            "now": self.now,
            "waiting": None if self.waiting is None else self.waiting.to_json(self.now),
            "nodes": [
                {
                    "name": self.names.get(n.address, n.address),
                    "address": n.address,
                    "endpoint": n.endpoint,
                    "fingerprint": n.fingerprint.hex(),
                    "state": n.state,
                    "last_seen": n.last_seen,
                    "last_checkin_round": n.last_checkin_round,
                    # a DP site's latest epsilon at its delta; None: not DP (or none reported)
                    "privacy": (self.privacy[n.address].to_json()
                                if n.address in self.privacy else None),
                }
                for n in self.nodes
            ],
            "rounds": [
                {
                    "round": r.info.round,
                    "status": r.info.status.name.lower(),
                    "leader": r.info.leader,
                    "leader_name": self.name(r.info.leader),
                    "attempt": r.info.attempt,
                    "participants": list(r.info.participants),
                    "participant_names": [self.name(p) for p in r.info.participants],
                    "digest": r.info.digest.hex() if r.info.digest else None,
                    "is_final": r.info.is_final,
                    "mean_loss": r.mean_loss,
                    "mean_metric": r.mean_metric,
                    "metric_reports": r.reports,
                    "privacy": [{"name": self.name(a), "address": a, **p.to_json()}
                                for a, p in r.privacy.items()],
                }
                for r in self.rounds
            ],
        }


def _waiting(current: RoundSummary | None, waiting_for: tuple[str, ...], names: dict[str, str],
             deadline_s: int, finished: bool) -> Waiting | None:
    """``waiting_for``: the sites the contract says the open round still waits for."""
    if current is None:
        return None
    info = current.info
    if finished:
        return Waiting(info.round, "finished", (), None)
    name = lambda a: names.get(a, a)  # noqa: E731
    joined = tuple(name(p) for p in info.participants)
    if info.status is RoundStatus.OPEN:
        # the contract's answer (the grace period may elect without them)
        missing = tuple(name(a) for a in waiting_for)
        return Waiting(info.round, "check-in", missing, info.first_checkin_at or None,
                       checked_in=joined)
    if info.status is RoundStatus.ELECTED and info.leader is None:
        return Waiting(info.round, "draw", (), info.elected_at, checked_in=joined)
    if info.status is RoundStatus.ELECTED:
        return Waiting(info.round, "merge", (name(info.leader),), info.elected_at,
                       deadline=info.elected_at + deadline_s, checked_in=joined,
                       leader=name(info.leader))
    return None


def waiting_now(contract: SwarmContract, names: dict[str, str] | None = None,
                nodes: Sequence[NodeInfo] | None = None) -> tuple[Waiting | None, int]:
    """What the current round waits for, from a few views (no event scan), and the chain's
    time: what a node tells its waiting trainer. ``nodes``: the enrolled nodes as the caller
    read them recently (they only name the sites; default: read now, one view per node)."""
    finished = contract.training_finished()
    current = contract.current_round()
    r = current - 1 if finished else current
    # the latest block's time, or this host's clock when no block came since (an idle dev chain)
    now = max(contract.block_timestamp(), int(time.time()))
    if r < 1:
        return None, now
    if nodes is None:
        nodes = tuple(contract.nodes())
    named = {n.address: site_name(n, names) for n in nodes}
    summary = RoundSummary(info=contract.round(r), mean_loss=None, mean_metric=None, reports=0)
    waiting_for = tuple(contract.waiting_for(r))
    return _waiting(summary, waiting_for, named, contract.settings().deadline_s, finished), now


def overview(contract: SwarmContract, last_rounds: int = 20,
             names: dict[str, str] | None = None) -> Overview:
    """Read the contract's views (and its metric events) into one :class:`Overview`; ``names``:
    site names by address (lower case), else names from the sites' endpoints."""
    current = contract.current_round()
    finished = contract.training_finished()
    # After the final commit the current round is one past the final round: nothing to show.
    last = current - 1 if finished else current
    first = max(1, last - last_rounds + 1)
    metrics: dict[int, list[tuple[int, int]]] = defaultdict(list)
    privacy: dict[int, dict[str, SitePrivacy]] = defaultdict(dict)
    latest: dict[str, SitePrivacy] = {}
    for event in contract.events(names={"MetricsReported", "PrivacyReported"}):
        r = int(event.args["round"])
        if event.name == "MetricsReported":
            metrics[r].append((event.args["loss"], event.args["metric"]))
            continue
        node = str(event.args["node"])
        p = SitePrivacy(r, *chain_epsilon.from_event(event.args))
        privacy[r][node] = p
        if node not in latest or latest[node].round <= r:
            latest[node] = p
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
            privacy=dict(privacy.get(r, {})),
        ))
    nodes = tuple(contract.nodes())
    named = {n.address: site_name(n, names) for n in nodes}
    settings = contract.settings()
    now_round = next((r for r in rounds if r.info.round == current), None)
    return Overview(
        contract=contract.address,
        chain=contract.chain,
        settings=settings,
        current_round=current,
        final_round=contract.final_round(),
        training_finished=finished,
        active_count=contract.active_count(),
        nodes=nodes,
        rounds=tuple(rounds),
        names=named,
        waiting=_waiting(now_round if not finished else (rounds[-1] if rounds else None),
                         tuple(contract.waiting_for(current)), named, settings.deadline_s,
                         finished),
        now=max(contract.block_timestamp(), 0) or int(time.time()),
        privacy=latest,
    )
