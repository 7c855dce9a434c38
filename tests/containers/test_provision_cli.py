"""`swarmnode consortium init/sign` and `swarmnode site request/install`: a consortium from one
file, each site's keys made in its own folder and never sent (the containers test brings such a
consortium up and trains it: tests/containers/test_provision.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from provision_support import cli, provision, secrets_of, write_consortium

from swarmnode.identity import create_ca, describe, issue_node_cert
from swarmnode.provision import load_consortium


def test_provisioning_keeps_every_private_key_in_its_own_folder(tmp_path: Path) -> None:
    _, folders = provision(tmp_path)
    ca_key = next((tmp_path / "admin-desk" / "admin" / "ca").glob("*.key"))
    owners = {ca_key.parent: [ca_key.read_bytes()]}
    owners.update({f: secrets_of(f) for f in folders.values()})
    for folder, secrets in owners.items():
        assert secrets and all(len(s) > 20 for s in secrets)
        for path in tmp_path.rglob("*"):
            if not path.is_file() or folder in path.parents:
                continue
            data = path.read_bytes()
            for secret in secrets:
                assert secret.strip() not in data, f"{folder}'s secret found in {path}"
    for folder in folders.values():  # no key file of any kind outside the site's own certs/
        for path in folder.rglob("*"):
            if path.is_file() and path.parent != folder / "certs":
                assert b"PRIVATE KEY" not in path.read_bytes(), path
    for f in folders.values():
        for secret_file in [*(f / "certs").glob("*.key"), f / "chain" / "keystore.json",
                            f / "chain" / "keystore.password"]:
            assert secret_file.stat().st_mode & 0o777 == 0o600


def test_each_kit_is_a_complete_site_folder(tmp_path: Path) -> None:
    conf, folders = provision(tmp_path)
    consortium, _ = load_consortium(conf)
    sites_csv = (tmp_path / "admin-desk" / "admin" / "consortium" / "sites.csv").read_text()
    for name, folder in folders.items():
        env = dict(line.split("=", 1) for line in (folder / ".env").read_text().splitlines()
                   if line and not line.startswith("#"))
        assert env["SITE"] == name and env["PEER_ENDPOINT"] == f"{name}:7441"
        assert env["KEYSTORE_FILE"] == "./chain/keystore.json" and env["KEY_INDEX"] == ""
        for key in ("CERT_FILE", "KEY_FILE", "TRUST_FILE", "KEYSTORE_FILE",
                    "KEYSTORE_PASSWORD_FILE"):
            assert (folder / env[key]).is_file(), key
        assert (folder / "compose.yaml").is_file() and (folder / "compose.keystore.yaml").is_file()
        # the certificate is the site's own key's, signed by the consortium CA, named for it
        info = describe(folder / env["CERT_FILE"])
        assert info.subject.endswith(f"CN={name}") or name in info.subject
        assert name in info.dns
        address = json.loads((folder / f"{name}.request.json").read_text())["address"]
        assert f"{name},{address},{name}.pem" in sites_csv
        sentinel = name == consortium.sentinel_name
        assert ("COMPOSE_PROFILES=sentinel" in (folder / ".env").read_text()) == sentinel
        assert (folder / "consortium" / "sites.csv").exists() == sentinel


def test_a_request_holding_a_private_key_is_refused(tmp_path: Path) -> None:
    conf = write_consortium(tmp_path / "desk")
    cli("consortium", "init", conf)
    cli("site", "request", "--name", "hospital-1", "--dir", tmp_path / "h1")
    req = json.loads((tmp_path / "h1" / "hospital-1.request.json").read_text())
    req["key"] = (tmp_path / "h1" / "certs" / "hospital-1.key").read_text()
    bad = tmp_path / "bad.request.json"
    bad.write_text(json.dumps(req))
    out = cli("consortium", "sign", conf, bad, code=10)
    assert "holds a private key" in out and "exposed" in out


def test_sign_refuses_unknown_sites_missing_sites_and_forged_requests(tmp_path: Path) -> None:
    conf = write_consortium(tmp_path / "desk", ["hospital-1", "hospital-2"])
    cli("consortium", "init", conf)
    reqs = []
    for s in ("hospital-1", "hospital-2", "hospital-9"):
        cli("site", "request", "--name", s, "--dir", tmp_path / s)
        reqs.append(tmp_path / s / f"{s}.request.json")
    assert "not a site of consortium study" in cli("consortium", "sign", conf, *reqs, code=10)
    assert "no request yet from hospital-2" in cli("consortium", "sign", conf, reqs[0], code=10)
    # a request whose CSR was made for another name
    forged = json.loads(reqs[1].read_text())
    forged["csr"] = json.loads(reqs[0].read_text())["csr"]
    reqs[1].write_text(json.dumps(forged))
    out = cli("consortium", "sign", conf, reqs[0], reqs[1], code=30)
    assert "the request of hospital-2 names 'hospital-1'" in out


def test_install_checks_the_kit_against_the_sites_own_key(tmp_path: Path) -> None:
    conf = write_consortium(tmp_path / "desk", ["hospital-1", "hospital-2"])
    cli("consortium", "init", conf)
    for s in ("hospital-1", "hospital-2"):
        cli("site", "request", "--name", s, "--dir", tmp_path / s)
    cli("consortium", "sign", conf, *(tmp_path / s / f"{s}.request.json"
                                       for s in ("hospital-1", "hospital-2")))
    kits = tmp_path / "desk" / "admin" / "kits"
    # hospital-2's kit installed in hospital-1's folder
    out = cli("site", "install", kits / "hospital-2", "--dir", tmp_path / "hospital-1", code=10)
    assert "not that site's folder" in out
    # a kit changed on the way
    env = kits / "hospital-1" / ".env"
    env.write_text(env.read_text().replace("PEER_ENDPOINT=hospital-1", "PEER_ENDPOINT=evil"))
    out = cli("site", "install", kits / "hospital-1", "--dir", tmp_path / "hospital-1", code=10)
    assert "changed since the kit was made" in out
    # keys made again after the request: the signed certificate is no longer this site's key's
    cli("consortium", "sign", conf, *(tmp_path / s / f"{s}.request.json"
                                       for s in ("hospital-1", "hospital-2")))
    cli("site", "request", "--name", "hospital-1", "--dir", tmp_path / "hospital-1", "--force")
    out = cli("site", "install", kits / "hospital-1", "--dir", tmp_path / "hospital-1", code=30)
    assert "does not belong" in out or "key" in out


def test_a_site_with_its_own_organisation_ca_joins_through_the_trust_bundle(
    tmp_path: Path,
) -> None:
    desk = tmp_path / "desk"
    org_cert, org_key = create_ca(tmp_path / "org-b" / "ca", "org-b-ca", org="Org B")
    conf = write_consortium(desk, ["hospital-1", "hospital-2"])
    shutil.copy(org_cert, desk / "org-b-ca.pem")
    raw = yaml.safe_load(conf.read_text())
    raw["sites"][1]["organisation_ca"] = "org-b-ca.pem"
    conf.write_text(yaml.safe_dump(raw))
    cli("consortium", "init", conf)
    trust = (desk / "admin" / "consortium" / "trust.pem").read_bytes()
    assert org_cert.read_bytes().strip() in trust
    cli("site", "request", "--name", "hospital-1", "--dir", tmp_path / "hospital-1")
    cli("site", "request", "--name", "hospital-2", "--dir", tmp_path / "hospital-2")
    # org B's own CA signs its site's certificate (at org B), the request carries it
    cert, _key = issue_node_cert(org_cert, org_key, tmp_path / "org-b" / "issued", "hospital-2",
                                 dns=["hospital-2"], ips=[])
    req_path = tmp_path / "hospital-2" / "hospital-2.request.json"
    req = json.loads(req_path.read_text())
    req.pop("csr")
    req["cert"] = cert.read_text()
    req_path.write_text(json.dumps(req))
    cli("consortium", "sign", conf, tmp_path / "hospital-1" / "hospital-1.request.json", req_path)
    listed = x509.load_pem_x509_certificate(
        (desk / "admin" / "consortium" / "hospital-2.pem").read_bytes())
    assert listed.issuer == x509.load_pem_x509_certificate(org_cert.read_bytes()).subject
    # a certificate from another CA is refused for that site
    other_cert, other_key = create_ca(tmp_path / "org-x", "org-x-ca")
    forged, _ = issue_node_cert(other_cert, other_key, tmp_path / "org-x" / "issued",
                                "hospital-2", dns=["hospital-2"], ips=[])
    req["cert"] = forged.read_text()
    req_path.write_text(json.dumps(req))
    out = cli("consortium", "sign", conf, tmp_path / "hospital-1" / "hospital-1.request.json",
               req_path, code=10)
    assert "not signed by its organisation CA" in out


def test_sites_on_separate_hosts_publish_their_ports_and_dial_the_sentinels_gateway(
    tmp_path: Path,
) -> None:
    conf = write_consortium(tmp_path / "desk", ["hospital-1", "hospital-2"])
    raw = yaml.safe_load(conf.read_text())
    raw.update(one_host=False, chain={"rpc_url": "https://h1.example.org:8545"})
    raw["sites"] = [{"name": "hospital-1", "host": "h1.example.org", "one_port": True},
                    {"name": "hospital-2", "host": "h2.example.org", "peer_port": 8441}]
    conf.write_text(yaml.safe_dump(raw))
    cli("consortium", "init", conf)
    for s in ("hospital-1", "hospital-2"):
        cli("site", "request", "--name", s, "--dir", tmp_path / s)
    cli("consortium", "sign", conf, *(tmp_path / s / f"{s}.request.json"
                                      for s in ("hospital-1", "hospital-2")))
    kits = tmp_path / "desk" / "admin" / "kits"
    one = (kits / "hospital-1" / ".env").read_text()
    two = (kits / "hospital-2" / ".env").read_text()
    # the sentinel publishes the gateway, never the dev chain itself
    assert "RPC_URL=http://chain:8545" in one and "GATEWAY_PUBLISH=0.0.0.0:8545" in one
    assert "CHAIN_PUBLISH" not in one
    assert "compose.gateway.yaml" in one
    assert (kits / "hospital-1" / "compose.gateway.yaml").is_file()
    # the other site dials the gateway with its own certificate
    assert "RPC_URL=https://h1.example.org:8545" in two and "CHAIN_PUBLISH" not in two
    assert "CHAIN_CERT=/run/secrets/node_cert" in two and "CHAIN_KEY=/run/secrets/node_key" in two
    assert "CHAIN_TRUST=/run/secrets/trust" in two
    assert "gateway" not in two.split("COMPOSE_FILE=")[1].splitlines()[0]
    assert "PEER_ENDPOINT=h2.example.org:8441" in two and "PEER_PUBLISH=0.0.0.0:8441" in two
    assert "DATA_PUBLISH=0.0.0.0:7442" in two and "CONSORTIUM_EXTERNAL" not in two
    # a site that opens one port publishes that one, its node serving both behind it
    assert "ONE_PORT=true" in one and "PEER_PUBLISH=0.0.0.0:7441" in one
    assert "DATA_PUBLISH" not in one and "ONE_PORT" not in two
    assert "h2.example.org" in describe(kits / "hospital-2" / "certs" / "hospital-2.pem").dns
    # the gateway presents the sentinel's certificate: it names the host in rpc_url
    assert "h1.example.org" in describe(kits / "hospital-1" / "certs" / "hospital-1.pem").dns


def test_the_dev_chain_admin_is_a_fresh_key_that_only_the_sentinel_kit_carries(
    tmp_path: Path,
) -> None:
    from eth_account import Account

    from swarmnode.chain.accounts import DEV_MNEMONIC, dev_account, load_keystore
    from swarmnode.containers.consortium import contract_address_for

    conf, folders = provision(tmp_path)
    admin_dir = tmp_path / "admin-desk" / "admin" / "chain"
    keystore, password = admin_dir / "admin.keystore.json", admin_dir / "admin.keystore.password"
    assert keystore.stat().st_mode & 0o777 == 0o600 and password.stat().st_mode & 0o777 == 0o600
    admin = load_keystore(keystore, password.read_text())
    # not derivable from the public dev mnemonic (anvil's and Hardhat's default)
    Account.enable_unaudited_hdwallet_features()
    published = {Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").address
                 for i in range(20)}
    assert dev_account(0).address in published and admin.address not in published
    # the kits name the training the admin deploys first (after its registry), no dev account's
    sentinel, *others = list(folders.values())
    env = dict(line.split("=", 1) for line in (sentinel / ".env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["ADMIN_ADDRESS"] == admin.address
    assert env["CONTRACT"] == contract_address_for(admin.address, 1)
    assert env["REGISTRY"] == contract_address_for(admin.address, 0)  # the admin's first deploy
    for folder in folders.values():  # every kit names the registry and the training
        kit = json.loads((folder / "kit.json").read_text())
        assert (kit["registry"], kit["contract"]) == (env["REGISTRY"], env["CONTRACT"])
    assert "compose.admin.yaml" in env["COMPOSE_FILE"]
    assert float(env["ADMIN_FUND_ETH"]) > 3 * 10  # every site's FUND_ETH and gas
    for rel in ("ADMIN_KEYSTORE_FILE", "ADMIN_KEYSTORE_PASSWORD_FILE"):
        assert (sentinel / env[rel]).stat().st_mode & 0o777 == 0o600
    assert load_keystore(sentinel / env["ADMIN_KEYSTORE_FILE"],
                         (sentinel / env["ADMIN_KEYSTORE_PASSWORD_FILE"]).read_text()
                         ).address == admin.address
    secret = keystore.read_bytes()
    for other in others:  # no other site ever sees it
        assert not any(secret in p.read_bytes() for p in other.rglob("*") if p.is_file())
        assert "ADMIN_" not in (other / ".env").read_text()
    # init again keeps the admin (the kits' contract address stays right)
    cli("consortium", "init", conf)
    assert keystore.read_bytes() == secret


@pytest.mark.parametrize(("change", "message"), [
    ({"sites": [{"name": "hospital-1"}]}, "at least two sites"),
    ({"sites": [{"name": "Hospital 1"}, {"name": "b"}]}, "lower-case"),
    ({"sites": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"sentinel": "nobody"}, "not one of the sites"),
    ({"colour": "blue"}, "colour"),
    ({"chain": {"dev": False}}, "chain.contract"),
    ({"chain": {"dev": False, "contract": "0x" + "11" * 20}}, "chain.registry"),
    ({"chain": {"registry": "0x1234"}}, "'0x1234' is not a contract address"),
    ({"one_host": False, "chain": {"rpc_url": "http://hospital-1:8545"}}, "gateway"),
    ({"one_host": False, "chain": {"rpc_url": "https://elsewhere.example.org:8545"}},
     "the host the sentinel's certificate names"),
])
def test_a_bad_consortium_file_names_what_is_wrong(tmp_path: Path, change: dict,
                                                   message: str) -> None:
    conf = write_consortium(tmp_path / "desk")
    raw = yaml.safe_load(conf.read_text())
    raw.update(change)
    conf.write_text(yaml.safe_dump(raw))
    out = cli("consortium", "init", conf, code=10)
    assert message in out


def test_the_kits_chain_url_is_one_every_site_can_reach(tmp_path: Path) -> None:
    """Issue 21: the README's example (the sentinel's gateway URL with one_host: true) made
    kits whose other sites could never reach the chain; init and sign refuse it, naming what to
    change, and a file that leaves the URL out gets the one that fits."""
    gateway = "https://hospital-1.example.org:8545"
    conf = write_consortium(tmp_path / "desk", ["hospital-1", "hospital-2"],
                            chain={"rpc_url": gateway})
    out = cli("consortium", "init", conf, code=10)
    assert f"one_host: true, but chain.rpc_url is {gateway}" in out
    assert "http://chain:8545" in out and "Remove chain.rpc_url" in out
    # init done with a right file, then the URL changed before sign: sign refuses it too
    raw = yaml.safe_load(conf.read_text())
    raw.pop("chain")
    conf.write_text(yaml.safe_dump(raw))
    cli("consortium", "init", conf)
    for s in ("hospital-1", "hospital-2"):
        cli("site", "request", "--name", s, "--dir", tmp_path / s)
    reqs = [tmp_path / s / f"{s}.request.json" for s in ("hospital-1", "hospital-2")]
    conf.write_text(yaml.safe_dump({**raw, "chain": {"rpc_url": gateway}}))
    assert "one_host: true, but chain.rpc_url" in cli("consortium", "sign", conf, *reqs, code=10)
    assert not (tmp_path / "desk" / "admin" / "kits").exists()
    conf.write_text(yaml.safe_dump(raw))  # left out: the sentinel's chain on the shared network
    cli("consortium", "sign", conf, *reqs)
    two = (tmp_path / "desk" / "admin" / "kits" / "hospital-2" / ".env").read_text()
    assert "RPC_URL=http://chain:8545\n" in two
    # separate hosts, the URL left out: the sentinel's gateway on the host its certificate names
    raw.update(one_host=False, sites=[{"name": "hospital-1", "host": "h1.example.org"},
                                      {"name": "hospital-2", "host": "h2.example.org"}])
    conf.write_text(yaml.safe_dump(raw))
    consortium, _ = load_consortium(conf)
    assert consortium.chain.rpc_url == "https://h1.example.org:8545"


def test_a_spec_file_and_a_setting_that_contradicts_it_are_refused(tmp_path: Path) -> None:
    desk = tmp_path / "desk"
    desk.mkdir()
    spec = Path(__file__).resolve().parents[2] / "examples" / "breast_cancer" / "consortium"
    raw = {"consortium": "study", "one_host": True,
           "training": {"spec": str(spec / "spec.json"), "sync_frequency": 9},
           "sites": [{"name": "a"}, {"name": "b"}]}
    (desk / "c.yaml").write_text(yaml.safe_dump(raw))
    out = cli("consortium", "init", desk / "c.yaml", code=10)
    assert "training.sync_frequency is 9" in out and "pins 4" in out
    raw["training"].pop("sync_frequency")
    (desk / "c.yaml").write_text(yaml.safe_dump(raw))
    cli("consortium", "init", desk / "c.yaml")
    written = json.loads((desk / "admin" / "consortium" / "spec.json").read_text())
    assert written == json.loads((spec / "spec.json").read_text())


def _sentinel_deploys(url: str, conf: Path, folders: dict[str, Path]) -> dict[str, str]:
    """What the sentinel's deploy service does on its dev chain (compose/hospital.yaml, with
    compose/admin.yaml): fund the admin, deploy the registry and the first training as the admin,
    fund and authorise every site once. The sentinel's .env."""
    sentinel = next(iter(folders.values()))
    env = dict(line.split("=", 1) for line in (sentinel / ".env").read_text().splitlines()
               if line and not line.startswith("#"))
    admin = ["--keystore", sentinel / env["ADMIN_KEYSTORE_FILE"], "--password-file",
             sentinel / env["ADMIN_KEYSTORE_PASSWORD_FILE"], "--rpc-url", url]
    cli("chain", "fund", env["ADMIN_ADDRESS"], "--eth", "40", "--at-least", "--key-index", "0",
        "--rpc-url", url)
    cli("contract", "deploy", "--spec", sentinel / "consortium" / "spec.json", "--min-peers", "2",
        "--grace", "2", "--deadline", "10", *admin)
    rows = (sentinel / "consortium" / "sites.csv").read_text().splitlines()[1:]
    for _ in range(2):  # a re-run (the sentinel's `up -d` again) sends nothing
        for row in rows:
            _name, address, cert = row.split(",")
            cli("authorize", address, "--cert", sentinel / "consortium" / cert, "--fund", "1",
                "--once", "--contract", env["CONTRACT"], *admin)
    return env


def test_the_next_training_needs_no_authorisation_and_every_kit_names_it(
    tmp_path: Path, anvil,  # noqa: ANN001 - the session's real anvil (tests/conftest.py)
) -> None:
    from swarmnode.chain.client import SwarmContract, SwarmRegistry, connect
    from swarmnode.spec import TrainingSpec

    conf, folders = provision(tmp_path)
    desk = tmp_path / "admin-desk"
    first = TrainingSpec.from_json((desk / "admin" / "consortium" / "spec.json").read_text())
    nxt = desk / "next-spec.json"
    nxt.write_text(TrainingSpec(params=first.params, sync_frequency=2, min_peers=2,
                                merge_method="mean").to_json())
    # before the sentinel deployed anything, there is no registry to deploy on
    out = cli("consortium", "training", conf, "--spec", nxt, "--rpc-url", anvil.url, code=22)
    assert "the consortium's registry: no contract at" in out and "sentinel" in out
    env = _sentinel_deploys(anvil.url, conf, folders)
    w3 = connect(anvil.url)
    registry = SwarmRegistry(w3, env["REGISTRY"])
    authorised = len(registry.events(names={"Authorized"}))
    assert authorised == 3  # the re-run of the deploy service authorised nobody again
    # wrong inputs, each with what to do
    assert "does not exist" in cli("consortium", "training", conf, "--spec",
                                   desk / "nope.json", "--rpc-url", anvil.url, code=10)
    out = cli("consortium", "training", conf, "--spec", nxt, "--rpc-url", "http://127.0.0.1:9",
              code=21)
    assert "127.0.0.1:9" in out
    big = desk / "big-spec.json"
    big.write_text(TrainingSpec(params=first.params, sync_frequency=2, min_peers=4,
                                merge_method="mean").to_json())
    assert "min_peers=4 but the consortium has 3 sites" in cli(
        "consortium", "training", conf, "--spec", big, "--rpc-url", anvil.url, code=10)

    out = cli("consortium", "training", conf, "--spec", nxt, "--rpc-url", anvil.url,
              "--grace", "1", "--deadline", "5")
    assert "no site authorised again" in out
    trainings = registry.trainings()
    assert len(trainings) == 2 and trainings[0] == env["CONTRACT"]
    second = SwarmContract(w3, trainings[1])
    assert second.registry.address == registry.address
    assert (second.settings().min_peers, second.settings().grace_s) == (2, 1)
    assert len(registry.events(names={"Authorized"})) == authorised
    for name, folder in folders.items():  # each site installs its kit again: checked, then named
        kit = desk / "admin" / "kits" / name
        cli("site", "install", kit, "--dir", folder)
        site_env = (folder / ".env").read_text()
        assert f"CONTRACT={trainings[1]}\n" in site_env
        assert f"REGISTRY={registry.address}\n" in site_env
        assert json.loads((folder / "kit.json").read_text())["contract"] == trainings[1]
    # a kit changed after the update is still caught
    env_file = desk / "admin" / "kits" / "hospital-2" / ".env"
    env_file.write_text(env_file.read_text().replace(trainings[1], trainings[0]))
    assert "changed since the kit was made" in cli(
        "site", "install", desk / "admin" / "kits" / "hospital-2", "--dir",
        folders["hospital-2"], code=10)
    # a signer that is not the registry's admin is refused before anything is sent
    stranger = tmp_path / "stranger"
    cli("site", "request", "--name", "stranger", "--dir", stranger)
    out = cli("consortium", "training", conf, "--spec", nxt, "--rpc-url", anvil.url,
              "--keystore", stranger / "chain" / "keystore.json", "--password-file",
              stranger / "chain" / "keystore.password", code=10)
    assert "is not the admin of the registry" in out
    assert len(registry.trainings()) == 2


def test_sign_again_keeps_the_certificates_and_a_reissue_is_authorised_on_chain(
    tmp_path: Path, anvil,  # noqa: ANN001 - the session's real anvil (tests/conftest.py)
) -> None:
    """Issue 21: signing again re-issued every certificate, and every site already authorised
    then restart-looped on a fingerprint mismatch. Now a certificate is kept unless re-issued,
    and a re-issue prints the one command that authorises it (or runs it with --rpc-url)."""
    import shlex

    from cryptography.hazmat.primitives import hashes

    from swarmnode.chain.client import SwarmRegistry, connect

    conf, folders = provision(tmp_path)
    env = _sentinel_deploys(anvil.url, conf, folders)
    registry = SwarmRegistry(connect(anvil.url), env["REGISTRY"])
    desk = tmp_path / "admin-desk"
    listed = desk / "admin" / "consortium" / "hospital-2.pem"
    before = {s: (desk / "admin" / "consortium" / f"{s}.pem").read_bytes() for s in folders}
    requests = sorted((desk / "requests").iterdir())
    out = cli("consortium", "sign", conf, *requests)  # again, e.g. to fix a setting
    assert "NEW CERTIFICATE" not in out
    for s, pem in before.items():
        assert (desk / "admin" / "consortium" / f"{s}.pem").read_bytes() == pem
        assert (desk / "admin" / "kits" / s / "certs" / f"{s}.pem").read_bytes() == pem

    def fingerprint() -> bytes:
        return x509.load_pem_x509_certificate(listed.read_bytes()).fingerprint(hashes.SHA256())

    address = json.loads((folders["hospital-2"] / "hospital-2.request.json").read_text())[
        "address"]
    assert registry.site(address).fingerprint == fingerprint()
    # hospital-2 made new keys: its old certificate no longer fits, and is not silently replaced
    cli("site", "request", "--name", "hospital-2", "--dir", folders["hospital-2"], "--force")
    shutil.copy(folders["hospital-2"] / "hospital-2.request.json", desk / "requests")
    address = json.loads((folders["hospital-2"] / "hospital-2.request.json").read_text())[
        "address"]  # its new account
    out = cli("consortium", "sign", conf, *requests, code=10)
    assert "carries a new key" in out and "--reissue hospital-2" in out
    assert listed.read_bytes() == before["hospital-2"]
    # re-issued: the exact command to authorise it is printed, with this consortium's values
    out = cli("consortium", "sign", conf, *requests, "--reissue", "hospital-2")
    assert "hospital-2" in out.split("NEW CERTIFICATE")[0].splitlines()[-1]
    assert out.count("NEW CERTIFICATE") == 1
    assert registry.site(address).fingerprint != fingerprint()  # refused until authorised
    command = next(line for line in out.splitlines() if line.startswith("swarmnode authorize"))
    assert command.endswith("--rpc-url http://$(docker port hospital-1-chain-1 8545)")
    args = shlex.split(command.rsplit(" --rpc-url ", 1)[0])
    assert args[2] == address and args[args.index("--contract") + 1] == env["REGISTRY"]
    assert Path(args[args.index("--cert") + 1]) == listed.resolve()
    cli(*args[1:], "--rpc-url", anvil.url)  # as the admin runs it (the chain's port here)
    assert registry.site(address).fingerprint == fingerprint()
    assert registry.site(address).authorized and connect(anvil.url).eth.get_balance(address) > 0
    for s in ("hospital-1", "hospital-3"):  # the others' certificates stayed as authorised
        assert (desk / "admin" / "consortium" / f"{s}.pem").read_bytes() == before[s]
    # with --rpc-url the re-issue is authorised at once
    out = cli("consortium", "sign", conf, *requests, "--reissue", "hospital-2", "--rpc-url",
              anvil.url)
    assert "hospital-2: authorised" in out
    assert registry.site(address).fingerprint == fingerprint()


def test_status_audit_and_report_run_in_a_site_folder_with_no_flags(
    tmp_path: Path, anvil, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001 - session anvil
) -> None:
    """Issue 21: status, audit and report needed the chain URL (found with `docker port`) and
    the contract although the site's kit holds both. In a site's folder they now take them
    from its kit: here a site on another host, through the sentinel's real gateway (mutual TLS
    with the site's own certificate) in front of a real anvil."""
    import socket

    from swarmnode.chain.gateway import ChainGateway
    from swarmnode.identity.tls import TlsFiles

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    desk = tmp_path / "admin-desk"
    conf = write_consortium(desk, one_host=False, chain={"rpc_url": f"https://localhost:{port}"})
    raw = yaml.safe_load(conf.read_text())
    raw["sites"][0]["host"] = "localhost"  # the sentinel: its certificate names the gateway's host
    conf.write_text(yaml.safe_dump(raw))
    cli("consortium", "init", conf)
    folders = {s["name"]: tmp_path / s["name"] for s in raw["sites"]}
    for name, folder in folders.items():
        cli("site", "request", "--name", name, "--dir", folder)
    cli("consortium", "sign", conf, *(f / f"{n}.request.json" for n, f in folders.items()))
    for name, folder in folders.items():
        cli("site", "install", desk / "admin" / "kits" / name, "--dir", folder)
    env = _sentinel_deploys(anvil.url, conf, folders)
    sentinel = folders["hospital-1"] / "certs"
    monkeypatch.delenv("SWARMNODE_RPC_URL", raising=False)
    monkeypatch.delenv("SWARMNODE_CONTRACT", raising=False)
    monkeypatch.chdir(folders["hospital-2"])
    with ChainGateway(anvil.url, f"127.0.0.1:{port}", TlsFiles(
            sentinel / "hospital-1.pem", sentinel / "hospital-1.key", sentinel / "trust.pem")):
        view = json.loads(cli("status", "--format", "json"))
        assert view["contract"] == env["CONTRACT"] and view["training_finished"] is False
        assert json.loads(cli("audit", "--format", "json"))["ok"] is True
        out = cli("report", "--out", tmp_path / "report", code=10)  # no round yet: says so
        assert "no site has reported metrics yet" in out
    monkeypatch.chdir(tmp_path)  # no kit here: the same commands say what to pass
    assert "run this in a site's folder" in cli("status", code=10)


def test_the_ml_container_takes_hpes_settings_and_the_sites_own(tmp_path: Path) -> None:
    """Issue 21: a site could not pass its own variables (HPE's MAX_EPOCHS, MIN_PEERS) to its
    trainer, HPE's scratch path was not writable, and python as PID 1 ignored SIGTERM. The
    kit's compose files as `docker-compose config` resolves them in the site's folder."""
    import subprocess

    from swarmnode.containers.engine import compose_binary

    _, folders = provision(tmp_path)
    for name, folder in folders.items():
        with open(folder / ".env", "a") as env:  # what a site adds for its script
            env.write("MAX_EPOCHS=3\nMY_SCRIPT_SETTING=north wing\n")
        done = subprocess.run([compose_binary(), "config", "--format", "json"], cwd=folder,
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        ml = json.loads(done.stdout)["services"]["ml"]
        assert ml["init"] is True  # a signal-forwarding init as PID 1
        environment = ml["environment"]
        assert environment["MAX_EPOCHS"] == "3"
        assert environment["MY_SCRIPT_SETTING"] == "north wing"
        assert environment["MIN_PEERS"] == "2" and environment["SITE"] == name
        # HPE's names as the container sees its data and its writable output
        assert environment["DATA_DIR"] == "/data" and environment["SCRATCH_DIR"] == "/workspace/out"
        mounts = {v["target"]: v for v in ml["volumes"]}
        assert mounts["/data"]["read_only"] and mounts["/data"]["source"] == str(folder / "data")
        assert "/workspace/out" in mounts and ml["command"] == ["python", "/app/train.py"]


def test_a_sentinel_restart_neither_funds_nor_authorises_again(
    tmp_path: Path, anvil,  # noqa: ANN001 - the session's real anvil (tests/conftest.py)
) -> None:
    """Issue 21: each sentinel restart re-funded and re-authorised every site. The sentinel's
    deploy service's own command (compose/hospital.yaml with compose/admin.yaml, as its
    container runs it, on a real anvil) run twice: the second run sends nothing."""
    import subprocess
    import sys

    from swarmnode.chain.client import SwarmRegistry, connect

    root = Path(__file__).resolve().parents[2]
    _, folders = provision(tmp_path, ["hospital-1", "hospital-2"])
    sentinel = folders["hospital-1"]
    env = dict(line.split("=", 1) for line in (sentinel / ".env").read_text().splitlines()
               if line and not line.startswith("#"))
    deploy = yaml.safe_load((root / "compose" / "hospital.yaml").read_text())["services"]["deploy"]
    script = deploy["command"][0].replace("$$", "$")
    script = script.replace("/consortium/", f"{sentinel / 'consortium'}/").replace(
        "/var/lib/swarmnode/", f"{tmp_path}/")
    admin = yaml.safe_load((root / "compose" / "admin.yaml").read_text())["services"]["deploy"]
    assert set(admin["environment"]) >= {"ADMIN_KEYSTORE", "ADMIN_PASSWORD_FILE"}
    run_env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "SWARMNODE_RPC_URL": anvil.url, "SWARMNODE_CONTRACT": env["CONTRACT"],
        "MIN_PEERS": env["MIN_PEERS"], "GRACE_S": env["GRACE_S"],
        "DEADLINE_S": env["DEADLINE_S"], "FUND_ETH": env["FUND_ETH"],
        "ADMIN_ADDRESS": env["ADMIN_ADDRESS"], "ADMIN_FUND_ETH": env["ADMIN_FUND_ETH"],
        "ADMIN_KEYSTORE": str(sentinel / env["ADMIN_KEYSTORE_FILE"]),
        "ADMIN_PASSWORD_FILE": str(sentinel / env["ADMIN_KEYSTORE_PASSWORD_FILE"])}
    w3 = connect(anvil.url)
    addresses = [json.loads((f / f"{n}.request.json").read_text())["address"]
                 for n, f in folders.items()]

    def start() -> tuple[str, list[int], int]:
        done = subprocess.run(["/bin/sh", "-ec", script], env=run_env, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        return (done.stdout, [w3.eth.get_balance(a) for a in addresses],
                len(SwarmRegistry(w3, env["REGISTRY"]).events(names={"Authorized"})))

    _, funded, authorised = start()
    assert authorised == 2 and all(b == int(float(env["FUND_ETH"]) * 10**18) for b in funded)
    out, after, again = start()  # the sentinel restarted: `docker-compose up -d` again
    assert (after, again) == (funded, authorised), out
    assert out.count("nothing sent") == 2 and "consortium ready" in out
