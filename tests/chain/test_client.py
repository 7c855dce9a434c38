"""SwarmContract and friends: error translation, accounts policy, events, waiting, concurrency."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from eth_account import Account
from web3 import Web3

from swarmnode.chain import tx as txmod
from swarmnode.chain.accounts import account_for, dev_account, load_keystore
from swarmnode.chain.client import SwarmContract, SwarmRegistry, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.chain.tx import TxSender
from swarmnode.errors import (
    ChainTimeout,
    ChainUnavailable,
    ConfigError,
    ContractNotFound,
    ContractReverted,
)

if TYPE_CHECKING:
    from conftest import Backend, Swarm

MakeSwarm = Callable[..., "Swarm"]
# init code that deploys a one-byte contract (STOP): code, but not one of swarmnode's
TINY_CONTRACT = "0x6001600c60003960016000f300"


def test_connect_errors() -> None:
    with pytest.raises(ConfigError, match="is not an http.s. URL"):
        connect("127.0.0.1:8545")
    with pytest.raises(ChainUnavailable, match="is the chain running\\? start one with"):
        connect("http://127.0.0.1:1", timeout=2)


def test_contract_not_found(backend: Backend) -> None:
    with pytest.raises(ContractNotFound, match="no contract at .*swarmnode training deploy"):
        SwarmContract(backend.w3, dev_account(5).address)
    with pytest.raises(ContractNotFound, match="no contract at .*swarmnode registry deploy"):
        SwarmRegistry(backend.w3, dev_account(5).address)
    receipt = TxSender(backend.w3, dev_account(0)).send(
        {"data": TINY_CONTRACT}, "deploy tiny", lambda r: ContractReverted(r)
    )
    with pytest.raises(ContractNotFound, match="is not a SwarmTraining"):
        SwarmContract(backend.w3, receipt["contractAddress"])
    with pytest.raises(ContractNotFound, match="is not a SwarmRegistry"):
        SwarmRegistry(backend.w3, receipt["contractAddress"])
    training = SwarmContract.deploy(backend.w3, dev_account(0), '{"a": 1}', 1, 0, 60)
    with pytest.raises(ContractNotFound, match="is not a SwarmTraining"):
        SwarmContract(backend.w3, training.registry.address)  # a registry is not a training
    with pytest.raises(ContractNotFound, match="is not a SwarmRegistry"):
        SwarmRegistry(backend.w3, training.address)
    with pytest.raises(ConfigError, match="is not a SwarmTraining address"):
        SwarmContract(backend.w3, "0x1234")


def test_read_only_handle_cannot_send(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=1)
    reader = SwarmContract(swarm.backend.w3, swarm.admin.address)
    assert reader.account_address is None
    assert reader.current_round() == 1
    with pytest.raises(ConfigError, match="needs a signing account"):
        reader.checkin(1, 1)
    with pytest.raises(ConfigError, match="is not an address"):
        reader.node("nobody")


def test_events_filter_and_wait_for(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=2)
    names = [e.name for e in swarm.admin.events()]
    # the training's events with its registry's merged in, in chain order
    assert names[0] == "SpecPublished" and names.count("Enrolled") == 2
    assert names.count("Joined") == 2 and names.index("Enrolled") < names.index("Joined")
    enrolled = swarm.admin.events(names={"Enrolled"})
    assert [e.args["site"] for e in enrolled] == [n.account_address for n in swarm.nodes]
    assert all(isinstance(e.args["fingerprint"], bytes) for e in enrolled)
    joined = swarm.admin.events(names={"Joined"})
    assert [e.args["node"] for e in joined] == [n.account_address for n in swarm.nodes]
    assert [e.name for e in swarm.admin.registry.events(names={"Enrolled"})] == ["Enrolled"] * 2
    with pytest.raises(ConfigError, match="unknown event name.*Enroled.*known: "):
        swarm.admin.events(names={"Enroled"})
    assert swarm.admin.wait_for(lambda: swarm.admin.current_round(), 1, "a round") == 1
    with pytest.raises(ChainTimeout, match="leader of round 1 did not happen within 0.2 s"):
        swarm.admin.wait_for(lambda: swarm.admin.round(1).leader, 0.2, "leader of round 1")


def _outcome(call: Callable[[], object]) -> object:
    try:
        value = call()
    except Exception as exc:  # noqa: BLE001 - compared, not handled
        return ("raised", type(exc), str(exc))
    return (type(value), value)


def test_view_calls_give_what_web3s_contract_call_gives(make_swarm: MakeSwarm) -> None:
    """_Handle._call encodes and decodes a view itself (web3 looks the function up and validates
    the whole ABI on every call): the same values, types and reverts as web3's own call."""
    swarm = make_swarm(nodes=2)
    a, b = swarm.nodes
    a.checkin(1, 5)
    b.checkin(1, 7)
    me, nobody = a.account_address, "0x" + "42" * 20
    training = [("currentRound", ()), ("activeCount", ()), ("absentCount", ()),
                ("nodeList", ()), ("roundInfo", (1,)), ("roundInfo", (99,)),
                ("participants", (1,)), ("participants", (7,)), ("checkinWeight", (1, me)),
                ("checkinWeight", (2, me)), ("checkinWeight", (1, nobody))]
    registry = [("admin", ()), ("siteList", ()), ("trainings", ()), ("siteInfo", (me,)),
                ("siteInfo", (nobody,)), ("endpointOf", (me,)), ("isTraining", (me,))]
    checked = 0
    for handle, cases in ((swarm.admin, training), (swarm.admin.registry, registry)):
        for fn, args in cases:
            assert handle._view(fn) is not None, fn
            ours = _outcome(partial(handle._call_view, fn, args))
            theirs = _outcome(partial(getattr(handle._contract.functions, fn)(*args).call))
            assert ours == theirs, (fn, args)
            checked += 1
    assert checked == len(training) + len(registry)
    assert swarm.admin.round(1).participants == (a.account_address, b.account_address)


@pytest.mark.anvil
def test_account_policy(anvil_w3: Web3, tester_w3: Web3) -> None:
    assert account_for(anvil_w3, key_index=3).address == dev_account(3).address
    with pytest.raises(ConfigError, match="only allowed on a dev chain .* this chain has id"):
        account_for(tester_w3, key_index=3)
    with pytest.raises(ConfigError, match="no signing key given"):
        account_for(anvil_w3)


@pytest.mark.anvil
def test_keystore(tmp_path: Path, anvil_w3: Web3) -> None:
    key = Account.create()
    path = tmp_path / "node.json"
    path.write_text(json.dumps(Account.encrypt(key.key, "s3cret", iterations=2)))
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    acct = account_for(anvil_w3, keystore=path, password_file=pw)
    assert acct.address == key.address
    with pytest.raises(ConfigError, match=f"wrong password for keystore {path}"):
        load_keystore(path, "nope")
    with pytest.raises(ConfigError, match="does not exist; check --keystore"):
        load_keystore(tmp_path / "missing.json", "x")
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ConfigError, match="is not JSON"):
        load_keystore(tmp_path / "bad.json", "x")
    with pytest.raises(ConfigError, match="either a dev key index or a keystore"):
        account_for(anvil_w3, key_index=1, keystore=path, password="s3cret")
    with pytest.raises(ConfigError, match="password file .* does not exist"):
        account_for(anvil_w3, keystore=path, password_file=tmp_path / "nopw")


@pytest.mark.anvil
def test_threads_share_one_account(anvil_w3: Web3, spec_json: str) -> None:
    contract = SwarmContract.deploy(anvil_w3, dev_account(0), spec_json, 1, 0, 60)
    results: list = []
    errors: list = []

    def send(i: int) -> None:
        try:
            results.append(contract.authorize(dev_account(i % 9 + 1).address, bytes([i + 1]) * 32))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.tx_hash for r in results}) == 12


@pytest.mark.anvil
def test_failed_receipt_becomes_contract_reverted(
    anvil_w3: Web3, spec_json: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    contract = SwarmContract.deploy(anvil_w3, dev_account(0), spec_json, 1, 0, 60)
    monkeypatch.setattr(txmod, "GAS_MARGIN", 0.6)
    monkeypatch.setattr(txmod, "GAS_HEADROOM", 0)
    with pytest.raises(ContractReverted, match="failed in block .*gas used"):
        contract.authorize(dev_account(1).address, b"\x01" * 32)  # runs out of gas on chain
    assert not contract.node(dev_account(1).address).authorized


@pytest.mark.anvil
def test_unmined_receipt_and_vanished_chain(spec_json: str) -> None:
    with DevChain() as chain:
        w3 = connect(chain.url)
        contract = SwarmContract.deploy(w3, dev_account(0), spec_json, 1, 0, 60)
        slow = SwarmContract(w3, contract.address, dev_account(0), receipt_timeout=0.3)
        w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
        with pytest.raises(ChainTimeout, match="is the chain mining blocks"):
            slow.authorize(dev_account(1).address, b"\x01" * 32)
    with pytest.raises(ChainUnavailable, match=f"no JSON-RPC answer at {chain.url}"):
        contract.current_round()


def test_masked_update_hash_rides_on_the_checkin(make_swarm: MakeSwarm) -> None:
    """Secure aggregation: the check-in logs the masked update's hash (MaskedUpdate), read back
    per round; a plain check-in logs none; a malformed hash is refused before any transaction."""
    swarm = make_swarm(nodes=3, min_peers=3)
    a, b, c = swarm.nodes
    ha, hb = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    a.checkin(1, 2, masked_hash=ha)
    b.checkin(1, 3, masked_hash=hb)
    plain = c.checkin(1, 1)
    assert "MaskedUpdate" not in plain.events
    assert swarm.admin.masked_hashes(1) == {a.account_address: ha, b.account_address: hb}
    assert swarm.admin.masked_hashes(2) == {}
    with pytest.raises(ConfigError, match="32 bytes, not all zero"):
        a.checkin(2, 1, masked_hash=bytes(32))
    with pytest.raises(ConfigError, match="32 bytes, not all zero"):
        a.checkin(2, 1, masked_hash=b"short")
