"""Sites that train under ``torch.distributed`` in a real swarm: a site of 2 ranks
(``torchrun --nproc-per-node 2``, gloo on CPU) beside a single-process site, with plain PyTorch
DDP, Lightning's DDP strategy and the Hugging Face Trainer, against real node services, a real
anvil chain and mTLS between the sites. Every rank of every site ends with the chain's final
model; the 2-rank site is one site on chain (one check-in per round, weighted by its whole shard);
only its rank 0 talks to the node. A rank that dies ends the job, boundedly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from integration_support import (
    chain_final_digest,
    chain_final_round,
    checkins_of,
    expected_rounds,
    shard,
    two_site_swarm,
)

from swarmnode.demo.data import load_shard
from swarmnode.demo.swarm import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.anvil]

TRAINER = Path(__file__).resolve().parent / "ddp_trainer.py"
TRAIN_TIMEOUT = 180.0
RANKS = 2


def _env(swarm: LocalSwarm) -> dict[str, str]:
    """The swarm's environment without SWARMNODE_LOCAL_API: ranks get it only by argument."""
    env = {k: v for k, v in swarm.env.items() if k != "SWARMNODE_LOCAL_API"}
    return dict(env, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")


def _start(swarm: LocalSwarm, i: int, framework: str, out: Path, ranks: int,
           extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Site ``i``'s trainer: under torchrun with ``ranks`` ranks, or one plain process."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     str(ranks)]
    cmd = [*launcher, str(TRAINER), "--framework", framework, "--shard", str(shard(swarm, i)),
           "--local-api", swarm.socket(i), "--out", str(out), *(extra or [])]
    out.mkdir(parents=True, exist_ok=True)
    with open(swarm.log(i, "trainer"), "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(swarm),
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _ranks(out: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(n)]


@pytest.mark.parametrize("framework", ["plain", "lightning", "hf"])
def test_a_two_rank_site_and_a_single_process_site_end_with_the_chain_final_model(
    framework: str, tmp_path: Path
) -> None:
    began = time.monotonic()
    with two_site_swarm(tmp_path / "swarm") as swarm:
        outs = [tmp_path / "site0", tmp_path / "site1"]
        procs = [_start(swarm, 0, framework, outs[0], RANKS),
                 _start(swarm, 1, framework, outs[1], 1)]
        try:
            codes = swarm.wait_processes(procs, TRAIN_TIMEOUT)
        finally:
            for proc in procs:
                _stop(proc)
        for i, code in enumerate(codes):
            assert code == 0, swarm.tail(i, "trainer", 40)
        final = chain_final_digest(swarm)
        site0, site1 = _ranks(outs[0], RANKS), _ranks(outs[1], 1)
        for rank in [*site0, *site1]:  # every rank of every site: the chain's final model
            assert rank["digest"] == final
            assert rank["final_digest"] == final
        # the 2-rank site: same counters on every rank, decided by rank 0
        assert [r["world_size"] for r in site0] == [RANKS, RANKS] and site1[0]["world_size"] == 1
        assert len({(r["steps"], r["batches"], r["rounds"], r["last_round"]) for r in site0}) == 1
        steps = site0[0]["steps"]
        assert steps == site0[0]["batches"] and site0[0]["rounds"] == expected_rounds(steps)
        # only rank 0 talked to the node; no rank had SWARMNODE_LOCAL_API in its environment
        assert [r["talked"] for r in site0] == [True, False] and site1[0]["talked"]
        assert {r["env_local_api"] for r in [*site0, *site1]} == {None}
        # one site on chain: one check-in per round, weighed by the whole shard (not a rank's)
        samples = len(load_shard(shard(swarm, 0)).y)
        assert {r["num_samples"] for r in site0} == {samples}
        final_round = chain_final_round(swarm)
        assert checkins_of(swarm, 0) == (
            [(r, samples) for r in range(1, site0[0]["rounds"] + 1)] + [(final_round, 0)])
        if framework == "plain":  # its talking rank validates and reports the metrics
            reported = swarm.contract.events(names={"MetricsReported"})
            assert {e.args["node"] for e in reported} == {a.address for a in swarm.accounts}
        logs = swarm.log(0, "trainer").read_text()
        assert "Traceback" not in logs
    print(f"\n{framework}: {steps} steps and {site0[0]['rounds']} merges at the 2-rank site, "
          f"{time.monotonic() - began:.1f} s in all")


def test_a_rank_that_dies_ends_the_site_job_boundedly(tmp_path: Path) -> None:
    """Rank 1 is killed while rank 0 waits in a sync (the other site never comes): torchrun
    ends the job with an error within seconds, and the chain saw one site check in once."""
    with two_site_swarm(tmp_path / "swarm") as swarm:
        out = tmp_path / "site0"
        proc = _start(swarm, 0, "plain", out, RANKS)
        try:
            me = swarm.accounts[0].address
            swarm.wait_until(lambda: any(e.args["node"] == me for e in
                                         swarm.contract.events(names={"CheckedIn"})),
                             90, "the 2-rank site's first check-in")
            pid = swarm.wait_until(lambda: _rank_pid(proc.pid, 1), 30, "rank 1's process")
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            code = swarm.wait_processes([proc], 60)[0]
            ended = time.monotonic() - killed
        finally:
            _stop(proc)
        assert code != 0, swarm.tail(0, "trainer", 40)
        assert ended < 30, f"the job took {ended:.1f} s to end after rank 1 died"
        assert checkins_of(swarm, 0) == [(1, len(load_shard(shard(swarm, 0)).y))]
        assert not (out / "rank-0.json").exists() and not (out / "rank-1.json").exists()
        log = swarm.log(0, "trainer").read_text()
        assert "ChildFailedError" in log or "exitcode" in log, log[-3000:]
        print(f"\njob ended {ended:.1f} s after rank 1 was killed")


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker ``rank`` (a child of the launcher with RANK=rank)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None
