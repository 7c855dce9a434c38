"""HPE Swarm Learning's PyTorch program, ported by changing its import line
(`examples/hpe_port/model/mnist_pyt.py`), trains in a real two-site swarm: real anvil, node
services and the script itself as separate processes, configured as HPE configures it (environment
variables), each site ending with the chain's final model in the file the script saves."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from swarmnode.cli import app
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.transport import serde

pytestmark = [pytest.mark.slow, pytest.mark.anvil]

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "hpe_port" / "model" / "mnist_pyt.py"


def _script_model_state() -> dict:
    spec = importlib.util.spec_from_file_location("mnist_pyt", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mnistNet().state_dict()


def _site_data(root: Path, sites: int) -> list[Path]:
    """The digits split across sites in HPE's mnist.npz layout."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test, train = order[:300], order[300:]
    dirs = []
    for i, part in enumerate(np.array_split(train, sites)):
        d = root / f"site-{i + 1}"
        d.mkdir(parents=True)
        np.savez(d / "mnist.npz", x_train=x[part].reshape(-1, 8, 8), y_train=y[part],
                 x_test=x[test].reshape(-1, 8, 8), y_test=y[test])
        dirs.append(d)
    return dirs


def test_hpes_mnist_program_trains_after_changing_its_import(tmp_path: Path) -> None:
    with LocalSwarm(tmp_path / "swarm", 2, min_peers=2, grace_s=1, deadline_s=6,
                    sync_frequency=4, initial_state=_script_model_state()) as swarm:
        for i in range(2):
            swarm.start_node(i)
        swarm.wait_enrolled([0, 1])
        procs = []
        for i, data in enumerate(_site_data(tmp_path / "data", 2)):
            env = dict(swarm.env, SWARMNODE_LOCAL_API=swarm.socket(i), DATA_DIR=str(data),
                       SCRATCH_DIR=str(data / "scratch"), MAX_EPOCHS="3", MIN_PEERS="2",
                       SYNC_FREQUENCY="4", SEED=str(i))
            with open(swarm.log(i, "trainer"), "ab") as log:
                procs.append(subprocess.Popen([sys.executable, str(SCRIPT)], env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
        for i, code in enumerate(swarm.wait_processes(procs, 240)):
            assert code == 0, swarm.tail(i, "trainer", 20)
        final = swarm.contract.events(names={"TrainingFinished"})[-1].args["digest"]
        saved = [load_file(tmp_path / "data" / f"site-{i + 1}" / "scratch" / "mnist_pyt" /
                           "saved_model.safetensors") for i in range(2)]
        for state in saved:  # the same tensors at both sites: the chain's final model
            assert serde.digest(serde.encode(state)) == final
        # the file the script saved (safetensors.torch.save_file: another header layout than the
        # node's) is proven to be the final model: the audit compares tensors, not file bytes
        saved_file = (tmp_path / "data" / "site-1" / "scratch" / "mnist_pyt"
                      / "saved_model.safetensors")
        assert serde.digest(saved_file.read_bytes()) != final
        out = CliRunner().invoke(app, ["audit", "--contract", swarm.contract.address,
                                       "--rpc-url", swarm.rpc_url, "--model", str(saved_file),
                                       "--format", "json"])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["model_matches_final_digest"] is True
        logs = swarm.log(0, "trainer").read_text()
        assert "Test set: accuracy" in logs and "epoch 3/3" in logs
        assert "Traceback" not in logs
