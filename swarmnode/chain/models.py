"""Values read from the contracts (registry, training): frozen dataclasses, no web3 types."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

__all__ = [
    "ChainEvent",
    "ContractSettings",
    "NodeInfo",
    "RoundInfo",
    "RoundStatus",
    "SiteInfo",
    "TxResult",
]


class RoundStatus(IntEnum):
    """A round's stage, as the contract's ``RoundStatus`` enum numbers it."""

    OPEN = 0  # accepting check-ins, no leader yet
    ELECTED = 1  # leader drawn, merge not committed yet
    COMMITTED = 2  # merged digest on chain
    ABANDONED = 3  # every participant failed as leader; the swarm moved on


@dataclass(frozen=True)
class ContractSettings:
    """The training's fixed settings, pinned at deployment."""

    spec_hash: bytes
    min_peers: int
    grace_s: int
    deadline_s: int
    admin: str
    absent_after_rounds: int = 2  # markAbsent needs this many rounds since the last check-in
    max_weight: int = (1 << 96) - 1  # the largest weight a check-in may carry
    deployed_block: int = 0  # the contract's event log starts in this block
    secure_aggregation: bool = False  # the spec's: a join copies the site's registry key


@dataclass(frozen=True)
class SiteInfo:
    """A site as the consortium's registry knows it."""

    address: str
    fingerprint: bytes  # SHA-256 of the site certificate's DER
    endpoint: str
    authorized: bool
    enrolled: bool
    revoked: bool
    enrolled_at: int  # unix time (chain) of its enrolment; 0 before
    public_key: bytes | None  # the site's published key slot, None while empty


@dataclass(frozen=True)
class NodeInfo:
    """One node as the contract knows it."""

    address: str
    fingerprint: bytes  # SHA-256 of the node certificate's DER
    endpoint: str
    authorized: bool
    enrolled: bool
    revoked: bool
    finished: bool
    last_seen: int  # unix time of its last state-changing call
    absent: bool = False  # marked absent (stopped taking part); a check-in brings it back
    last_checkin_round: int = 0  # the last round it checked in for (0: none)
    enrolled_round: int = 0  # the current round when it enrolled (0: not enrolled)

    @property
    def state(self) -> str:
        """One word: revoked, finished, absent, active, authorized or unknown."""
        if self.revoked:
            return "revoked"
        if self.finished:
            return "finished"
        if self.absent:
            return "absent"
        if self.enrolled:
            return "active"
        if self.authorized:
            return "authorized"
        return "unknown"


@dataclass(frozen=True)
class RoundInfo:
    """One round: its status, leader, participants (in check-in order) and merged digest."""

    round: int
    status: RoundStatus
    leader: str | None
    attempt: int
    participants: tuple[str, ...]
    digest: bytes | None
    elected_at: int
    first_checkin_at: int
    is_final: bool


@dataclass(frozen=True)
class ChainEvent:
    """A decoded contract event (addresses checksummed, bytes as ``bytes``)."""

    name: str
    args: dict[str, Any] = field(hash=False)
    block: int
    tx_hash: str
    log_index: int


@dataclass(frozen=True)
class TxResult:
    """A mined, successful transaction."""

    tx_hash: str
    gas_used: int
    block: int
    events: tuple[str, ...] = ()  # names of the contract's events it emitted, in order
