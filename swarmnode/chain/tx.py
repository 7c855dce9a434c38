"""Locally signed transactions over standard ``eth_*`` JSON-RPC.

Each transaction is estimated (a revert there is reported before anything is sent), signed by
the account and sent with ``eth_sendRawTransaction``; a lock per account serialises nonce use so
several threads can share one account. Works with any node (anvil, geth) and with eth-tester.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import TimeExhausted

from swarmnode.chain.rpc import revert_reason, rpc_guard
from swarmnode.errors import ConfigError, ContractReverted

__all__ = ["GAS_HEADROOM", "GAS_MARGIN", "TxSender"]

GAS_MARGIN = 1.2
# A check-in, finish or revoke may also run the election when another node's transaction lands
# first; this headroom covers that path (unused gas is refunded).
GAS_HEADROOM = 60_000

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _account_lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


class TxSender:
    """Sends transactions signed by ``account`` on ``w3`` and waits for their receipts."""

    def __init__(self, w3: Web3, account: LocalAccount, receipt_timeout: float = 30.0) -> None:
        self.w3 = w3
        self.account = account
        self.receipt_timeout = receipt_timeout
        self._chain_id: int | None = None
        # one lock per (chain, account): by URL over HTTP, by provider object in-process
        where = getattr(w3.provider, "endpoint_uri", None) or f"in-process {id(w3.provider)}"
        self._lock = _account_lock(f"{where}|{account.address}")

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
            tx["gasPrice"] = int(w3.eth.gas_price)
            tx["chainId"] = self._chain_id
            with self._lock:
                tx["nonce"] = w3.eth.get_transaction_count(account.address, "pending")
                unsigned = {k: v for k, v in tx.items() if k != "from"}
                signed = account.sign_transaction(unsigned)
                try:
                    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
                except Exception as exc:
                    reason = revert_reason(exc)
                    if reason is None:
                        raise
                    raise refused(reason) from None
            receipt = self._receipt(tx_hash)
        if receipt["status"] != 1:
            raise refused(self._replay_reason(tx, receipt))
        return receipt

    def _receipt(self, tx_hash: Any) -> Any:
        """Wait for the receipt, asking at 20 ms at first and then less and less often (at most
        every 250 ms): an instant-mining chain answers the first ask, a busy one is not asked
        dozens of times per transaction (32 nodes checking in at once did that)."""
        from web3.exceptions import TransactionNotFound

        deadline = time.monotonic() + self.receipt_timeout
        delay = 0.02
        while True:
            try:
                receipt = self.w3.eth.get_transaction_receipt(tx_hash)
                if receipt is not None:
                    return receipt
            except TransactionNotFound:
                pass
            if time.monotonic() >= deadline:
                raise TimeExhausted(
                    f"transaction 0x{bytes(tx_hash).hex()} is not in a block after "
                    f"{self.receipt_timeout:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

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


def require_account(account: LocalAccount | None, what: str) -> LocalAccount:
    if account is None:
        raise ConfigError(f"{what} needs a signing account; pass --key-index or --keystore")
    return account
