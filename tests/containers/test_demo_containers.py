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
