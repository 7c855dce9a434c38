"""`swarmnode demo --containers` runs the three-hospital demo as containers and writes the same
summary as `swarmnode demo`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarmnode.demo.orchestrator import NODE_KEYS, SUMMARY_KEYS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_demo_containers_writes_the_demo_summary(images, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "swarmnode", "demo", "--containers", "--nodes", "3", "--json",
         str(out), "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary) == SUMMARY_KEYS
    assert [n["name"] for n in summary["nodes"]] == ["hospital-1", "hospital-2", "hospital-3"]
    assert all(set(n) == NODE_KEYS for n in summary["nodes"])
    assert summary["all_nodes_agree"] is True
    assert all(n["final_digest"] == summary["chain_final_digest"] for n in summary["nodes"])
    assert len(summary["rounds"]) > 10
    assert "every node holds the final model whose digest is on chain" in done.stdout


def test_secure_aggregation_with_containers_is_accepted_and_configures_the_consortium(
        engine, tmp_path: Path) -> None:
    """`--secure-aggregation --containers` (refused before): the options the CLI builds, and the
    consortium they make writes a secure spec (min_peers 3, the demo's clip norm and weight cap)
    and each trainer's clip norm; the same flags without secure aggregation write a plain one.
    Fast: the sites' files only, no container started (the demo itself: the test below)."""
    from typer.testing import CliRunner

    from swarmnode.cli import app
    from swarmnode.demo.orchestrator import demo_consortium, demo_options
    from swarmnode.demo.swarm import SECURE_CLIP_NORM, SECURE_MAX_WEIGHT
    from swarmnode.errors import ConfigError
    from swarmnode.spec import TrainingSpec

    refused = CliRunner().invoke(app, ["demo", "--secure-aggregation", "--containers",
                                       "--nodes", "2", "--workdir", str(tmp_path / "no")])
    assert refused.exit_code == ConfigError.exit_code, refused.output
    assert "3 or more hospitals" in refused.output and not (tmp_path / "no").exists()

    for secure in (True, False):
        opts = demo_options(containers=True, secure_aggregation=secure,
                            workdir=tmp_path / f"run-{secure}")
        assert (opts.example, opts.min_peers, opts.secure_aggregation) == (
            "breast-cancer", 3 if secure else 2, secure)
        with demo_consortium(opts) as c:
            assert c.secure_aggregation is secure and c.min_peers == opts.min_peers
            spec = TrainingSpec.from_json((c.work / "consortium" / "spec.json").read_text())
            ml_env = (c.work / "hospital-1" / "ml.env").read_text().splitlines()
            site_env = (c.work / "hospital-1" / ".env").read_text().splitlines()
        assert spec.secure_aggregation is secure and spec.min_peers == opts.min_peers
        assert f"MIN_PEERS={opts.min_peers}" in site_env  # what the sentinel deploys with
        if secure:
            assert spec.merge_method == "mean" and spec.max_weight == SECURE_MAX_WEIGHT
            assert spec.merge_options == {"clip_norm": SECURE_CLIP_NORM}
            assert f"SWARM_CLIP_NORM={SECURE_CLIP_NORM}" in ml_env
        else:
            assert not spec.merge_options and not any(line.startswith("SWARM_CLIP_NORM")
                                                      for line in ml_env)


def test_demo_containers_with_secure_aggregation_never_hands_a_leader_a_plain_update(
        images, tmp_path: Path) -> None:
    """`swarmnode demo --containers --secure-aggregation`: three hospitals in containers, min
    peers 3; the summary's counts come from the node containers' logs (ContainerConsortium.log)
    and the CLI prints that the leader never held a plain update."""
    out = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "swarmnode", "demo", "--containers", "--secure-aggregation",
         "--json", str(out), "--workdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    secure = summary["secure_aggregation"]  # counted in the node containers' logs
    assert secure["plain_updates_received"] == 0
    # every summed round: the leader's two members' masked updates (once a hospital is done,
    # fewer than three add weight and rounds commit with nothing summed)
    assert secure["rounds_summed"] > 5
    assert secure["masked_updates_received"] >= 2 * secure["rounds_summed"]
    assert summary["all_nodes_agree"] is True
    assert "the leader never held a plain update" in done.stdout
