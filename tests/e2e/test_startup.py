"""Deployment defaults that fit containers, against real processes: a node service started before
its chain, its contract or its authorisation waits (saying what for) instead of exiting, stops
promptly on SIGTERM while it waits, and enrols as soon as everything is there; a chain outage
between rounds does not end a trainer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.containers.consortium import contract_address_for
from swarmnode.demo.swarm import LocalSwarm, wait_until
from swarmnode.identity import create_ca, describe, issue_node_cert, make_bundle
from swarmnode.spec import TrainingSpec

pytestmark = pytest.mark.slow

SPEC = TrainingSpec.from_state({"w": torch.zeros(3)}, sync_frequency=4, min_peers=1,
                               merge_method="mean").to_json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    wait_until(check, timeout, what)


@pytest.fixture()
def early_node(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A node service started before any chain answers at its RPC URL."""
    port = _free_port()
    ca_cert, ca_key = create_ca(tmp_path / "ca", "ca", org="test")
    trust = make_bundle([ca_cert], tmp_path / "trust.pem")
    cert, key = issue_node_cert(ca_cert, ca_key, tmp_path / "node", "site-a", dns=["localhost"],
                                ips=["127.0.0.1"])
    # where the training will land: the admin deploys its registry first (nonce 0)
    contract = contract_address_for(dev_account(0).address, 1)
    cfg = {"name": "site-a", "rpc_url": f"http://127.0.0.1:{port}", "contract": contract,
           "key_index": 1, "peer_listen": "127.0.0.1:0", "cert": str(cert), "key": str(key),
           "trust": str(trust), "data_dir": str(tmp_path / "data")}
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarmnode", "run", "--config", str(tmp_path / "node.yaml")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
    try:
        yield proc, log, port, cert
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_node_started_before_its_chain_waits_then_enrols(early_node) -> None:
    proc, log, port, cert = early_node
    _wait("the node saying it waits for the chain",
          lambda: "waiting for the chain at" in log.read_text())
    assert proc.poll() is None, log.read_text()
    with DevChain(port=port, block_time=1.0) as chain:
        w3 = connect(chain.url)
        contract = SwarmContract.deploy(w3, dev_account(0), SPEC, 1, 1, 10)
        assert contract.address == contract_address_for(dev_account(0).address, 1)
        _wait("the node saying it waits for its authorisation",
              lambda: "to be authorised" in log.read_text())
        assert proc.poll() is None, log.read_text()
        me = dev_account(1).address
        contract.authorize(me, describe(cert).fingerprint)
        _wait("the node enrolling", lambda: contract.node(me).enrolled)
        assert contract.node(me).endpoint.startswith("127.0.0.1:")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
        assert time.monotonic() - t0 < 10


def test_sigterm_while_waiting_for_the_chain_stops_promptly(early_node) -> None:
    proc, log, _port, _cert = early_node
    _wait("the node saying it waits for the chain",
          lambda: "waiting for the chain at" in log.read_text())
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log.read_text()
    assert time.monotonic() - t0 < 5
    assert "stopped while waiting for the chain" in log.read_text()


def test_a_chain_outage_between_rounds_does_not_end_the_trainers(tmp_path: Path) -> None:
    """The chain (state kept) goes away for a few seconds mid-training and comes back on the same
    port: the trainers wait it out, and every site ends with the final model on chain."""
    with LocalSwarm(tmp_path / "swarm", 2, epochs=6, state_file=True) as swarm:
        for i in range(2):
            swarm.start_node(i)
        swarm.wait_enrolled([0, 1])
        for i in range(2):
            swarm.start_trainer(i)
        _wait("round 4", lambda: swarm.contract.current_round() > 4, 180)
        swarm.chain.stop()
        outage_started = time.monotonic()
        # the trainers and node services keep running while the chain is gone
        _wait("an outage of 4 s", lambda: time.monotonic() - outage_started > 4, 10)
        assert all(p.poll() is None for p in [*swarm.trainers.values(), *swarm.nodes.values()])
        swarm.chain.start()
        _wait("both trainers done", lambda: all(
            p.poll() is not None for p in swarm.trainers.values()), 300)
        final = swarm.contract.events(names={"TrainingFinished"})[-1].args["digest"].hex()
        for i in range(2):
            assert swarm.result(i)["final_digest"] == final
        logs = [swarm.log(i, "node").read_text() for i in range(2)]
        assert any("chain not answering" in t or "waiting for the chain to answer again" in t
                   for t in logs), "no node noticed the outage"
