"""A site that trains with differential privacy (Opacus DP-SGD) and a site that does not, in one
real swarm: real anvil, real node services (mTLS between them), the DP site's SwarmCallback in
the test process, the other site the example `examples/dp/train.py` with DP off, as its own
process. The DP site's wrapped model (GradSampleModule, names `_module.*`) merges with the plain
one, takes the merged parameters into its live tensors with Opacus' hooks intact, and its node
shows the epsilon the site's accountant says, the chain records it with the site's metrics
(what `status` and `report` show); the plain site shows none."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import ModuleType

import opacus  # pinned in requirements.lock (the dp extra): never skipped
import pytest
import torch
from integration_support import cpu_state, state_digest

from swarmnode.callback import SwarmCallback, unwrap
from swarmnode.chain.overview import overview
from swarmnode.chain.report import collect
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.anvil]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DIGITS = EXAMPLES / "digits" / "data"
DELTA = 1e-5
EPOCHS = 2  # ~13 DP steps an epoch at the DP site, 15 at the plain one: ~8 merges
TRAIN_TIMEOUT = 120.0


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dp_example_train", EXAMPLES / "dp" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def test_a_dp_site_and_a_plain_site_merge_and_the_dp_site_reports_its_epsilon(
    tmp_path: Path,
) -> None:
    ex = _example()
    with LocalSwarm(tmp_path / "swarm", 2, min_peers=2, grace_s=1, deadline_s=6,
                    sync_frequency=ex.SYNC_FREQUENCY,
                    initial_state=ex.make_model(0).state_dict()) as swarm:
        for i in range(2):
            swarm.start_node(i, settings={"metrics_listen": "127.0.0.1:0"})
        swarm.wait_enrolled([0, 1])
        urls = [f"http://127.0.0.1:{swarm.health(i)['metrics_port']}/metrics"
                for i in range(len(swarm.names))]
        out = tmp_path / "plain"
        env = dict(swarm.env, SWARMNODE_LOCAL_API=swarm.socket(1), SITE="hospital-2",
                   TRAIN_DATA=str(DIGITS / "hospital-2"), TRAIN_OUTPUT=str(out), TRAIN_SEED="1",
                   TRAIN_EPOCHS=str(EPOCHS), DP_EPSILON="off", PYTHONDONTWRITEBYTECODE="1")
        with open(swarm.log(1, "trainer"), "ab") as log:
            plain = subprocess.Popen([sys.executable, str(EXAMPLES / "dp" / "train.py")],
                                     env=env, stdout=log, stderr=subprocess.STDOUT)

        # the DP site, here: Opacus wraps the model; the callback gets the wrapper
        X, y = ex.load(DIGITS / "hospital-1" / "train.npz")
        model = ex.make_model(0)
        wrapped, optimizer, batches, engine = ex.make_private(
            model, ex.loader(X, y, 0), EPOCHS, 8.0, DELTA)
        assert isinstance(wrapped, opacus.GradSampleModule)
        assert next(iter(wrapped.state_dict())).startswith("_module.")
        tensors = [(p, p.data_ptr()) for p in wrapped.parameters()]
        swarm_cb = SwarmCallback(
            wrapped, sync_frequency=ex.SYNC_FREQUENCY, min_peers=2, num_samples=len(y),
            val_data=(torch.as_tensor(X), torch.as_tensor(y)), loss_fn=ex.loss_fn,
            metric_fn=ex.accuracy_fn, local_api=swarm.socket(0), privacy_engine=engine,
            target_delta=DELTA)
        assert swarm_cb.model is model  # the names the spec pins: no `_module.` prefix
        swarm_cb.on_train_begin()  # the node's hello compares the spec: a prefix would fail it
        ex.train(wrapped, optimizer, batches, EPOCHS, swarm_cb)
        swarm_cb.on_train_end()
        epsilon = engine.get_epsilon(DELTA)

        assert swarm.wait_processes([plain], TRAIN_TIMEOUT) == [0], swarm.tail(1, "trainer", 30)
        finished = swarm.contract.events(names={"TrainingFinished"})
        assert finished, "no TrainingFinished event on chain"
        final = bytes(finished[-1].args["digest"]).hex()
        plain_result = json.loads((out / "scores.json").read_text())
        # both sites end with the chain's final model
        assert plain_result["final_digest"] == plain_result["callback_final_digest"] == final
        assert plain_result["epsilon"] is None
        assert swarm_cb.state.final_digest == final and swarm_cb.state.rounds >= 3
        assert state_digest(cpu_state(model)) == final
        # ... in the DP site's own tensors, and Opacus' hooks still make per-sample gradients
        assert [(p, p.data_ptr()) for p in wrapped.parameters()] == tensors
        wrapped.train()
        optimizer.zero_grad()
        ex.loss_fn(wrapped(torch.as_tensor(X[:5])), torch.as_tensor(y[:5])).backward()
        for p, _ in tensors:
            assert p.grad_sample is not None and p.grad_sample.shape == (5, *p.shape)
        optimizer.zero_grad()
        assert engine.get_epsilon(DELTA) == epsilon  # a backward alone spends nothing

        # the DP site's node shows the epsilon its accountant says; the plain site's none
        dp_metrics, plain_metrics = _scrape(urls[0]), _scrape(urls[1])
        assert 0 < epsilon <= 8.0
        assert dp_metrics[f'swarmnode_site_epsilon{{delta="{DELTA:g}"}}'] == epsilon
        assert not any(k.startswith("swarmnode_site_epsilon") for k in plain_metrics)
        assert "swarmnode_site_loss" in plain_metrics
        logged = [line for line in swarm.log(0, "node").read_text().splitlines()
                  if "the trainer reports loss" in line]
        assert logged and f"epsilon {epsilon:.4g} at delta {DELTA:g}" in logged[-1]

        # on the chain's record: the DP site's epsilon with each round's metrics (1e-6), its
        # final model's last; none of the plain site. `status` and `report` read them there.
        dp_site, plain_site = (a.address for a in swarm.accounts[:2])
        recorded = swarm.contract.privacy_reports()
        final_round = swarm.contract.final_round()
        assert {site for _, site in recorded} == {dp_site}, recorded
        assert recorded[(final_round, dp_site)] == (round(epsilon, 6), DELTA)
        spent = [recorded[k] for k in sorted(recorded)]  # by round: it only grows
        assert all(d == DELTA for _, d in spent), recorded
        assert [e for e, _ in spent] == sorted(e for e, _ in spent), recorded
        view = overview(swarm.contract)
        assert set(view.privacy) == {dp_site}
        assert view.privacy[dp_site].epsilon == round(epsilon, 6)
        rows = collect(swarm.contract)
        assert {r.epsilon for r in rows if r.address == plain_site} == {None}
        assert [r.epsilon for r in rows if r.address == dp_site][-1] == round(epsilon, 6)


def test_unwrap_drops_opacus_prefix_and_bad_privacy_settings_are_refused(tmp_path: Path) -> None:
    """Beside the swarm test: the wrapper's names, and the settings a DP site can get wrong."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    wrapped = opacus.GradSampleModule(model)
    assert set(wrapped.state_dict()) == {f"_module.{k}" for k in model.state_dict()}
    assert unwrap(wrapped) is model
    sock = f"unix://{tmp_path}/node.sock"
    engine = opacus.PrivacyEngine(accountant="rdp")
    cases = [({"target_delta": 1e-5}, "without privacy_engine"),
             ({"privacy_engine": engine}, "without target_delta"),
             ({"privacy_engine": engine, "target_delta": 2.0}, "in (0, 1)"),
             ({"privacy_engine": object(), "target_delta": 1e-5}, "no get_epsilon")]
    for kwargs, said in cases:
        with pytest.raises(ConfigError, match=re.escape(said)):
            SwarmCallback(wrapped, sync_frequency=2, min_peers=2, local_api=sock, **kwargs)
    cb = SwarmCallback(wrapped, sync_frequency=2, min_peers=2, local_api=sock,
                       privacy_engine=engine, target_delta=1e-5)
    assert cb.epsilon() == 0.0  # no private step yet
    assert SwarmCallback(model, sync_frequency=2, min_peers=2, local_api=sock).epsilon() is None


def test_a_failing_accountant_costs_the_report_not_the_training(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An accountant that raises (a numerical error, a custom engine): the sync and the final
    metrics go on without epsilon, and the site's log says why once."""
    class Broken:
        accountant = [object()]  # it took private steps

        def get_epsilon(self, delta: float) -> float:
            raise FloatingPointError("overflow in the RDP orders")

    model = torch.nn.Linear(4, 2)
    cb = SwarmCallback(model, sync_frequency=2, min_peers=2,
                       local_api=f"unix://{tmp_path}/node.sock", privacy_engine=Broken(),
                       target_delta=1e-5)
    with caplog.at_level("WARNING", logger="swarmnode"):
        assert cb._privacy() == {} and cb._privacy() == {}  # noqa: SLF001
    said = [r.getMessage() for r in caplog.records if "accountant failed" in r.getMessage()]
    assert len(said) == 1 and "overflow in the RDP orders" in said[0]
