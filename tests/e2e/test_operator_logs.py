"""What an operator reads: a trainer whose sync waits says why (round, stage, the sites it waits
for), and the node service's log is one JSON object per line with site, round and stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmnode.demo.swarm import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.anvil]


def test_a_waiting_trainer_names_the_missing_site_and_node_logs_are_json(tmp_path: Path) -> None:
    with LocalSwarm(tmp_path / "swarm", 2, min_peers=2, grace_s=2, deadline_s=10,
                    epochs=2) as swarm:
        swarm.env.update(SWARMNODE_WAIT_LOG_S="1", SWARMNODE_WAIT_LOG_EVERY_S="1",
                         SWARMNODE_LOG_FORMAT="json")
        for i in range(2):
            swarm.start_node(i)
        swarm.wait_enrolled([0, 1])
        swarm.start_trainer(0)  # hospital-2's trainer is late: round 1 waits for it
        trainer_log = swarm.log(0, "trainer")
        missing = swarm.accounts[1].address
        swarm.wait_until(lambda: missing in trainer_log.read_text(), 120,
                  "the waiting trainer to name the missing site")
        line = next(x for x in trainer_log.read_text().splitlines() if missing in x)
        assert "has waited" in line and "round 1 waits" in line and "check-ins from" in line
        swarm.start_trainer(1)
        swarm.wait_until(lambda: all(swarm.trainer_exit(i) is not None for i in range(2)), 300,
                  "both trainers to finish")
        assert [swarm.trainer_exit(i) for i in range(2)] == [0, 0]
        records = [json.loads(x) for x in swarm.log(0, "node").read_text().splitlines()
                   if x.startswith("{")]
        assert records and all(r["site"] == "hospital-1" for r in records)
        in_rounds = [r for r in records if r["round"] is not None]
        assert {r["round"] for r in in_rounds} >= {1, 2}
        assert all(r["stage"] and r["level"] and r["msg"] for r in in_rounds)
        # one round followed through the log: its lines carry its number
        assert any(r["round"] == 2 and "round 2" in r["msg"] for r in records)
