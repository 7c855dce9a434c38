"""The chain commands against a real anvil: happy paths, `chain up` as a process, error exits."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.cli import app

pytestmark = pytest.mark.anvil
runner = CliRunner()
SWARMNODE = Path(sys.executable).with_name("swarmnode")


def make_cert(path: Path) -> bytes:
    """A self-signed EC certificate at ``path``; returns the SHA-256 of its DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hospital-1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def invoke(*args: str, env: dict[str, str] | None = None):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, list(args), env=env)


def assert_one_line_error(result, code: int, *parts: str) -> None:  # noqa: ANN001
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.fixture
def spec_file(tmp_path: Path, spec_json: str) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(spec_json)
    return path


@pytest.fixture
def deployed(anvil: DevChain, spec_file: Path) -> str:
    result = invoke("contract", "deploy", "--spec", str(spec_file), "--min-peers", "2",
                    "--grace", "5", "--deadline", "60", "--rpc-url", anvil.url)
    assert result.exit_code == 0, result.output
    address = result.stdout.strip()
    assert f"export SWARMNODE_CONTRACT={address}" in result.stderr
    return address


def test_deploy_authorize_enroll_revoke_status(
    anvil: DevChain, deployed: str, spec_file: Path, tmp_path: Path, spec_json: str
) -> None:
    contract = SwarmContract(connect(anvil.url), deployed)
    assert contract.spec_json() == spec_json
    env = {"SWARMNODE_RPC_URL": anvil.url, "SWARMNODE_CONTRACT": deployed}
    node1, node2 = dev_account(1).address, dev_account(2).address

    fp = make_cert(tmp_path / "node.pem")
    result = invoke("authorize", node1, "--cert", str(tmp_path / "node.pem"), env=env)
    assert result.exit_code == 0, result.output
    assert contract.node(node1).fingerprint == fp
    result = invoke("authorize", node2, "--fingerprint", "0x" + "ab" * 32, env=env)
    assert result.exit_code == 0, result.output
    assert contract.node(node2).fingerprint == bytes.fromhex("ab" * 32)

    result = invoke("enroll", "--endpoint", "127.0.0.1:7101", "--key-index", "1", env=env)
    assert result.exit_code == 0, result.output
    assert f"enrolled {node1} at 127.0.0.1:7101" in result.stdout
    result = invoke("enroll", "--endpoint", "127.0.0.1:7102", "--key-index", "2", env=env)
    assert result.exit_code == 0, result.output
    result = invoke("revoke", node2, env=env)
    assert result.exit_code == 0, result.output

    contract.with_account(dev_account(1)).checkin(1, 7)
    result = invoke("status", "--format", "json", env=env)
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["contract"] == deployed and status["current_round"] == 1
    assert status["settings"]["min_peers"] == 2 and status["settings"]["grace_s"] == 5
    assert status["settings"]["spec_hash"] == hashlib.sha256(spec_json.encode()).hexdigest()
    assert [(n["address"], n["state"], n["endpoint"]) for n in status["nodes"]] == [
        (node1, "active", "127.0.0.1:7101"), (node2, "revoked", "127.0.0.1:7102")
    ]
    assert status["nodes"][0]["fingerprint"] == fp.hex()
    (r1,) = status["rounds"]
    # node2 is revoked: node1 is the only enrolled node, fewer than min_peers (2), so its
    # check-in does not elect
    assert (r1["round"], r1["status"], r1["participants"]) == (1, "open", [node1])
    assert (r1["leader"], r1["digest"]) == (None, None)
    assert (r1["mean_loss"], r1["mean_metric"]) == (None, None)  # not played yet: none reported
    assert status["final_round"] is None and status["training_finished"] is False

    result = runner.invoke(app, ["status", "--rpc-url", anvil.url, "--contract", deployed],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in (deployed, "sites", "rounds", node1, "revoked", "open"):
        assert text in result.stdout


def test_deploy_json_output(anvil: DevChain, spec_file: Path) -> None:
    result = invoke("contract", "deploy", "--spec", str(spec_file), "--min-peers", "1",
                    "--grace", "0", "--deadline", "30", "--rpc-url", anvil.url, "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["admin"] == dev_account(0).address and out["deadline_s"] == 30
    assert SwarmContract(connect(anvil.url), out["address"]).settings().deadline_s == 30


def test_error_exits(anvil: DevChain, deployed: str, tmp_path: Path, spec_file: Path) -> None:
    node = dev_account(3).address
    assert_one_line_error(
        invoke("status", "--rpc-url", "http://127.0.0.1:1", "--contract", deployed),
        21, "no JSON-RPC answer at http://127.0.0.1:1", "swarmnode chain up",
    )
    assert_one_line_error(
        invoke("status", "--rpc-url", anvil.url, "--contract", dev_account(7).address),
        22, f"no contract at {dev_account(7).address}",
    )
    assert_one_line_error(
        invoke("status", "--rpc-url", anvil.url, "--contract", "0xnope"), 10, "'0xnope'",
    )
    env = {"SWARMNODE_RPC_URL": anvil.url, "SWARMNODE_CONTRACT": deployed}
    assert_one_line_error(
        invoke("enroll", "--endpoint", "127.0.0.1:7000", "--key-index", "4", env=env),
        25, "is not authorised", dev_account(4).address,
    )
    assert_one_line_error(
        invoke("authorize", node, "--key-index", "5", "--fingerprint", "11" * 32, env=env),
        25, "only the registry's admin",
    )
    assert_one_line_error(invoke("enroll", "--endpoint", "127.0.0.1:7000", env=env), 10,
                          "--key-index")
    assert_one_line_error(
        invoke("enroll", "--endpoint", "nohost", "--key-index", "1", env=env), 10, "host:port",
    )
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a certificate")
    assert_one_line_error(invoke("authorize", node, "--cert", str(bad_pem), env=env), 30,
                          "is not a PEM certificate")
    assert_one_line_error(invoke("authorize", node, "--fingerprint", "abc", env=env), 10,
                          "not 64 hex digits")
    assert_one_line_error(invoke("authorize", node, env=env), 10, "exactly one of --cert")
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text("{not json")
    assert_one_line_error(
        invoke("contract", "deploy", "--spec", str(bad_spec), "--min-peers", "1", "--grace",
               "0", "--deadline", "9", "--rpc-url", anvil.url),
        10, f"training spec {bad_spec} is not valid JSON",
    )


def test_chain_up_runs_until_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    proc = subprocess.Popen(
        [str(SWARMNODE), "chain", "up", "--port", "0", "--state-file", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=30)
            if "dev chain listening on " in line:
                url = line.split("listening on ")[1].split()[0]
        w3 = connect(url)
        assert w3.eth.chain_id == 31337
        assert w3.eth.get_balance(dev_account(1).address) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "dev chain stopped; state saved in" in proc.stderr.read()
        assert state.is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_deploy_with_a_record_is_idempotent(anvil: DevChain, spec_file: Path,
                                            tmp_path: Path) -> None:
    """What the sentinel's compose `deploy` service relies on: a re-run deploys nothing."""
    record = tmp_path / "state" / "contract.json"
    args = ("contract", "deploy", "--spec", str(spec_file), "--min-peers", "1", "--grace", "0",
            "--deadline", "30", "--rpc-url", anvil.url, "--record", str(record))
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    address = first.stdout.strip()
    assert json.loads(record.read_text())["address"] == address
    again = invoke(*args, env={"SWARMNODE_CONTRACT": address})
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == address and "nothing to deploy" in again.stderr
    assert "warning" not in again.stderr
    # a record naming a contract this chain does not have (a fresh dev chain): deploy afresh,
    # and say so when the address differs from the one the sites were given
    record.write_text(json.dumps({"address": "0x" + "ab" * 20}))
    fresh = invoke(*args, env={"SWARMNODE_CONTRACT": address})
    assert fresh.exit_code == 0, fresh.output
    assert fresh.stdout.strip() != address
    assert f"set CONTRACT={fresh.stdout.strip()}" in fresh.stderr


def test_status_names_the_sites_and_what_the_round_waits_for(
        anvil: DevChain, deployed: str, tmp_path: Path) -> None:
    """`status` names each site (by its endpoint's host, or from a names file) and says what the
    current round waits for: the check-ins still missing, then the leader draw, then the
    leader's merge with its deadline; `--watch --format json` prints one object per refresh."""
    admin = SwarmContract(connect(anvil.url), deployed, dev_account(0))
    sites = [admin.with_account(dev_account(i)) for i in (4, 5, 6)]
    for i, site in enumerate(sites):
        admin.authorize(site.account_address, hashlib.sha256(f"cert {i}".encode()).digest())
        site.enroll(f"hospital-{'abc'[i]}.example.org:7441")
    sites[0].checkin(1, 10)
    sites[1].checkin(1, 20)  # hospital-c is stopped: it never checks in
    env = {"SWARMNODE_CONTRACT": deployed, "SWARMNODE_RPC_URL": anvil.url}

    def status(*extra: str) -> dict:
        result = invoke("status", "--format", "json", *extra, env=env)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    out = status()
    names = {n["address"]: n["name"] for n in out["nodes"]}
    assert [names[s.account_address] for s in sites] == [
        "hospital-a.example.org", "hospital-b.example.org", "hospital-c.example.org"]
    waiting = out["waiting"]
    assert (waiting["round"], waiting["stage"]) == (1, "check-in")
    assert waiting["waiting_for"] == ["hospital-c.example.org"]
    assert waiting["checked_in"] == ["hospital-a.example.org", "hospital-b.example.org"]
    assert waiting["seconds"] >= 0

    csv_file = tmp_path / "sites.csv"
    csv_file.write_text("name,address,cert\n" + "".join(
        f"site-{i},{s.account_address},x.pem\n" for i, s in enumerate(sites)))
    assert status("--names", str(csv_file))["waiting"]["waiting_for"] == ["site-2"]
    watched = invoke("status", "--format", "json", "--watch", "--count", "2", "--interval",
                     "0.1", "--names", str(csv_file), env=env)
    assert watched.exit_code == 0, watched.output
    lines = watched.stdout.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["waiting"]["stage"] == "check-in" for x in lines)
    table = runner.invoke(app, ["status", "--names", str(csv_file)], env={**env, "COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "round 1 waits" in table.stdout and "check-ins from site-2" in table.stdout

    # the stopped site is set aside by the grace path: the round closes without it
    anvil_w3 = connect(anvil.url)
    anvil_w3.provider.make_request("evm_increaseTime", [10])  # type: ignore[arg-type]
    anvil_w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    sites[0].elect(1)
    sites[0].draw(1)
    waiting = status("--names", str(csv_file))["waiting"]
    assert waiting["stage"] == "merge" and waiting["leader"] in ("site-0", "site-1")
    assert waiting["waiting_for"] == [waiting["leader"]] and waiting["deadline"] is not None


def test_two_trainings_on_one_registry_need_one_authorisation(
    anvil: DevChain, spec_file: Path, tmp_path: Path
) -> None:
    result = invoke("registry", "deploy", "--rpc-url", anvil.url)
    assert result.exit_code == 0, result.output
    registry = result.stdout.strip()
    assert f"export SWARMNODE_REGISTRY={registry}" in result.stderr
    env = {"SWARMNODE_RPC_URL": anvil.url, "SWARMNODE_REGISTRY": registry}
    trainings = []
    for _ in range(2):
        result = invoke("training", "deploy", "--spec", str(spec_file), "--min-peers", "1",
                        "--grace", "0", "--deadline", "30", env=env)
        assert result.exit_code == 0, result.output
        trainings.append(result.stdout.strip())
    node = dev_account(1).address
    make_cert(tmp_path / "node.pem")
    # the registry's address as --contract: authorisation is the registry's business
    result = invoke("authorize", node, "--cert", str(tmp_path / "node.pem"), "--contract",
                    trainings[0], env=env)
    assert result.exit_code == 0, result.output
    w3 = connect(anvil.url)
    for address in trainings:  # no authorisation between them: the site joins both
        site = SwarmContract(w3, address, dev_account(1))
        assert site.registry.address == registry
        site.enroll("127.0.0.1:7101")
        assert site.node(node).enrolled and site.node(node).authorized
    # status by the registry's address is ambiguous while both run, and says so
    assert_one_line_error(invoke("status", "--contract", registry, env=env), 10,
                          "runs 2 trainings at once", trainings[0], trainings[1])
    result = invoke("status", "--format", "json", "--contract", trainings[1], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["contract"] == trainings[1]
    # a revocation in the registry (by its address, while both run) takes effect in both
    result = invoke("revoke", node, "--contract", registry, env=env)
    assert result.exit_code == 0, result.output
    for address in trainings:
        assert SwarmContract(w3, address).node(node).state == "revoked"


def test_chain_check_fails_within_its_wait_naming_what_is_missing(
    anvil: DevChain, spec_file: Path,
) -> None:
    """Issue 21: a site that could not reach the chain or its contract showed only "Waiting" in
    `docker-compose up` for up to 600 s. `swarmnode chain check` says which within its wait,
    naming what to check, and passes as soon as the contract is there (the sentinel's deploy
    service may still be deploying it)."""
    import time

    from swarmnode.containers.consortium import contract_address_for

    t0 = time.monotonic()
    assert_one_line_error(
        invoke("chain", "check", "--rpc-url", "http://127.0.0.1:1", "--contract",
               dev_account(7).address, "--wait", "3"),
        21, "no JSON-RPC answer at http://127.0.0.1:1", "waited 3 s", "RPC_URL")
    assert_one_line_error(
        invoke("chain", "check", "--rpc-url", anvil.url, "--contract", dev_account(7).address,
               "--wait", "3"),
        22, f"no contract at {dev_account(7).address}", "waited 3 s", "CONTRACT")
    assert time.monotonic() - t0 < 30
    # deployed while it waits: it passes
    admin = dev_account(0)
    future = contract_address_for(admin.address, connect(anvil.url).eth.get_transaction_count(
        admin.address) + 1)  # the training after its own registry
    later = threading.Timer(2.0, lambda: SwarmContract.deploy(  # the sentinel's deploy service
        connect(anvil.url), admin, spec_file.read_text(), 2, 5, 60))
    later.start()
    try:
        result = invoke("chain", "check", "--rpc-url", anvil.url, "--contract", future,
                        "--wait", "60")
    finally:
        later.join()
    assert result.exit_code == 0, result.output
    assert f"training {future} is deployed there" in result.stdout
