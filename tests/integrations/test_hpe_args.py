"""HPE Swarm Learning's SwarmCallback arguments and call patterns, as an HPE script uses them:
each works as in HPE or is refused at construction, naming it and saying what to use."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from swarmnode.callback import SwarmCallback, _builtin_metric, wait_log_after
from swarmnode.errors import ConfigError

API = "unix:///nonexistent/node.sock"  # construction does not connect


def hpe(**kw):  # type: ignore[no-untyped-def]
    args = dict(syncFrequency=1000, minPeers=2, model=torch.nn.Linear(4, 3), local_api=API)
    return SwarmCallback(**{**args, **kw})


def test_loss_and_metric_by_class_name_with_their_arguments() -> None:
    cb = hpe(lossFunction="CrossEntropyLoss", lossFunctionArgs={"reduction": "sum"},
             metricFunction="F1Score", metricFunctionArgs={"task": "multiclass",
                                                           "num_classes": 3})
    assert isinstance(cb.loss_fn, torch.nn.CrossEntropyLoss) and cb.loss_fn.reduction == "sum"
    out = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    tgt = torch.tensor([0, 1, 2, 2])
    assert cb.metric_fn(out, tgt) == pytest.approx(0.75)  # micro F1: HPE's default average
    loss = torch.nn.CrossEntropyLoss(reduction="sum")(out, tgt)
    assert float(cb.loss_fn(out, tgt)) == pytest.approx(float(loss))


def test_builtin_metrics_without_torchmetrics() -> None:
    """What a site without torchmetrics gets for the common names."""
    binary = _builtin_metric("F1Score", {"task": "binary"})
    # logits: two true positives, one false positive, one false negative -> F1 = 4 / 6
    out = torch.tensor([2.0, 1.5, 0.7, -1.0, -2.0])
    tgt = torch.tensor([1, 1, 0, 1, 0])
    assert binary(out, tgt) == pytest.approx(4 / 6)
    macro = _builtin_metric("F1Score", {"task": "multiclass", "num_classes": 3,
                                        "average": "macro"})
    out3 = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    assert macro(out3, torch.tensor([0, 1, 1])) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert _builtin_metric("Accuracy", {"task": "multiclass"})(out3,
                                                                torch.tensor([0, 0, 1])) == 1
    mse = _builtin_metric("MeanSquaredError", {})
    assert mse(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])) == pytest.approx(2.0)


def test_wrong_names_and_arguments_are_refused_at_construction() -> None:
    with pytest.raises(ConfigError, match="lossFunction 'CrossEntropy' is not a torch.nn loss "
                                          "class; use one of .*CrossEntropyLoss"):
        hpe(lossFunction="CrossEntropy")
    with pytest.raises(ConfigError,
                       match="lossFunctionArgs {'reductio': 'sum'} do not fit torch.nn.NLLLoss"):
        hpe(lossFunction="NLLLoss", lossFunctionArgs={"reductio": "sum"})
    with pytest.raises(ConfigError, match="metricFunction 'F1Scor'"):
        hpe(metricFunction="F1Scor")
    with pytest.raises(ConfigError, match="metricFunctionArgs .* do not fit|not supported"):
        hpe(metricFunction="F1Score", metricFunctionArgs={"tsk": "binary"})
    with pytest.raises(ConfigError, match="checkinModelOnTrainEnd 'snapshoot' is not one of "
                                          "inactive, snapshot, active"):
        hpe(checkinModelOnTrainEnd="snapshoot")
    with pytest.raises(ConfigError, match="unknown parameter 'checkinModelOnTrainENd'"):
        hpe(checkinModelOnTrainENd="snapshot")


def test_hpe_defaults_and_call_patterns() -> None:
    cb = hpe(totalEpochs=2)
    assert cb.policy == "snapshot"  # HPE's default end of training
    assert SwarmCallback(torch.nn.Linear(1, 1), sync_frequency=1, min_peers=1,
                         local_api=API).policy == "inactive"  # swarmnode's own default
    assert cb.weight == 1  # no num_samples in HPE: every site weighs nodeWeightage
    assert hpe(nodeWeightage=40).weight == 40
    cb.on_batch_end(0)  # HPE and Keras pass the batch index
    cb.on_batch_end(batch=1, logs={"loss": 0.1})
    assert cb.state.batches == 2
    cb.logger.setLevel(logging.DEBUG)
    assert isinstance(cb.logger, logging.Logger)
    cb.on_epoch_end(1)  # HPE's PyTorch examples count epochs from 1
    cb.on_epoch_end(2)
    assert cb.state.epoch == 2
    zero_based = hpe(totalEpochs=2)  # Keras, Lightning and the HF adapter count from 0
    zero_based.on_epoch_end(0)
    zero_based.on_epoch_end(1)
    assert zero_based.state.epoch == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hpe(useAdaptiveSync=False, adsValBatchSize=8)
    assert [str(w.message) for w in caught] == [
        "SwarmCallback: HPE option 'adsValBatchSize' has no effect in swarmnode"
    ]


def test_the_integrations_swarmcallback_names_are_their_adapters() -> None:
    """`from swarmnode.integrations.hf import SwarmCallback` in a Trainer script gets the
    Trainer's callback, not the plain one (which the Trainer would not call)."""
    pytest.importorskip("transformers")
    from swarmnode.integrations import hf

    assert hf.SwarmCallback is hf.SwarmTrainerCallback
    lightning = pytest.importorskip("swarmnode.integrations.lightning")
    assert lightning.SwarmCallback is lightning.SwarmLightningCallback


def test_a_waiting_sync_logs_after_5_s_or_twice_the_usual_sync_unless_told() -> None:
    assert wait_log_after(None, None) == 5.0  # the first sync
    assert wait_log_after(None, 1.2) == 5.0  # fast rounds: 5 s
    assert wait_log_after(None, 20.0) == 40.0  # a slow link's 20 s rounds are not news
    assert wait_log_after("", 20.0) == 40.0
    assert wait_log_after("1", 20.0) == 1.0  # SWARMNODE_WAIT_LOG_S wins
    assert wait_log_after("0", 20.0) == 0.0  # 0: never
