"""DevChain: readiness, a state file that survives restarts (even SIGKILL), clean stop, errors;
Hardhat's node as the second kind, with the dev-chain controls and interval mining."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain, advance_time, anvil_binary, mine, reorg
from swarmnode.chain.tx import TxSender
from swarmnode.demo.swarm import wait_until
from swarmnode.errors import ChainError, ChainUnavailable, ConfigError, ContractReverted

pytestmark = pytest.mark.anvil


def test_ready_on_start_and_stopped_cleanly() -> None:
    with DevChain() as chain:
        assert chain.port != 0 and chain.running
        w3 = connect(chain.url)  # answers right after start() returns
        assert w3.eth.chain_id == 31337
        assert w3.eth.get_balance(dev_account(1).address) > 0
        pid = chain._proc.pid  # type: ignore[union-attr]
        url = chain.url
    assert not chain.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped: no zombie left behind
    with pytest.raises(ChainUnavailable, match=f"no JSON-RPC answer at {url}"):
        connect(url, timeout=2)
    chain.stop()  # idempotent


def test_state_file_survives_restart(tmp_path: Path, spec_json: str) -> None:
    state = tmp_path / "chain" / "state.json"
    with DevChain(state_file=state) as chain:
        contract = SwarmContract.deploy(connect(chain.url), dev_account(0), spec_json, 1, 0, 60)
    assert state.is_file()
    with DevChain(state_file=state) as chain:
        again = SwarmContract(connect(chain.url), contract.address)
        assert again.settings().deadline_s == 60
        assert again.spec_json() == spec_json  # blocks and logs come back too


def test_state_survives_sigkill_thanks_to_the_interval(tmp_path: Path, spec_json: str) -> None:
    state = tmp_path / "state.json"
    chain = DevChain(state_file=state).start()
    try:
        contract = SwarmContract.deploy(connect(chain.url), dev_account(0), spec_json, 1, 0, 60)
        needle = contract.address.lower()[2:]
        wait_until(lambda: state.is_file() and needle in state.read_text().lower(), 10,
                   "the periodic state dump holds the contract")
        chain._proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        chain._proc.wait()  # type: ignore[union-attr]
    finally:
        chain.stop()
    with DevChain(state_file=state) as restarted:
        assert SwarmContract(connect(restarted.url), contract.address).current_round() == 1


def test_block_time_mines_without_transactions() -> None:
    with DevChain(block_time=0.2) as chain:
        w3 = connect(chain.url)
        wait_until(lambda: w3.eth.block_number >= 2, 10, "two timed blocks")


def test_dead_anvil_reports_its_output() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        match = "anvil exited with code 1: Error: Address already in use .*--port"
        with pytest.raises(ChainUnavailable, match=match):
            DevChain(port=port).start()


def test_anvil_binary_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert anvil_binary().name == "anvil"
    monkeypatch.setenv("SWARMNODE_ANVIL", str(tmp_path / "no-anvil"))
    with pytest.raises(ConfigError, match="SWARMNODE_ANVIL=.* is not an executable file"):
        anvil_binary()


# -- the launcher's second implementation: Hardhat's node ---------------------------------------


def test_kind_and_its_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dev chain kind 'geth'; use one of anvil, "):
        DevChain(kind="geth")
    with pytest.raises(ConfigError, match="Hardhat's node keeps no state file"):
        DevChain(kind="hardhat", state_file=tmp_path / "state.json")


def test_hardhat_answers_like_anvil_and_takes_the_dev_controls(hardhat: DevChain) -> None:
    w3 = connect(hardhat.url)
    assert w3.client_version.startswith("HardhatNetwork")
    assert w3.eth.chain_id == 31337
    assert w3.eth.get_balance(dev_account(99).address) > 0  # 100 funded dev accounts, as anvil
    before = w3.eth.get_block("latest")
    advance_time(w3, 500)
    after = w3.eth.get_block("latest")
    assert after["number"] == before["number"] + 1
    assert after["timestamp"] >= before["timestamp"] + 500
    mine(w3, 2)
    assert w3.eth.block_number == after["number"] + 2
    with pytest.raises(ChainError, match="the dev chain refused anvil_reorg"):
        reorg(w3, 1)  # anvil's own


def test_hardhat_with_automine_off_mines_on_its_interval_for_its_own_mnemonic(
        monkeypatch: pytest.MonkeyPatch) -> None:
    words = "abandon " * 11 + "about"
    monkeypatch.setenv("SWARMNODE_DEV_MNEMONIC", words)
    with DevChain(kind="hardhat", block_time=1, instant=False, mnemonic=words) as chain:
        w3 = connect(chain.url)
        account = dev_account(1)  # of the chain's own mnemonic
        assert w3.eth.get_balance(account.address) > 0
        sent_at = w3.eth.block_number
        receipt = TxSender(w3, account, receipt_timeout=60).send(
            {"to": dev_account(2).address, "value": 1}, "a transfer",
            lambda r: ContractReverted(r, reason=r))
        assert receipt["blockNumber"] > sent_at  # waited for the interval's block
        assert receipt["type"] == 2
        wait_until(lambda: w3.eth.block_number >= receipt["blockNumber"] + 2, 20,
                   "two more interval blocks without transactions")
        first, second = (w3.eth.get_block(receipt["blockNumber"] + k) for k in (1, 2))
        assert second["timestamp"] - first["timestamp"] in (1, 2)
        assert not first["transactions"] and not second["transactions"]
