"""SwarmTrainerCallback with real ``transformers.Trainer``s on two sites of a real swarm.

Site 0 trains in the test process; site 1 trains in its own process (this file run as a script).
Both talk to real node services (anvil chain, mTLS between the sites).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from integration_support import (
    BATCH_SIZE,
    PeerResult,
    chain_final_digest,
    chain_final_round,
    checkins_of,
    cpu_state,
    expected_rounds,
    peer_process,
    peer_result,
    shard,
    state_digest,
    two_site_swarm,
    write_result,
)
from transformers import Trainer, TrainingArguments

from swarmnode.demo import model as demo_model
from swarmnode.demo.data import load_shard
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.errors import ConfigError
from swarmnode.integrations import IntegrationUnavailable, SwarmTrainerCallback

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


class HFDemoNet(demo_model.DemoNet):
    """The swarm's DemoNet (same state_dict keys) with the Trainer's calling convention."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = super().forward(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = demo_model.loss_fn(logits, labels)
        return out


class ShardDataset(torch.utils.data.Dataset):
    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X = torch.as_tensor(X, dtype=torch.float32)
        self.y = torch.as_tensor(y, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.X[i], "labels": self.y[i]}


def train(shard_path: Path, out: Path, callback: SwarmTrainerCallback) -> tuple[HFDemoNet, Trainer]:
    """One epoch of a real Trainer on a site's shard, with the swarm callback."""
    X, y = load_shard(shard_path)
    model = HFDemoNet(X.shape[1])
    model.load_state_dict(demo_model.make_model(X.shape[1], seed=0).state_dict())
    args = TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=True, report_to=[], num_train_epochs=1,
        per_device_train_batch_size=BATCH_SIZE, learning_rate=demo_model.LR, seed=0,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ShardDataset(X, y),
                      callbacks=[callback])
    trainer.train()
    return model, trainer


@dataclass
class Training:
    swarm: LocalSwarm
    model: HFDemoNet
    trainer: Trainer
    callback: SwarmTrainerCallback
    peer: PeerResult
    samples: int


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Training]:
    """Both sites train one epoch together; the swarm (chain, node services) stays up after."""
    root = tmp_path_factory.mktemp("hf")
    with two_site_swarm(root / "swarm") as swarm:
        with peer_process(__file__, swarm, 1, root / "peer") as proc:
            callback = SwarmTrainerCallback(sync_frequency=4, min_peers=2,
                                            on_train_end_policy="inactive",
                                            local_api=swarm.socket(0), timeout=120)
            model, trainer = train(shard(swarm, 0), root / "site0", callback)
            peer = peer_result(proc, root / "peer")
        yield Training(swarm, model, trainer, callback, peer, len(load_shard(shard(swarm, 0)).y))


def test_both_sites_end_with_the_final_model_recorded_on_chain(training: Training) -> None:
    chain_digest = chain_final_digest(training.swarm)
    mine = cpu_state(training.model)
    assert mine.keys() == training.peer.state.keys()
    for name, tensor in mine.items():
        assert torch.equal(tensor, training.peer.state[name]), name
    assert state_digest(mine) == chain_digest
    assert state_digest(training.peer.state) == chain_digest
    assert training.callback.swarm is not None
    assert training.callback.swarm.state.final_digest == chain_digest
    assert training.peer.result["final_digest"] == chain_digest


def test_one_sync_per_sync_frequency_optimizer_steps(training: Training) -> None:
    steps = training.trainer.state.global_step
    assert steps == -(-training.samples // BATCH_SIZE)  # one epoch: ceil(samples / batch)
    swarm = training.callback.swarm
    assert swarm is not None
    assert swarm.state.batches == steps
    assert swarm.state.rounds == expected_rounds(steps)
    assert swarm.num_samples == training.samples  # taken from the Trainer's training set
    assert swarm.should_stop
    peer = training.peer.result
    assert peer["batches"] == peer["steps"] and peer["rounds"] == expected_rounds(peer["steps"])
    # Site 1 was configured with HPE names: they reached SwarmCallback unchanged.
    assert (peer["sync_frequency"], peer["min_peers"], peer["node_weight"]) == (4, 2, 1.0)
    # On chain: each sync is one check-in with the site's weight, in consecutive rounds; then both
    # sites join the final round with weight 0 (the "inactive" end-of-training policy both ask for).
    final_round = chain_final_round(training.swarm)
    assert checkins_of(training.swarm, 0) == (
        [(r, training.samples) for r in range(1, swarm.state.rounds + 1)] + [(final_round, 0)])
    assert checkins_of(training.swarm, 1) == (
        [(r, peer["num_samples"]) for r in range(1, peer["rounds"] + 1)] + [(final_round, 0)])


def test_a_trainer_started_after_the_swarm_finished_stops_and_takes_the_final_model(
    training: Training, tmp_path: Path
) -> None:
    callback = SwarmTrainerCallback(syncFrequency=4, minPeers=2,
                                    local_api=training.swarm.socket(0), timeout=120)
    model, trainer = train(shard(training.swarm, 0), tmp_path, callback)
    assert callback.swarm is not None and callback.swarm.should_stop
    assert trainer.state.global_step == 1  # the Trainer checks should_training_stop after a step
    assert callback.swarm.state.rounds == 0
    assert state_digest(cpu_state(model)) == state_digest(cpu_state(training.model))


def test_settings_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="takes? the model from the trainer"):
        SwarmTrainerCallback(model=torch.nn.Linear(2, 1), sync_frequency=4, min_peers=2)
    callback = SwarmTrainerCallback(syncFreq=4, min_peers=2, local_api=f"unix://{tmp_path}/x")
    with pytest.raises(ConfigError, match="unknown parameter 'syncFreq'"):
        callback.on_train_begin(None, None, None, model=torch.nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="before training started"):
        SwarmTrainerCallback(sync_frequency=4).on_step_end(None, None, None)


def test_missing_transformers_names_the_install() -> None:
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from swarmnode.integrations import IntegrationUnavailable\n"
            "try:\n    from swarmnode.integrations import SwarmTrainerCallback\n"
            "except IntegrationUnavailable as e:\n    print(type(e).__mro__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert "pip install transformers" in out and "ImportError" in out and "ConfigError" in out
    assert issubclass(IntegrationUnavailable, ImportError)


def _peer_main() -> None:
    """Site 1's training script: the same Trainer, configured with HPE Swarm Learning's names."""
    p = argparse.ArgumentParser()
    p.add_argument("--shard", type=Path, required=True)
    p.add_argument("--local-api", required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    # HPE's default end of training is snapshot; this site asks for inactive, as site 0 has
    callback = SwarmTrainerCallback(syncFrequency=4, minPeers=2, nodeWeightage=1,
                                    checkinModelOnTrainEnd="inactive",
                                    local_api=a.local_api, timeout=120)
    model, trainer = train(a.shard, a.out, callback)
    swarm = callback.swarm
    assert swarm is not None
    result: dict[str, Any] = {
        "steps": trainer.state.global_step, "batches": swarm.state.batches,
        "rounds": swarm.state.rounds, "final_digest": swarm.state.final_digest,
        "sync_frequency": swarm.sync_frequency, "min_peers": swarm.min_peers,
        "node_weight": swarm.node_weight, "num_samples": swarm.num_samples,
    }
    write_result(a.out, model, result)


if __name__ == "__main__":
    _peer_main()
