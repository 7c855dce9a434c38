"""Experiment tracking (swarmnode.tracking): the callback's per-round metrics in TensorBoard and
in MLflow.

The swarm test trains two sites (the demo's loop and model with real SwarmCallbacks, in two
threads of the test process) against real node service processes and a real anvil chain, site 0
with tracking switched on by the environment variable a container site sets in its ``.env``, site
1 by the callback's argument; site 0's event file is read back with TensorBoard's own
EventAccumulator and compared with what the chain recorded. Site 1's event file turns into
``/dev/full`` (every write fails with ENOSPC, as on a full disk) after its first sync: it must
finish all the same, with one warning.

MLflow: site 0 logs to a tracking server by the variables a container site sets in its ``.env``
(``SWARMNODE_MLFLOW_EXPERIMENT``, ``MLFLOW_TRACKING_URI``), read back over MLflow's REST API and
compared with the chain; site 1's ``mlflow_tracking_uri`` argument names a port where nothing
listens: it must finish all the same, its tracking off after a warning. The server is
tests/integrations/mlflow_support.py's REST server (always), and a real ``mlflow server`` where
the ``mlflow`` package is installed (not in CI: ~860 MB).
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
from mlflow_support import RestServer, mlflow_executable, read_run, real_server
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from swarmnode.callback import SwarmCallback
from swarmnode.chain.report import collect
from swarmnode.demo import model as demo_model
from swarmnode.demo.data import load_shard
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.errors import ConfigError
from swarmnode.tracking import ENV_TENSORBOARD_DIR, Tracker
from swarmnode.tracking_mlflow import ENV_MLFLOW_EXPERIMENT, ENV_MLFLOW_URI, TRIES, MLflowTracker

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
           out: dict[int, Any], mlflow_uri: str | None = None) -> None:
    """Site ``i``'s trainer (the demo's loop, one epoch) in a thread of the test process;
    ``board``: its tensorboard_dir argument (None: from SWARMNODE_TENSORBOARD_DIR);
    ``mlflow_uri``: its mlflow_tracking_uri argument (None: from MLFLOW_TRACKING_URI)."""
    try:
        X, y = load_shard(swarm.work / f"{swarm.names[i]}.npz")
        task = swarm.task
        model = task.make_model(X.shape[1], swarm.seed)
        optimizer = task.make_optimizer(model)
        cb = SwarmCallback(
            model, sync_frequency=swarm.sync_frequency, min_peers=2, num_samples=len(y),
            local_api=swarm.socket(i), timeout=120, tensorboard_dir=board,
            mlflow_tracking_uri=mlflow_uri,
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


def _nobody_listens() -> str:
    """A URL on a port where nothing listens (connection refused)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(params=["rest", "mlflow"])
def mlflow_server(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """An MLflow tracking server's URI: the test's REST server, or a real ``mlflow server``."""
    if request.param == "rest":
        with RestServer() as server:
            yield server.uri
        return
    if not mlflow_executable():
        pytest.skip("no mlflow installed (SWARMNODE_TEST_MLFLOW or mlflow on PATH)")
    with real_server(tmp_path / "mlflow") as uri:
        yield uri


@pytest.mark.slow
@pytest.mark.anvil
def test_two_sites_log_each_round_as_the_chain_records_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, mlflow_server: str) -> None:
    boards = [tmp_path / "tb-0", tmp_path / "tb-1"]
    monkeypatch.setenv(ENV_TENSORBOARD_DIR, str(boards[0]))  # site 0: as a site's .env sets it
    monkeypatch.setenv(ENV_MLFLOW_EXPERIMENT, "swarm-test")  # both sites: MLflow on
    monkeypatch.setenv(ENV_MLFLOW_URI, mlflow_server)  # site 1's argument names a dead port
    out: dict[int, Any] = {}
    with LocalSwarm(tmp_path / "swarm", 2, min_peers=2, sync_frequency=4) as swarm, \
            caplog.at_level(logging.WARNING, logger="swarmnode.callback"):
        swarm.start_node(0)
        swarm.start_node(1)
        swarm.wait_enrolled([0, 1])
        # site 1 (its own tensorboard_dir): its disk fills up after its first sync
        fill = [lambda cb: None, lambda cb: _fill_disk(boards[1])]
        uris = [None, _nobody_listens()]
        threads = [threading.Thread(target=_train, args=(swarm, i, [None, boards[1]][i],
                                                         fill[i], out, uris[i]), daemon=True)
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
    assert site1.trackers[0].failed and not site0.trackers[0].failed
    assert site1.state.rounds >= 3

    # MLflow: site 0's run holds what the chain holds, per round (step = round)
    tracker = site0.trackers[1]
    assert isinstance(tracker, MLflowTracker) and not tracker.failed and tracker.run_id
    run = read_run(mlflow_server, tracker.run_id)
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == swarm.names[0]
    assert run["tags"]["swarmnode.site"] == swarm.names[0]
    assert run["tags"]["swarmnode.address"].lower() == swarm.accounts[0].address.lower()
    assert run["params"]["sync_frequency"] == "4" and run["params"]["min_peers"] == "2"
    mloss = dict(run["metrics"]["swarm/loss"])
    assert sorted(mloss) == steps and [s for s, _ in run["metrics"]["swarm/round"]] == steps
    mfinal = dict(run["metrics"].get("swarm/final_loss", []))
    for row in rows:
        logged = mfinal.get(row.round) if row.round == final_round else None
        if logged is None or abs(logged - row.loss) > 2e-6:
            logged = mloss[row.round]
        assert abs(logged - row.loss) <= 2e-6, (row, mloss)
    assert run["metrics"]["swarm/final_round"] == [(final_round, float(final_round))]
    assert run["tags"]["swarm.final_digest"] == final_digest
    if site0.state.last_digest:
        assert run["tags"]["swarm.digest"] == site0.state.last_digest
    assert "swarm/epsilon" not in run["metrics"]  # not a DP site
    # site 1: nothing listened; its tracking is off after a warning, its training done
    dead = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(dead) == 1 and uris[1] in dead[0] and ENV_MLFLOW_URI in dead[0], dead
    assert site1.trackers[1].failed and site1.trackers[1].run_id is None


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
    assert cb.trackers == [] and not list(tmp_path.glob("**/events.out.tfevents.*"))


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


# -- MLflow, fast: one tracker against the test's REST server ------------------------------------
def _round(tracker: MLflowTracker, r: int, *, epsilon: float | None = None) -> None:
    tracker.merged(r, loss=1.0 / r, metric=0.5, digest=f"{r:064x}", seconds=0.1,
                   update_bytes=10, epsilon=epsilon)


def test_mlflow_logs_each_round_with_mlflows_credentials(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
    with RestServer() as server:
        a = MLflowTracker("exp", server.uri)
        a.joined({"name": "north", "address": "0x01"}, {"min_peers": 2, "target_delta": 1e-5})
        _round(a, 1, epsilon=float("inf"))  # no noise: not a number MLflow can hold
        _round(a, 2, epsilon=0.75)
        a.finished(2, f"{2:064x}")
        a.final_metrics(2, 0.4, 0.9)
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "site")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
        b = MLflowTracker("exp", server.uri)  # a second site: the same experiment
        _round(b, 1)
        auths = [h.get("Authorization") for _, _, h, _ in server.requests]
        run = read_run(server.uri, a.run_id or "")
    assert auths[0] == "Bearer s3cret" and auths[-1] == "Basic c2l0ZTpwdw=="  # site:pw
    assert list(server.experiments) == ["exp"] and len(server.runs) == 2
    assert run["metrics"]["swarm/loss"] == [(1, 1.0), (2, 0.5)]
    assert run["metrics"]["swarm/epsilon"] == [(2, 0.75)]
    assert run["metrics"]["swarm/final_loss"] == [(2, 0.4)]
    assert run["params"] == {"min_peers": "2", "target_delta": "1e-05"}
    assert run["tags"]["swarm.digest"] == f"{2:064x}" == run["tags"]["swarm.final_digest"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "north"


def test_mlflow_that_refuses_costs_the_tracking_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    with RestServer() as server, caplog.at_level(logging.WARNING, logger="swarmnode.callback"):
        server.answer = 401
        tracker = MLflowTracker("exp", server.uri)
        _round(tracker, 1)
        asked = len(server.requests)
        _round(tracker, 2)
        tracker.finished(2, "ab" * 32)
        assert len(server.requests) == asked == 1  # off: nothing asked after the refusal
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "refused" in warned[0] and "401" in warned[0], warned
    assert "MLFLOW_TRACKING_TOKEN" in warned[0] and server.uri in warned[0]
    assert tracker.failed


def test_mlflow_down_keeps_the_rounds_until_it_answers_then_gives_up(
        caplog: pytest.LogCaptureFixture) -> None:
    with RestServer() as server, caplog.at_level(logging.INFO, logger="swarmnode.callback"):
        server.answer = 503
        tracker = MLflowTracker("exp", server.uri)
        _round(tracker, 1)
        _round(tracker, 2)
        server.answer = None  # back: rounds 1 and 2 arrive with round 3
        _round(tracker, 3)
        assert not tracker.failed
        run = read_run(server.uri, tracker.run_id or "")
        assert [s for s, _ in run["metrics"]["swarm/loss"]] == [1, 2, 3]
        server.answer = 503
        for r in range(4, 4 + TRIES):
            _round(tracker, r)
        asked = len(server.requests)
        _round(tracker, 10)
        assert tracker.failed and len(server.requests) == asked
    said = [r.getMessage() for r in caplog.records]
    assert sum("does not answer" in m for m in said) == 2, said  # once per silence
    assert any("answers again" in m for m in said)
    assert sum(f"no answer in {TRIES} rounds" in m for m in said) == 1, said


def test_mlflow_without_a_server_url_is_refused_at_construction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_MLFLOW_EXPERIMENT, "exp")
    monkeypatch.delenv(ENV_MLFLOW_URI, raising=False)
    local = f"unix://{tmp_path / 'node.sock'}"
    with pytest.raises(ConfigError, match=f"{ENV_MLFLOW_URI}.*got 'nothing'"):
        SwarmCallback(torch.nn.Linear(2, 1), sync_frequency=1, min_peers=1, local_api=local)
    monkeypatch.setenv(ENV_MLFLOW_URI, "./mlruns")  # MLflow's local store: not a server
    with pytest.raises(ConfigError, match="REST API only.*mlflow server"):
        SwarmCallback(torch.nn.Linear(2, 1), sync_frequency=1, min_peers=1, local_api=local)
    cb = SwarmCallback(torch.nn.Linear(2, 1), sync_frequency=1, min_peers=1, local_api=local,
                       mlflow_tracking_uri="https://mlflow.example:5000")  # the argument wins
    assert [type(t) for t in cb.trackers] == [MLflowTracker]
