"""SwarmLightningCallback with real Lightning ``Trainer``s on two sites of a real swarm.

Site 0 trains in the test process; site 1 trains in its own process (this file run as a script).
Both talk to real node services (anvil chain, mTLS between the sites).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
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

from swarmnode.demo import model as demo_model
from swarmnode.demo.data import load_shard
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.errors import ConfigError
from swarmnode.integrations import SwarmLightningCallback

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


class LitDemoNet(pl.LightningModule):
    """The swarm's DemoNet as a LightningModule: the same layers, so the same state_dict keys."""

    def __init__(self, n_features: int, seed: int = 0) -> None:
        super().__init__()
        net = demo_model.make_model(n_features, seed)
        self.norm, self.linear = net.norm, net.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return demo_model.DemoNet.forward(self, x)  # type: ignore[arg-type]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return demo_model.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return demo_model.make_optimizer(self)


def train(shard_path: Path, out: Path, callback: SwarmLightningCallback,
          accumulate: int = 1) -> tuple[LitDemoNet, pl.Trainer]:
    """One epoch of a real Lightning Trainer on a site's shard, with the swarm callback."""
    X, y = load_shard(shard_path)
    module = LitDemoNet(X.shape[1])
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
        accumulate_grad_batches=accumulate, callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, demo_model.make_loader(X, y, BATCH_SIZE, seed=0))
    return module, trainer


@dataclass
class Training:
    swarm: LocalSwarm
    module: LitDemoNet
    trainer: pl.Trainer
    callback: SwarmLightningCallback
    peer: PeerResult
    samples: int


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Training]:
    """Both sites train one epoch together; the swarm (chain, node services) stays up after.

    Site 1 accumulates gradients over 2 batches: its syncs count optimizer steps, not batches.
    """
    root = tmp_path_factory.mktemp("lightning")
    with two_site_swarm(root / "swarm") as swarm:
        with peer_process(__file__, swarm, 1, root / "peer") as proc:
            callback = SwarmLightningCallback(sync_frequency=4, min_peers=2,
                                              on_train_end_policy="inactive",
                                              local_api=swarm.socket(0), timeout=120)
            module, trainer = train(shard(swarm, 0), root / "site0", callback)
            peer = peer_result(proc, root / "peer")
        yield Training(swarm, module, trainer, callback, peer, len(load_shard(shard(swarm, 0)).y))


def test_both_sites_end_with_the_final_model_recorded_on_chain(training: Training) -> None:
    chain_digest = chain_final_digest(training.swarm)
    mine = cpu_state(training.module)
    assert list(mine) == list(demo_model.make_model(30, 0).state_dict())  # DemoNet's keys
    assert mine.keys() == training.peer.state.keys()
    for name, tensor in mine.items():
        assert torch.equal(tensor, training.peer.state[name]), name
    assert state_digest(mine) == chain_digest
    assert state_digest(training.peer.state) == chain_digest
    assert training.callback.swarm is not None
    assert training.callback.swarm.state.final_digest == chain_digest
    assert training.peer.result["final_digest"] == chain_digest


def test_one_sync_per_sync_frequency_optimizer_steps(training: Training) -> None:
    batches = -(-training.samples // BATCH_SIZE)  # one epoch: ceil(samples / batch)
    steps = training.trainer.global_step
    assert steps == batches
    swarm = training.callback.swarm
    assert swarm is not None
    assert swarm.state.batches == steps and swarm.state.epoch == 1
    assert swarm.state.rounds == expected_rounds(steps)
    assert swarm.num_samples == training.samples  # taken from the training DataLoader
    peer = training.peer.result
    peer_batches = -(-peer["num_samples"] // BATCH_SIZE)
    assert peer["steps"] == -(-peer_batches // 2)  # accumulate_grad_batches=2
    assert peer["batches"] == peer["steps"] and peer["rounds"] == expected_rounds(peer["steps"])
    assert (peer["sync_frequency"], peer["min_peers"], peer["node_weight"]) == (4, 2, 1.0)
    final_round = chain_final_round(training.swarm)
    assert checkins_of(training.swarm, 0) == (
        [(r, training.samples) for r in range(1, swarm.state.rounds + 1)] + [(final_round, 0)])
    assert checkins_of(training.swarm, 1) == (
        [(r, peer["num_samples"]) for r in range(1, peer["rounds"] + 1)] + [(final_round, 0)])


def test_a_trainer_started_after_the_swarm_finished_stops_and_takes_the_final_model(
    training: Training, tmp_path: Path
) -> None:
    callback = SwarmLightningCallback(syncFrequency=4, minPeers=2,
                                      local_api=training.swarm.socket(0), timeout=120)
    module, trainer = train(shard(training.swarm, 0), tmp_path, callback)
    assert callback.swarm is not None and callback.swarm.should_stop
    assert trainer.should_stop and trainer.global_step == 0  # stopped before the first batch
    assert callback.swarm.state.rounds == 0
    assert state_digest(cpu_state(module)) == chain_final_digest(training.swarm)


def test_settings_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="takes? the model from the trainer"):
        SwarmLightningCallback(model=torch.nn.Linear(2, 1), sync_frequency=4, min_peers=2)
    with pytest.raises(ConfigError, match="before training started"):
        SwarmLightningCallback(sync_frequency=4).on_train_epoch_end(None, None)
    saved = {"batches": 8, "rounds": 3}
    callback = SwarmLightningCallback(sync_frequency=4, min_peers=2)
    callback.load_state_dict(saved)  # restored from a checkpoint before training starts
    assert callback.state_dict() == saved


def test_missing_lightning_names_the_install() -> None:
    code = ("import sys; sys.modules['lightning'] = None\n"
            "from swarmnode.integrations import IntegrationUnavailable\n"
            "try:\n    from swarmnode.integrations import SwarmLightningCallback\n"
            "except IntegrationUnavailable as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert "pip install lightning" in out


def _peer_main() -> None:
    """Site 1's training script: the same Trainer, HPE names, gradient accumulation over 2."""
    p = argparse.ArgumentParser()
    p.add_argument("--shard", type=Path, required=True)
    p.add_argument("--local-api", required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    # HPE's default end of training is snapshot; this site asks for inactive, as site 0 has
    callback = SwarmLightningCallback(syncFrequency=4, minPeers=2, nodeWeightage=1,
                                      checkinModelOnTrainEnd="inactive",
                                      local_api=a.local_api, timeout=120)
    module, trainer = train(a.shard, a.out, callback, accumulate=2)
    swarm = callback.swarm
    assert swarm is not None
    write_result(a.out, module, {
        "steps": trainer.global_step, "batches": swarm.state.batches,
        "rounds": swarm.state.rounds, "final_digest": swarm.state.final_digest,
        "sync_frequency": swarm.sync_frequency, "min_peers": swarm.min_peers,
        "node_weight": swarm.node_weight, "num_samples": swarm.num_samples,
    })


if __name__ == "__main__":
    _peer_main()
