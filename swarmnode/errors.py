"""The one exception tree of swarmnode.

Every error a user can meet is a :class:`SwarmError`. Each message says what happened and what to do
next, naming the setting, file, node or round concerned. Each class carries an exit code in a
numbered band, so the CLI (and scripts around it) can tell failures apart::

    SwarmError (1)
    ├── ConfigError (10)            a setting, file or flag is wrong            [ValueError]
    │   └── SpecMismatch (11)       a trainer's settings differ from the swarm's training spec
    ├── ChainError (20)             the chain or the contract refused or failed
    │   ├── ChainUnavailable (21)   no JSON-RPC answer at the URL                 [ConnectionError]
    │   ├── ContractNotFound (22)   no SwarmLearning contract at the address
    │   ├── ContractReverted (23)   the contract refused a call (reason attached)
    │   │   ├── NotPermitted (25)   the caller may not do this (identity, role, revocation)
    │   │   ├── NotNow (26)         the training's state does not allow it now (round, grace,
    │   │   │                       deadline, finished): read the state and act on it
    │   │   └── BadArgument (27)    an argument the contract refuses (zero, too large, listed twice)
    │   └── ChainTimeout (24)       an awaited on-chain event did not happen in time [TimeoutError]
    ├── IdentityError (30)          certificates, keys, trust bundles
    ├── TransportError (40)         the peer or local API failed
    │   ├── PeerUnavailable (41)    a peer could not be reached                   [ConnectionError]
    │   ├── PeerRefused (42)        a peer's identity was refused (TLS/chain) [PermissionError]
    │   └── PayloadRejected (43)    parameter bytes failed a check (digest, spec, size, NaN)
    │       ├── DuplicateUpdate (44)  the leader already holds this sender's update
    │       └── NonFiniteValues (45)  parameters hold NaN/Inf, or would overflow the merge
    ├── MergeError (50)             a merge rule could not be applied
    ├── RoundError (60)             the round protocol could not go on
    │   ├── RoundTimeout (61)       a round step did not finish in time           [TimeoutError]
    │   ├── RoundAbandoned (62)     a secure-aggregation round cannot complete; nothing revealed
    │   └── AggregateRejected (63)  a masked sum or its parts fail a check (bound, hash, reveal)
    └── NodeError (70)              the node service failed
        └── NodeUnavailable (71)    no node service answers at the local API      [ConnectionError]
"""

from __future__ import annotations

__all__ = [
    "AggregateRejected",
    "BadArgument",
    "ChainError",
    "ChainTimeout",
    "ChainUnavailable",
    "ConfigError",
    "ContractNotFound",
    "ContractReverted",
    "DuplicateUpdate",
    "IdentityError",
    "MergeError",
    "NodeError",
    "NodeUnavailable",
    "NonFiniteValues",
    "NotNow",
    "NotPermitted",
    "PayloadRejected",
    "PeerRefused",
    "PeerUnavailable",
    "RoundAbandoned",
    "RoundError",
    "RoundTimeout",
    "SpecMismatch",
    "SwarmError",
    "TransportError",
    "error_class",
]


class SwarmError(Exception):
    """Root of every swarmnode error."""

    exit_code = 1
    help = "unexpected swarmnode error"


class ConfigError(SwarmError, ValueError):
    exit_code = 10
    help = "a setting, file or flag is wrong"


class SpecMismatch(ConfigError):
    exit_code = 11
    help = "the trainer's settings differ from the swarm's training spec"

    def __init__(self, message: str, setting: str = "") -> None:
        super().__init__(message)
        self.setting = setting


class ChainError(SwarmError):
    exit_code = 20
    help = "the chain or the contract refused or failed"


class ChainUnavailable(ChainError, ConnectionError):
    exit_code = 21
    help = "no JSON-RPC answer at the chain URL"


class ContractNotFound(ChainError):
    exit_code = 22
    help = "no SwarmLearning contract at the given address"


class ContractReverted(ChainError):
    exit_code = 23
    help = "the contract refused a call"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class NotPermitted(ContractReverted):
    exit_code = 25
    help = "the caller may not do this (identity, role, revocation)"


class NotNow(ContractReverted):
    exit_code = 26
    help = "the training's state does not allow this call now"


class BadArgument(ContractReverted):
    exit_code = 27
    help = "the contract refuses an argument"


class ChainTimeout(ChainError, TimeoutError):
    exit_code = 24
    help = "an awaited on-chain event did not happen in time"


class IdentityError(SwarmError):
    exit_code = 30
    help = "a certificate, key or trust bundle is missing or invalid"


class TransportError(SwarmError):
    exit_code = 40
    help = "the peer or local API failed"


class PeerUnavailable(TransportError, ConnectionError):
    exit_code = 41
    help = "a peer could not be reached"


class PeerRefused(TransportError, PermissionError):
    exit_code = 42
    help = "a peer's identity was refused"


class PayloadRejected(TransportError):
    exit_code = 43
    help = "parameter bytes failed a check (digest, spec, size, NaN/Inf)"


class NonFiniteValues(PayloadRejected):
    """Parameters hold NaN or Inf (a diverged or hostile sender, or an overflowing merge)."""

    exit_code = 45
    help = "parameters hold NaN/Inf, or values so large that the merge would overflow"


class DuplicateUpdate(PayloadRejected):
    exit_code = 44
    help = "the leader already holds this sender's update for the round (a replay or a retry)"


class MergeError(SwarmError):
    exit_code = 50
    help = "a merge rule could not be applied"


class RoundError(SwarmError):
    exit_code = 60
    help = "the round protocol could not go on"


class RoundTimeout(RoundError, TimeoutError):
    exit_code = 61
    help = "a round step did not finish in time"


class RoundAbandoned(RoundError):
    exit_code = 62
    help = "a secure-aggregation round cannot complete and is abandoned; nothing is revealed"


class AggregateRejected(RoundError):
    exit_code = 63
    help = "a masked sum or its parts fail a check (bound, hash, reveal, verification)"


class NodeError(SwarmError):
    exit_code = 70
    help = "the node service failed or is not running"


class NodeUnavailable(NodeError, ConnectionError):
    exit_code = 71
    help = "no node service answers at the local API (not started, or restarting)"


def error_class(name: str) -> type[SwarmError]:
    """The SwarmError subclass called ``name`` (for errors that cross a process boundary)."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, SwarmError):
        return cls
    return SwarmError
