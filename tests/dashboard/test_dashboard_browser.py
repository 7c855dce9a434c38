"""`swarmnode dashboard` in a real headless Chromium (Debian's `chromium`, installed when missing)
against a real swarm (anvil, node processes, trainers): once the training ended, the page shows
what `swarmnode status --format json` shows (rounds, sites and states, leaders, digests, mean
losses), each site's loss per round as the report reads it from the chain, the nodes' metrics
(one node's port gone: unreachable), the dead site highlighted, and a site name from a hostile
names file as text. Screenshots under the test's tmp dir (and results/dashboard/ with
SWARMNODE_RECORD_RESULTS=1)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from swarmnode.chain.overview import read_names
from swarmnode.chain.report import collect
from swarmnode.containers.images import repo_root
from swarmnode.demo.swarm import LocalSwarm, wait_until
from swarmnode.testing.browser import Element, dump_dom, ensure_chromium, parse_dom, screenshot

pytestmark = [pytest.mark.slow, pytest.mark.anvil]

HOSTILE = "<img src=x onerror=\"document.title='pwned'\">hospital-2 & co"


def _names(swarm: LocalSwarm, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "address", "cert"])
        for name, acct in zip(["hospital-1", HOSTILE, "hospital-3"], swarm.accounts,
                              strict=True):
            w.writerow([name, acct.address, f"{name}.pem"])
    return path


def _api(base: str) -> dict:
    with urllib.request.urlopen(base + "/api/status", timeout=10) as reply:
        return json.loads(reply.read())


def _value(e: Element) -> str:
    return e.attrs["data-value"]


def _cells(row: Element) -> dict[str, Element]:
    return {td.attrs["data-k"]: td for td in row.find_all("td")}


def _node_round(port: int) -> float:
    """The round a node's metrics port shows (read directly, not through the dashboard)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r"^swarmnode_round (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def test_the_page_shows_what_status_shows(tmp_path: Path) -> None:
    t0 = time.monotonic()
    ensure_chromium()  # before the swarm: a first install takes a while
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=1, deadline_s=4,
                    epochs=1) as swarm:
        names = _names(swarm, tmp_path / "sites.csv")
        for i in range(3):
            swarm.start_node(i, settings={"metrics_listen": "127.0.0.1:0"})
        swarm.wait_enrolled([0, 1, 2])
        ports = [swarm.health(i)["metrics_port"] for i in range(len(swarm.names))]
        swarm.kill_node(2)  # hospital-3: enrolled, then dead (silent; its port gone)
        chain = ["--contract", swarm.contract.address, "--rpc-url", swarm.rpc_url,
                 "--names", str(names)]
        log = open(tmp_path / "dashboard.log", "w")  # noqa: SIM115 - closed below
        dash = subprocess.Popen(
            [sys.executable, "-m", "swarmnode", "dashboard", *chain, "--listen", "127.0.0.1:0",
             "--interval", "0.5", *[x for i, p in enumerate(ports) for x in (
                 "--metrics", f"{swarm.accounts[i].address}=127.0.0.1:{p}")]],
            stdout=subprocess.PIPE, stderr=log, text=True, env=swarm.env)
        try:
            m, lines = None, []
            while m is None and (line := dash.stdout.readline()):  # type: ignore[union-attr]
                lines.append(line)
                m = re.search(r"^dashboard on http://127\.0\.0\.1:(\d+)/", line)
            assert m, f"no address in {lines}: {(tmp_path / 'dashboard.log').read_text()}"
            base = f"http://127.0.0.1:{m.group(1)}"
            for i in (0, 1):
                swarm.start_trainer(i)
            # while it trains: the page is up and shows a round (a screenshot to look at)
            wait_until(lambda: _api(base)["current_round"] >= 2, 120, "round 2 on the page")
            screenshot(base + "/", tmp_path / "dashboard-training.png")
            codes = swarm.wait_processes([swarm.trainers[0], swarm.trainers[1]], 240)
            assert codes == [0, 0], [swarm.trainer_failure(i) for i in (0, 1)]
            wait_until(lambda: _api(base)["training_finished"], 30, "the finished training")
            status = json.loads(subprocess.run(
                [sys.executable, "-m", "swarmnode", "status", "--format", "json", *chain],
                capture_output=True, text=True, check=True, env=swarm.env).stdout)
            api = _api(base)
            dom = parse_dom(dump_dom(base + "/"))
            shot = screenshot(base + "/", tmp_path / "dashboard-finished.png")
            rows = collect(swarm.contract, read_names(names))
            node_rounds = {swarm.accounts[i].address: _node_round(ports[i]) for i in (0, 1)}
        finally:
            dash.terminate()
            dash.wait(15)
            log.close()
    print(f"\ndashboard browser test: {status['current_round'] - 1} rounds, states "
          f"{[n['state'] for n in status['nodes']]}, "
          f"{time.monotonic() - t0:.0f} s in all")

    # the API is status's object, read at the same final state (blocks come every second:
    # the chain's time moves on)
    assert {k: api[k] for k in status if k != "now"} == {k: v for k, v in status.items()
                                                         if k != "now"}
    assert 0 <= api["now"] - status["now"] < 30
    assert int(dom.find("body").attrs["data-updates"]) >= 1
    assert dom.find("head").find("title").text == "swarmnode dashboard"  # the name: no script
    assert dom.find_all("img") == [] and dom.find(id="error").attrs.get("hidden") is not None
    assert _value(dom.find(id="state")) == "finished"
    assert _value(dom.find(id="current-round")) == str(status["current_round"])
    assert _value(dom.find(id="final-round")) == str(status["final_round"])
    assert _value(dom.find(id="active-count")) == str(status["active_count"])
    assert _value(dom.find(id="spec-hash")) == status["settings"]["spec_hash"]
    # sites: names (the hostile one as text), states, the dead one highlighted
    by_address = {r.attrs["data-address"]: r for r in dom.find(id="sites").find_all("tr")
                  if "data-address" in r.attrs}
    assert list(by_address) == [n["address"] for n in status["nodes"]]
    for node in status["nodes"]:
        cells = _cells(by_address[node["address"]])
        assert cells["name"].text == node["name"]
        assert _value(cells["state"]) == node["state"]
        assert _value(cells["checkin"]) == str(node["last_checkin_round"])
        highlighted = "silent" in by_address[node["address"]].attrs.get("class", "")
        assert highlighted == (node["state"] == "absent"), node
    named = {n["address"]: n for n in status["nodes"]}
    assert named[swarm.accounts[1].address]["name"] == HOSTILE
    dead = named[swarm.accounts[2].address]
    assert dead["state"] == "absent", dead  # set aside by the others: shown highlighted
    # metrics: the two live nodes' ports read, the dead one's unreachable
    for address in named:
        cells = _cells(by_address[address])
        if address not in node_rounds:
            assert cells["m-state"].text == "unreachable"
            continue
        assert cells["m-state"].text == "ok"
        assert float(_value(cells["m-round"])) == node_rounds[address]
        assert float(_value(cells["m-sent"])) > 0
    # rounds: status, leader, digest and mean loss and metric of every round status shows
    by_round = {r.attrs["data-round"]: _cells(r) for r in dom.find(id="rounds").find_all("tr")
                if "data-round" in r.attrs}
    assert sorted(map(int, by_round)) == [r["round"] for r in status["rounds"]]
    assert len(status["rounds"]) >= 2
    for r in status["rounds"]:
        cells = by_round[str(r["round"])]
        assert _value(cells["status"]) == r["status"]
        assert cells.get("leader") is not None and cells["leader"].text == (r["leader_name"]
                                                                             or "-")
        assert cells["digest"].attrs.get("data-value", "") == (r["digest"] or "")
        for k, key in (("loss", "mean_loss"), ("metric", "mean_metric")):
            if r[key] is None:
                assert "data-value" not in cells[k].attrs
            else:
                assert float(_value(cells[k])) == r[key]
    # the chart: one line per site, a point per round it reported, at the chain's values
    for chart, field in (("chart-loss", "loss"), ("chart-metric", "metric")):
        drawn = {(g.attrs["data-address"], int(c.attrs["data-round"]), float(_value(c)))
                 for g in dom.find(id=chart).find_all("g") for c in g.find_all("circle")}
        assert drawn == {(x.address, x.round, getattr(x, field)) for x in rows}
    assert rows and {x.address for x in rows} == {swarm.accounts[0].address,
                                                  swarm.accounts[1].address}
    assert shot.stat().st_size > 10_000
    if os.environ.get("SWARMNODE_RECORD_RESULTS") == "1":
        out = repo_root() / "results" / "dashboard"
        out.mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("dashboard-*.png"):
            shutil.copy(png, out / png.name)
