"""`SwarmCallback`: add swarm learning to an existing PyTorch training loop.

    swarm = SwarmCallback(model, sync_frequency=8, min_peers=2, num_samples=len(train_set),
                          val_data=(X_val, y_val))
    swarm.on_train_begin()
    for epoch in range(epochs):
        for batch in loader:
            ...  # forward, backward, optimizer.step()
            swarm.on_batch_end()
            if swarm.should_stop:
                break
        swarm.on_epoch_end(epoch)
    swarm.on_train_end()      # waits for the swarm's final round; loads the final model

The callback only talks to its own node service (the local API: a unix socket by default, from
``local_api`` or the ``SWARMNODE_LOCAL_API`` environment variable). Parameters travel as
safetensors, never pickle.

HPE Swarm Learning scripts port by changing their import (``from swarmnode.pyt import
SwarmCallback``): HPE's parameter names are accepted (``syncFrequency``, ``minPeers``,
``mergeMethod``, ``nodeWeightage``, ``checkinModelOnTrainEnd``, ``adsValData``, ``valData``,
``totalEpochs``, ``lossFunction`` and ``metricFunction`` as class names with their
``lossFunctionArgs`` / ``metricFunctionArgs``, ``model=``), its call patterns work
(``on_batch_end(batch)``, ``on_epoch_end(epoch)``, ``.logger``), a callback built the HPE way ends
training as HPE does (``snapshot``; swarmnode's own default
is ``inactive``), and ``num_samples`` is optional (without it every site weighs
``nodeWeightage``, as in HPE). Options with no counterpart are named when given
(``useAdaptiveSync=True`` warns that syncs stay at ``syncFrequency``); a misspelt name or value is
refused at construction, saying what to use.

Under ``torch.distributed`` (DDP, Lightning's DDP strategy, the Hugging Face Trainer under
``torchrun``/``accelerate``) build the callback on every rank, after ``init_process_group``, and
call its hooks on every rank. The site is one site of the swarm: only the talking rank (rank 0 of
``process_group``, by default the default group; ``talking_rank=`` picks another) opens the local
API and talks to the node; every other rank needs no ``local_api``, never contacts the node, and
at each hook waits for the talking rank's decision (sync now or not, the swarm is over, the final
round), broadcast over the process group, then loads the merged model (parameters and buffers)
broadcast into its own module in place. So every rank syncs at the same step and ends with the
same model (:mod:`swarmnode.ranks`). ``num_samples`` is the site's whole training set, the same on
every rank (the dataset's length, not a rank's shard); it, ``node_weight``, ``sync_frequency``,
``min_peers`` and the end-of-training policy must agree on every rank, or every rank raises
ConfigError at ``on_train_begin``. Validation runs on the talking rank's ``val_data`` only.

Experiment tracking, on the talking rank (:mod:`swarmnode.tracking`): ``tensorboard_dir=`` or
the ``SWARMNODE_TENSORBOARD_DIR`` environment variable logs each merge's loss, metric and digest to
TensorBoard at step = the swarm round (``pip install 'swarmnode[tracking]'``);
``mlflow_experiment=`` or ``SWARMNODE_MLFLOW_EXPERIMENT`` logs them to an MLflow tracking server
(``mlflow_tracking_uri=`` or ``MLFLOW_TRACKING_URI``; no extra package:
:mod:`swarmnode.tracking_mlflow`).

Differential privacy at a site (DP-SGD with Opacus, ``pip install swarmnode[dp]``): give the
callback the module Opacus' ``PrivacyEngine.make_private`` returned (a ``GradSampleModule``; the
model it wraps works as well), the engine and the delta the site sets::

    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, ...)
    swarm = SwarmCallback(model, ..., privacy_engine=engine, target_delta=1e-5)

The swarm merges the wrapped model (its names without Opacus' ``_module.`` prefix, so a DP site
and a non-DP site of the same model merge together) and loads the merged parameters into the live
module in place: the same tensors, Opacus' per-sample gradient hooks stay attached. Every sync
(and the final model's metrics) reports the site's epsilon spent so far,
``engine.get_epsilon(target_delta)`` from its accountant, with the loss and metric; a callback
without an engine reports none (the node reads that as "not DP"). The accountant is asked at
every sync: ``PrivacyEngine(accountant="rdp")`` answers in ~0.05 s on a loaded 2-core machine,
Opacus' default ``prv`` in ~0.4 s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from swarmnode import tracking
from swarmnode.errors import ConfigError, NodeUnavailable, SwarmError
from swarmnode.ranks import SiteRanks
from swarmnode.spec import TrainingSpec
from swarmnode.transport import serde
from swarmnode.transport.local import LocalClient

__all__ = ["HPE_ALIASES", "SwarmCallback", "SwarmState"]

log = logging.getLogger("swarmnode.callback")

HPE_ALIASES = {
    "syncFrequency": "sync_frequency",
    "minPeers": "min_peers",
    "mergeMethod": "merge_method",
    "nodeWeightage": "node_weight",
    "checkinModelOnTrainEnd": "on_train_end_policy",
    "adsValData": "val_data",
    "valData": "val_data",
    "totalEpochs": "total_epochs",
    "lossFunction": "loss_fn",
    "metricFunction": "metric_fn",
    "lossFunctionArgs": "loss_fn_args",
    "metricFunctionArgs": "metric_fn_args",
}
# HPE options that change nothing here: the validation batch size (validation runs on what
# adsValData yields) and the training contract's name (one contract per training)
_IGNORED_HPE = {"adsValBatchSize", "valBatchSize", "trainingContract"}
POLICIES = ("inactive", "snapshot", "active")
_HPE_DEFAULT_POLICY = "snapshot"  # HPE's default for checkinModelOnTrainEnd
# swarmnode's default. The quality study (5 seeds) scores `active` a little higher on digits
# (0.974 / 0.976 vs 0.967 / 0.963; equal on breast-cancer), but rounds do not wait for a site that
# finished, so whether its check-in lands in a round is a race: with `active` or `snapshot` the
# same seed no longer gives the same digests (tests/e2e/test_swarm.py saw them differ from the
# round after the first site finished). `inactive` keeps rounds reproducible.
DEFAULT_POLICY = "inactive"


@dataclass
class SwarmState:
    """Read-only view of the callback's progress; saved as JSON (``state_dict``), never pickle."""

    batches: int = 0
    batches_since_sync: int = 0
    epoch: int = 0
    rounds: int = 0
    last_round: int = 0
    last_digest: str = ""
    training_finished: bool = False
    final_digest: str = ""


def _logits(output: Any) -> torch.Tensor:
    """A model's prediction tensor: the output itself, a Hugging Face ``ModelOutput``'s
    ``logits``, or the first element of a tuple/list output."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(
        f"the model returned {type(output).__name__}, not a tensor; validation needs logits "
        "(a tensor, an output with .logits, or a tuple whose first element is the prediction)"
    )


WAIT_LOG_S = 5.0  # a sync waiting longer than this (or twice the usual sync) says why
WAIT_LOG_USUAL = 2.0  # ... twice the time the last syncs took: a slow link's rounds are not news


def wait_log_after(setting: str | None, usual_s: float | None) -> float:
    """When a waiting sync starts to say what it waits for: ``SWARMNODE_WAIT_LOG_S`` if set
    (0: never), else WAIT_LOG_S or WAIT_LOG_USUAL times the usual sync, whichever is longer
    (on links where every round takes 20 s, a 25 s sync is not worth a log line)."""
    if setting:
        return float(setting)
    return max(WAIT_LOG_S, WAIT_LOG_USUAL * (usual_s or 0.0))


class _WaitReporter:
    """While a sync/finish call waits longer than :func:`wait_log_after` (5 s, or twice the
    usual sync), log every ``SWARMNODE_WAIT_LOG_EVERY_S`` (default 10) what the round waits for:
    the round, the stage, the sites it waits for (the node reads it from the chain)."""

    def __init__(self, client: LocalClient, method: str, usual_s: float | None = None) -> None:
        self.client, self.method = client, method
        self.after_s = wait_log_after(os.environ.get("SWARMNODE_WAIT_LOG_S"), usual_s)
        self.every_s = max(float(os.environ.get("SWARMNODE_WAIT_LOG_EVERY_S", "10") or 10), 0.2)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> _WaitReporter:
        if self.method in ("sync", "finish") and self.after_s > 0:
            self._t0 = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="swarm-wait-log", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _run(self) -> None:
        if self._done.wait(self.after_s):
            return
        while not self._done.is_set():
            waited = time.monotonic() - self._t0
            try:
                status, _ = self.client.call("status", {"waiting": True}, None, timeout=10.0)
            except SwarmError as exc:
                log.info("%s has waited %.0f s; the node service does not answer: %s",
                         self.method, waited, exc)
            else:
                if self._done.is_set():
                    return
                w = status.get("waiting") or {}
                line = w.get("line") or w.get("error") or w.get("stage") or "unknown"
                log.info("%s has waited %.0f s (node stage %s, round %s): %s", self.method,
                         waited, status.get("stage"), status.get("round"), line)
            if self._done.wait(self.every_s):
                return


class SwarmCallback:
    def __init__(
        self,
        model: torch.nn.Module,
        sync_frequency: int | None = None,
        min_peers: int | None = None,
        merge_method: str = "mean",
        *,
        node_weight: float = 1.0,
        num_samples: int | None = None,
        on_train_end_policy: str | None = None,
        val_data: Any = None,
        total_epochs: int | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric_fn: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
        merge_options: dict[str, float] | None = None,
        local_api: str | None = None,
        timeout: float | None = None,
        reconnect_s: float = 600.0,
        tensorboard_dir: str | os.PathLike[str] | None = None,
        mlflow_experiment: str | None = None,
        mlflow_tracking_uri: str | None = None,
        logger: logging.Logger | None = None,
        process_group: Any = None,
        talking_rank: int = 0,
        privacy_engine: Any = None,
        target_delta: float | None = None,
        **aliases: Any,
    ) -> None:
        given: dict[str, Any] = dict(
            sync_frequency=sync_frequency, min_peers=min_peers, merge_method=merge_method,
            node_weight=node_weight, on_train_end_policy=on_train_end_policy, val_data=val_data,
            total_epochs=total_epochs, loss_fn=loss_fn, metric_fn=metric_fn, loss_fn_args=None,
            metric_fn_args=None,
        )
        hpe_style = bool(aliases)
        adaptive = aliases.pop("useAdaptiveSync", False)
        if adaptive:
            warnings.warn("SwarmCallback: useAdaptiveSync is not implemented in swarmnode; the "
                          "swarm syncs every syncFrequency batches", stacklevel=2)
        for name, value in aliases.items():
            if name in _IGNORED_HPE:
                warnings.warn(f"SwarmCallback: HPE option {name!r} has no effect in swarmnode",
                              stacklevel=2)
            elif name in HPE_ALIASES:
                given[HPE_ALIASES[name]] = value
            else:
                raise ConfigError(
                    f"SwarmCallback got an unknown parameter {name!r}; known HPE names: "
                    f"{', '.join(sorted([*HPE_ALIASES, *_IGNORED_HPE, 'useAdaptiveSync']))}; "
                    "swarmnode's own: sync_frequency, min_peers, merge_method, node_weight, "
                    "num_samples, on_train_end_policy, val_data, total_epochs, loss_fn, "
                    "metric_fn, merge_options, local_api, timeout, reconnect_s, logger, "
                    "process_group, talking_rank, privacy_engine, target_delta, "
                    "tensorboard_dir, mlflow_experiment, mlflow_tracking_uri"
                )
        if given["on_train_end_policy"] is None:  # not given: HPE's default for HPE-style
            # callers, else the one the quality study found best (results/quality.md)
            given["on_train_end_policy"] = _HPE_DEFAULT_POLICY if hpe_style else DEFAULT_POLICY
        policy = given["on_train_end_policy"]
        if policy not in POLICIES:
            raise ConfigError(
                f"SwarmCallback: on_train_end_policy / checkinModelOnTrainEnd {policy!r} is not "
                f"one of {', '.join(POLICIES)} (HPE's default is {_HPE_DEFAULT_POLICY})"
            )
        self.loss_fn_name = given["loss_fn"] if isinstance(given["loss_fn"], str) else None
        given["loss_fn"] = resolve_loss(given["loss_fn"], given["loss_fn_args"])
        given["metric_fn"] = resolve_metric(given["metric_fn"], given["metric_fn_args"])
        if given["sync_frequency"] is None or int(given["sync_frequency"]) < 1:
            raise ConfigError("SwarmCallback needs sync_frequency >= 1 (batches between merges)")
        if given["min_peers"] is None or int(given["min_peers"]) < 1:
            raise ConfigError("SwarmCallback needs min_peers >= 1")
        if float(given["node_weight"]) < 0:
            raise ConfigError(f"node_weight must be >= 0, got {given['node_weight']}")
        self.privacy_engine, self.target_delta = _check_privacy(privacy_engine, target_delta)
        self.model = unwrap(model)
        self.sync_frequency = int(given["sync_frequency"])
        self.min_peers = int(given["min_peers"])
        self.merge_method = str(given["merge_method"])
        self.node_weight = float(given["node_weight"])
        self.policy = str(given["on_train_end_policy"])
        self._epoch_base: int | None = None  # 0 or 1, from the first epoch number passed
        self.val_data = given["val_data"]
        self.total_epochs = given["total_epochs"]
        self.loss_fn = given["loss_fn"]
        self.metric_fn = given["metric_fn"]
        self.merge_options = dict(merge_options or {})
        self.num_samples = num_samples
        self.timeout = timeout
        self.reconnect_s = reconnect_s
        # under torch.distributed: the site's ranks; None in a single process
        self.ranks = SiteRanks.detect(process_group, int(talking_rank))
        self._group = (process_group, int(talking_rank))
        self.client: LocalClient | None = None  # the talking rank's only
        # TensorBoard / MLflow (swarmnode.tracking): the talking rank's only, when the site asks
        self.trackers: list[Any] = []
        if self.is_talking_rank:
            target = local_api or os.environ.get("SWARMNODE_LOCAL_API")
            if not target:
                where = " on the talking rank" if self.ranks is not None else ""
                hint = ""
                if self.ranks is None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                    hint = ("; under torchrun, build SwarmCallback after "
                            "torch.distributed.init_process_group: then only rank 0 needs it")
                raise ConfigError(
                    f"SwarmCallback needs the node service's local API{where}: pass local_api= "
                    f"or set SWARMNODE_LOCAL_API (e.g. unix:///run/swarm/node.sock){hint}"
                )
            self.client = LocalClient(target)
            self.trackers = tracking.start(tensorboard_dir, mlflow_experiment,
                                           mlflow_tracking_uri)
        self.logger = logger or _hpe_logger()
        self.state = SwarmState()
        self.node_info: dict[str, Any] = {}
        self.last_reply: dict[str, Any] = {}  # the node's answer to the last sync (timings too)
        self._usual_sync_s: float | None = None  # how long syncs take here (the wait log)
        self._loaded = False  # whether the last hook loaded a model from the node

    # -- settings ---------------------------------------------------------------------------------
    def training_spec(self) -> TrainingSpec:
        """The swarm settings this trainer runs with (compared with the swarm's by the node)."""
        return TrainingSpec.from_state(
            self._state_cpu(), sync_frequency=self.sync_frequency, min_peers=self.min_peers,
            merge_method=self.merge_method, merge_options=self.merge_options,
        )

    @property
    def weight(self) -> int:
        """This site's merge weight: ``num_samples x node_weight``; without ``num_samples``
        (HPE has none) the node weight alone, so every site weighs the same by default."""
        if self.num_samples is None:
            return int(round(self.node_weight))
        return int(round(self.num_samples * self.node_weight))

    @property
    def is_talking_rank(self) -> bool:
        """True in a single process, and on the one rank of a distributed site that talks to
        the node."""
        return self.ranks is None or self.ranks.is_talker

    @property
    def should_stop(self) -> bool:
        """True once the swarm's training is over: stop the training loop."""
        return self.state.training_finished

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_begin(self) -> None:
        """Called when training starts: joins the swarm and starts from the swarm's weights."""
        if self.ranks is None and SiteRanks.detect(*self._group) is not None:
            raise ConfigError(
                "SwarmCallback was built before torch.distributed.init_process_group and is "
                "started after it: build it after init_process_group, on every rank")
        if self.ranks is not None:
            self.ranks.agree(*self._settings())
        self._as_site("on_train_begin", self._begin)

    def _begin(self) -> None:
        client = self._client()
        client.wait_ready(timeout=self.timeout or 120.0)
        reply, payload = self._call(
            "hello", {"spec": self.training_spec().to_json()}, None, self.timeout or 600.0
        )
        self.node_info = reply
        settings = {"sync_frequency": self.sync_frequency, "min_peers": self.min_peers,
                    "merge_method": self.merge_method, "node_weight": self.node_weight,
                    "on_train_end_policy": self.policy, "num_samples": self.num_samples,
                    "target_delta": self.target_delta}
        for tracker in self.trackers:
            tracker.joined(reply, settings)
        if reply.get("training_finished"):
            self.state.training_finished = True
        if payload is not None:  # a late joiner or a restart: the latest merged model
            self._load(payload)
            self.state.last_round = int(reply.get("latest_round", 0))
            self.state.last_digest = str(reply.get("digest", ""))
            log.info("joined at round %s from the latest merged model", self.state.last_round)
        elif not self.state.training_finished:
            self._sync()  # first sync: every node starts from the same weights

    def on_batch_end(self, batch: int | None = None, logs: Any = None) -> None:
        """Called after each training batch: merges every ``sync_frequency`` batches. ``batch``
        and ``logs`` (HPE's and Keras' signature) are accepted and not needed."""
        if not self.is_talking_rank:  # the talking rank decides, and says so
            self._follow("on_batch_end")
            return
        self._count_batch()
        if self.state.batches_since_sync >= self.sync_frequency and not self.should_stop:
            self._as_site("on_batch_end", self._sync)
        elif self.ranks is not None:
            self.ranks.tick("on_batch_end")

    def _count_batch(self) -> None:
        self.state.batches += 1
        self.state.batches_since_sync += 1

    def on_epoch_end(self, epoch: int | None = None, logs: Any = None) -> None:
        """Called at the end of each epoch (``epoch`` as the script counts it, from 0 or 1: the
        first number passed tells which: Keras, Lightning and the HF adapter count from 0, HPE's
        PyTorch examples from 1)."""
        if epoch is None:
            self.state.epoch += 1
        else:
            if self._epoch_base is None:
                self._epoch_base = 0 if epoch == 0 else 1
            self.state.epoch = epoch + 1 - self._epoch_base
        done = self.state.epoch
        total = f"/{self.total_epochs}" if self.total_epochs else ""
        if self.is_talking_rank:
            self.logger.info("epoch %d%s done, %d merges so far (round %d)", done, total,
                             self.state.rounds, self.state.last_round)

    def on_train_end(self) -> None:
        """Called when local training ends: a last sync, then the end-of-training policy until the
        swarm's final round; loads the final model every node ends with."""
        self._as_site("on_train_end", self._finish)

    def _finish(self) -> None:
        if self.state.batches_since_sync > 0 and not self.should_stop:
            self._sync()
        reply, payload = self._call(
            "finish", {"policy": self.policy, "weight": self.weight}, self._payload(), self.timeout
        )
        if payload is not None:
            self._load(payload)
        self.state.training_finished = True
        self.state.final_digest = str(reply.get("digest", ""))
        self.state.last_round = int(reply.get("round", self.state.last_round))
        for tracker in self.trackers:
            tracker.finished(self.state.last_round, self.state.final_digest)
        self._report_final()

    def _report_final(self) -> None:
        """The final model's validation loss and metric, to the node, which records them on
        chain for the final round (the report's last point). Never fails the training."""
        loss, metric = self._validate()
        if loss is None and metric is None:
            return
        try:
            self._call("final_metrics", {"loss": loss, "metric": metric, **self._privacy()},
                       None, self.timeout or 120.0)
        except SwarmError as exc:
            log.warning("the final model's metrics were not recorded: %s", exc)
        else:
            self.logger.info("final model (round %d): loss %s, metric %s", self.state.last_round,
                             loss, metric)
            for tracker in self.trackers:
                tracker.final_metrics(self.state.last_round, loss, metric)

    # -- state (JSON, never pickle) ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = SwarmState(**json.loads(json.dumps(state)))

    # -- the site's ranks (torch.distributed) ----------------------------------------------------
    def _as_site(self, hook: str, work: Callable[[], None]) -> None:
        """Run ``work`` (the hook's node calls) here in a single process; under
        torch.distributed on the talking rank, then hand every other rank its outcome: the
        state counters and decisions, and the model if the node gave one."""
        if self.ranks is None:
            work()
        elif not self.ranks.is_talker:
            self._follow(hook)
        else:
            self._loaded = False
            self.ranks.lead(hook, work)
            header = {"state": asdict(self.state), "node_info": self.node_info,
                      "last_reply": self.last_reply}
            self.ranks.publish(hook, header, self.model if self._loaded else None)

    def _follow(self, hook: str) -> None:
        assert self.ranks is not None
        header = self.ranks.follow(hook, self.model)
        if header is None:  # the talking rank counted a batch and did not sync
            self._count_batch()
            return
        self.state = SwarmState(**header["state"])
        self.node_info = dict(header.get("node_info") or {})
        self.last_reply = dict(header.get("last_reply") or {})

    def _settings(self) -> tuple[dict[str, float], dict[str, str]]:
        """What every rank of a site must agree on, and what to do when they do not."""
        values = {"num_samples": -1.0 if self.num_samples is None else float(self.num_samples),
                  "node_weight": self.node_weight, "sync_frequency": self.sync_frequency,
                  "min_peers": self.min_peers, "on_train_end_policy": POLICIES.index(self.policy)}
        advice = {"num_samples": "num_samples is the site's whole training set (the site's "
                  "weight, sent by the talking rank alone), not a rank's shard: pass "
                  "len(dataset) of the whole dataset on every rank (-1: not given)",
                  "on_train_end_policy": "give every rank the same one (the values are indices "
                  f"into {POLICIES})"}
        return values, advice

    def _client(self) -> LocalClient:
        if self.client is None:
            raise SwarmError("only the talking rank talks to the node service")
        return self.client

    # -- internals --------------------------------------------------------------------------------
    def _state_cpu(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}

    def _payload(self) -> serde.Encoded:
        """The parameters laid out for the node, written straight from the tensors when sent."""
        return serde.Encoded(self._state_cpu())

    def _load(self, payload: serde.Buffer) -> None:
        """The merged model into the module's own parameters and buffers, in place, tensor by
        tensor, straight onto their device (a GPU model gets no second host copy; the reply's
        pages are dropped as they are copied)."""
        serde.load_into(payload, self.model.state_dict())
        self._loaded = True

    def _call(
        self, method: str, args: dict[str, Any], payload: serde.Encoded | None,
        timeout: float | None,
    ) -> tuple[dict[str, Any], serde.Buffer | None]:
        """One local API call; if the node service is down (restarting), wait for it and retry,
        for up to ``reconnect_s`` seconds, so a node restart does not end the training. A call
        that waits longer than :func:`wait_log_after` (5 s, or twice the usual sync) logs what
        the round waits for."""
        with _WaitReporter(self._client(), method, self._usual_sync_s):
            reply = self._call_once(method, args, payload, timeout)
        if method == "sync" and isinstance(reply[0].get("seconds"), (int, float)):
            seconds = float(reply[0]["seconds"])  # a running mean of the syncs' time
            usual = self._usual_sync_s
            self._usual_sync_s = seconds if usual is None else 0.7 * usual + 0.3 * seconds
        return reply

    def _call_once(
        self, method: str, args: dict[str, Any], payload: serde.Encoded | None,
        timeout: float | None,
    ) -> tuple[dict[str, Any], serde.Buffer | None]:
        client = self._client()
        try:
            return client.call(method, args, payload, timeout=timeout)
        except NodeUnavailable as exc:
            if self.reconnect_s <= 0:
                raise
            log.warning("%s; waiting up to %.0f s for it to come back", exc, self.reconnect_s)
        deadline = time.monotonic() + self.reconnect_s
        while True:
            # the channel may still look ready just after the node died: retry until it answers
            client.wait_ready(timeout=max(0.1, deadline - time.monotonic()))
            try:
                return client.call(method, args, payload, timeout=timeout)
            except NodeUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _sync(self) -> None:
        loss, metric = self._validate()
        args: dict[str, Any] = {"weight": self.weight}
        if loss is not None:
            args["loss"] = loss
        if metric is not None:
            args["metric"] = metric
        args.update(self._privacy())
        update = self._payload()
        reply, payload = self._call("sync", args, update, self.timeout)
        self.last_reply = reply
        if payload is not None:
            self._load(payload)
        self.state.rounds += 1
        self.state.batches_since_sync = 0
        self.state.last_round = int(reply.get("round", 0))
        self.state.last_digest = str(reply.get("digest", ""))
        self.state.training_finished = bool(reply.get("training_finished", False))
        if self.state.training_finished and reply.get("ended_early"):
            log.warning("the swarm's training is over for this site before its data is: %s",
                        reply["ended_early"])
        for tracker in self.trackers:
            tracker.merged(self.state.last_round, loss=loss, metric=metric,
                           digest=self.state.last_digest, seconds=reply.get("seconds"),
                           update_bytes=update.nbytes, epsilon=args.get("epsilon"))

    def epsilon(self) -> float | None:
        """The site's epsilon spent so far at ``target_delta`` (its Opacus accountant's), None
        without a privacy engine; ``inf`` when the engine adds no noise."""
        if self.privacy_engine is None:
            return None
        accountant = getattr(self.privacy_engine, "accountant", None)
        if accountant is not None and len(accountant) == 0:
            return 0.0  # no private step yet: nothing spent (not every accountant says so)
        return float(self.privacy_engine.get_epsilon(self.target_delta))

    def _privacy(self) -> dict[str, float]:
        """What a sync and the final metrics carry of the site's privacy: ``epsilon`` and
        ``delta``, or nothing when the site does not train with differential privacy. An
        accountant that fails is a report lost, not a training: it is logged (once) and the sync
        goes on without it."""
        try:
            epsilon = self.epsilon()
        except Exception as exc:  # the engine's own code: any error, never the training's end
            if not getattr(self, "_privacy_failed", False):
                self._privacy_failed = True
                log.warning("the privacy engine's accountant failed (%s: %s); epsilon is not "
                            "reported until it answers again", type(exc).__name__, exc)
            return {}
        if epsilon is None:
            return {}
        assert self.target_delta is not None
        if math.isinf(epsilon) and not getattr(self, "_privacy_inf_said", False):
            self._privacy_inf_said = True
            log.warning("epsilon is infinite at delta %g: the privacy engine adds no noise "
                        "(noise_multiplier 0?)", self.target_delta)
        return {"epsilon": epsilon, "delta": self.target_delta}

    def _validate(self) -> tuple[float | None, float | None]:
        """Loss and metric of the local model on the validation data (reported on chain)."""
        if self.val_data is None:
            return None, None
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        batches: Iterable[Any] = (
            [self.val_data] if isinstance(self.val_data, tuple) else self.val_data
        )
        outputs, targets = [], []
        with torch.no_grad():
            for x, y in batches:
                outputs.append(_logits(self.model(torch.as_tensor(x).to(device))).cpu())
                targets.append(torch.as_tensor(y).cpu())
        self.model.train(was_training)
        out, tgt = torch.cat(outputs), torch.cat(targets)
        loss = float(self.loss_fn(out, tgt)) if self.loss_fn else None
        metric = float(self.metric_fn(out, tgt)) if self.metric_fn else None
        if loss is not None or metric is not None:
            self.logger.debug("validation: loss %s, metric %s", loss, metric)
        return loss, metric


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state the swarm merges: ``model.module`` of a DistributedDataParallel or
    DataParallel wrapper (so the names have no ``module.`` prefix), the module an Opacus
    ``GradSampleModule`` wraps (no ``_module.`` prefix; the same parameter tensors, so loading
    into it loads into the wrapper, whose hooks stay on its submodules), else the model itself."""
    wrappers: tuple[type, ...] = (torch.nn.parallel.DistributedDataParallel,
                                  torch.nn.DataParallel)
    opacus_gsm = _opacus_grad_sample_module()
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif opacus_gsm is not None and isinstance(model, opacus_gsm):
            model = model._module
        else:
            return model


def _opacus_grad_sample_module() -> type | None:
    """Opacus' wrapper class when the script imported Opacus (never imported here: the training
    side does not need it)."""
    module = sys.modules.get("opacus.grad_sample.gsm_base")
    return getattr(module, "AbstractGradSampleModule", None) if module is not None else None


def _check_privacy(engine: Any, delta: Any) -> tuple[Any, float | None]:
    """The privacy engine and delta a DP site passed, checked: both or neither."""
    if engine is None and delta is None:
        return None, None
    if engine is None:
        raise ConfigError("SwarmCallback got target_delta without privacy_engine: pass the Opacus "
                          "PrivacyEngine whose epsilon the site reports, or drop target_delta")
    if not callable(getattr(engine, "get_epsilon", None)):
        raise ConfigError(f"SwarmCallback: privacy_engine is a {type(engine).__name__}, which has "
                          "no get_epsilon(delta); pass Opacus' PrivacyEngine")
    if delta is None:
        raise ConfigError("SwarmCallback got privacy_engine without target_delta: pass the delta "
                          "the site's epsilon is reported at (e.g. target_delta=1e-5, below "
                          "1 / the site's number of samples)")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"SwarmCallback: target_delta must be a number in (0, 1), got "
                          f"{delta!r} (e.g. 1e-5)")
    return engine, float(delta)


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints the callback's lines to stderr while the application has configured no logging
    (the root logger has no handler); once it has, the root's handlers print them: never twice,
    whether the script configures logging before or after it builds the callback."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _hpe_logger() -> logging.Logger:
    """``swarmCallback.logger``: the swarm's progress (epochs, merges, what a long sync waits
    for) reaches the trainer's log even when the script configures no logging (HPE's do not):
    at INFO, to stderr, unless the script set the level or configured logging itself."""
    if not any(isinstance(h, _UntilConfigured) for h in log.handlers):
        handler = _UntilConfigured()
        handler.setFormatter(logging.Formatter("%(asctime)s swarm %(levelname)s %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET and not logging.getLogger().handlers:
        log.setLevel(logging.INFO)
    return log


def resolve_loss(loss: Any, args: dict[str, Any] | None) -> Callable[..., Any] | None:
    """A loss given by name (HPE: a ``torch.nn`` class name such as "CrossEntropyLoss", with its
    keyword arguments), built now so a wrong name fails here, not at the first sync."""
    if not isinstance(loss, str):
        if args:
            raise ConfigError("lossFunctionArgs are given but lossFunction is not a class name; "
                              "pass the arguments to your own loss function instead")
        return loss
    cls = getattr(torch.nn, loss, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.modules.loss._Loss)):
        known = sorted(n for n in dir(torch.nn) if n.endswith("Loss"))
        raise ConfigError(f"lossFunction {loss!r} is not a torch.nn loss class; use one of "
                          f"{', '.join(known)}, or pass a callable as loss_fn")
    try:
        return cls(**(args or {}))
    except TypeError as exc:
        raise ConfigError(f"lossFunctionArgs {args!r} do not fit torch.nn.{loss}: {exc}") from None


def resolve_metric(metric: Any, args: dict[str, Any] | None) -> Callable[..., Any] | None:
    """A metric given by name (HPE: a ``torchmetrics`` class name such as "F1Score", with its
    keyword arguments): the torchmetrics class when it is installed, else swarmnode's own for
    the common names (Accuracy, F1Score, MeanSquaredError, MeanAbsoluteError)."""
    if not isinstance(metric, str):
        if args:
            raise ConfigError("metricFunctionArgs are given but metricFunction is not a class "
                              "name; pass the arguments to your own metric function instead")
        return metric
    try:
        import torchmetrics  # type: ignore[import-not-found]
    except ImportError:
        torchmetrics = None
    if torchmetrics is not None and isinstance(getattr(torchmetrics, metric, None), type):
        try:
            built = getattr(torchmetrics, metric)(**(args or {}))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metricFunctionArgs {args!r} do not fit torchmetrics.{metric}: "
                              f"{exc}") from None
        return lambda out, tgt: float(built(out, tgt))
    if torchmetrics is not None and metric not in _BUILTIN_METRICS:
        raise ConfigError(f"metricFunction {metric!r} is not a torchmetrics class; use one of its "
                          "metric classes (e.g. Accuracy, F1Score, AUROC), or pass a callable as "
                          "metric_fn")
    return _builtin_metric(metric, dict(args or {}))


_BUILTIN_METRICS = ("Accuracy", "F1Score", "MeanSquaredError", "MeanAbsoluteError")


def _builtin_metric(name: str, args: dict[str, Any]) -> Callable[..., float]:
    if name not in _BUILTIN_METRICS:
        raise ConfigError(
            f"metricFunction {name!r}: torchmetrics is not installed and swarmnode has no "
            f"built-in {name}; install torchmetrics, use one of {', '.join(_BUILTIN_METRICS)}, "
            "or pass a callable as metric_fn"
        )
    task = str(args.pop("task", "multiclass" if name in ("Accuracy", "F1Score") else ""))
    args.pop("num_classes", None)
    average = str(args.pop("average", "micro" if task != "binary" else "binary"))
    threshold = float(args.pop("threshold", 0.5))
    if args:
        raise ConfigError(f"metricFunctionArgs {sorted(args)} are not supported by swarmnode's "
                          f"built-in {name}; install torchmetrics to use them")
    if task not in ("binary", "multiclass", ""):
        raise ConfigError(f"metricFunctionArgs task={task!r}: the built-in {name} knows "
                          "'binary' and 'multiclass'; install torchmetrics for others")

    def labels(out: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if task == "binary" or out.dim() == 1 or out.shape[-1] == 1:
            p = out.reshape(-1).float()
            if p.min() < 0 or p.max() > 1:  # logits, as torchmetrics treats them
                p = torch.sigmoid(p)
            return (p >= threshold).long(), tgt.reshape(-1).long()
        return out.argmax(dim=-1), tgt.reshape(-1).long()

    def metric(out: torch.Tensor, tgt: torch.Tensor) -> float:
        if name == "MeanSquaredError":
            return float(((out.reshape(tgt.shape).float() - tgt.float()) ** 2).mean())
        if name == "MeanAbsoluteError":
            return float((out.reshape(tgt.shape).float() - tgt.float()).abs().mean())
        pred, true = labels(out, tgt)
        if name == "Accuracy" or (name == "F1Score" and average == "micro"):
            return float((pred == true).float().mean())  # micro F1 = accuracy (single label)
        classes = [1] if task == "binary" else sorted(set(true.tolist()) | set(pred.tolist()))
        scores = []
        for c in classes:
            tp = float(((pred == c) & (true == c)).sum())
            fp = float(((pred == c) & (true != c)).sum())
            fn = float(((pred != c) & (true == c)).sum())
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return sum(scores) / len(scores)

    return metric
