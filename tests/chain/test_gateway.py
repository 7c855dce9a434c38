"""The chain gateway: a real anvil behind a real gateway with real certificates. What other sites
of a dev consortium on separate hosts can do with the sentinel's chain: the standard calls a node
makes (a swarmnode contract deployed and called through it), and nothing that rewrites the chain
or signs with its dev accounts; no client without a certificate from the consortium's CA."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from eth_account import Account

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract
from swarmnode.chain.gateway import ALLOWED_METHODS, ChainGateway, GatewayLimits
from swarmnode.chain.launcher import DevChain
from swarmnode.chain.rpc import ChainTls, connect
from swarmnode.errors import ChainError, ChainUnavailable, ConfigError
from swarmnode.identity import create_ca, issue_node_cert, make_bundle
from swarmnode.identity.tls import TlsFiles

SPEC_JSON = '{"merge_method": "mean", "min_peers": 2, "sync_frequency": 8}'
ADMIN_PREFIXES = ("anvil_", "evm_", "hardhat_", "debug_")
REFUSED = [
    ("anvil_setBalance", ["{addr}", "0xde0b6b3a7640000"]),
    ("anvil_impersonateAccount", ["{addr}"]),
    ("anvil_mine", ["0x1"]),
    ("anvil_dumpState", []),
    ("evm_snapshot", []),
    ("evm_revert", ["0x0"]),
    ("evm_mine", []),
    ("evm_increaseTime", [3600]),
    ("evm_setNextBlockTimestamp", [4102444800]),
    ("hardhat_setBalance", ["{addr}", "0xde0b6b3a7640000"]),
    ("hardhat_impersonateAccount", ["{addr}"]),
    ("debug_traceTransaction", ["0x" + "00" * 32]),
    ("eth_sendTransaction", [{"from": "{admin}", "to": "{addr}", "value": "0x1"}]),
    ("eth_sign", ["{admin}", "0x00"]),
    ("eth_accounts", []),
    ("personal_unlockAccount", ["{admin}", "", 0]),
    ("personal_sendTransaction", [{"from": "{admin}", "to": "{addr}", "value": "0x1"}, ""]),
    ("admin_nodeInfo", []),
    ("txpool_content", []),
]


@dataclass
class Pki:
    trust: Path
    server: TlsFiles
    client: ChainTls  # a site of the consortium
    outsider: ChainTls  # a certificate from another CA, trusting the consortium's


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("gateway-pki")
    ca = create_ca(root / "ca", "study-ca", org="study consortium")
    trust = make_bundle([ca[0]], root / "trust.pem")
    server = issue_node_cert(*ca, root / "sentinel", "hospital-1", dns=["localhost"],
                             ips=["127.0.0.1"])
    client = issue_node_cert(*ca, root / "site", "hospital-2", dns=["hospital-2"], ips=[])
    other = create_ca(root / "other-ca", "other-ca", org="somebody else")
    outsider = issue_node_cert(*other, root / "outsider", "hospital-2", dns=["hospital-2"],
                               ips=[])
    return Pki(trust, TlsFiles(*server, trust), ChainTls(*client, trust),
               ChainTls(*outsider, trust))


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    with DevChain() as dev:
        yield dev


@pytest.fixture()
def gateway(chain: DevChain, pki: Pki) -> Iterator[ChainGateway]:
    limits = GatewayLimits(max_body_bytes=64 * 1024, handshake_timeout_s=1.0,
                           max_connections=8, max_handshakes=4)
    with ChainGateway(chain.url, "127.0.0.1:0", pki.server, limits) as gw:
        yield gw


def _post(gw: ChainGateway, tls: ChainTls, payload: object | None = None, *,
          data: bytes | None = None) -> requests.Response:
    body = data if data is not None else json.dumps(payload).encode()
    return requests.post(gw.url, data=body, headers={"Content-Type": "application/json"},
                         timeout=30, **tls.request_kwargs())  # type: ignore[arg-type]


def _rpc(method: str, params: list, request_id: object = 1) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def _fill(params: list, **values: str) -> list:
    return json.loads(json.dumps(params).replace("{addr}", values["addr"])
                      .replace("{admin}", values["admin"]))


def test_a_swarmnode_contract_is_deployed_and_called_through_the_gateway(
        chain: DevChain, gateway: ChainGateway, pki: Pki) -> None:
    w3 = connect(gateway.url, tls=pki.client)
    assert w3.eth.chain_id == chain.chain_id
    # A site's own key (not a dev account): funded inside the sentinel, then everything it
    # does goes through the gateway as transactions it signed itself.
    admin = Account.create()
    direct = connect(chain.url)
    funder = dev_account(0)
    tx = funder.sign_transaction({
        "to": admin.address, "value": 10**18, "gas": 21_000, "gasPrice": direct.eth.gas_price,
        "nonce": direct.eth.get_transaction_count(funder.address), "chainId": chain.chain_id})
    direct.eth.wait_for_transaction_receipt(direct.eth.send_raw_transaction(tx.raw_transaction))

    swarm = SwarmContract.deploy(w3, admin, SPEC_JSON, 2, 1, 5)
    settings = swarm.settings()
    assert settings.admin.lower() == admin.address.lower() and settings.min_peers == 2
    node = Account.create()
    swarm.authorize(node.address, b"\x11" * 32)
    assert gateway.stats["forwarded"] > 5 and gateway.stats["refused"] == 0
    # the same contract as the chain itself sees it
    assert SwarmContract(direct, swarm.address).settings().admin == settings.admin


@pytest.mark.parametrize(("method", "params"), REFUSED, ids=[m for m, _ in REFUSED])
def test_admin_and_node_signed_methods_are_refused(chain: DevChain, gateway: ChainGateway,
                                                   pki: Pki, method: str, params: list) -> None:
    victim = Account.create().address
    answer = _post(gateway, pki.client,
                   _rpc(method, _fill(params, addr=victim, admin=dev_account(0).address), 7))
    assert answer.status_code == 200
    body = answer.json()
    assert body["id"] == 7 and "result" not in body
    assert body["error"]["code"] == -32601
    assert method in body["error"]["message"]
    assert "not available through the swarmnode chain gateway" in body["error"]["message"]
    # nothing reached the chain: the balance anvil_setBalance & co. would have given is not there
    assert connect(chain.url).eth.get_balance(victim) == 0


def test_the_allow_list_holds_no_admin_or_signing_method() -> None:
    assert not [m for m in ALLOWED_METHODS if m.startswith(ADMIN_PREFIXES)]
    assert not ALLOWED_METHODS & {"eth_sendTransaction", "eth_sign", "eth_signTransaction",
                                  "eth_signTypedData_v4", "eth_accounts"}
    assert all(m.split("_")[0] in ("eth", "net", "web3") for m in ALLOWED_METHODS)


def test_web3_sees_a_refusal_as_a_chain_error_naming_the_method(gateway: ChainGateway,
                                                                pki: Pki) -> None:
    w3 = connect(gateway.url, tls=pki.client)
    answer = w3.provider.make_request("evm_snapshot", [])  # type: ignore[arg-type]
    assert "evm_snapshot" in answer["error"]["message"]
    with pytest.raises(Exception, match="eth_accounts"):
        w3.eth.accounts  # noqa: B018


def test_a_batch_answers_each_entry_and_refuses_only_the_forbidden_one(
        chain: DevChain, gateway: ChainGateway, pki: Pki) -> None:
    victim = Account.create().address
    batch = [
        _rpc("eth_chainId", [], "a"),
        _rpc("anvil_setBalance", [victim, "0xde0b6b3a7640000"], "b"),
        _rpc("eth_getBalance", [victim, "latest"], "a"),  # a repeated id is answered in place
        {"jsonrpc": "2.0", "method": "evm_mine", "params": []},  # a notification: no answer
        "not a request",
        _rpc("eth_blockNumber", [], 9),
    ]
    answers = _post(gateway, pki.client, batch).json()
    assert len(answers) == 5
    assert answers[0] == {"jsonrpc": "2.0", "id": "a", "result": hex(chain.chain_id)}
    assert answers[1]["id"] == "b" and "anvil_setBalance" in answers[1]["error"]["message"]
    assert answers[2] == {"jsonrpc": "2.0", "id": "a", "result": "0x0"}
    assert answers[3]["error"]["code"] == -32600 and answers[3]["id"] is None
    assert answers[4]["id"] == 9 and int(answers[4]["result"], 16) >= 0
    assert connect(chain.url).eth.get_balance(victim) == 0


def test_a_request_is_forwarded_as_the_gateway_read_it(chain: DevChain, gateway: ChainGateway,
                                                       pki: Pki) -> None:
    """A second "method" key cannot smuggle a method past the check: the chain gets the
    request re-serialised from what the gateway checked."""
    victim = Account.create().address
    smuggled = json.dumps(_rpc("eth_chainId", [victim, "0x1"])).replace(
        "}", ', "method": "anvil_setBalance"}').encode()
    body = _post(gateway, pki.client, data=smuggled).json()
    assert "anvil_setBalance" in body["error"]["message"]
    smuggled = b'{"jsonrpc":"2.0","id":1,"method":"anvil_setBalance","params":[],' \
        b'"method":"eth_chainId"}'
    assert _post(gateway, pki.client, data=smuggled).json()["result"] == hex(chain.chain_id)
    assert connect(chain.url).eth.get_balance(victim) == 0


def test_bad_bodies_get_a_json_rpc_error(gateway: ChainGateway, pki: Pki) -> None:
    assert _post(gateway, pki.client, data=b"{not json").json()["error"]["code"] == -32700
    assert _post(gateway, pki.client, []).json()["error"]["code"] == -32600
    big_batch = [_rpc("eth_chainId", [], i) for i in range(101)]
    assert "at most 100" in _post(gateway, pki.client, big_batch).json()["error"]["message"]
    got = requests.get(gateway.url, timeout=30, **pki.client.request_kwargs())  # type: ignore
    assert got.status_code == 405 and "POST only" in got.json()["error"]["message"]


def test_an_oversize_body_is_refused(gateway: ChainGateway, pki: Pki) -> None:
    oversize = json.dumps(_rpc("eth_call", [{"data": "0x" + "00" * 40_000}, "latest"])).encode()
    assert len(oversize) > gateway.limits.max_body_bytes
    answer = _post(gateway, pki.client, data=oversize)
    assert answer.status_code == 413
    assert f"at most {gateway.limits.max_body_bytes} bytes" in answer.json()["error"]["message"]
    # the gateway still serves (a fresh connection: it closed that one)
    assert _post(gateway, pki.client, _rpc("eth_chainId", [])).json()["result"]


def test_a_client_without_a_consortium_certificate_is_refused(gateway: ChainGateway,
                                                              pki: Pki) -> None:
    before = gateway.stats["failed_handshakes"]
    for who in (ChainTls(trust=pki.trust), pki.outsider):
        with pytest.raises(ChainUnavailable, match="TLS") as err:
            connect(gateway.url, tls=who)
        assert "SWARMNODE_CHAIN_CERT" in str(err.value)
        with pytest.raises(requests.exceptions.ConnectionError):
            _post(gateway, who, _rpc("eth_chainId", []))
    assert gateway.stats["failed_handshakes"] >= before + 4
    assert gateway.stats["forwarded"] == 0


def test_the_client_checks_the_gateway_against_the_trust_bundle(gateway: ChainGateway,
                                                               pki: Pki) -> None:
    """A client that does not trust the consortium CA (the system's CAs) refuses the gateway."""
    assert pki.client.cert is not None and pki.client.key is not None
    with pytest.raises(ChainUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        connect(gateway.url, tls=ChainTls(pki.client.cert, pki.client.key,
                                          Path(ssl.get_default_verify_paths().cafile or
                                               "/etc/ssl/certs/ca-certificates.crt")))


def test_half_a_client_certificate_is_a_config_error(gateway: ChainGateway, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="SWARMNODE_CHAIN_KEY"):
        connect(gateway.url, tls=ChainTls(cert=pki.client.cert, trust=pki.trust))
    with pytest.raises(ConfigError, match="does not exist"):
        connect(gateway.url, tls=ChainTls(pki.client.cert, Path("/nowhere.key"), pki.trust))


def test_the_environment_gives_the_client_certificate(gateway: ChainGateway, pki: Pki,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMNODE_CHAIN_CERT", str(pki.client.cert))
    monkeypatch.setenv("SWARMNODE_CHAIN_KEY", str(pki.client.key))
    monkeypatch.setenv("SWARMNODE_CHAIN_TRUST", str(pki.trust))
    assert connect(gateway.url).eth.block_number >= 0


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(gateway: ChainGateway,
                                                                    pki: Pki) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""  # closed by the gateway, not by us
        waited = time.monotonic() - started
    assert gateway.limits.handshake_timeout_s * 0.5 < waited < 20


def test_connections_past_the_limit_are_closed_and_others_still_served(
        gateway: ChainGateway, pki: Pki) -> None:
    held = [socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            for _ in range(gateway.limits.max_handshakes)]
    try:
        deadline = time.monotonic() + 20
        while gateway.stats["rejected_connections"] == 0 and time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as extra:
                extra.settimeout(30)
                try:
                    closed = extra.recv(1) == b""
                except ConnectionResetError:
                    closed = True
                assert closed
        assert gateway.stats["rejected_connections"] >= 1
    finally:
        for s in held:
            s.close()
    # with the handshakes freed, a site is served again
    deadline = time.monotonic() + 20
    while True:
        try:
            assert _post(gateway, pki.client, _rpc("eth_chainId", [])).json()["result"]
            break
        except requests.exceptions.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_refusal_through_swarmnode_is_a_chain_error(gateway: ChainGateway, pki: Pki) -> None:
    """What a CLI command sees when it asks for a method the gateway does not pass."""
    from swarmnode.chain.rpc import rpc_guard

    w3 = connect(gateway.url, tls=pki.client)
    with pytest.raises(ChainError, match="eth_accounts"), rpc_guard(w3, "listing accounts"):
        w3.eth.accounts  # noqa: B018


def test_the_cli_runs_the_gateway_until_sigterm(chain: DevChain, pki: Pki) -> None:
    """`swarmnode chain gateway` as the sentinel's gateway container runs it."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "SWARMNODE_CERT": str(pki.server.cert),
           "SWARMNODE_KEY": str(pki.server.key), "SWARMNODE_TRUST": str(pki.trust)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmnode", "chain", "gateway", "--upstream", chain.url,
         "--listen", f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed once it listens
        assert f"port {port}" in first and "eth_sendRawTransaction" in first, first
        url = f"https://127.0.0.1:{port}"
        assert connect(url, tls=pki.client).eth.chain_id == chain.chain_id
        refused = requests.post(url, json=_rpc("anvil_mine", []), timeout=30,
                                **pki.client.request_kwargs()).json()  # type: ignore[arg-type]
        assert "anvil_mine" in refused["error"]["message"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "chain gateway stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_chain_fund_tops_up_the_admin_from_a_dev_account_once(chain: DevChain) -> None:
    """What the sentinel's deploy service runs, inside the sentinel, before it signs as the
    consortium's fresh admin: a re-run (a restarted deploy service) sends nothing more."""
    from typer.testing import CliRunner

    from swarmnode.cli import app

    admin = Account.create().address
    args = ["chain", "fund", admin, "--eth", "3", "--at-least", "--key-index", "0",
            "--rpc-url", chain.url]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert connect(chain.url).eth.get_balance(admin) == 3 * 10**18
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing sent" in again.output, again.output
    assert connect(chain.url).eth.get_balance(admin) == 3 * 10**18
    bad = CliRunner().invoke(app, ["chain", "fund", "0x123", "--eth", "1", "--rpc-url", chain.url])
    assert bad.exit_code != 0 and "not a chain address" in bad.output


def test_a_node_service_reaches_the_chain_through_the_gateway_with_its_own_certificate(
        chain: DevChain, gateway: ChainGateway, pki: Pki, tmp_path: Path) -> None:
    """A real `swarmnode run` process whose config names the gateway's https URL and nothing
    else about it (no SWARMNODE_CHAIN_* variables): it dials with its consortium certificate,
    waits for its authorisation and joins the training."""
    import os
    import signal
    import subprocess
    import sys

    import torch
    import yaml

    from swarmnode.demo.swarm import wait_until
    from swarmnode.identity import describe
    from swarmnode.spec import TrainingSpec

    spec = TrainingSpec.from_state({"w": torch.zeros(3)}, sync_frequency=4, min_peers=1,
                                   merge_method="mean").to_json()
    direct = connect(chain.url)
    training = SwarmContract.deploy(direct, dev_account(0), spec, 1, 1, 10)
    cert, key = pki.client.cert, pki.client.key
    assert cert is not None and key is not None
    cfg = {"name": "site-b", "rpc_url": gateway.url, "contract": training.address,
           "key_index": 2, "peer_listen": "127.0.0.1:0", "cert": str(cert), "key": str(key),
           "trust": str(pki.trust), "data_dir": str(tmp_path / "data")}
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMNODE_CHAIN_")}
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmnode", "run", "--config", str(tmp_path / "node.yaml")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**env, "GRPC_VERBOSITY": "ERROR"})
    try:
        me = dev_account(2).address

        def alive_and(check: Callable[[], bool]) -> Callable[[], bool]:
            def probe() -> bool:
                assert proc.poll() is None, log.read_text()
                return check()
            return probe

        wait_until(alive_and(lambda: "to be authorised" in log.read_text()), 60,
                   "the node waiting for its authorisation", describe=log.read_text)
        training.authorize(me, describe(cert).fingerprint)
        wait_until(alive_and(lambda: training.node(me).enrolled), 60, "the node joining",
                   describe=log.read_text)
        assert gateway.stats["forwarded"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
