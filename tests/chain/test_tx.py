"""Transactions: type 2 (EIP-1559) where the chain has base fees and legacy where it has none
(in-process eth-tester, anvil, a pre-London anvil); on a chain that does not mine at once,
replacement with a higher fee (never a second transaction queued behind a stuck one), and a
confirmation depth that a reorganisation cannot fool. Real anvil, with its automine switched off
so a transaction stays pending until the test mines a block."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from web3 import EthereumTesterProvider, Web3
from web3.exceptions import TransactionNotFound

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.launcher import DevChain, mine, reorg, set_automine
from swarmnode.chain.rpc import connect
from swarmnode.chain.tx import TxSender
from swarmnode.demo.swarm import wait_until
from swarmnode.errors import ConfigError, ContractReverted

pytestmark = pytest.mark.anvil


@pytest.fixture
def manual_chain() -> Iterator[Web3]:
    """An anvil of its own whose blocks come only when the test mines one."""
    with DevChain() as chain:
        w3 = connect(chain.url)
        set_automine(w3, False)
        yield w3


def _refused(reason: str) -> ContractReverted:
    return ContractReverted(reason, reason=reason)


def _mine(w3: Web3) -> None:
    mine(w3)


def _transfer_type(w3: Web3, gas: int | None = None) -> tuple[int, Any]:
    """Send a transfer with TxSender; the mined transaction's type and the transaction."""
    receipt = TxSender(w3, dev_account(2)).send({"to": dev_account(3).address, "value": 3},
                                                  "a transfer", _refused, gas=gas)
    assert receipt["status"] == 1
    mined = w3.eth.get_transaction(receipt["transactionHash"])
    assert int(mined["type"]) == int(receipt["type"])
    return int(mined["type"]), mined


def _in_process(vm: type | None = None) -> Web3:
    """An in-process eth-tester chain (``vm``: one fork for every block) with dev account 2
    funded."""
    from eth_tester import EthereumTester, PyEVMBackend

    backend = PyEVMBackend(vm_configuration=((0, vm),)) if vm is not None else PyEVMBackend()
    w3 = Web3(EthereumTesterProvider(EthereumTester(backend)))
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": dev_account(2).address,
                             "value": 10**20, "gasPrice": 10**10} if vm is not None else
                            {"from": w3.eth.accounts[0], "to": dev_account(2).address,
                             "value": 10**20})
    return w3


def test_type_2_in_process_where_blocks_have_a_base_fee() -> None:
    w3 = _in_process()
    base = w3.eth.get_block("latest")["baseFeePerGas"]
    kind, mined = _transfer_type(w3)
    assert kind == 2
    assert mined["maxPriorityFeePerGas"] > 0 and mined["maxFeePerGas"] >= 2 * base


def test_legacy_in_process_where_blocks_have_no_base_fee() -> None:
    from eth.vm.forks import BerlinVM

    w3 = _in_process(BerlinVM)
    assert "baseFeePerGas" not in w3.eth.get_block("latest")
    # gas given: eth-tester cannot estimate on a pre-London VM (it estimates with EIP-1559 fields)
    kind, mined = _transfer_type(w3, gas=21_000)
    assert kind == 0 and mined["gasPrice"] > 0


@pytest.mark.parametrize("hardfork, expected", [(None, 2), ("berlin", 0)])
def test_anvil_mines_type_2_with_base_fees_and_legacy_without(hardfork: str | None,
                                                               expected: int) -> None:
    with DevChain(hardfork=hardfork) as chain:
        w3 = connect(chain.url)
        assert ("baseFeePerGas" in w3.eth.get_block("latest")) is (expected == 2)
        kind, mined = _transfer_type(w3)
        assert kind == expected
        receipt = w3.eth.get_transaction_receipt(mined["hash"])
        assert receipt["effectiveGasPrice"] > 0
        if expected == 2:  # paid the block's base fee plus the tip, not the cap
            block = w3.eth.get_block(receipt["blockNumber"])
            assert receipt["effectiveGasPrice"] == (
                block["baseFeePerGas"] + mined["maxPriorityFeePerGas"])


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
    first_price, first_tip = int(w3.eth.gas_price), int(w3.eth.max_priority_fee)
    nonce = w3.eth.get_transaction_count(account.address)
    thread, out = _send_in_background(sender, dev_account(6).address)
    wait_until(lambda: sender.replaced >= 2, 30, "the stuck transaction replaced twice",
               poll=0.05)
    assert sender.replaced >= 2, "the stuck transaction was never replaced"
    assert _pool_size(w3) == 1  # replacements take the stuck one's place; nothing queues behind
    assert sender.pending == 1  # what the metrics port shows as swarmnode_pending_transactions
    _mine(w3)
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert sender.pending == 0
    receipt = out["receipt"]
    assert receipt["status"] == 1
    assert int(receipt["effectiveGasPrice"]) > first_price  # the replacement was mined
    mined = w3.eth.get_transaction(receipt["transactionHash"])
    assert mined["type"] == 2  # replaced as type 2: both fees raised by at least a tenth each time
    assert mined["maxPriorityFeePerGas"] >= int(first_tip * 1.1**2)
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
    def mine_pending() -> dict:  # type: ignore[type-arg]
        pending = w3.provider.make_request("txpool_content", [])["result"]["pending"]  # type: ignore[arg-type]
        return next((v for k, v in pending.items() if k.lower() == account.address.lower()), {})

    wait_until(lambda: any(bytes.fromhex(tx["hash"][2:]) != bytes(stuck_hash)
                           for tx in mine_pending().values()),
               30, "the new process's own transaction in the pool", poll=0.05)
    mine = mine_pending()
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
        wait_until(lambda: _pool_size(w3) > 0 or w3.eth.block_number != start, 30,
                   "the transfer (or a block) to mine", poll=0.02)
        assert "receipt" not in out
        _mine(w3)
        time.sleep(0.3)
    thread.join(30)
    assert "error" not in out, out.get("error")
    assert w3.eth.block_number >= out["receipt"]["blockNumber"] + 2


def test_confirmations_survive_a_reorganisation_that_takes_back_an_unconfirmed_receipt(
        manual_chain: Web3) -> None:
    w3 = manual_chain
    # Without confirmations a receipt counts as soon as its block is mined ...
    payee = dev_account(11).address
    before = w3.eth.get_balance(payee)
    thread, out = _send_in_background(TxSender(w3, dev_account(10), receipt_timeout=60), payee)
    wait_until(lambda: _pool_size(w3) == 1, 30, "the transfer in the pool", poll=0.02)
    _mine(w3)
    thread.join(30)
    assert "error" not in out, out.get("error")
    told = out["receipt"]
    assert told["status"] == 1
    reorg(w3, 1)  # ... and a reorganisation of depth 1 takes it back:
    with pytest.raises(TransactionNotFound):
        w3.eth.get_transaction_receipt(told["transactionHash"])
    assert w3.eth.get_balance(payee) == before  # what the caller was told happened did not
    assert _pool_size(w3) == 0  # nor will it: the transaction is gone

    # With confirmations=2 the sender holds the receipt until two blocks are on top of it; the
    # same reorganisation meanwhile is seen (the transaction left the chain), the transaction
    # is sent again, and its depth counts from the block that holds it now.
    payee = dev_account(13).address
    before = w3.eth.get_balance(payee)
    sender = TxSender(w3, dev_account(12), receipt_timeout=60, confirmations=2)
    thread, out = _send_in_background(sender, payee)
    wait_until(lambda: _pool_size(w3) == 1, 30, "the transfer in the pool", poll=0.02)
    _mine(w3)
    first_block = w3.eth.get_block("latest")
    assert len(first_block["transactions"]) == 1
    time.sleep(0.5)
    assert "receipt" not in out  # mined, not yet confirmed
    reorg(w3, 1)
    wait_until(lambda: _pool_size(w3) == 1, 30,
               "the transaction sent again after the reorganisation", poll=0.02)
    assert "receipt" not in out
    for _ in range(3):  # its new block, then two on top
        _mine(w3)
        time.sleep(0.3)
    thread.join(30)
    assert "error" not in out, out.get("error")
    receipt = out["receipt"]
    assert receipt["status"] == 1
    assert receipt["transactionHash"] == first_block["transactions"][0]  # the same transaction
    assert receipt["blockHash"] != first_block["hash"]  # in another block
    assert w3.eth.get_block(receipt["blockNumber"])["hash"] == receipt["blockHash"]  # canonical
    assert w3.eth.block_number >= receipt["blockNumber"] + 2
    assert w3.eth.get_balance(payee) == before + 1


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


_RACER = """
import sys
from eth_account import Account
from swarmnode.chain.rpc import connect
from swarmnode.chain.tx import TxSender
from swarmnode.errors import ContractReverted
w3 = connect(sys.argv[1])
sender = TxSender(w3, Account.from_key(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    sender.send({"to": sys.argv[4], "value": 1}, "a transfer",
                lambda r: ContractReverted(r, reason=r), gas=21_000)
"""


def test_two_processes_of_one_account_take_turns_with_its_nonces(anvil: DevChain) -> None:
    """A site's nodes of two trainings at once sign with its one account, each in its own
    process: they take turns with its nonces (without the host lock one of the two failed in
    each run tried: a nonce too low, or its transaction replaced by the other's)."""
    import subprocess
    import sys

    from eth_account import Account

    w3 = connect(anvil.url)
    site, to = Account.create(), Account.create().address
    TxSender(w3, dev_account(0)).send({"to": site.address, "value": 10**18}, "funding",
                                      _refused, gas=21_000)
    n = 25
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, anvil.url, site.key.hex(),
                                str(n), to], stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    codes = [(p.wait(180), p.stderr.read() if p.stderr else "") for p in racers]
    assert [c for c, _ in codes] == [0, 0], [err[-600:] for _, err in codes]
    assert w3.eth.get_transaction_count(site.address) == 2 * n
    assert w3.eth.get_balance(to) == 2 * n
