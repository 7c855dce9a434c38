"""A distributed site's ranks without a node service, in a real process group: ``torchrun
--nproc-per-node 2`` with gloo on CPU runs ``ranks_worker.py``, whose cases share one group with
a 4 s timeout. The swarm itself (node services, chain) is in test_ddp.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "ranks_worker.py"


def _torchrun(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SWARMNODE_LOCAL_API"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), "--out", str(tmp_path), "--missing-socket",
         f"unix://{tmp_path}/no-node.sock", *extra],
        env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)


def test_a_sites_ranks_share_state_refuse_mismatches_and_fail_together(tmp_path: Path) -> None:
    done = _torchrun(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    talker, other = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    # the talking rank's parameters and buffers (a bool mask, an int64 counter) are rank 1's now
    assert other["digest"] == talker["digest"] and other["header"] == {"state": "x"}
    assert (talker["talked"], other["talked"]) == (True, False)  # rank 1 has no local API
    # process_group= and talking_rank=: rank 1 of a group of the caller's sends to rank 0
    assert (talker["group_talker"], other["group_talker"]) == (False, True)
    assert talker["group_digest"] == other["group_digest"] != talker["digest"]
    # built before init_process_group: both ranks are told to build it after
    for seen in (talker, other):
        assert seen["early"]["error"] == "ConfigError"
        assert "build SwarmCallback after torch.distributed.init_process_group" in (
            seen["early"]["message"])
    # num_samples differs: both ranks refuse before anything talks to the node, saying why
    for seen in (talker, other):
        assert seen["mismatch"]["error"] == "ConfigError"
        assert "num_samples differs between the site's ranks (rank 0: 100, rank 1: 50)" in (
            seen["mismatch"]["message"])
        assert "whole training set" in seen["mismatch"]["message"]
    # rank 0 waited 8 s for a node that is not there (twice the group's 4 s timeout): rank 1
    # waited with it, kept alive by the heartbeats, and raised what rank 0 raised
    assert talker["talker_fails"]["error"] == "NodeUnavailable"
    assert other["talker_fails"]["error"] == "RankFailed"
    assert "talking rank 0 failed in on_train_begin: NodeUnavailable" in (
        other["talker_fails"]["message"])
    assert other["talker_fails"]["seconds"] >= 7.5
    # rank 1 at another hook than rank 0's: an error naming both, not a hang
    assert other["wrong_hook"]["error"] == "ConfigError"
    assert "rank 1 is at on_train_end while the talking rank 0 is at on_batch_end" in (
        other["wrong_hook"]["message"])


def test_a_rank_that_dies_ends_the_job_while_rank_0_waits_for_the_node(tmp_path: Path) -> None:
    """Rank 1 exits 3 s into on_train_begin, while rank 0 waits (up to 120 s) for its node:
    torchrun ends the whole job at once, naming rank 1's exit as the root cause."""
    began = time.monotonic()
    done = _torchrun(tmp_path, "--die")
    took = time.monotonic() - began
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "ChildFailedError" in log and "exitcode  : 3" in log, log[-3000:]
    assert took < 90, f"the job took {took:.0f} s to end (rank 0 would have waited 120 s)"
    assert not list(tmp_path.glob("rank-*.json"))
