"""What an operator reads: a trainer whose sync waits says why (round, stage, the sites it waits
for), the node service's log is one JSON object per line with site, round and stage, and its
Prometheus metrics port shows the round advancing and the bytes growing."""

from __future__ import annotations

import json
import re
import urllib.request
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
            swarm.start_node(i, settings={"metrics_listen": "127.0.0.1:0"})
        swarm.wait_enrolled([0, 1])
        urls = []
        for i in range(len(swarm.names)):
            health = swarm.health(i)  # waits for the file: a node enrols before writing it
            urls.append(f"http://127.0.0.1:{health['metrics_port']}/metrics")
        url = urls[0]
        swarm.start_trainer(0)  # hospital-2's trainer is late: round 1 waits for it
        trainer_log = swarm.log(0, "trainer")
        missing = swarm.accounts[1].address
        swarm.wait_until(lambda: missing in trainer_log.read_text(), 120,
                  "the waiting trainer to name the missing site")
        line = next(x for x in trainer_log.read_text().splitlines() if missing in x)
        assert "has waited" in line and "round 1 waits" in line and "check-ins from" in line
        waiting = _scrape(url)
        assert waiting["swarmnode_round"] == 1 and waiting["swarmnode_rounds_total"] == 0
        assert waiting['swarmnode_stage{stage="election"}'] == 1  # checked in, waiting
        swarm.start_trainer(1)
        swarm.wait_until(lambda: _scrape(url)["swarmnode_rounds_total"] >= 2, 300,
                         "two rounds on the metrics port")
        moving = _scrape(url)
        swarm.wait_until(lambda: all(swarm.trainer_exit(i) is not None for i in range(2)), 300,
                  "both trainers to finish")
        assert [swarm.trainer_exit(i) for i in range(2)] == [0, 0]
        done = _scrape(url)
        assert done["swarmnode_round"] > moving["swarmnode_round"] >= 2
        # the bytes grow: nothing moved while round 1 waited; by the end the late hospital-2
        # (set aside as absent, so hospital-1 trained on alone) took the final model from it
        moved = [sum(m[f'swarmnode_peer_bytes_total{{direction="{way}"}}']
                     for way in ("sent", "received")) for m in (waiting, done)]
        assert moved[0] == 0 and moved[1] > 0, moved
        assert _scrape(urls[1])["swarmnode_finished"] == 1
        assert done['swarmnode_round_stage_seconds_count{stage="round"}'] == \
            done["swarmnode_rounds_total"]
        assert done["swarmnode_chain_requests_total"] > moving["swarmnode_chain_requests_total"]
        assert done["swarmnode_pending_transactions"] == 0  # every check-in and commit mined
        assert "swarmnode_site_loss" in done and done["swarmnode_last_commit_age_seconds"] >= 0
        records = [json.loads(x) for x in swarm.log(0, "node").read_text().splitlines()
                   if x.startswith("{")]
        assert records and all(r["site"] == "hospital-1" for r in records)
        in_rounds = [r for r in records if r["round"] is not None]
        assert {r["round"] for r in in_rounds} >= {1, 2}
        assert all(r["stage"] and r["level"] and r["msg"] for r in in_rounds)
        # one round followed through the log: its lines carry its number
        assert any(r["round"] == 2 and "round 2" in r["msg"] for r in records)


def _scrape(url: str) -> dict[str, float]:
    """The metrics port's samples, by name and labels, as Prometheus would read them."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
        assert m, f"not an exposition line: {line!r}"
        out[m.group(1)] = float(m.group(2))
    return out
