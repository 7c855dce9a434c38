"""Transactions on a chain that does not mine at once: replacement with a higher fee (never a
second transaction queued behind a stuck one) and a confirmation depth. Real anvil, with its
automine switched off so a transaction stays pending until the test mines a block."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from web3 import Web3

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.launcher import DevChain
from swarmnode.chain.rpc import connect
from swarmnode.chain.tx import TxSender
from swarmnode.errors import ConfigError, ContractReverted

pytestmark = pytest.mark.anvil


@pytest.fixture
def manual_chain() -> Iterator[Web3]:
    """An anvil of its own whose blocks come only when the test mines one."""
    with DevChain() as chain:
        w3 = connect(chain.url)
        w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
        yield w3


def _refused(reason: str) -> ContractReverted:
    return ContractReverted(reason, reason=reason)


def _mine(w3: Web3) -> None:
    w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


def _send_in_background(sender: TxSender, to: str) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["receipt"] = sender.send({"to": to, "value": 1}, "a transfer", _refused)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _pool_size(w3: Web3) -> int:
    status = w3.provider.make_request("txpool_status", [])["result"]  # type: ignore[arg-type]
    return int(status["pending"], 16) + int(status["queued"], 16)


def test_a_pending_transaction_is_replaced_with_a_higher_fee(manual_chain: Web3) -> None:
    w3 = manual_chain
    account = dev_account(5)
    sender = TxSender(w3, account, receipt_timeout=60, bump_after_s=0.4)
    first_price = int(w3.eth.gas_price)
    nonce = w3.eth.get_transaction_count(account.address)
    thread, out = _send_in_background(sender, dev_account(6).address)
    deadline = time.monotonic() + 30
    while sender.replaced < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sender.replaced >= 2, "the stuck transaction was never replaced"
    assert _pool_size(w3) == 1  # replacements take the stuck one's place; nothing queues behind
    _mine(w3)
    thread.join(30)
    assert "error" not in out, out.get("error")
    receipt = out["receipt"]
    assert receipt["status"] == 1
    assert int(receipt["effectiveGasPrice"]) > first_price  # the replacement was mined
    assert w3.eth.get_transaction_count(account.address) == nonce + 1
    assert _pool_size(w3) == 0


def test_a_transaction_left_pending_by_an_earlier_run_is_replaced_not_queued_behind(
        manual_chain: Web3) -> None:
    w3 = manual_chain
    account = dev_account(7)
    nonce = w3.eth.get_transaction_count(account.address)
    stuck = account.sign_transaction({
        "to": dev_account(8).address, "value": 5, "gas": 21_000, "nonce": nonce,
        "gasPrice": int(w3.eth.gas_price), "chainId": int(w3.eth.chain_id),
    })
    stuck_hash = w3.eth.send_raw_transaction(stuck.raw_transaction)
    sender = TxSender(w3, account, receipt_timeout=60, bump_after_s=30)  # a new process
    thread, out = _send_in_background(sender, dev_account(9).address)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pending = w3.provider.make_request("txpool_content", [])["result"]["pending"]  # type: ignore[arg-type]
        mine = next((v for k, v in pending.items() if k.lower() == account.address.lower()), {})
        if any(bytes.fromhex(tx["hash"][2:]) != bytes(stuck_hash) for tx in mine.values()):
            break
        time.sleep(0.05)
    assert list(mine) == [str(nonce)], mine  # the same nonce, not nonce + 1 behind it
    _mine(w3)
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert out["receipt"]["status"] == 1
    assert w3.eth.get_transaction_count(account.address) == nonce + 1
    assert _pool_size(w3) == 0


def test_a_receipt_counts_once_it_has_its_confirmations(manual_chain: Web3) -> None:
    w3 = manual_chain
    sender = TxSender(w3, dev_account(4), receipt_timeout=60, confirmations=2)
    thread, out = _send_in_background(sender, dev_account(3).address)
    start = w3.eth.block_number
    for _ in range(3):  # the transaction's block, then two on top
        while _pool_size(w3) == 0 and w3.eth.block_number == start:
            time.sleep(0.02)
        assert "receipt" not in out
        _mine(w3)
        time.sleep(0.3)
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert w3.eth.block_number >= out["receipt"]["blockNumber"] + 2


def test_dev_accounts_come_from_the_chains_own_mnemonic(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dev network funded from another mnemonic than anvil's default (SWARMNODE_DEV_MNEMONIC):
    the admin deploys and a node enrols with the accounts that network funded."""
    import hashlib

    from swarmnode.chain.client import SwarmContract

    words = "abandon " * 11 + "about"
    with DevChain(mnemonic=words) as chain:
        w3 = connect(chain.url)
        default_admin = dev_account(0)
        assert w3.eth.get_balance(default_admin.address) == 0  # anvil's usual keys hold nothing
        monkeypatch.setenv("SWARMNODE_DEV_MNEMONIC", words)
        admin_key, node_key = dev_account(0), dev_account(1)
        assert admin_key.address != default_admin.address
        admin = SwarmContract.deploy(w3, admin_key, '{"a": 1}', 1, 10, 10)
        node = admin.with_account(node_key)
        admin.authorize(node.account_address, hashlib.sha256(b"its cert").digest())
        node.enroll("127.0.0.1:7100")
        assert admin.node(node.account_address).enrolled
    monkeypatch.setenv("SWARMNODE_DEV_MNEMONIC", "not a mnemonic")
    with pytest.raises(ConfigError, match="SWARMNODE_DEV_MNEMONIC is not a valid BIP-39"):
        dev_account(2)
