"""SwarmCallback against a real node service process (anvil, mTLS peers, unix-socket local API)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from swarmnode.callback import SwarmCallback
from swarmnode.demo import model as demo_model
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.errors import ConfigError, SpecMismatch

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with LocalSwarm(tmp_path_factory.mktemp("cb") / "swarm", 2, min_peers=2,
                    sync_frequency=4) as swarm:
        swarm.start_node(0)
        swarm.wait_enrolled([0])
        yield swarm


def _model(swarm: LocalSwarm) -> torch.nn.Module:
    return demo_model.make_model(swarm.data.X_test.shape[1], seed=0)


def test_a_trainer_with_other_settings_is_refused_naming_the_setting(one_node: LocalSwarm) -> None:
    cb = SwarmCallback(_model(one_node), sync_frequency=5, min_peers=2, num_samples=10,
                       local_api=one_node.socket(0), timeout=30)
    with pytest.raises(SpecMismatch, match="sync_frequency = 5 differs from the swarm's 4"):
        cb.on_train_begin()
    wrong_model = torch.nn.Sequential(torch.nn.Linear(30, 2))
    cb = SwarmCallback(wrong_model, sync_frequency=4, min_peers=2, num_samples=10,
                       local_api=one_node.socket(0), timeout=30)
    expected = r"model has tensor 0.bias \(float32\[2\]\), which the swarm's has not"
    with pytest.raises(SpecMismatch, match=expected):
        cb.on_train_begin()


def test_hpe_aliases_port_an_hpe_script(one_node: LocalSwarm) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = SwarmCallback(
            model=_model(one_node), syncFrequency=4, minPeers=2, mergeMethod="mean",
            nodeWeightage=50, checkinModelOnTrainEnd="snapshot", adsValData=None,
            totalEpochs=3, useAdaptiveSync=True, local_api=one_node.socket(0), num_samples=10,
        )
    assert (cb.sync_frequency, cb.min_peers, cb.merge_method) == (4, 2, "mean")
    assert (cb.node_weight, cb.policy, cb.total_epochs) == (50.0, "snapshot", 3)
    assert cb.weight == 500
    assert any("useAdaptiveSync" in str(w.message) for w in caught)
    with pytest.raises(ConfigError, match="unknown parameter 'syncFreq'; known HPE names: "):
        SwarmCallback(_model(one_node), syncFreq=4, minPeers=2, local_api=one_node.socket(0))


def test_missing_local_api_and_bad_settings_are_clear(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    monkeypatch.delenv("SWARMNODE_LOCAL_API", raising=False)
    with pytest.raises(ConfigError, match="SWARMNODE_LOCAL_API"):
        SwarmCallback(model, sync_frequency=1, min_peers=1)
    with pytest.raises(ConfigError, match="sync_frequency >= 1"):
        SwarmCallback(model, sync_frequency=0, min_peers=1, local_api="unix:///x")
    cb = SwarmCallback(model, sync_frequency=1, min_peers=1, num_samples=1,
                       local_api=f"unix://{tmp_path / 'nothing.sock'}", timeout=1)
    with pytest.raises(Exception, match="no node service"):
        cb.on_train_begin()


def test_callback_state_is_json(one_node: LocalSwarm) -> None:
    cb = SwarmCallback(_model(one_node), sync_frequency=4, min_peers=2, num_samples=10,
                       local_api=one_node.socket(0))
    cb.state.batches = 7
    saved = cb.state_dict()
    import json

    restored = SwarmCallback(_model(one_node), sync_frequency=4, min_peers=2, num_samples=10,
                             local_api=one_node.socket(0))
    restored.load_state_dict(json.loads(json.dumps(saved)))
    assert restored.state.batches == 7
