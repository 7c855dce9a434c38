"""A swarm whose sites differ in their ports (issue 19 item 4), as node processes on anvil with
real certificates: hospital-1 runs with one_port (peer API and data plane on one port, told
apart by ALPN), hospital-2 with a peer port and a data port. hospital-2 finds hospital-1's data
plane on its one port; they train to the end (6 rounds: almost always each leads some), every
model over a data plane (no fallback to gRPC in either log), and both end with the chain's
final model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarmnode.demo.swarm import LocalSwarm
from swarmnode.identity import TlsFiles, describe
from swarmnode.transport.peer import PeerClient

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


class _Chain:
    """Who holds which certificate, as the contract says (PeerAuthority)."""

    def __init__(self, swarm: LocalSwarm) -> None:
        self.swarm = swarm

    def fingerprint_of(self, address: str) -> bytes | None:
        node = self.swarm.contract.node(address)
        return node.fingerprint if node.enrolled and not node.revoked else None

    def is_participant(self, round: int, address: str) -> bool:
        return True


def test_a_one_port_site_and_a_two_port_site_train_together(tmp_path: Path) -> None:
    began = time.monotonic()
    with LocalSwarm(tmp_path / "swarm", 2, min_peers=2, grace_s=1, deadline_s=6,
                    epochs=1, sync_frequency=8) as swarm:
        swarm.start_node(0, settings={"one_port": True})
        swarm.start_node(1)
        swarm.wait_enrolled([0, 1])
        one = swarm.contract.node(swarm.accounts[0].address).endpoint
        cert, key = swarm.certs[1]
        with PeerClient(one, TlsFiles(cert, key, swarm.trust), swarm.accounts[1].address,
                        swarm.accounts[0].address, _Chain(swarm)) as client:
            health = client.health(20)
            data = client.data_plane(20)
        assert health.get("one_port") is True and "data_port" not in health, health
        assert data is not None and data.port == int(one.rpartition(":")[2])
        assert describe(cert).fingerprint == swarm.contract.node(
            swarm.accounts[1].address).fingerprint
        ready = time.monotonic()
        for i in (0, 1):
            swarm.start_trainer(i)
        swarm.wait_until(lambda: all(swarm.trainers[i].poll() is not None for i in (0, 1)),
                         300, "the trainers")
        final = swarm.contract.events(names={"TrainingFinished"})[-1].args["digest"].hex()
        assert {swarm.result(i)["final_digest"] for i in (0, 1)} == {final}
        rounds = swarm.contract.current_round()
        leaders = {swarm.contract.round(r).leader.lower() for r in range(1, rounds + 1)
                   if swarm.contract.round(r).leader}
        logs = [swarm.log(i, "node").read_text() for i in (0, 1)]
    assert "told apart by ALPN" in logs[0]
    for text in logs:
        assert "using gRPC" not in text  # no model fell back to the peer API
    print(f"\none-port + two-port swarm: {rounds} rounds, {len(leaders)} distinct leaders; "
          f"set-up {ready - began:.1f} s, training {time.monotonic() - ready:.1f} s")
