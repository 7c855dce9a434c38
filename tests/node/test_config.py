"""The node config loader: file < environment < flags, unknown keys refused, paths resolved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from swarmnode.cli import app
from swarmnode.config import load_config
from swarmnode.errors import ConfigError

BASE = {"name": "a", "contract": "0x" + "11" * 20, "key_index": 1, "cert": "c.pem",
        "key": "c.key", "trust": "t.pem", "peer_endpoint": "a.example.org:7441"}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE | {"poll_s": 0.5, "rpc_url": "http://file:1"})
    env = {"SWARMNODE_POLL_S": "0.2", "SWARMNODE_RPC_URL": "http://env:2", "OTHER": "x",
           "SWARMNODE_KEYSTORE": ""}  # empty (as compose passes an unset ${VAR:-}): not set
    cfg = load_config(path, {"rpc_url": "http://flag:3", "name": None}, env=env)
    assert (cfg.poll_s, cfg.rpc_url, cfg.name) == (0.2, "http://flag:3", "a")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), env={})
    assert cfg.cert == tmp_path / "c.pem" and cfg.data_dir == tmp_path / "swarm-data"
    assert cfg.local_target == f"unix://{tmp_path / 'swarm-data' / 'node.sock'}"


def test_unknown_setting_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'peer_listn' .*did you mean "
                                          "'peer_listen'"):
        load_config(_write(tmp_path, BASE | {"peer_listn": "x"}), env={})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key_index": None}, "set key_index .* or keystore"),
        ({"collect_fraction": 1.5}, "setting collect_fraction"),
        ({"name": None, "contract": None}, "setting (name|contract)"),
        # a training by its address, or by its registry (the one it runs): one of them
        ({"contract": None}, "set contract .* or registry"),
        # the enrolled endpoint must be one other sites can dial, never a wildcard bind address
        ({"peer_endpoint": None}, "binds every interface.*set peer_endpoint"),
        ({"peer_endpoint": "0.0.0.0:7441"}, "peer_endpoint 0.0.0.0:7441 is not an address"),
        # the local API socket is never world-accessible
        ({"local_api_mode": "0666"}, "gives every user on the machine access"),
        ({"local_api_mode": "rw"}, "setting local_api_mode"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path: Path, change: dict, message: str) -> None:
    data = {k: v for k, v in (BASE | change).items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, data), env={})


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad, env={})


def test_run_with_a_bad_config_is_one_line_and_exit_code_10(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 10
    assert "Traceback" not in result.output
    assert "cannot read config file" in result.output


def test_defaults_fit_containers(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE | {"local_api_mode": "0660",
                                               "local_api_group": "swarm"}), env={})
    assert cfg.peer_listen == "0.0.0.0:7441"  # the peer API's own port, not geth's 30303
    assert cfg.endpoint == "a.example.org:7441"
    assert (cfg.socket_mode, cfg.local_api_group) == (0o660, "swarm")
    local = load_config(_write(tmp_path, BASE | {"peer_listen": "127.0.0.1:0",
                                                 "peer_endpoint": None}), env={})
    assert local.endpoint == "127.0.0.1:0"  # a loopback bind needs no separate endpoint


def test_faults_are_test_only_from_the_file_and_validated(tmp_path: Path) -> None:
    from swarmnode.node.faults import NO_FAULTS, ExitAt, Stall

    cfg = load_config(_write(tmp_path, BASE), env={"SWARMNODE_FAULTS": "x"})
    assert cfg.faults is None and cfg.fault_plan == NO_FAULTS  # never from the environment
    assert load_config(_write(tmp_path, BASE), {"faults": "x"}, env={}).faults is None
    faults = {"stall_commit": "2:1:20", "exit": "after-commit:3+"}
    plan = load_config(_write(tmp_path, BASE | {"faults": faults}), env={}).fault_plan
    assert plan.stalls == (Stall(2, 1, 20.0),) and plan.exit == ExitAt("after-commit", 3, True)
    with pytest.raises(ConfigError, match="setting faults.*exit 'mid-push:2'"):
        load_config(_write(tmp_path, BASE | {"faults": {"exit": "mid-push:2"}}), env={})
    with pytest.raises(ConfigError, match="faults"):
        load_config(_write(tmp_path, BASE | {"faults": {"stall": "2:1"}}), env={})
