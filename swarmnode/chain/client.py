"""The SwarmLearning contract behind a small typed interface.

Transactions are signed locally by the contract's account and sent with
``eth_sendRawTransaction`` (standard ``eth_*`` only, so geth works like anvil). A lock per account
serialises nonce use, so several threads may share one account. Every revert becomes a
:class:`~swarmnode.errors.ContractReverted` naming the function, the contract's reason and what to
do; RPC failures become :class:`~swarmnode.errors.ChainUnavailable`. No web3 type leaves here.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from eth_account.signers.local import LocalAccount
from eth_utils import event_abi_to_log_topic, function_abi_to_4byte_selector
from web3 import Web3
from web3.exceptions import Web3TypeError, Web3ValidationError, Web3ValueError

from swarmnode.chain.compile import load_artifact
from swarmnode.chain.models import (
    ChainEvent,
    ContractSettings,
    NodeInfo,
    RoundInfo,
    RoundStatus,
    TxResult,
)
from swarmnode.chain.rpc import (
    chain_id,
    connect,
    describe,
    revert_reason,
    rpc_calls,
    rpc_calls_by_method,
    rpc_guard,
)
from swarmnode.chain.tx import TxSender, require_account
from swarmnode.errors import (
    ChainError,
    ChainTimeout,
    ConfigError,
    ContractNotFound,
    ContractReverted,
)

__all__ = [
    "ChainEvent",
    "ContractSettings",
    "NodeInfo",
    "RoundInfo",
    "RoundStatus",
    "SwarmContract",
    "TxResult",
    "chain_id",
    "connect",
]

T = TypeVar("T")
ZERO_ADDRESS = "0x" + "0" * 40
DRAW_GAS = 800_000
LOG_RANGE = 5_000  # blocks per eth_getLogs query
FIXED_POINT = 1_000_000  # reportMetrics values are fixed-point x1e6
UINT32_MAX = 2**32 - 1

_ARTIFACT = load_artifact()
ABI: list[dict[str, Any]] = _ARTIFACT["abi"]
BYTECODE: str = _ARTIFACT["bytecode"]
_SELECTORS = [function_abi_to_4byte_selector(e) for e in ABI if e["type"] == "function"]
_EVENTS = {e["name"]: e for e in ABI if e["type"] == "event"}
_TOPICS = {event_abi_to_log_topic(e): name for name, e in _EVENTS.items()}

_HINTS = (
    ("not open for check-in", "read the current round with `swarmnode status` and use it"),
    ("already elected", "take the round's merged model and move on to the next round"),
    ("min peers checked in", "wait for more nodes to check in, then elect again"),
    ("grace period ends at", "call elect again after that time"),
    ("has until", "wait for the round deadline, then re-elect"),
    ("only the admin", "sign with the admin account (the deployer)"),
    ("only its leader", "only the elected leader commits; the others pull its merged model"),
    ("can be marked absent from round", "wait until that round; the node may still come back"),
    ("cannot be marked absent", "only a node that neither finished nor was revoked can be"),
    ("is already absent", "nothing to do; a check-in by that node brings it back"),
)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _spec_max_weight(spec_json: str) -> int:
    """The spec's max_weight (the contract's cap on a check-in's weight); 2^96-1 when it sets
    none. ConfigError for a value the contract cannot hold."""
    from swarmnode.spec import MAX_WEIGHT

    try:
        raw = json.loads(spec_json)
    except ValueError:
        return MAX_WEIGHT
    value = raw.get("max_weight") if isinstance(raw, dict) else None
    if value is None:
        return MAX_WEIGHT
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WEIGHT:
        raise ConfigError(f"the spec's max_weight {value!r} must be a whole number in 1..2^96-1")
    return value


def _hint(reason: str) -> str:
    for needle, hint in _HINTS:
        if needle in reason:
            return hint
    return "see `swarmnode status` for the contract's state"


def _to_fixed(value: float, name: str) -> int:
    if not math.isfinite(value):
        raise ConfigError(f"metric {name}={value} is not a finite number; report finite values")
    return int(builtins.round(value * FIXED_POINT))


class SwarmContract:
    """One deployed SwarmLearning contract, acting as ``account`` (None: read-only)."""

    def __init__(
        self,
        w3: Web3,
        address: str,
        account: LocalAccount | None = None,
        *,
        receipt_timeout: float = 30.0,
        bump_after_s: float = 30.0,
        confirmations: int = 0,
        _checked: bool = False,
    ) -> None:
        """``bump_after_s``: replace a transaction still pending this long with a higher fee;
        ``confirmations``: blocks on top of a transaction's block before it counts as done."""
        try:
            self.address: str = Web3.to_checksum_address(address)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{address!r} is not a contract address (0x and 40 hex digits); check --contract "
                "or SWARMNODE_CONTRACT"
            ) from None
        self._w3 = w3
        self._account = account
        self.receipt_timeout = receipt_timeout
        self.bump_after_s = bump_after_s
        self.confirmations = confirmations
        self._contract = w3.eth.contract(address=self.address, abi=ABI)
        self._sender: TxSender | None = None
        self._settings: ContractSettings | None = None
        # participants of elected rounds (fixed from the election on): one read per round
        self._fixed_participants: dict[int, tuple[str, ...]] = {}
        if not _checked:
            self._check_code()

    # ------------------------------------------------------------------ construction

    @classmethod
    def deploy(
        cls,
        w3: Web3,
        admin: LocalAccount,
        spec_json: str,
        min_peers: int,
        grace_s: int,
        deadline_s: int,
        *,
        receipt_timeout: float = 30.0,
    ) -> SwarmContract:
        """Deploy a new contract for one training; ``admin`` signs and becomes its admin."""
        for name, value in (("min_peers", min_peers), ("grace_s", grace_s),
                            ("deadline_s", deadline_s)):
            if not isinstance(value, int) or not 0 <= value <= UINT32_MAX:
                raise ConfigError(f"{name}={value!r} must be an integer in 0..{UINT32_MAX}")
        spec_hash = hashlib.sha256(spec_json.encode("utf-8")).digest()
        max_weight = _spec_max_weight(spec_json)
        what = f"deploy(min_peers={min_peers}, grace={grace_s}s, deadline={deadline_s}s)"
        try:
            factory = w3.eth.contract(abi=ABI, bytecode=BYTECODE)
            data = factory.constructor(
                spec_hash, spec_json, min_peers, grace_s, deadline_s, max_weight
            ).data_in_transaction
        except (Web3ValidationError, Web3TypeError, Web3ValueError, OverflowError) as exc:
            raise ConfigError(f"{what}: an argument does not fit the constructor: {exc}") from None

        def refused(reason: str) -> ContractReverted:
            return ContractReverted(
                f"{what} by {admin.address} was refused: {reason}. Next: fix the deployment "
                "settings", reason=reason,
            )

        sender = TxSender(w3, admin, receipt_timeout)
        receipt = sender.send({"data": data}, what, refused)
        return cls(w3, receipt["contractAddress"], admin, receipt_timeout=receipt_timeout,
                   _checked=True)

    def with_account(self, account: LocalAccount) -> SwarmContract:
        """The same contract, signing as ``account``."""
        other = SwarmContract(self._w3, self.address, account,
                              receipt_timeout=self.receipt_timeout,
                              bump_after_s=self.bump_after_s, confirmations=self.confirmations,
                              _checked=True)
        other._settings = self._settings
        return other

    @property
    def rpc_calls(self) -> int:
        """JSON-RPC requests this client has sent so far."""
        return rpc_calls(self._w3)

    @property
    def rpc_calls_by_method(self) -> dict[str, int]:
        """JSON-RPC requests this client sent, by method (eth_call, eth_sendRawTransaction...)."""
        return rpc_calls_by_method(self._w3)

    @property
    def account_address(self) -> str | None:
        """The signing account's address (None for a read-only handle)."""
        return self._account.address if self._account is not None else None

    @property
    def chain(self) -> str:
        """Where the contract lives (RPC URL), for messages."""
        return describe(self._w3)

    # ------------------------------------------------------------------ admin and node calls

    def authorize(self, node: str, fingerprint: bytes) -> TxResult:
        """Admin: authorise ``node`` with its certificate fingerprint (again to rotate it)."""
        if len(fingerprint) != 32:
            raise ConfigError(
                f"certificate fingerprint for {node} is {len(fingerprint)} bytes; it must be the "
                "32-byte SHA-256 of the certificate's DER"
            )
        node = self._address_arg(node, "node")
        return self._transact("authorize", (node, fingerprint), f"authorize({node})")

    def revoke(self, node: str) -> TxResult:
        """Admin: revoke ``node``; it leaves the open round and can do nothing more."""
        node = self._address_arg(node, "node")
        return self._transact("revoke", (node,), f"revoke({node})")

    def enroll(self, endpoint: str) -> TxResult:
        """Enrol this (authorised) account with its peer endpoint ``host:port``."""
        return self._transact("enroll", (endpoint,), f"enroll(endpoint {endpoint!r})")

    def update_endpoint(self, endpoint: str) -> TxResult:
        """Change this node's peer endpoint (a restart on a new port)."""
        return self._transact("updateEndpoint", (endpoint,), f"updateEndpoint({endpoint!r})")

    def checkin(self, round: int, weight: int,
                metrics: tuple[int, float, float] | None = None) -> TxResult:
        """Check in for the open round; elects the leader when this completes the round.

        ``metrics`` = (round, loss, metric) of an earlier committed round this node took part
        in, carried by the check-in."""
        if metrics is not None:
            self.report_metrics(*metrics)  # transitional: v2 carries them in the check-in
        if not isinstance(weight, int) or weight < 0:
            raise ConfigError(f"check-in weight {weight!r} must be a non-negative integer")
        what = f"checkin(round {round}, weight {weight})"
        return self._transact("checkin", (round, weight), what)

    def elect(self, round: int) -> TxResult:
        """Elect the open round's leader once ``min_peers`` checked in and the grace passed."""
        return self._transact("elect", (round,), f"elect(round {round})")

    def commit_merge(self, round: int, digest: bytes, members: Sequence[str]) -> TxResult:
        """Leader: record the merged model's digest and the participants merged."""
        if len(digest) != 32:
            raise ConfigError(f"round {round}: merge digest is {len(digest)} bytes; it must be 32")
        addrs = [self._address_arg(m, "member") for m in members]
        return self._transact(
            "commitMerge", (round, digest, addrs),
            f"commitMerge(round {round}, {len(addrs)} members)",
        )

    def draw(self, round: int) -> TxResult:
        """Pin the elected round's leader, drawn from the hash of the block that closed the round
        (needs a later block; ``round()`` shows the drawn leader without it where one exists)."""
        # not estimated: in the latest block the draw block's hash is not known yet (on a chain
        # that mines on transactions the draw itself brings the next block). The gas covers a
        # re-election's draw among 100 participants; what it does not use is not charged.
        return self._transact("draw", (round,), f"draw(round {round})", gas=DRAW_GAS)

    def reelect(self, round: int) -> TxResult:
        """Participant: replace a leader that missed the round deadline."""
        return self._transact("reelect", (round,), f"reelect(round {round})")

    def mark_absent(self, node: str) -> TxResult:
        """Mark ``node`` absent: it missed the last rounds, so no round waits for it any more.

        Allowed once the current round is ``settings().absent_after_rounds`` past the later of
        its last check-in and its enrolment round (see :meth:`absent_candidates`).
        """
        node = self._address_arg(node, "node")
        return self._transact("markAbsent", (node,), f"markAbsent({node})")

    def finish(self, metrics: tuple[int, float, float] | None = None) -> TxResult:
        """This node's trainer is done (the last one fixes the final round); ``metrics`` as in
        :meth:`checkin`."""
        if metrics is not None:
            self.report_metrics(*metrics)  # transitional: v2 carries them in finish
        return self._transact("finish", (), "finish()")

    def report_metrics(self, round: int, loss: float, metric: float) -> TxResult:
        """Record loss and metric for ``round`` (an event; fixed point x1e6 on chain)."""
        args = (round, _to_fixed(loss, "loss"), _to_fixed(metric, "metric"))
        return self._transact("reportMetrics", args, f"reportMetrics(round {round})")

    # ------------------------------------------------------------------ views

    def settings(self) -> ContractSettings:
        """The settings pinned at deployment (immutable: read once, then cached)."""
        if self._settings is None:
            self._settings = ContractSettings(
                spec_hash=bytes(self._call("specHash")),
                min_peers=int(self._call("minPeers")),
                grace_s=int(self._call("graceSeconds")),
                deadline_s=int(self._call("roundDeadline")),
                admin=str(self._call("admin")),
                absent_after_rounds=int(self._call("ABSENT_AFTER_ROUNDS")),
                max_weight=int(self._call("maxWeight")),
                deployed_block=int(self._call("deployedBlock")),
            )
        return self._settings

    def spec_json(self) -> str:
        """The training spec published at deployment, verified against the pinned hash."""
        published = self.events(names={"SpecPublished"})
        if not published:
            raise ContractNotFound(
                f"no SpecPublished event from {self.address} on {self.chain}; the chain has no "
                "history of its deployment (was it restarted without --state-file?)"
            )
        spec: str = published[0].args["specJson"]
        expected = self.settings().spec_hash
        if hashlib.sha256(spec.encode("utf-8")).digest() != expected:
            raise ChainError(
                f"the spec published by {self.address} does not match its pinned hash "
                f"{expected.hex()}; do not use this contract"
            )
        return spec

    def current_round(self) -> int:
        """The round open for check-in (or being merged)."""
        return int(self._call("currentRound"))

    def final_round(self) -> int | None:
        """The final round once every node finished, else None."""
        value = int(self._call("finalRound"))
        return value or None

    def training_finished(self) -> bool:
        """True once the final round is committed."""
        return bool(self._call("trainingFinished"))

    def active_count(self) -> int:
        """Enrolled nodes that are neither revoked, finished nor absent."""
        return int(self._call("activeCount"))

    def absent_count(self) -> int:
        """Enrolled, non-revoked nodes marked absent."""
        return int(self._call("absentCount"))

    def node(self, address: str) -> NodeInfo:
        """What the contract knows about ``address``."""
        address = self._address_arg(address, "node")
        (fp, endpoint, authorized, enrolled, revoked, finished, last_seen, absent, last_checkin,
         enrolled_round) = self._call("nodeInfo", address)
        return NodeInfo(
            address=address, fingerprint=bytes(fp), endpoint=str(endpoint),
            authorized=bool(authorized), enrolled=bool(enrolled), revoked=bool(revoked),
            finished=bool(finished), last_seen=int(last_seen), absent=bool(absent),
            last_checkin_round=int(last_checkin), enrolled_round=int(enrolled_round),
        )

    def nodes(self) -> list[NodeInfo]:
        """Every enrolled node, in enrolment order."""
        return [self.node(a) for a in self._call("nodeList")]

    def absent_candidates(self) -> list[str]:
        """Nodes that :meth:`mark_absent` would accept now, in enrolment order.

        Enrolled, neither revoked, finished nor absent, the current round at least
        ``absent_after_rounds`` past the later of the node's last check-in and enrolment round,
        and silent for at least the round deadline; or silent for ``absent_after_rounds + 1``
        round deadlines (rounds no longer move on when only a dead site is left training).
        Empty once the training finished.
        """
        if self.training_finished():
            return []
        settings = self.settings()
        current = self.current_round()
        since = current - settings.absent_after_rounds
        now = max(self.block_timestamp(), int(time.time()))
        silent = settings.deadline_s * (settings.absent_after_rounds + 1)
        return [
            n.address for n in self.nodes()
            if n.enrolled and not (n.revoked or n.finished or n.absent)
            and n.last_checkin_round != current
            and ((max(n.last_checkin_round, n.enrolled_round) <= since
                  and now >= n.last_seen + settings.deadline_s)
                 or now >= n.last_seen + silent)
        ]

    def round(self, r: int) -> RoundInfo:
        """Round ``r``: status, leader, attempt, participants in check-in order, digest."""
        self._round_arg(r)
        status, leader, attempt, elected_at, first_at, digest, _count, is_final = self._call(
            "roundInfo", r
        )
        state = RoundStatus(int(status))
        participants = self._fixed_participants.get(r)
        if participants is None:
            participants = tuple(str(a) for a in self._call("participants", r))
            if state is not RoundStatus.OPEN:  # fixed at the election
                self._fixed_participants[r] = participants
                for old in sorted(self._fixed_participants)[:-8]:
                    del self._fixed_participants[old]
        return RoundInfo(
            round=r,
            status=state,
            leader=None if leader == ZERO_ADDRESS else str(leader),
            attempt=int(attempt),
            participants=participants,
            digest=None if not any(digest) else bytes(digest),
            elected_at=int(elected_at),
            first_checkin_at=int(first_at),
            is_final=bool(is_final),
        )

    def checkin_weight(self, r: int, node: str) -> int | None:
        """The weight ``node`` checked in with for round ``r``; None if it did not."""
        self._round_arg(r)
        checked, weight = self._call("checkinWeight", r, self._address_arg(node, "node"))
        return int(weight) if checked else None

    def log_filter(self, *names: str) -> dict[str, Any]:
        """An ``eth_subscribe("logs")`` filter for this contract's events called ``names``."""
        from eth_utils import event_abi_to_log_topic

        topics = ["0x" + event_abi_to_log_topic(e).hex() for e in ABI
                  if e.get("type") == "event" and e.get("name") in names]
        return {"address": self.address, "topics": [topics]}

    def latest_block(self) -> tuple[int, int]:
        """The latest block's number and timestamp."""
        with rpc_guard(self._w3, "reading the latest block"):
            block = self._w3.eth.get_block("latest")
        return int(block["number"]), int(block["timestamp"])

    def block_timestamp(self) -> int:
        """The latest block's timestamp (the contract's clock)."""
        with rpc_guard(self._w3, "reading the latest block"):
            return int(self._w3.eth.get_block("latest")["timestamp"])

    def elect_ready_at(self, round: int) -> int | None:
        """When ``elect(round)`` would pass (unix time), or None while it cannot (yet)."""
        info = self.round(round)
        if info.status is not RoundStatus.OPEN or round != self.current_round():
            return None
        settings = self.settings()
        if len(info.participants) < settings.min_peers:
            return None
        return info.first_checkin_at + settings.grace_s

    def events(
        self,
        from_block: int | None = None,
        to_block: int | None = None,
        names: set[str] | None = None,
    ) -> list[ChainEvent]:
        """The contract's events in chain order, optionally only those called ``names``.

        From the contract's deployment block unless ``from_block`` says otherwise (never from
        block 0 of a long chain), asked for in ranges of ``LOG_RANGE`` blocks (public RPC
        providers refuse wider queries)."""
        if from_block is None:
            from_block = self.settings().deployed_block
        topics: list[Any] = []
        if names is not None:
            unknown = sorted(set(names) - set(_EVENTS))
            if unknown:
                known = ", ".join(sorted(_EVENTS))
                raise ConfigError(f"unknown event name(s) {', '.join(unknown)}; known: {known}")
            topics = [[event_abi_to_log_topic(_EVENTS[n]) for n in sorted(names)]]
        with rpc_guard(self._w3, "reading the block number"):
            head = self._w3.eth.block_number
        to_block = head if to_block is None else min(to_block, head)
        if from_block > to_block:  # nothing mined yet past from_block (anvil refuses the query)
            return []
        logs: list[Any] = []
        for start in range(from_block, to_block + 1, LOG_RANGE):
            query: dict[str, Any] = {
                "address": self.address,
                "fromBlock": start,
                "toBlock": min(to_block, start + LOG_RANGE - 1),
            }
            if topics:
                query["topics"] = topics
            with rpc_guard(self._w3, "reading contract events"):
                logs += self._w3.eth.get_logs(query)  # type: ignore[arg-type]
        out = []
        for log in logs:
            name = _TOPICS.get(bytes(log["topics"][0])) if log["topics"] else None
            if name is None:
                continue
            decoded = self._contract.events[name]().process_log(log)
            out.append(ChainEvent(
                name=name,
                args={k: _plain(v) for k, v in decoded["args"].items()},
                block=int(log["blockNumber"]),
                tx_hash="0x" + bytes(log["transactionHash"]).hex(),
                log_index=int(log["logIndex"]),
            ))
        return out

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        what: str,
        poll: float = 0.05,
    ) -> T:
        """Poll ``predicate`` until it returns something other than None."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise ChainTimeout(
                    f"{what} did not happen within {timeout:g} s on {self.chain} "
                    f"(contract {self.address}); check `swarmnode status`"
                )
            time.sleep(poll)

    # ------------------------------------------------------------------ internals

    def _check_code(self) -> None:
        with rpc_guard(self._w3, f"reading the code at {self.address}"):
            code = bytes(self._w3.eth.get_code(self.address))
        if not code:
            raise ContractNotFound(
                f"no contract at {self.address} on {self.chain}; deploy one with `swarmnode "
                "contract deploy` or check --contract / SWARMNODE_CONTRACT"
            )
        if not all(sel in code for sel in _SELECTORS):
            raise ContractNotFound(
                f"the contract at {self.address} on {self.chain} is not a SwarmLearning contract; "
                "check --contract / SWARMNODE_CONTRACT"
            )

    def _address_arg(self, value: str, what: str) -> str:
        try:
            return Web3.to_checksum_address(value)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{what} {value!r} is not an address (0x and 40 hex digits)"
            ) from None

    @staticmethod
    def _round_arg(r: int) -> None:
        if not isinstance(r, int) or r < 1:
            raise ConfigError(f"round {r!r} does not exist; rounds are numbered from 1")

    def _call(self, fn: str, *args: Any) -> Any:
        with rpc_guard(self._w3, f"calling {fn}"):
            try:
                return getattr(self._contract.functions, fn)(*args).call()
            except Exception as exc:
                reason = revert_reason(exc)
                if reason is None:
                    raise
                raise ContractReverted(
                    f"{fn} on {self.address} reverted: {reason}", reason=reason
                ) from None

    def _refused(self, what: str, reason: str) -> ContractReverted:
        who = self.account_address or "(no account)"
        return ContractReverted(
            f"{what} by {who} was refused by the contract {self.address}: "
            f"{reason}. Next: {_hint(reason)}",
            reason=reason,
        )

    def _tx_sender(self, what: str) -> TxSender:
        if self._sender is None:
            self._sender = TxSender(self._w3, require_account(self._account, what),
                                    self.receipt_timeout, bump_after_s=self.bump_after_s,
                                    confirmations=self.confirmations)
        return self._sender

    def fund(self, address: str, wei: int) -> TxResult:
        """Send ``wei`` from this client's account to ``address`` (a dev chain's admin funds
        the accounts sites made themselves: they start with nothing to pay gas with)."""
        what = f"funding {address}"
        if not Web3.is_address(address):
            raise ConfigError(f"{what}: {address!r} is not a chain address")
        receipt = self._tx_sender(what).send(
            {"to": Web3.to_checksum_address(address), "value": int(wei)}, what,
            lambda r: ContractReverted(f"{what} failed: {r}"), gas=21_000)
        return TxResult(tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
                        gas_used=int(receipt["gasUsed"]), block=int(receipt["blockNumber"]),
                        events=())

    def _transact(
        self, fn: str, args: tuple[Any, ...], what: str, gas: int | None = None
    ) -> TxResult:
        try:
            data = self._contract.encode_abi(fn, args=list(args))
        except (Web3ValidationError, Web3TypeError, Web3ValueError, OverflowError) as exc:
            raise ConfigError(
                f"{what}: an argument does not fit the contract's types: {exc}"
            ) from None
        receipt = self._tx_sender(what).send(
            {"to": self.address, "data": data}, what, lambda r: self._refused(what, r),
            gas=gas,
        )
        mine = self.address.lower()
        return TxResult(
            tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
            gas_used=int(receipt["gasUsed"]),
            block=int(receipt["blockNumber"]),
            events=tuple(
                _TOPICS.get(bytes(lg["topics"][0]), "?") for lg in receipt.get("logs", ())
                if lg["topics"] and str(lg["address"]).lower() == mine
            ),
        )
