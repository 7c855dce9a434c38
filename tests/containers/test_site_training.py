"""`swarmnode site training KIT --project NAME`: a training beside the one a site's folder runs, as
its own compose project (checked here with `docker-compose config`, no engine; the containers test
runs two trainings at once this way: tests/containers/test_provision.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from provision_support import cli, provision, write_consortium
from test_files import check_wiring

from swarmnode.containers.engine import compose_binary
from swarmnode.identity import describe
from swarmnode.provision import _set_env, _write_manifest

OTHER = "0x" + "ab" * 20  # the training beside the first (as `consortium training` names it)


def _next_training_kit(kit: Path) -> None:
    """The kit as `swarmnode consortium training` leaves it (without a chain): CONTRACT names
    another training of the registry, the manifest made again."""
    env = kit / ".env"
    env.write_text(_set_env(env.read_text(), "CONTRACT", OTHER))
    manifest = {k: v for k, v in json.loads((kit / "kit.json").read_text()).items()
                if k != "files"}
    _write_manifest(kit, {**manifest, "contract": OTHER})


def _config(folder: Path) -> dict:
    done = subprocess.run([compose_binary(), "config", "--format", "json"], cwd=folder,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _lock_mount(cfg: dict) -> str:
    (source,) = [v["source"] for v in cfg["services"]["node"]["volumes"]
                 if v["target"] == "/tmp/swarmnode-tx"]
    return source


def test_a_training_beside_the_first_is_its_own_project_of_the_same_site(tmp_path: Path) -> None:
    _, folders = provision(tmp_path, ["hospital-1", "hospital-2"])
    kits = tmp_path / "admin-desk" / "admin" / "kits"
    for name in ("hospital-1", "hospital-2"):
        _next_training_kit(kits / name)
        out = cli("site", "training", kits / name, "--dir", folders[name], "--project", "b")
        assert f"as compose project {name}-b" in out and f"b.{name}.study:7441" in out
    one, two = _config(folders["hospital-2"]), _config(folders["hospital-2"] / "b")
    assert (one["name"], two["name"]) == ("hospital-2", "hospital-2-b")
    node = two["services"]["node"]
    assert node["environment"]["SWARMNODE_CONTRACT"] == OTHER
    assert one["services"]["node"]["environment"]["SWARMNODE_CONTRACT"] != OTHER
    # dialled under its own name on the shared network, which the site's certificate names
    assert node["environment"]["SWARMNODE_PEER_ENDPOINT"] == "b.hospital-2.study:7441"
    assert node["networks"]["consortium"]["aliases"] == ["b.hospital-2.study"]
    assert one["services"]["node"]["networks"]["consortium"]["aliases"] == ["hospital-2"]
    assert "*.hospital-2.study" in describe(folders["hospital-2"] / "certs" / "hospital-2.pem").dns
    assert two["networks"]["consortium"]["external"] is True
    # the same certificate, key and account; one nonce lock folder for both node containers
    for secret in ("node_cert", "node_key", "trust", "keystore", "keystore_password"):
        assert two["secrets"][secret]["file"] == one["secrets"][secret]["file"], secret
    lock = folders["hospital-2"] / "chain" / "tx-lock"
    assert _lock_mount(one) == _lock_mount(two) == str(lock) and lock.is_dir()
    assert lock.stat().st_uid == 10001 and lock.stat().st_mode & 0o777 == 0o700
    assert check_wiring(two) == []
    # the sentinel's project beside its own runs neither the chain nor the deploy service
    sentinel = _config(folders["hospital-1"] / "b")
    assert not {"chain", "deploy"} & set(sentinel["services"])
    assert sentinel["services"]["node"]["environment"]["SWARMNODE_RPC_URL"] == \
        "http://chain:8545"
    # what is refused, saying what to do
    out = cli("site", "training", kits / "hospital-2", "--dir", folders["hospital-2"],
              "--project", "c", code=10)
    assert "already runs training" in out  # b runs it already
    out = cli("site", "training", kits / "hospital-2", "--dir", folders["hospital-2"],
              "--project", "certs", code=10)
    assert "not one of the site folder's own" in out
    out = cli("site", "training", kits / "hospital-2", "--dir", folders["hospital-1"],
              "--project", "c", code=10)
    assert "no installed kit of hospital-2" in out
    out = cli("site", "training", kits / "hospital-2", "--dir", folders["hospital-2"],
              "--project", "b", "--peer-port", "7443", code=10)
    assert "--peer-port is for sites on separate hosts" in out


def test_on_separate_hosts_a_training_beside_the_first_takes_other_ports(tmp_path: Path) -> None:
    conf = write_consortium(tmp_path / "desk", ["hospital-1", "hospital-2"])
    raw = yaml.safe_load(conf.read_text())
    raw.update(one_host=False, chain={"rpc_url": "https://h1.example.org:8545"})
    raw["sites"] = [{"name": "hospital-1", "host": "h1.example.org"},
                    {"name": "hospital-2", "host": "h2.example.org"}]
    conf.write_text(yaml.safe_dump(raw))
    cli("consortium", "init", conf)
    for s in ("hospital-1", "hospital-2"):
        cli("site", "request", "--name", s, "--dir", tmp_path / s)
    cli("consortium", "sign", conf, *(tmp_path / s / f"{s}.request.json"
                                      for s in ("hospital-1", "hospital-2")))
    kit, site = tmp_path / "desk" / "admin" / "kits" / "hospital-2", tmp_path / "hospital-2"
    cli("site", "install", kit, "--dir", site)
    _next_training_kit(kit)
    out = cli("site", "training", kit, "--dir", site, "--project", "b", code=10)
    assert "pass --peer-port P" in out and "open both" in out
    out = cli("site", "training", kit, "--dir", site, "--project", "b", "--peer-port", "7442",
              code=10)
    assert "not 7441 or 7442" in out
    cli("site", "training", kit, "--dir", site, "--project", "b", "--peer-port", "7443")
    node = _config(site / "b")["services"]["node"]
    assert node["environment"]["SWARMNODE_PEER_ENDPOINT"] == "h2.example.org:7443"
    assert node["environment"]["SWARMNODE_DATA_PORT"] == "7444"
    # the same numbers outside and in for the data plane (it is advertised as bound)
    # the peer API and the data plane published for the other sites; the metrics port (7443
    # inside the container) on this host's loopback only, on a port of the engine's choosing
    assert {(p["host_ip"], p["published"], p["target"]) for p in node["ports"]} == {
        ("0.0.0.0", "7443", 7441), ("0.0.0.0", "7444", 7444), ("127.0.0.1", "0", 7443)}
    assert node["environment"]["SWARMNODE_METRICS_LISTEN"] == "0.0.0.0:7443"
    assert node["environment"]["SWARMNODE_RPC_URL"] == "https://h1.example.org:8545"
    assert node["environment"]["SWARMNODE_CHAIN_CERT"] == "/run/secrets/node_cert"
    # no wildcard name: on separate hosts the site's host name, other ports
    assert sorted(describe(site / "certs" / "hospital-2.pem").dns) == ["h2.example.org",
                                                                      "hospital-2"]
