"""Locally signed transactions over standard ``eth_*`` JSON-RPC.

Each transaction is estimated (a revert there is reported before anything is sent), signed by
the account and sent with ``eth_sendRawTransaction``; a lock per account serialises nonce use so
several threads, and processes on one host (a file lock), can share one account. Works with any
node (anvil, Hardhat, geth) and with eth-tester.

Fees: where the latest block has a ``baseFeePerGas`` (London and later) a transaction is of type 2
(EIP-1559): a priority fee from ``eth_maxPriorityFeePerGas`` (else the median reward of
``eth_feeHistory``) and a fee cap of twice the base fee plus that tip, so it stays valid while the
base fee climbs for several full blocks (only base fee + tip is paid). A chain without base fees
gets a legacy transaction at ``eth_gasPrice``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import TimeExhausted

from swarmnode.chain.rpc import revert_reason, rpc_guard
from swarmnode.errors import ConfigError, ContractReverted

__all__ = ["GAS_HEADROOM", "GAS_MARGIN", "PRIORITY_FEE_TTL_S", "TxSender", "fee_fields"]

GAS_MARGIN = 1.2
# A check-in, finish or revoke may also run the election when another node's transaction lands
# first; this headroom covers that path (unused gas is refunded).
GAS_HEADROOM = 60_000
# The priority fee a chain suggests changes slowly: it is asked again after this many seconds.
PRIORITY_FEE_TTL_S = 30.0

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_nonces: dict[str, int] = {}  # the next nonce per (chain, account), known after its first mined tx
_locks_guard = threading.Lock()


def _account_lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


@contextmanager
def _host_lock(key: str) -> Iterator[None]:
    """The account's lock among this host's processes (a file lock in the temp folder): a
    site's nodes of two trainings at once sign with its one account, each in its own process, and
    take turns with its nonces as its threads do. Where no lock file can be made, none."""
    folder = Path(tempfile.gettempdir()) / "swarmnode-tx"
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.debug("no host lock for %s: %s", key, exc)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class TxSender:
    """Sends transactions signed by ``account`` on ``w3`` and waits for their receipts.

    One transaction per account is in flight at a time (the account lock is held until its
    receipt): a later one is never queued behind one that is stuck. A transaction still pending
    after ``bump_after_s`` is replaced (same nonce, fees raised by a quarter, as geth requires
    at least a tenth), again every ``bump_after_s``, until one of them is mined; a transaction
    this account left pending before (a restarted process) is replaced the same way rather than
    queued behind. ``confirmations``: the receipt is returned once that many blocks are on top of
    it and its block is still on the chain; a reorganisation that drops it in the meantime sends
    the same signed transaction again and waits for its new block.
    """

    def __init__(
        self, w3: Web3, account: LocalAccount, receipt_timeout: float = 30.0, *,
        bump_after_s: float = 30.0, confirmations: int = 0,
    ) -> None:
        if confirmations < 0:
            raise ConfigError(f"confirmations={confirmations} must be 0 or more")
        if bump_after_s <= 0:
            raise ConfigError(f"bump_after_s={bump_after_s} must be positive")
        self.w3 = w3
        self.account = account
        self.receipt_timeout = receipt_timeout
        self.bump_after_s = bump_after_s
        self.confirmations = confirmations
        self.replaced = 0  # transactions replaced with a higher fee, for logs and tests
        self._chain_id: int | None = None
        self._tip: tuple[float, int] | None = None  # (asked at, priority fee)
        # one lock per (chain, account): by URL over HTTP, by provider object in-process
        where = getattr(w3.provider, "endpoint_uri", None) or f"in-process {id(w3.provider)}"
        self._key = f"{where}|{account.address}"
        self._lock = _account_lock(self._key)
        self._nonce_key = self._key  # + the chain's id and genesis, known at the first send
        self._pending = 0  # sent by this sender, not yet mined and confirmed
        self._pending_guard = threading.Lock()

    @property
    def pending(self) -> int:
        """Transactions this sender has submitted that are not yet mined and confirmed (an
        operator's sign of a chain that stopped taking them: the metrics port shows it)."""
        return self._pending

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        with self._pending_guard:
            self._pending += 1
        try:
            yield
        finally:
            with self._pending_guard:
                self._pending -= 1

    def send(
        self,
        fields: dict[str, Any],
        what: str,
        refused: Callable[[str], ContractReverted],
        *,
        gas: int | None = None,
    ) -> Any:
        """Send a transaction with ``fields`` (``data`` and ``to``, none for a deployment).

        Returns the receipt of the successful transaction; a revert raises ``refused(reason)``.
        ``gas``: send with this gas limit, without estimating (a revert then shows in the receipt).
        """
        w3, account = self.w3, self.account
        tx: dict[str, Any] = {"from": account.address, "value": 0, **fields}
        with rpc_guard(w3, what):
            if self._chain_id is None:
                self._chain_id = int(w3.eth.chain_id)
                # the cached nonce is per chain, not per URL: a dev chain started later on a
                # port an earlier one used has the same URL and accounts but fresh nonces
                genesis = bytes(w3.eth.get_block(0)["hash"]).hex()
                self._nonce_key = f"{self._key}|{self._chain_id}|{genesis}"
            if gas is None:
                try:
                    estimate = w3.eth.estimate_gas(tx)  # type: ignore[arg-type]
                except Exception as exc:
                    reason = revert_reason(exc)
                    if reason is None:
                        raise
                    raise refused(reason) from None
                gas = int(estimate * GAS_MARGIN) + GAS_HEADROOM
            tx["gas"] = gas
            tx["chainId"] = self._chain_id
            with self._lock, _host_lock(self._key):
                fees = self._fees()
                cached = _nonces.pop(self._nonce_key, None)
                while True:
                    for name in _FEE_FIELDS:
                        tx.pop(name, None)
                    tx.update(fees)
                    nonce = cached
                    if nonce is None:
                        nonce = w3.eth.get_transaction_count(account.address, "latest")
                        if w3.eth.get_transaction_count(account.address, "pending") > nonce:
                            # left pending by an earlier run: take its nonce over, priced to
                            # replace it
                            log.warning("%s: account %s has a pending transaction (nonce %d); "
                                        "replacing it", what, account.address, nonce)
                            tx.update(_takeover(fees))
                    tx["nonce"] = nonce
                    try:
                        with self._in_flight():
                            receipt = self._mine(tx, what, refused)
                    except Exception as exc:
                        # another process signed with this account since: read the nonce again
                        if cached is not None and "nonce" in str(exc).lower():
                            cached = None
                            continue
                        raise  # the nonce is read again next time
                    _nonces[self._nonce_key] = nonce + 1
                    break
            with self._in_flight():
                receipt = self._confirm(receipt, tx, what, refused)
        if receipt["status"] != 1:
            raise refused(self._replay_reason(tx, receipt))
        return receipt

    def _fees(self) -> dict[str, int]:
        """The fee fields of the next transaction (see the module's docstring)."""
        now = time.monotonic()
        if self._tip is not None and now - self._tip[0] < PRIORITY_FEE_TTL_S:
            return fee_fields(self.w3, tip=self._tip[1])
        fees = fee_fields(self.w3)
        if "maxPriorityFeePerGas" in fees:
            self._tip = (now, fees["maxPriorityFeePerGas"])
        return fees

    def _submit(self, tx: dict[str, Any], refused: Callable[[str], ContractReverted]) -> Any:
        unsigned = {k: v for k, v in tx.items() if k != "from"}
        signed = self.account.sign_transaction(unsigned)
        try:
            return self.w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:
            reason = revert_reason(exc)
            if reason is None:
                raise
            raise refused(reason) from None

    def _mine(self, tx: dict[str, Any], what: str,
              refused: Callable[[str], ContractReverted]) -> Any:
        """Submit ``tx`` and wait for a receipt of it or of a replacement (same nonce, higher
        fee) sent each time ``bump_after_s`` passes without one."""
        hashes = [self._submit(tx, refused)]
        deadline = time.monotonic() + self.receipt_timeout
        while True:
            bump_at = min(deadline, time.monotonic() + self.bump_after_s)
            receipt = self._receipt(hashes, bump_at)
            if receipt is not None:
                return receipt
            if time.monotonic() >= deadline:
                raise TimeExhausted(
                    f"{what}: no transaction of nonce {tx['nonce']} is in a block after "
                    f"{self.receipt_timeout:.0f} s ({len(hashes)} sent, the last at "
                    f"{_describe_fees(tx)}); the chain may not be producing blocks"
                )
            for name in _FEE_FIELDS:
                if name in tx:
                    tx[name] = _bumped(tx[name])
            try:
                hashes.append(self._submit(tx, refused))
            except Exception as exc:  # noqa: BLE001 - e.g. "nonce too low": one was just mined
                log.info("%s: replacement not accepted (%s); waiting for the earlier one",
                         what, exc)
                continue
            self.replaced += 1
            log.warning("%s: still pending after %.0f s; replaced it at %s",
                        what, self.bump_after_s, _describe_fees(tx))

    def _receipt(self, hashes: list[Any], until: float) -> Any:
        """The receipt of any of ``hashes``, asking at 20 ms at first and then less and less
        often (at most every 250 ms): an instant-mining chain answers the first ask, a busy one
        is not asked dozens of times per transaction (32 nodes checking in at once did that).
        None at ``until``."""
        from web3.exceptions import TransactionNotFound

        delay = 0.02
        while True:
            for tx_hash in reversed(hashes):
                try:
                    receipt = self.w3.eth.get_transaction_receipt(tx_hash)
                    if receipt is not None:
                        return receipt
                except TransactionNotFound:
                    pass
            if time.monotonic() >= until:
                return None
            time.sleep(min(delay, max(0.0, until - time.monotonic())))
            delay = min(delay * 1.5, 0.25)

    def _confirm(self, receipt: Any, tx: dict[str, Any], what: str,
                 refused: Callable[[str], ContractReverted]) -> Any:
        """Wait until ``confirmations`` blocks are on top of the receipt's block and return the
        receipt as the chain holds it then. Every new head, the receipt is read again: a
        reorganisation may have moved the transaction to another block (the depth counts from
        there) or dropped it (the same signed transaction is sent again: same nonce, so it can
        land at most once)."""
        if not self.confirmations:
            return receipt
        tx_hash = receipt["transactionHash"]
        deadline = time.monotonic() + self.receipt_timeout + self.confirmations * 60
        seen: Any = None  # the head last looked at (a reorganisation may keep its number)
        while True:
            head = self.w3.eth.get_block("latest")
            if head["hash"] != seen:
                seen = head["hash"]
                now = self._receipt([tx_hash], 0.0)  # one ask
                if now is None:
                    log.warning("%s: transaction 0x%s left the chain in a reorganisation "
                                "(it was in block %d); sending it again", what,
                                bytes(tx_hash).hex(), receipt["blockNumber"])
                    try:
                        tx_hash = self._submit(tx, refused)
                    except ContractReverted:
                        raise
                    except Exception as exc:  # noqa: BLE001 - e.g. already in the pool again
                        log.info("%s: sending it again was not accepted (%s)", what, exc)
                    now = self._receipt([tx_hash], time.monotonic() + self.receipt_timeout)
                    if now is None:
                        raise TimeExhausted(f"{what}: transaction 0x{bytes(tx_hash).hex()} is "
                                            "not back in a block after a reorganisation")
                    seen = None  # look at the new head at once
                elif now["blockHash"] != receipt["blockHash"]:
                    log.warning("%s: a reorganisation moved the transaction from block %d to "
                                "block %d", what, receipt["blockNumber"], now["blockNumber"])
                receipt = now
                if seen is not None and (int(head["number"]) >=
                                         int(receipt["blockNumber"]) + self.confirmations):
                    return receipt
            if time.monotonic() >= deadline:
                raise TimeExhausted(
                    f"block {receipt['blockNumber']} did not get {self.confirmations} "
                    "confirmations in time; the chain may not be producing blocks"
                )
            time.sleep(0.25)

    def _replay_reason(self, tx: dict[str, Any], receipt: Any) -> str:
        """Why a mined transaction failed: replay it as a call on the state after its block."""
        call = {k: tx[k] for k in ("from", "data", "gas") if k in tx}
        if tx.get("to"):
            call["to"] = tx["to"]
        try:
            block = int(receipt["blockNumber"])
            self.w3.eth.call(call, block_identifier=block)  # type: ignore[arg-type]
        except Exception as exc:
            reason = revert_reason(exc)
            if reason is not None:
                return reason
        return (
            f"transaction 0x{bytes(receipt['transactionHash']).hex()} failed in block "
            f"{receipt['blockNumber']} (gas used {receipt['gasUsed']} of {tx['gas']})"
        )


_FEE_FIELDS = ("gasPrice", "maxFeePerGas", "maxPriorityFeePerGas")


def fee_fields(w3: Web3, *, tip: int | None = None) -> dict[str, int]:
    """Fee fields for a transaction sent now: ``maxFeePerGas`` and ``maxPriorityFeePerGas``
    (type 2) where the latest block has a base fee, else ``gasPrice`` (legacy). ``tip``: the
    priority fee, if known already (not asked again)."""
    base = w3.eth.get_block("latest").get("baseFeePerGas")
    if base is None:
        return {"gasPrice": int(w3.eth.gas_price)}
    if tip is None:
        tip = _priority_fee(w3)
    return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * int(base) + tip}


def _priority_fee(w3: Web3) -> int:
    """The chain's suggested priority fee: ``eth_maxPriorityFeePerGas``, else the median reward
    paid in the last blocks (``eth_feeHistory``), else 1 gwei."""
    try:
        return int(w3.eth.max_priority_fee)
    except Exception as exc:  # noqa: BLE001 - a node without the method (it is not in the spec)
        log.debug("eth_maxPriorityFeePerGas unavailable (%s); using eth_feeHistory", exc)
    try:
        rewards = [int(r[0]) for r in w3.eth.fee_history(10, "latest", [50]).get("reward", [])
                   if r]
    except Exception as exc:  # noqa: BLE001
        log.debug("eth_feeHistory unavailable (%s); tipping 1 gwei", exc)
        rewards = []
    rewards = sorted(r for r in rewards if r > 0)
    return rewards[len(rewards) // 2] if rewards else 10**9


def _takeover(fees: dict[str, int]) -> dict[str, int]:
    """Fees that replace a transaction left pending by an earlier run, whose fees are unknown:
    twice today's price and more, all of it offered as tip for a type-2 transaction (a legacy one
    left pending is replaced only by a tip above its whole gas price)."""
    if "gasPrice" in fees:
        return {"gasPrice": _bumped(fees["gasPrice"] * 2)}
    cap = _bumped(fees["maxFeePerGas"] * 2)
    return {"maxFeePerGas": cap, "maxPriorityFeePerGas": cap}


def _describe_fees(tx: dict[str, Any]) -> str:
    if "gasPrice" in tx:
        return f"gas price {tx['gasPrice']}"
    return f"fee cap {tx['maxFeePerGas']}, priority fee {tx['maxPriorityFeePerGas']}"


def _bumped(price: int) -> int:
    """A fee that replaces ``price`` (geth wants at least 10% more; this gives 25%)."""
    return max(price + 1, price * 5 // 4)


def require_account(account: LocalAccount | None, what: str) -> LocalAccount:
    if account is None:
        raise ConfigError(f"{what} needs a signing account; pass --key-index or --keystore")
    return account
