"""`swarmnode site install` keeps the site's own settings in its .env: a site adds its script's
settings there (HPE's MAX_EPOCHS, SCRIPT=, tracking variables), and the README has it install
the next kit (a fixed setting signed again, the consortium's next training) into the same folder.
Real CLI commands on real files: the consortium's init, a site's request, the admin's sign."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from swarmnode.cli import app

runner = CliRunner()


def cli(*args: object) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def test_installing_a_kit_again_keeps_the_sites_own_settings(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3, 2)}, str(tmp_path / "initial.safetensors"))
    conf = tmp_path / "consortium.yaml"
    conf.write_text(yaml.safe_dump({
        "consortium": "study", "one_host": True,
        "training": {"initial": "initial.safetensors", "sync_frequency": 4, "min_peers": 2},
        "sites": [{"name": "hospital-1"}, {"name": "hospital-2"}]}))
    cli("consortium", "init", conf)
    for s in ("hospital-1", "hospital-2"):
        cli("site", "request", "--name", s, "--dir", tmp_path / s)
    cli("consortium", "sign", conf, *(tmp_path / s / f"{s}.request.json"
                                       for s in ("hospital-1", "hospital-2")))
    kit, site = tmp_path / "admin" / "kits" / "hospital-2", tmp_path / "hospital-2"
    first = cli("site", "install", kit, "--dir", site)
    assert f"{site / 'app' / 'train.py'}" in first and f"{site / 'data'}" in first
    assert "once the sentinel's is up" in first and "kept" not in first
    env = site / ".env"
    kit_env = env.read_text()
    # the site adds its script's settings and changes one of the kit's
    env.write_text(kit_env.replace("MIN_PEERS=2", "MIN_PEERS=3")
                   + "MAX_EPOCHS=5\nSCRIPT=mnist_pyt.py\n# a note\nSWARMNODE_MLFLOW_EXPERIMENT=x\n")
    again = cli("site", "install", kit, "--dir", site)
    assert "kept this site's own settings" in again
    assert "MAX_EPOCHS, SCRIPT, SWARMNODE_MLFLOW_EXPERIMENT" in again
    assert "the kit sets MIN_PEERS" in again
    text = env.read_text()
    assert text.startswith(kit_env)  # the kit's file, whole, then the site's own settings
    assert text[len(kit_env):].splitlines()[1:] == [
        "MAX_EPOCHS=5", "SCRIPT=mnist_pyt.py", "SWARMNODE_MLFLOW_EXPERIMENT=x"]
    assert "MIN_PEERS=3" not in text
    # once more: nothing doubled
    cli("site", "install", kit, "--dir", site)
    assert env.read_text() == text
