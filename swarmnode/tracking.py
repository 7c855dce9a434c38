"""Experiment tracking: the callback's per-round swarm metrics in TensorBoard (here) and in
MLflow (:mod:`swarmnode.tracking_mlflow`); :func:`start` builds the ones a site asks for.

A site asks for it with ``SwarmCallback(..., tensorboard_dir="runs/site-a")`` or, without
editing the script (a container site's ``.env``), with the environment variable
``SWARMNODE_TENSORBOARD_DIR``; the argument wins over the variable. It needs the ``tracking``
extra (``pip install 'swarmnode[tracking]'``: ``tensorboard``, for
``torch.utils.tensorboard``); without it the callback refuses to start, naming that command.

What is logged, at step = the swarm round (the chain's round number, so it keeps rising across a
trainer's restart; a restarted trainer adds an event file beside the old one):

- at each merge (``sync``): ``swarm/loss`` and ``swarm/metric`` (the local model's validation
  loss and metric the site reported for that round, the values the chain records), the round
  (``swarm/round``), the seconds the sync took (``swarm/sync_seconds``), the bytes of the update
  the site handed its node (``swarm/update_bytes``), and the merged model's digest as text
  (``swarm/digest``), and at a DP site the epsilon spent so far (``swarm/epsilon``);
- at the end: ``swarm/final_round``, the final model's digest (``swarm/final_digest``) and, when
  the callback validates, the final model's ``swarm/final_loss`` / ``swarm/final_metric``.

Each round's events are on disk when the sync returns, so TensorBoard shows them while training
runs. Tracking
never stops training: a failure after start (disk full, a removed directory) logs one warning and
turns tracking off for the rest of the run. A directory that cannot be created at start is a
:class:`~swarmnode.errors.ConfigError` naming it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from swarmnode.errors import ConfigError

__all__ = ["ENV_TENSORBOARD_DIR", "EXTRA", "Tracker", "TrackingUnavailable", "start"]

log = logging.getLogger("swarmnode.callback")

ENV_TENSORBOARD_DIR = "SWARMNODE_TENSORBOARD_DIR"
EXTRA = "pip install 'swarmnode[tracking]'"


class TrackingUnavailable(ConfigError, ImportError):
    """The package a tracking backend needs is not installed."""

    help = f"experiment tracking needs swarmnode's tracking extra: {EXTRA}"


class Tracker:
    """One site's TensorBoard event file (the talking rank's). Every method swallows a failure to
    write: the first one is logged as a warning, then tracking is off.

    The summaries are torch.utils.tensorboard's (``summary.scalar``/``summary.text``, what its
    ``SummaryWriter`` writes); the records are appended here, in the calling thread, reopening the
    file by name for each round: unlike ``SummaryWriter``'s writer thread, a failed write raises
    where it is caught (no thread traceback in the trainer's log), and each round is on disk when
    the sync returns."""

    def __init__(self, tensorboard_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(tensorboard_dir).expanduser()
        try:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
            from torch.utils.tensorboard import summary
        except ImportError as exc:
            raise TrackingUnavailable(
                f"TensorBoard logging (tensorboard_dir / {ENV_TENSORBOARD_DIR}) needs the "
                f"tensorboard package, which is not installed ({exc}); run `{EXTRA}` in the "
                f"training environment, or unset {ENV_TENSORBOARD_DIR}"
            ) from None
        self._event, self._records, self._summary = event_pb2.Event, RecordWriter, summary
        # TensorBoard's own file name: events.out.tfevents.<time>.<host>.<pid>.<n>
        self.path = self.directory / (f"events.out.tfevents.{int(time.time()):010d}."
                                      f"{socket.gethostname()}.{os.getpid()}.{next(_files)}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._append([self._event(wall_time=time.time(), file_version="brain.Event:2")])
        except OSError as exc:
            raise ConfigError(
                f"TensorBoard directory {str(self.directory)!r} cannot be written ({exc}); give "
                f"tensorboard_dir / {ENV_TENSORBOARD_DIR} a directory this trainer can create "
                "and write"
            ) from None
        self.failed = False

    @classmethod
    def from_settings(cls, tensorboard_dir: str | os.PathLike[str] | None) -> Tracker | None:
        """A tracker for the argument, else for ``SWARMNODE_TENSORBOARD_DIR``; None when
        neither asks for one."""
        where = tensorboard_dir or os.environ.get(ENV_TENSORBOARD_DIR, "").strip()
        return cls(where) if where else None

    def joined(self, info: dict[str, Any], settings: dict[str, Any]) -> None:
        """The node's hello and the site's settings: nothing for TensorBoard (the directory
        names the run)."""

    def merged(self, round: int, *, loss: float | None, metric: float | None, digest: str,
               seconds: float | None, update_bytes: int | None,
               epsilon: float | None = None) -> None:
        """One sync's outcome: what the site reported for ``round`` and what the round merged."""
        scalars = {"swarm/round": round, "swarm/loss": loss, "swarm/metric": metric,
                   "swarm/sync_seconds": seconds, "swarm/update_bytes": update_bytes,
                   "swarm/epsilon": epsilon if epsilon is None or math.isfinite(epsilon)
                   else None}
        self._write(round, scalars, {"swarm/digest": digest})

    def finished(self, round: int, digest: str) -> None:
        """The swarm's final round and the final model's digest."""
        self._write(round, {"swarm/final_round": round}, {"swarm/final_digest": digest})

    def final_metrics(self, round: int, loss: float | None, metric: float | None) -> None:
        """The final model's validation loss and metric (what the node records on chain)."""
        self._write(round, {"swarm/final_loss": loss, "swarm/final_metric": metric}, {})

    def _write(self, step: int, scalars: dict[str, float | int | None],
               texts: dict[str, str]) -> None:
        if self.failed:
            return
        now = time.time()
        try:
            summaries = [self._summary.scalar(tag, float(value))
                         for tag, value in scalars.items() if value is not None]
            summaries += [self._summary.text(tag, text) for tag, text in texts.items() if text]
            self._append([self._event(wall_time=now, step=step, summary=s) for s in summaries])
        except Exception as exc:  # noqa: BLE001 - tracking never stops training
            self.failed = True
            log.warning("TensorBoard logging to %s failed (%s: %s); training goes on without "
                        "it", self.directory, type(exc).__name__, exc)

    def _append(self, events: list[Any]) -> None:
        with open(self.path, "ab") as f:
            records = self._records(f)
            for event in events:
                records.write(event.SerializeToString())


_files = itertools.count()


def start(tensorboard_dir: str | os.PathLike[str] | None = None,
          mlflow_experiment: str | None = None,
          mlflow_tracking_uri: str | None = None) -> list[Any]:
    """The trackers a site asks for (arguments, else ``SWARMNODE_TENSORBOARD_DIR`` /
    ``SWARMNODE_MLFLOW_EXPERIMENT``), each with the methods ``joined``, ``merged``, ``finished``
    and ``final_metrics``, each swallowing its own failures; empty when none is asked for."""
    from swarmnode.tracking_mlflow import MLflowTracker

    trackers: list[Any] = [Tracker.from_settings(tensorboard_dir),
                           MLflowTracker.from_settings(mlflow_experiment, mlflow_tracking_uri)]
    return [t for t in trackers if t is not None]
