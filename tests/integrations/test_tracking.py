"""Experiment tracking (swarmnode.tracking): the callback's per-round metrics in TensorBoard.

The swarm test trains two sites (the demo's loop and model with real SwarmCallbacks, in two
threads of the test process) against real node service processes and a real anvil chain, site 0
with tracking switched on by the environment variable a container site sets in its ``.env``, site
1 by the callback's argument; site 0's event file is read back with TensorBoard's own
EventAccumulator and compared with what the chain recorded. Site 1's event file turns into
``/dev/full`` (every write fails with ENOSPC, as on a full disk) after its first sync: it must
finish all the same, with one warning.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swarmnode.callback import SwarmCallback
from swarmnode.chain.report import collect
from swarmnode.demo import model as demo_model
from swarmnode.demo.data import load_shard
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.errors import ConfigError
from swarmnode.tracking import ENV_TENSORBOARD_DIR, Tracker

FAILED = "TensorBoard logging to"  # the one warning a failed writer logs


def _events(directory: Path) -> EventAccumulator:
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode())
            for e in acc.Tensors(f"{tag}/text_summary")]


def _fill_disk(directory: Path) -> None:
    """Every event file in ``directory`` now writes to /dev/full (ENOSPC on every write)."""
    files = list(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for f in files:
        f.unlink()
        f.symlink_to("/dev/full")


def _train(swarm: LocalSwarm, i: int, board: Path | None, after_first_sync: Any,
           out: dict[int, Any]) -> None:
    """Site ``i``'s trainer (the demo's loop, one epoch) in a thread of the test process;
    ``board``: its tensorboard_dir argument (None: from SWARMNODE_TENSORBOARD_DIR)."""
    try:
        X, y = load_shard(swarm.work / f"{swarm.names[i]}.npz")
        task = swarm.task
        model = task.make_model(X.shape[1], swarm.seed)
        optimizer = task.make_optimizer(model)
        cb = SwarmCallback(
            model, sync_frequency=swarm.sync_frequency, min_peers=2, num_samples=len(y),
            local_api=swarm.socket(i), timeout=120, tensorboard_dir=board,
            val_data=(torch.as_tensor(X, dtype=torch.float32),
                      torch.as_tensor(y, dtype=torch.float32)),
            loss_fn=task.loss_fn, metric_fn=task.accuracy_fn)
        cb.on_train_begin()
        after_first_sync(cb)
        task.train_epoch(model, demo_model.make_loader(X, y, task.batch_size, swarm.seed),
                         optimizer, on_batch_end=cb.on_batch_end,
                         should_stop=lambda: cb.should_stop)
        cb.on_epoch_end(0)
        cb.on_train_end()
        out[i] = cb
    except BaseException as exc:  # the test thread reports it
        out[i] = exc


@pytest.mark.slow
@pytest.mark.anvil
def test_two_sites_log_each_round_as_the_chain_records_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    boards = [tmp_path / "tb-0", tmp_path / "tb-1"]
    monkeypatch.setenv(ENV_TENSORBOARD_DIR, str(boards[0]))  # site 0: as a site's .env sets it
    out: dict[int, Any] = {}
    with LocalSwarm(tmp_path / "swarm", 2, min_peers=2, sync_frequency=4) as swarm, \
            caplog.at_level(logging.WARNING, logger="swarmnode.callback"):
        swarm.start_node(0)
        swarm.start_node(1)
        swarm.wait_enrolled([0, 1])
        # site 1 (its own tensorboard_dir): its disk fills up after its first sync
        fill = [lambda cb: None, lambda cb: _fill_disk(boards[1])]
        threads = [threading.Thread(target=_train, args=(swarm, i, [None, boards[1]][i],
                                                         fill[i], out), daemon=True)
                   for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a trainer did not finish in 120 s"
        errors = [v for v in out.values() if isinstance(v, BaseException)]
        assert not errors, errors
        rows = [r for r in collect(swarm.contract) if r.address == swarm.accounts[0].address]
        finished = swarm.contract.events(names={"TrainingFinished"})[-1].args
        final_round, final_digest = int(finished["round"]), bytes(finished["digest"]).hex()
    site0, site1 = out[0], out[1]

    acc = _events(boards[0])
    loss = {e.step: e.value for e in acc.Scalars("swarm/loss")}
    steps = [e.step for e in acc.Scalars("swarm/loss")]
    # step = the swarm round: one point per sync, rising, the round as its own scalar too
    assert len(steps) == site0.state.rounds >= 3
    assert steps == sorted(set(steps))
    assert [e.value for e in acc.Scalars("swarm/round")] == steps
    # every loss the chain holds for site 0 is the one logged for that round (the final round's
    # may be the final model's, reported after the training finished)
    final_loss = {e.step: e.value for e in acc.Scalars("swarm/final_loss")}
    assert len(rows) >= 2
    for row in rows:
        logged = final_loss.get(row.round) if row.round == final_round else None
        if logged is None or abs(logged - row.loss) > 2e-6:
            logged = loss[row.round]
        assert abs(logged - row.loss) <= 2e-6, (row, loss)
    # each merge's digest, the final round and the final digest (the chain's)
    digests = dict(_text(acc, "swarm/digest"))
    assert len(digests) >= 2 and all(len(d) == 64 for d in digests.values())
    if site0.state.last_digest:  # empty when its last round was abandoned
        assert digests[steps[-1]] == site0.state.last_digest
    assert [e.value for e in acc.Scalars("swarm/final_round")] == [final_round]
    assert _text(acc, "swarm/final_digest") == [(final_round, final_digest)]
    assert site0.state.final_digest == site1.state.final_digest == final_digest
    assert all(e.value > 0 for e in acc.Scalars("swarm/update_bytes"))
    # site 1: a full disk cost it its TensorBoard log after the first round, not its training
    warned = [r.getMessage() for r in caplog.records if FAILED in r.getMessage()]
    assert len(warned) == 1 and str(boards[1]) in warned[0], warned
    assert "No space left on device" in warned[0]
    assert site1.tracker.failed and not site0.tracker.failed
    assert site1.state.rounds >= 3


def test_a_full_disk_warns_once_and_stops_tracking(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker(tmp_path / "tb")
    tracker.merged(1, loss=0.5, metric=0.9, digest="ab" * 32, seconds=1.0, update_bytes=10)
    _fill_disk(tmp_path / "tb")
    with caplog.at_level(logging.WARNING, logger="swarmnode.callback"):
        tracker.merged(2, loss=0.4, metric=0.9, digest="cd" * 32, seconds=1.0, update_bytes=10)
        tracker.finished(2, "cd" * 32)
    warned = [r.getMessage() for r in caplog.records if FAILED in r.getMessage()]
    assert len(warned) == 1 and "No space left on device" in warned[0], warned
    assert tracker.failed


def test_an_unwritable_directory_is_refused_at_construction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(ENV_TENSORBOARD_DIR, str(blocker / "tb"))
    with pytest.raises(ConfigError, match=f"a-file/tb.*cannot be written.*{ENV_TENSORBOARD_DIR}"):
        SwarmCallback(torch.nn.Linear(2, 1), sync_frequency=1, min_peers=1,
                      local_api=f"unix://{tmp_path / 'node.sock'}")
    monkeypatch.delenv(ENV_TENSORBOARD_DIR)  # neither argument nor variable: no tracking
    cb = SwarmCallback(torch.nn.Linear(2, 1), sync_frequency=1, min_peers=1,
                       local_api=f"unix://{tmp_path / 'node.sock'}")
    assert cb.tracker is None and not list(tmp_path.glob("**/events.out.tfevents.*"))


MISSING = """
import sys
sys.modules["tensorboard"] = None  # not installed, as in a site's environment without the extra
import torch
from swarmnode.callback import SwarmCallback
from swarmnode.errors import ConfigError
try:
    SwarmCallback(torch.nn.Linear(2, 1), sync_frequency=1, min_peers=1, local_api="unix:///x")
except ConfigError as exc:
    print(type(exc).__name__, exc)
"""


def test_a_missing_tensorboard_names_the_extra_to_install(tmp_path: Path) -> None:
    env = dict(os.environ, **{ENV_TENSORBOARD_DIR: str(tmp_path / "tb")})
    done = subprocess.run([sys.executable, "-c", MISSING], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("TrackingUnavailable"), done.stdout + done.stderr
    assert "pip install 'swarmnode[tracking]'" in done.stdout
    assert ENV_TENSORBOARD_DIR in done.stdout
    assert not (tmp_path / "tb").exists()
