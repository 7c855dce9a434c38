"""`swarmnode spec --topology`: the sharded topology is written into the training spec, and a
merge rule that cannot shard is refused saying what to change."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from swarmnode.cli import app
from swarmnode.spec import TrainingSpec

runner = CliRunner()


def _weights(tmp_path: Path) -> Path:
    path = tmp_path / "initial.safetensors"
    save_file({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, str(path))
    return path


def test_spec_topology_sharded_is_pinned_in_the_spec(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    result = runner.invoke(app, ["spec", str(_weights(tmp_path)), "--sync-frequency", "4",
                                 "--min-peers", "3", "--merge", "trimmedmean", "--topology",
                                 "sharded", "--out", str(out)])
    assert result.exit_code == 0, result.output
    raw = json.loads(out.read_text())
    assert raw["topology"] == "sharded"
    assert TrainingSpec.from_json(out.read_text()).topology == "sharded"
    plain = tmp_path / "plain.json"
    result = runner.invoke(app, ["spec", str(_weights(tmp_path)), "--sync-frequency", "4",
                                 "--min-peers", "3", "--out", str(plain)])
    assert result.exit_code == 0 and "topology" not in json.loads(plain.read_text())


def test_a_rule_that_cannot_shard_is_refused_with_what_to_change(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    result = runner.invoke(app, ["spec", str(_weights(tmp_path)), "--sync-frequency", "4",
                                 "--min-peers", "3", "--merge", "geomedian", "--topology",
                                 "sharded", "--out", str(out)])
    assert result.exit_code != 0
    assert "needs whole updates" in result.output and "topology 'leader'" in result.output
    assert not out.exists()
