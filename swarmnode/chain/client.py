"""The contracts behind a small typed interface: a consortium's :class:`SwarmRegistry` and a
training's :class:`SwarmContract` (a ``SwarmTraining`` deployment, which names its registry).

Transactions are signed locally by the contract's account and sent with
``eth_sendRawTransaction`` (standard ``eth_*`` only, so geth works like anvil). A lock per account
serialises nonce use, so several threads may share one account. Every revert becomes a
:class:`~swarmnode.errors.ContractReverted` naming the function, the contract's reason and what to
do (decoded by selector from the contracts' custom errors: :mod:`swarmnode.chain.reverts`); RPC
failures become :class:`~swarmnode.errors.ChainUnavailable`. No web3 type leaves here.
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
from eth_utils.abi import get_abi_output_types
from web3 import Web3
from web3._utils.abi import map_abi_data
from web3._utils.contracts import encode_abi
from web3._utils.normalizers import BASE_RETURN_NORMALIZERS
from web3.exceptions import (
    BadFunctionCallOutput,
    Web3TypeError,
    Web3ValidationError,
    Web3ValueError,
)

from swarmnode.chain import epsilon
from swarmnode.chain.compile import load_artifact
from swarmnode.chain.models import (
    ChainEvent,
    ContractSettings,
    NodeInfo,
    RoundInfo,
    RoundStatus,
    SiteInfo,
    TxResult,
)
from swarmnode.chain.reverts import Revert
from swarmnode.chain.rpc import (
    chain_id,
    connect,
    describe,
    revert_reason,
    rpc_calls,
    rpc_calls_by_method,
    rpc_guard,
    rpc_stats,
)
from swarmnode.chain.tx import TxSender, require_account
from swarmnode.errors import (
    BadArgument,
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
    "SwarmRegistry",
    "TxResult",
    "chain_id",
    "connect",
]

T = TypeVar("T")
ZERO_ADDRESS = "0x" + "0" * 40
_CLOSED = (RoundStatus.COMMITTED, RoundStatus.ABANDONED)
DRAW_GAS = 800_000
LOG_RANGE = 5_000  # blocks per eth_getLogs query
FIXED_POINT = 1_000_000  # reportMetrics values are fixed-point x1e6
UINT32_MAX = 2**32 - 1

_ARTIFACT = load_artifact("SwarmTraining")
ABI: list[dict[str, Any]] = _ARTIFACT["abi"]
BYTECODE: str = _ARTIFACT["bytecode"]
_REG_ARTIFACT = load_artifact("SwarmRegistry")
REGISTRY_ABI: list[dict[str, Any]] = _REG_ARTIFACT["abi"]
REGISTRY_BYTECODE: str = _REG_ARTIFACT["bytecode"]


def _selectors(abi: list[dict[str, Any]]) -> list[bytes]:
    return [function_abi_to_4byte_selector(e) for e in abi if e["type"] == "function"]


def _events(abi: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in abi if e["type"] == "event"}


_EVENTS = _events(ABI)
_REG_EVENTS = _events(REGISTRY_ABI)
_TOPICS = {event_abi_to_log_topic(e): name for name, e in _EVENTS.items()}
_REG_TOPICS = {event_abi_to_log_topic(e): name for name, e in _REG_EVENTS.items()}

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


def _spec_secure(spec_json: str) -> bool:
    """Whether the spec sets secure_aggregation (pinned in the contract: joins then need a key)."""
    try:
        raw = json.loads(spec_json)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("secure_aggregation") is True


def _to_fixed(value: float, name: str) -> int:
    if not math.isfinite(value):
        raise ConfigError(f"metric {name}={value} is not a finite number; report finite values")
    return int(builtins.round(value * FIXED_POINT))


#: (epsilon, delta) of a DP site, or None
Privacy = tuple[float, float] | None
#: (round, loss, metric), or (round, loss, metric, privacy): a DP site's privacy rides with them
Metrics = tuple[int, float, float] | tuple[int, float, float, Privacy]


def _privacy_word(privacy: Privacy) -> int:
    if privacy is None:
        return 0
    try:
        eps, delta = privacy
    except (TypeError, ValueError):
        raise ConfigError(f"privacy {privacy!r} must be (epsilon, delta) or None") from None
    return epsilon.pack(eps, delta)


def _metrics_args(metrics: Metrics | None) -> tuple[int, int, int, int]:
    if metrics is None:
        return (0, 0, 0, 0)
    if len(metrics) not in (3, 4):
        raise ConfigError(f"metrics {metrics!r} must be (round, loss, metric[, privacy])")
    round_, loss, metric = metrics[0], metrics[1], metrics[2]
    if not isinstance(round_, int) or round_ < 1:
        raise ConfigError(f"metrics round {round_!r} must be a round number from 1 on")
    word = _privacy_word(metrics[3] if len(metrics) == 4 else None)  # type: ignore[misc]
    return (round_, _to_fixed(loss, "loss"), _to_fixed(metric, "metric"), word)


def _read_events(w3: Web3, contract: Any, address: str, abis: dict[str, dict[str, Any]],
                 topics_by: dict[bytes, str], from_block: int, to_block: int | None,
                 names: set[str] | None, round_topic: str | None = None) -> list[ChainEvent]:
    topics: list[Any] = []
    if names is not None:
        topics = [[event_abi_to_log_topic(abis[n]) for n in sorted(names)]]
    if round_topic is not None:
        topics = (topics or [None]) + [round_topic]
    with rpc_guard(w3, "reading the block number"):
        head = w3.eth.block_number
    to_block = head if to_block is None else min(to_block, head)
    if from_block > to_block:  # nothing mined yet past from_block (anvil refuses the query)
        return []
    logs: list[Any] = []
    for start in range(from_block, to_block + 1, LOG_RANGE):
        query: dict[str, Any] = {
            "address": address,
            "fromBlock": start,
            "toBlock": min(to_block, start + LOG_RANGE - 1),
        }
        if topics:
            query["topics"] = topics
        with rpc_guard(w3, "reading contract events"):
            logs += w3.eth.get_logs(query)  # type: ignore[arg-type]
    out = []
    for log in logs:
        name = topics_by.get(bytes(log["topics"][0])) if log["topics"] else None
        if name is None:
            continue
        decoded = contract.events[name]().process_log(log)
        out.append(ChainEvent(
            name=name,
            args={k: _plain(v) for k, v in decoded["args"].items()},
            block=int(log["blockNumber"]),
            tx_hash="0x" + bytes(log["transactionHash"]).hex(),
            log_index=int(log["logIndex"]),
        ))
    return out


def _returned(types: Sequence[str], values: Sequence[Any]) -> list[Any]:
    """Decoded return values as web3 returns them (its BASE_RETURN_NORMALIZERS: addresses
    checksummed; arrays as lists), without its generic data-tree walk (a third of a view call's
    client CPU) for the types swarmnode's contracts return; anything else goes through web3's."""
    out: list[Any] = []
    for t, v in zip(types, values, strict=True):
        if "(" in t or t.count("[") > 1:
            return list(map_abi_data(BASE_RETURN_NORMALIZERS, types, values))
        if t == "address":
            out.append(Web3.to_checksum_address(v))
        elif t.startswith("address["):
            out.append([Web3.to_checksum_address(a) for a in v])
        elif t.endswith("]"):
            out.append(list(v))
        else:
            out.append(v)
    return out


class _Handle:
    """A deployed contract of ``abi`` at ``address``, acting as ``account`` (None: read-only)."""

    _abi: list[dict[str, Any]] = []
    _topics: dict[bytes, str] = {}
    _kind = "contract"

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
                f"{address!r} is not a {self._kind} address (0x and 40 hex digits); check "
                "--contract / --registry or the node config"
            ) from None
        self._w3 = w3
        self._account = account
        self.receipt_timeout = receipt_timeout
        self.bump_after_s = bump_after_s
        self.confirmations = confirmations
        self._contract = w3.eth.contract(address=self.address, abi=self._abi)
        self._views: dict[str, tuple[dict[str, Any], str, list[str]]] = {}  # see _view
        self._sender: TxSender | None = None
        if not _checked:
            self._check_code()

    def _options(self) -> dict[str, Any]:
        return {"receipt_timeout": self.receipt_timeout, "bump_after_s": self.bump_after_s,
                "confirmations": self.confirmations}

    def _check_code(self) -> None:
        with rpc_guard(self._w3, f"reading the code at {self.address}"):
            code = bytes(self._w3.eth.get_code(self.address))
        if not code:
            raise ContractNotFound(
                f"no contract at {self.address} on {self.chain}; deploy a {self._kind} with "
                f"`swarmnode {self._cli} deploy` or check the address you passed"
            )
        if not all(sel in code for sel in _selectors(self._abi)):
            raise ContractNotFound(
                f"the contract at {self.address} on {self.chain} is not a {self._kind}; check "
                "the address you passed"
            )

    @classmethod
    def _deploy_data(cls, w3: Web3, bytecode: str, what: str, *args: Any) -> str:
        try:
            factory = w3.eth.contract(abi=cls._abi, bytecode=bytecode)
            return str(factory.constructor(*args).data_in_transaction)
        except (Web3ValidationError, Web3TypeError, Web3ValueError, OverflowError) as exc:
            raise ConfigError(f"{what}: an argument does not fit the constructor: {exc}") from None

    @staticmethod
    def _deploy_refused(what: str, admin: LocalAccount) -> Callable[[str], ContractReverted]:
        def refused(reason: str) -> ContractReverted:
            cls = reason.row.cls if isinstance(reason, Revert) else ContractReverted
            hint = reason.row.hint if isinstance(reason, Revert) else "fix the deployment settings"
            return cls(f"{what} by {admin.address} was refused: {reason}. Next: {hint}",
                       reason=reason)
        return refused

    @property
    def rpc_calls(self) -> int:
        """JSON-RPC requests this client has sent so far."""
        return rpc_calls(self._w3)

    @property
    def rpc_stats(self) -> tuple[int, float, int]:
        """(JSON-RPC requests, seconds spent in them, failed requests) so far."""
        return rpc_stats(self._w3)

    @property
    def pending_transactions(self) -> int:
        """Transactions this client has sent that are not yet mined and confirmed."""
        return 0 if self._sender is None else self._sender.pending

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

    def chain_id(self) -> int:
        """The chain's id (EIP-155)."""
        with rpc_guard(self._w3, "reading the chain id"):
            return int(self._w3.eth.chain_id)

    def latest_block(self) -> tuple[int, int]:
        """The latest block's number and timestamp."""
        with rpc_guard(self._w3, "reading the latest block"):
            block = self._w3.eth.get_block("latest")
        return int(block["number"]), int(block["timestamp"])

    def block_timestamp(self) -> int:
        """The latest block's timestamp (the contract's clock)."""
        with rpc_guard(self._w3, "reading the latest block"):
            return int(self._w3.eth.get_block("latest")["timestamp"])

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

    def _view(self, fn: str) -> tuple[dict[str, Any], str, list[str]] | None:
        """``fn``'s ABI, selector and output types, looked up once (None: not one function of
        that name). web3 looks them up on every call, validating the whole ABI each time (a
        Keccak-256 per function of the contract: 0.2-0.6 ms a call here, some 150 calls a round
        per node); :meth:`_call` does the rest as web3 does."""
        got = self._views.get(fn)
        if got is None:
            found = [a for a in self._abi if a.get("type") == "function" and a.get("name") == fn]
            if len(found) != 1:
                return None
            abi = found[0]
            got = (abi, "0x" + function_abi_to_4byte_selector(abi).hex(),
                   list(get_abi_output_types(abi)))  # type: ignore[arg-type]
            self._views[fn] = got
        return got

    def _call_view(self, fn: str, args: tuple[Any, ...]) -> Any:
        """An eth_call of ``fn``, encoded, sent and decoded with web3's own normalizers (the
        same values as ``contract.functions.fn(*args).call()``)."""
        view = self._view(fn)
        if view is None:
            return getattr(self._contract.functions, fn)(*args).call()
        abi, selector, outputs = view
        tx: dict[str, Any] = {"to": self.address,
                              "data": encode_abi(self._w3, abi, args, selector)}  # type: ignore[arg-type]
        if self._w3.eth.default_account:
            tx["from"] = self._w3.eth.default_account
        raw = self._w3.eth.call(tx)  # type: ignore[arg-type]
        try:
            decoded = self._w3.codec.decode(outputs, raw)
        except Exception as exc:  # noqa: BLE001 - web3 says it the same way
            raise BadFunctionCallOutput(
                f"Could not decode contract function call to {fn} with return data: "
                f"{raw!r}, output_types: {outputs}") from exc
        values = _returned(outputs, decoded)
        return values[0] if len(values) == 1 else values

    def _call(self, fn: str, *args: Any) -> Any:
        with rpc_guard(self._w3, f"calling {fn}"):
            try:
                return self._call_view(fn, args)
            except Exception as exc:
                reason = revert_reason(exc)
                if reason is None:
                    raise
                if isinstance(reason, Revert):
                    raise reason.row.cls(f"{fn} on {self.address} reverted: {reason}. Next: "
                                         f"{reason.row.hint}", reason=reason) from None
                raise ContractReverted(f"{fn} on {self.address} reverted: {reason}",
                                       reason=reason) from None

    def _refused(self, what: str, reason: str) -> ContractReverted:
        who = self.account_address or "(no account)"
        if isinstance(reason, Revert):
            cls, hint = reason.row.cls, reason.row.hint
        else:  # a string or panic from a contract that is not swarmnode's own
            cls, hint = ContractReverted, "see `swarmnode status` for the training's state"
        return cls(f"{what} by {who} was refused by the contract {self.address}: {reason}. "
                   f"Next: {hint}", reason=reason)

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
                self._topics.get(bytes(lg["topics"][0]), "?") for lg in receipt.get("logs", ())
                if lg["topics"] and str(lg["address"]).lower() == mine
            ),
        )


class SwarmRegistry(_Handle):
    """A consortium's SwarmRegistry: its admin, the sites' authorisation (with certificate
    fingerprints), enrolment and endpoints, a public-key slot per site, and its trainings."""

    _abi = REGISTRY_ABI
    _topics = _REG_TOPICS
    _kind = "SwarmRegistry"
    _cli = "registry"

    @classmethod
    def deploy(cls, w3: Web3, admin: LocalAccount, *, receipt_timeout: float = 30.0
               ) -> SwarmRegistry:
        """Deploy a new registry for a consortium; ``admin`` signs and becomes its admin."""
        what = "deploy(SwarmRegistry)"
        data = cls._deploy_data(w3, REGISTRY_BYTECODE, what)
        receipt = TxSender(w3, admin, receipt_timeout).send(
            {"data": data}, what, cls._deploy_refused(what, admin))
        return cls(w3, receipt["contractAddress"], admin, receipt_timeout=receipt_timeout,
                   _checked=True)

    def with_account(self, account: LocalAccount) -> SwarmRegistry:
        """The same registry, signing as ``account``."""
        return SwarmRegistry(self._w3, self.address, account, _checked=True, **self._options())

    def admin(self) -> str:
        return str(self._call("admin"))

    def deployed_block(self) -> int:
        return int(self._call("deployedBlock"))

    def authorize(self, site: str, fingerprint: bytes) -> TxResult:
        """Admin: authorise ``site`` with its certificate fingerprint (again to rotate it)."""
        if len(fingerprint) != 32:
            raise ConfigError(
                f"certificate fingerprint for {site} is {len(fingerprint)} bytes; it must be the "
                "32-byte SHA-256 of the certificate's DER"
            )
        site = self._address_arg(site, "site")
        return self._transact("authorize", (site, fingerprint), f"authorize({site})")

    def revoke(self, site: str) -> TxResult:
        """Admin: revoke ``site`` for good, in every training of this registry."""
        site = self._address_arg(site, "site")
        return self._transact("revoke", (site,), f"revoke({site})")

    def enroll(self, endpoint: str) -> TxResult:
        """Enrol this (authorised) site with its peer endpoint ``host:port``."""
        return self._transact("enroll", (endpoint,), f"enroll(endpoint {endpoint!r})")

    def update_endpoint(self, endpoint: str) -> TxResult:
        """Change this site's peer endpoint in the registry."""
        return self._transact("updateEndpoint", (endpoint,), f"updateEndpoint({endpoint!r})")

    def set_public_key(self, key: bytes) -> TxResult:
        """Publish this site's 32-byte public key (for protocols that need one)."""
        if len(key) != 32:
            raise ConfigError(f"a site's public key is 32 bytes; {len(key)} given")
        return self._transact("setPublicKey", (key,), "setPublicKey()")

    def add_training(self, training: str) -> TxResult:
        """Admin: list ``training`` (a SwarmTraining naming this registry) as the consortium's."""
        training = self._address_arg(training, "training")
        return self._transact("addTraining", (training,), f"addTraining({training})")

    def site(self, address: str) -> SiteInfo:
        """What the registry knows about ``address``."""
        address = self._address_arg(address, "site")
        fp, endpoint, authorized, enrolled, revoked, enrolled_at, key = self._call(
            "siteInfo", address)
        return SiteInfo(address=address, fingerprint=bytes(fp), endpoint=str(endpoint),
                        authorized=bool(authorized), enrolled=bool(enrolled),
                        revoked=bool(revoked), enrolled_at=int(enrolled_at),
                        public_key=bytes(key) if any(key) else None)

    def sites(self) -> list[SiteInfo]:
        """Every enrolled site, in enrolment order."""
        return [self.site(a) for a in self._call("siteList")]

    def trainings(self) -> list[str]:
        """The consortium's trainings, in the order the admin listed them."""
        return [str(a) for a in self._call("trainings")]

    def events(self, from_block: int | None = None, to_block: int | None = None,
               names: set[str] | None = None) -> list[ChainEvent]:
        """The registry's events in chain order (authorisations, enrolments, revocations)."""
        if from_block is None:
            from_block = self.deployed_block()
        return _read_events(self._w3, self._contract, self.address, _REG_EVENTS, _REG_TOPICS,
                            from_block, to_block, names)


class SwarmContract(_Handle):
    """One training: a deployed SwarmTraining contract, acting as ``account`` (None:
    read-only). Site identities live in its registry (:attr:`registry`); the calls that concern
    them (authorize, revoke, enrol) go there."""

    _abi = ABI
    _topics = _TOPICS
    _kind = "SwarmTraining"
    _cli = "training"

    def __init__(self, w3: Web3, address: str, account: LocalAccount | None = None,
                 **options: Any) -> None:
        super().__init__(w3, address, account, **options)
        self._settings: ContractSettings | None = None
        self._registry: SwarmRegistry | None = None
        # participants of elected rounds (fixed from the election on): one read per round
        self._fixed_participants: dict[int, tuple[str, ...]] = {}
        self._closed_rounds: dict[int, RoundInfo] = {}  # committed or abandoned: final

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
        registry: SwarmRegistry | str | None = None,
        receipt_timeout: float = 30.0,
    ) -> SwarmContract:
        """Deploy a new training on ``registry`` (a handle or address; None: a new registry of
        its own) and list it there; ``admin`` signs and must be the registry's admin."""
        for name, value in (("min_peers", min_peers), ("grace_s", grace_s),
                            ("deadline_s", deadline_s)):
            if not isinstance(value, int) or not 0 <= value <= UINT32_MAX:
                raise ConfigError(f"{name}={value!r} must be an integer in 0..{UINT32_MAX}")
        if _spec_secure(spec_json):
            from swarmnode.privacy.guards import check_first_round

            try:  # round 1 (parameters encoded whole) must fit the ring: refused before any tx
                check_first_round(_spec_max_weight(spec_json))
            except ValueError as exc:
                raise ConfigError(f"training spec: {exc}") from None
        if registry is None:
            registry = SwarmRegistry.deploy(w3, admin, receipt_timeout=receipt_timeout)
        elif isinstance(registry, str):
            registry = SwarmRegistry(w3, registry, admin, receipt_timeout=receipt_timeout)
        else:
            registry = registry.with_account(admin)
        spec_hash = hashlib.sha256(spec_json.encode("utf-8")).digest()
        max_weight = _spec_max_weight(spec_json)
        what = f"deploy(min_peers={min_peers}, grace={grace_s}s, deadline={deadline_s}s)"
        data = cls._deploy_data(w3, BYTECODE, what, registry.address, spec_hash, spec_json,
                                min_peers, grace_s, deadline_s, max_weight,
                                _spec_secure(spec_json))
        receipt = TxSender(w3, admin, receipt_timeout).send(
            {"data": data}, what, cls._deploy_refused(what, admin))
        training = cls(w3, receipt["contractAddress"], admin, receipt_timeout=receipt_timeout,
                       _checked=True)
        registry.add_training(training.address)
        training._registry = registry
        return training

    @classmethod
    def resolve(cls, w3: Web3, address: str, account: LocalAccount | None = None, *,
                running_only: bool = False, **options: Any) -> SwarmContract:
        """The training at ``address``; or, when ``address`` is a registry, the one training of
        it still running (else its newest, once all finished; with ``running_only``, a
        ContractNotFound then). ConfigError naming them when several run at once: pass one of
        them. ``options``: the handle's (receipt_timeout, bump_after_s, confirmations)."""
        try:
            return cls(w3, address, account, **options)
        except ContractNotFound as not_training:
            try:
                registry = SwarmRegistry(w3, address, account)
            except ContractNotFound:
                raise not_training from None
        trainings = [cls(w3, t, account, _checked=True, **options)
                     for t in registry.trainings()]
        if not trainings:
            raise ContractNotFound(
                f"the registry {registry.address} lists no training yet; deploy one with "
                "`swarmnode training deploy --registry ...`")
        running = [t for t in trainings if not t.training_finished()]
        if len(running) > 1:
            raise ConfigError(
                f"the registry {registry.address} runs {len(running)} trainings at once ("
                f"{', '.join(t.address for t in running)}); pass one of them as --contract")
        if not running and running_only:
            raise ContractNotFound(
                f"every training of the registry {registry.address} has finished (the newest: "
                f"{trainings[-1].address}); the admin deploys the next one (`swarmnode "
                "consortium training` or `swarmnode training deploy --registry ...`)")
        return running[0] if running else trainings[-1]

    def with_account(self, account: LocalAccount) -> SwarmContract:
        """The same training, signing as ``account``."""
        other = SwarmContract(self._w3, self.address, account, _checked=True, **self._options())
        other._settings = self._settings
        return other

    @property
    def registry(self) -> SwarmRegistry:
        """The consortium's registry this training names, signing as this handle's account."""
        if self._registry is None or self._registry._account is not self._account:
            self._registry = SwarmRegistry(self._w3, str(self._call("registry")), self._account,
                                           _checked=True, **self._options())
        return self._registry

    # ------------------------------------------------------------------ admin and node calls

    def authorize(self, node: str, fingerprint: bytes) -> TxResult:
        """Registry admin: authorise ``node`` (in the consortium: every training sees it)."""
        return self.registry.authorize(node, fingerprint)

    def revoke(self, node: str) -> TxResult:
        """Registry admin: revoke ``node`` in the consortium (every training sets it aside)."""
        return self.registry.revoke(node)

    def join(self, endpoint: str = "") -> TxResult:
        """Join this training (the site must be enrolled in the registry); ``endpoint``
        overrides the registry's for this training (empty: none)."""
        return self._transact("join", (endpoint,), f"join(endpoint {endpoint!r})")

    def enroll(self, endpoint: str) -> TxResult:
        """Enrol this (authorised) site in the registry if it is not yet, and join this training
        at ``endpoint`` (an override only where the registry holds another endpoint)."""
        me = require_account(self._account, "enroll").address
        site = self.registry.site(me)
        if not site.enrolled and not site.revoked:
            self.registry.enroll(endpoint)
            return self.join("")
        return self.join("" if site.endpoint == endpoint else endpoint)

    def update_endpoint(self, endpoint: str) -> TxResult:
        """Change this site's peer endpoint for this training (a restart on a new port)."""
        return self._transact("updateEndpoint", (endpoint,), f"updateEndpoint({endpoint!r})")

    def checkin(self, round: int, weight: int,
                metrics: Metrics | None = None,
                masked_hash: bytes | None = None) -> TxResult:
        """Check in for the open round; elects the leader when this completes the round.

        ``metrics`` = (round, loss, metric): the evaluation of the committed round this site
        last checked in for, carried by the check-in (no transaction of its own); a DP site adds
        its privacy spent, (round, loss, metric, (epsilon, delta)) (:mod:`.epsilon`; read back
        with :meth:`privacy_reports`).
        ``masked_hash``: with secure aggregation, the SHA-256 of the masked update this site
        pushes for the round (logged as MaskedUpdate; :meth:`masked_hashes` reads it back)."""
        if not isinstance(weight, int) or weight < 0:
            raise ConfigError(f"check-in weight {weight!r} must be a non-negative integer")
        if masked_hash is not None and (not isinstance(masked_hash, bytes)
                                        or len(masked_hash) != 32 or not any(masked_hash)):
            raise ConfigError("a masked update's hash is 32 bytes, not all zero (SHA-256 of "
                              "swarmnode.privacy.wire.to_bytes)")
        what = f"checkin(round {round}, weight {weight})"
        return self._transact(
            "checkin", (round, weight, *_metrics_args(metrics), masked_hash or bytes(32)), what)

    def masked_hashes(self, round: int, from_block: int | None = None) -> dict[str, bytes]:
        """Secure aggregation: site -> the hash of the masked update it checked in with for
        ``round`` (sites that checked in without one are absent). ``from_block``: read from
        there (a block at or before the check-ins asked about), not from the deployment."""
        self._round_arg(round)
        topic = "0x" + round.to_bytes(32, "big").hex()
        out: dict[str, bytes] = {}
        for e in self.events(from_block, names={"MaskedUpdate"}, round_topic=topic):
            out.setdefault(str(e.args["node"]), bytes(e.args["hash"]))
        return out

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

    def finish(self, metrics: Metrics | None = None) -> TxResult:
        """This site's trainer is done (the last one fixes the final round); ``metrics`` as in
        :meth:`checkin`."""
        return self._transact("finish", _metrics_args(metrics), "finish()")

    def report_final_metrics(self, loss: float, metric: float,
                             privacy: Privacy = None) -> TxResult:
        """The evaluation of the final model (the one report with a transaction of its own: no
        check-in follows the final round); only once the training finished. ``privacy``: a DP
        site's (epsilon, delta), as in :meth:`checkin`."""
        args = (_to_fixed(loss, "loss"), _to_fixed(metric, "metric"), _privacy_word(privacy))
        return self._transact("reportFinalMetrics", args, "reportFinalMetrics()")

    def privacy_reports(self) -> dict[tuple[int, str], tuple[float, float]]:
        """(round, site) -> (epsilon, delta): every DP site's privacy spent, as reported with
        its metrics of that round (a site reporting a round twice: its last report)."""
        return {(int(e.args["round"]), str(e.args["node"])): epsilon.from_event(e.args)
                for e in self.events(names={"PrivacyReported"})}

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
                secure_aggregation=bool(self._call("secureAggregation")),
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
        """What the training and its registry know about ``address``: ``enrolled`` means joined
        this training; ``revoked``, revoked in the registry (or set aside here for it)."""
        address = self._address_arg(address, "node")
        (endpoint, joined, revoked, finished, last_seen, absent, last_checkin,
         joined_round) = self._call("nodeInfo", address)
        site = self.registry.site(address)
        return NodeInfo(
            address=address, fingerprint=site.fingerprint, endpoint=str(endpoint),
            authorized=site.authorized, enrolled=bool(joined), revoked=bool(revoked),
            finished=bool(finished), last_seen=int(last_seen), absent=bool(absent),
            last_checkin_round=int(last_checkin), enrolled_round=int(joined_round),
        )

    def mask_key(self, address: str) -> bytes | None:
        """The secure-aggregation key ``address`` joined with (the registry's slot then, kept
        here: a later ``setPublicKey`` does not change it); None for none."""
        address = self._address_arg(address, "node")
        key = bytes(self._call("maskKeyOf", address))
        return key if any(key) else None

    def nodes(self) -> list[NodeInfo]:
        """Every site that joined this training, in joining order."""
        return [self.node(a) for a in self.node_list()]

    def node_list(self) -> list[str]:
        """The addresses of every site that joined this training, in joining order (one read;
        the list only grows)."""
        return [str(a) for a in self._call("nodeList")]

    def absent_candidates(self) -> list[str]:
        """Sites that :meth:`mark_absent` would accept now (the contract's own rule, on chain
        time: revoked in the registry, or missed rounds and silent), in joining order."""
        return [str(a) for a in self._call("absentCandidates")]

    def waiting_for(self, round: int) -> list[str]:
        """The sites the open ``round`` still waits for before it elects by itself."""
        self._round_arg(round)
        return [str(a) for a in self._call("waitingFor", round)]

    def election_due(self, round: int) -> bool:
        """Whether ``elect(round)`` would pass now (min peers in, grace over, still open)."""
        self._round_arg(round)
        return bool(self._call("electionDue", round))

    def reelect_due(self, round: int) -> bool:
        """Whether the elected ``round``'s deadline has passed on chain time."""
        self._round_arg(round)
        return bool(self._call("reelectDue", round))

    def round(self, r: int) -> RoundInfo:
        """Round ``r``: status, leader, attempt, participants in check-in order, digest.

        A closed round (committed or abandoned) never changes again: read once, then cached.
        The contract holds the details of the current and the previous round only; an older
        one's participants, leader and digest come from its events."""
        self._round_arg(r)
        closed = self._closed_rounds.get(r)
        if closed is not None:
            return closed
        status, leader, attempt, elected_at, first_at, digest, _count, is_final = self._call(
            "roundInfo", r
        )
        state = RoundStatus(int(status))
        leader = None if leader == ZERO_ADDRESS else str(leader)
        got: bytes | None = bytes(digest) if any(digest) else None
        participants = None
        if state in _CLOSED and int(attempt) == 0:  # older than the previous round
            participants, leader, attempt, got = self._round_from_events(r, state)
        else:
            participants = self._fixed_participants.get(r)
            if participants is None:
                try:
                    participants = tuple(str(a) for a in self._call("participants", r))
                except BadArgument as exc:  # pruned between the two reads: a round moved on
                    if getattr(exc.reason, "name", None) != "RoundPruned":
                        raise
                    return self.round(r)
                if state is not RoundStatus.OPEN:  # fixed at the election
                    self._fixed_participants[r] = participants
                    for old in sorted(self._fixed_participants)[:-8]:
                        del self._fixed_participants[old]
        info = RoundInfo(
            round=r,
            status=state,
            leader=leader,
            attempt=int(attempt),
            participants=participants,
            digest=got,
            elected_at=int(elected_at),
            first_checkin_at=int(first_at),
            is_final=bool(is_final),
        )
        # final once closed; with confirmations, only what is confirmed would be (a reorg can
        # take a commit back), so nothing is kept then
        if (state in _CLOSED and (state is RoundStatus.ABANDONED or got is not None)
                and self.confirmations == 0):
            self._closed_rounds[r] = info
            for old in sorted(self._closed_rounds)[:-64]:
                del self._closed_rounds[old]
        return info

    def _round_from_events(self, r: int, state: RoundStatus
                           ) -> tuple[tuple[str, ...], str | None, int, bytes | None]:
        topic = "0x" + r.to_bytes(32, "big").hex()
        events = self.events(names={"CheckedIn", "MergeCommitted", "RoundClosed"},
                             round_topic=topic)
        checkins = [e for e in events if e.name == "CheckedIn"]
        closed = [e for e in events if e.name == "RoundClosed"]
        expelled: list[ChainEvent] = []
        if checkins:  # a site expelled while the round was open left it (NodeRevoked)
            end = closed[0].block if closed else None
            expelled = self.events(from_block=checkins[0].block, to_block=end,
                                   names={"NodeRevoked"})
        participants = _open_round_members(checkins, expelled, closed[0] if closed else None)
        attempt = max((int(e.args["attempt"]) for e in events if e.name == "RoundClosed"),
                      default=0)
        commits = [e for e in events if e.name == "MergeCommitted"]
        if commits and state is RoundStatus.COMMITTED:
            return (participants, str(commits[-1].args["leader"]), attempt,
                    bytes(commits[-1].args["digest"]))
        return participants, None, attempt, None

    def checkin_weight(self, r: int, node: str) -> int | None:
        """The weight ``node`` checked in with for round ``r``; None if it did not."""
        self._round_arg(r)
        checked, weight = self._call("checkinWeight", r, self._address_arg(node, "node"))
        return int(weight) if checked else None

    def events(
        self,
        from_block: int | None = None,
        to_block: int | None = None,
        names: set[str] | None = None,
        *,
        round_topic: str | None = None,
    ) -> list[ChainEvent]:
        """The training's events in chain order, with its registry's (authorisations,
        enrolments, revocations) merged in; optionally only those called ``names``.

        From the training's deployment block unless ``from_block`` says otherwise (never from
        block 0 of a long chain), asked for in ranges of ``LOG_RANGE`` blocks (public RPC
        providers refuse wider queries). ``round_topic``: only events whose first indexed
        argument is that round (training events only)."""
        default_start = from_block is None
        if from_block is None:
            from_block = self.settings().deployed_block
        if names is not None:
            unknown = sorted(set(names) - set(_EVENTS) - set(_REG_EVENTS))
            if unknown:
                known = ", ".join(sorted(set(_EVENTS) | set(_REG_EVENTS)))
                raise ConfigError(f"unknown event name(s) {', '.join(unknown)}; known: {known}")
        mine = None if names is None else set(names) & set(_EVENTS)
        theirs = None if names is None else set(names) & set(_REG_EVENTS)
        if to_block is None:  # one head for both reads: a follower resumes from the last block
            with rpc_guard(self._w3, "reading the block number"):
                to_block = int(self._w3.eth.block_number)
        out: list[ChainEvent] = []
        if mine is None or mine:
            out += _read_events(self._w3, self._contract, self.address, _EVENTS, _TOPICS,
                                from_block, to_block, mine, round_topic)
        if round_topic is None and (theirs is None or theirs):
            reg = self.registry  # its sites were authorised before this training existed
            out += reg.events(None if default_start else from_block, to_block, theirs)
            out.sort(key=lambda e: (e.block, e.log_index))
        return out

    def log_filter(self, *names: str) -> dict[str, Any]:
        """An ``eth_subscribe("logs")`` filter for this training's events called ``names``."""
        topics = ["0x" + event_abi_to_log_topic(_EVENTS[n]).hex() for n in names if n in _EVENTS]
        return {"address": self.address, "topics": [topics]}


SwarmTraining = SwarmContract  # the contract's own name


def _open_round_members(checkins: list[ChainEvent], expelled: list[ChainEvent],
                        closed: ChainEvent | None) -> tuple[str, ...]:
    """A pruned round's participants as the contract held them at its election: every check-in,
    less the sites expelled before the round closed, removed as the contract removes them (the
    last entry takes the expelled one's place)."""
    def at(e: ChainEvent) -> tuple[int, int]:
        return (e.block, e.log_index)

    limit = at(closed) if closed is not None else None
    members: list[str] = []
    for e in sorted([*checkins, *expelled], key=at):
        if limit is not None and at(e) > limit:
            break
        node = str(e.args["node"])
        if e.name == "CheckedIn":
            members.append(node)
        elif node in members:
            i = members.index(node)
            members[i] = members[-1]
            members.pop()
    return tuple(members)
