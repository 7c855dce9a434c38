"""`secure_aggregation` in the training spec: left out of the JSON when false (existing spec
hashes stay), its guards say what to change, `swarmnode spec --secure-aggregation` writes it,
and a node that could not carry its seed reveals (no data plane) refuses to start."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner
from web3 import Web3

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract
from swarmnode.cli import app
from swarmnode.errors import ConfigError
from swarmnode.privacy import ring
from swarmnode.privacy.guards import refuse_until_wired
from swarmnode.spec import TensorSpec, TrainingSpec

PARAMS = {"fc.weight": TensorSpec((3, 4), "float32")}


def _spec(**changes: object) -> TrainingSpec:
    base = dict(sync_frequency=4, min_peers=3, merge_method="mean", params=PARAMS,
                merge_options={"clip_norm": 10.0}, max_weight=1000, secure_aggregation=True)
    return TrainingSpec(**(base | changes))  # type: ignore[arg-type]


def test_off_by_default_and_absent_from_the_json() -> None:
    plain = TrainingSpec(4, 2, "mean", PARAMS)
    text = ('{"format":"swarmnode-spec/1","merge_method":"mean","merge_options":{},'
            '"min_peers":2,"params":{"fc.weight":{"dtype":"float32","shape":[3,4]}},'
            '"sync_frequency":4}')
    assert not plain.secure_aggregation
    assert plain.to_json() == text  # as before this setting existed: same hash, same digests
    assert plain.digest == hashlib.sha256(text.encode()).digest()
    on = _spec()
    raw = json.loads(on.to_json())
    assert raw["secure_aggregation"] is True
    assert TrainingSpec.from_json(on.to_json()) == on
    with pytest.raises(ConfigError, match="secure_aggregation must be true or false"):
        TrainingSpec.from_json(on.to_json().replace('"secure_aggregation":true',
                                                    '"secure_aggregation":"yes"'))


@pytest.mark.parametrize(("changes", "says"), [
    ({"merge_method": "coordmedian"},
     "merge rule 'coordmedian' needs each update apart.*use merge_method 'mean'"),
    ({"min_peers": 2}, "min_peers at least 3.*learns the other's update from the sum"),
    ({"topology": "sharded"}, "topology 'leader' only.*slice owner sees one slice"),
    ({"compression": "int8"}, "cannot use compression 'int8'.*use compression 'none'"),
    ({"merge_options": {}}, "needs merge option clip_norm.*--clip-norm"),
    ({"max_weight": None}, "needs max_weight"),
    ({"max_weight": 10 ** 7, "merge_options": {"clip_norm": 10.0}},
     "lower max_weight to at most 838860 at clip_norm 10.0"),
    # fits the ring at clip_norm 1e-6, but round 1 (parameters whole) would have no room
    ({"max_weight": 8 * 10 ** 12, "merge_options": {"clip_norm": 1e-6}},
     "max_weight 8000000000000 leaves round 1 no room.*lower max_weight to at most"),
])
def test_each_guard_says_what_to_change(changes: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        _spec(**changes)
    # and the same settings without secure aggregation are not this guard's business
    try:
        _spec(**changes, secure_aggregation=False)
    except ConfigError as exc:
        assert "secure aggregation" not in str(exc)


def test_the_largest_fitting_weight_cap_is_accepted() -> None:
    cap = ring.largest_weight_cap(ring.MAX_SITES, 10.0)
    assert _spec(max_weight=cap).max_weight == cap
    with pytest.raises(ConfigError, match="would wrap around"):
        _spec(max_weight=cap + 1)


def _weights(tmp_path: Path) -> Path:
    path = tmp_path / "initial.safetensors"
    save_file({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, str(path))
    return path


def test_swarmnode_spec_writes_it_and_refuses_what_cannot_run(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "spec.json"
    args = ["spec", str(_weights(tmp_path)), "--sync-frequency", "4", "--out", str(out)]
    result = runner.invoke(app, [*args, "--min-peers", "3", "--clip-norm", "5",
                                 "--max-weight", "500", "--secure-aggregation"])
    assert result.exit_code == 0, result.output
    spec = TrainingSpec.from_json(out.read_text())
    assert spec.secure_aggregation and spec.merge_options == {"clip_norm": 5.0}
    out.unlink()
    result = runner.invoke(app, [*args, "--min-peers", "3", "--clip-norm", "5",
                                 "--max-weight", "500", "--merge", "geomedian",
                                 "--secure-aggregation"])
    assert result.exit_code == 10 and not out.exists()
    assert "needs each update apart" in " ".join(result.output.split())
    result = runner.invoke(app, [*args, "--min-peers", "3", "--max-weight", "500",
                                 "--secure-aggregation"])
    assert result.exit_code == 10 and "clip_norm" in result.output and not out.exists()
    result = runner.invoke(app, [*args, "--min-peers", "2", "--clip-norm", "-1"])
    assert result.exit_code == 10 and "--clip-norm -1.0 must be a positive number" in " ".join(
        result.output.split())


def test_a_node_without_a_data_plane_refuses_it_at_start(tester_w3: Web3) -> None:
    """The seed reveals travel on the data plane (or in process): a training with secure
    aggregation deploys, and a node whose data plane is off (data_port: -1) refuses to start."""
    spec_json = _spec().to_json()
    training = SwarmContract.deploy(tester_w3, dev_account(0), spec_json, 3, 100, 100)
    assert training.spec_json() == spec_json
    with pytest.raises(ConfigError, match="data plane off.*remove data_port"):
        refuse_until_wired(spec_json, reveals_carried=False)
    refuse_until_wired(spec_json, reveals_carried=True)
    refuse_until_wired(dataclasses.replace(_spec(), secure_aggregation=False).to_json(),
                       reveals_carried=False)
    refuse_until_wired("not json", reveals_carried=False)  # the spec's parser reports that


def test_deploy_and_swarmnode_spec_refuse_what_round_1_cannot_hold(tester_w3: Web3,
                                                                    tmp_path: Path) -> None:
    """Round 1 encodes the parameters whole: a secure spec whose max_weight leaves it no room
    is refused at deployment (before any transaction; before, the nodes failed at start), and
    `swarmnode spec` refuses initial weights whose norm is over round 1's bound (round 1 would
    scale the model down)."""
    raw = json.loads(_spec().to_json())
    raw["max_weight"], raw["merge_options"] = 8 * 10 ** 12, {"clip_norm": 1e-6}
    block = tester_w3.eth.block_number
    with pytest.raises(ConfigError, match="leaves round 1 no room"):
        SwarmContract.deploy(tester_w3, dev_account(0), json.dumps(raw), 3, 100, 100)
    assert tester_w3.eth.block_number == block  # nothing was sent
    big = tmp_path / "big.safetensors"
    save_file({"fc.weight": torch.full((3, 4), 3e5)}, str(big))  # norm 1.04e6
    out = tmp_path / "spec.json"
    args = ["spec", str(big), "--sync-frequency", "4", "--out", str(out), "--min-peers", "3",
            "--clip-norm", "5", "--secure-aggregation"]
    result = CliRunner().invoke(app, [*args, "--max-weight", "1600000"])  # bound ~3.4e5
    assert result.exit_code == 10 and not out.exists()
    assert "initial parameters have L2 norm 1.03923e+06" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--max-weight", "1000"])  # bound ~5.5e8
    assert result.exit_code == 0, result.output
