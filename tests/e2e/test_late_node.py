"""A site whose node process starts after the training finished (its compose project was slower
than the others): a real anvil chain, real node-service processes and trainer processes, mTLS.
The rule runs in process in tests/node/test_late_start.py; this test's subject is the process
boundary: the peers' real servers bind a site that never joined by its certificate and serve it
the final model, and the trainer's callback loads it through the local API."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmnode.demo.swarm import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


def test_a_node_started_after_the_finish_serves_its_trainer_the_final_model(
        tmp_path: Path) -> None:
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=1, deadline_s=6,
                    epochs=1) as swarm:
        c = swarm.contract
        for i in (0, 1):
            swarm.start_node(i)
        swarm.wait_enrolled([0, 1])
        for i in (0, 1):
            swarm.start_trainer(i)
        swarm.wait_until(c.training_finished, 180, "the two sites' training to finish")
        final = c.events(names={"TrainingFinished"})[-1].args["digest"].hex()
        # hospital-3: authorised (LocalSwarm authorises all three), its node only starts now;
        # before the fix it exited at once with TrainingOver (its start-up joined)
        swarm.start_node(2)
        swarm.start_trainer(2)
        assert swarm.wait_processes([swarm.trainers[2]], 120) == [0], swarm.trainer_failure(2)
        result = swarm.result(2)
        assert result["final_digest"] == final == result["callback_final_digest"]
        assert swarm.nodes[2].poll() is None, swarm.tail(2, "node")  # still serving
        assert not c.node(swarm.accounts[2].address).enrolled  # it never joined
        log = swarm.log(2, "node").read_text()
        assert "did not take part in the training" in log
        stored = swarm.work / swarm.names[2] / "data" / "latest.safetensors"
        assert stored.exists()
