"""Sites that train under ``torch.distributed`` in a real swarm: a site of 2 ranks
(``torchrun --nproc-per-node 2``, gloo on CPU) beside a single-process site, with plain PyTorch
DDP, Lightning's DDP strategy and the Hugging Face Trainer, against real node services, a real
anvil chain and mTLS between the sites. Every rank of every site ends with the chain's final
model; the 2-rank site is one site on chain (one check-in per round, weighted by its whole shard);
only its rank 0 talks to the node. ``examples/ddp/`` trains as one hospital of a swarm. (A rank
that dies: test_ranks.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from integration_support import (
    SYNC_FREQUENCY,
    chain_final_digest,
    chain_final_round,
    checkins_of,
    shard,
)

from swarmnode.demo.data import load_shard
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.transport import serde

pytestmark = [pytest.mark.slow, pytest.mark.anvil]

TRAINER = Path(__file__).resolve().parent / "ddp_trainer.py"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp" / "train.py"
TRAIN_TIMEOUT = 180.0
RANKS = 2
# the sites of one swarm: (framework, ranks). Three sites of 2 ranks (torchrun, gloo on CPU) and a
# single-process site train together: one swarm, so the chain, node services and the imports of
# every framework start once and side by side
SITES = [("plain", RANKS), ("lightning", RANKS), ("hf", RANKS), ("plain", 1)]
# a torchrun site of Lightning or transformers ranks starts 5-40 s after a single process on a
# busy machine: a round waits that long for a site that has not checked in yet (only an absent
# site costs this wait; rounds with every site in close at once)
GRACE_S = 60


@contextmanager
def swarm_of(workdir: Path, n: int) -> Iterator[LocalSwarm]:
    """A LocalSwarm of ``n`` sites (min_peers=2), every node service running and enrolled."""
    with LocalSwarm(workdir, n, min_peers=2, sync_frequency=SYNC_FREQUENCY,
                    grace_s=GRACE_S) as swarm:
        for i in range(n):
            swarm.start_node(i)
        swarm.wait_enrolled(list(range(n)))
        yield swarm


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


def test_two_rank_sites_of_ddp_lightning_and_hf_beside_a_single_process_site(
    tmp_path: Path
) -> None:
    began = time.monotonic()
    with swarm_of(tmp_path / "swarm", len(SITES)) as swarm:
        outs = [tmp_path / f"site{i}" for i in range(len(SITES))]
        procs = [_start(swarm, i, framework, outs[i], ranks)
                 for i, (framework, ranks) in enumerate(SITES)]
        try:
            codes = swarm.wait_processes(procs, TRAIN_TIMEOUT)
        finally:
            for proc in procs:
                _stop(proc)
        for i, code in enumerate(codes):
            assert code == 0, swarm.tail(i, "trainer", 40)
        final, final_round = chain_final_digest(swarm), chain_final_round(swarm)
        summary = []
        for i, (framework, ranks) in enumerate(SITES):
            site = _ranks(outs[i], ranks)
            what = f"site {i} ({framework}, {ranks} rank(s))"
            for rank in site:  # every rank of every site: the chain's final model
                assert rank["digest"] == final, what
                assert rank["final_digest"] == final, what
                assert rank["world_size"] == ranks, what
            # the same counters on every rank, decided by the talking rank
            counters = {(r["steps"], r["batches"], r["rounds"], r["last_round"]) for r in site}
            assert len(counters) == 1, (what, counters)
            steps, batches, rounds, _ = counters.pop()
            # a sync every SYNC_FREQUENCY steps (a site later than GRACE_S joins without the first)
            assert steps == batches > 0 and rounds >= steps // SYNC_FREQUENCY, what
            # only rank 0 talked to the node; no rank had SWARMNODE_LOCAL_API in its environment
            assert [r["talked"] for r in site] == [True] + [False] * (ranks - 1), what
            assert {r["env_local_api"] for r in site} == {None}, what
            # one site on chain: one check-in per sync, weighed by the site's whole shard (the
            # same num_samples on every rank), and its zero-weight one in the final round
            samples = len(load_shard(shard(swarm, i)).y)
            assert {r["num_samples"] for r in site} == {samples}, what
            checkins = checkins_of(swarm, i)
            assert checkins[-1] == (final_round, 0), what
            assert [w for _, w in checkins[:-1]] == [samples] * rounds, (what, checkins)
            assert len({r for r, _ in checkins}) == len(checkins), (what, checkins)
            summary.append(f"{framework}x{ranks}: {steps} steps, {rounds} merges")
        # the plain sites' talking ranks validate and report their metrics
        reported = {e.args["node"] for e in swarm.contract.events(names={"MetricsReported"})}
        assert {swarm.accounts[0].address, swarm.accounts[3].address} <= reported
        for i in range(len(SITES)):
            assert "Traceback" not in swarm.log(i, "trainer").read_text()
    print(f"\n{'; '.join(summary)}; {time.monotonic() - began:.1f} s in all")


def test_the_ddp_example_is_one_hospital_of_the_digits_swarm(tmp_path: Path) -> None:
    """examples/ddp/train.py under torchrun (2 gloo ranks, its README's command) beside the demo's
    single-process digits trainer: both end with the chain's final model."""
    with LocalSwarm(tmp_path / "swarm", 2, task="digits", min_peers=2, sync_frequency=2,
                    grace_s=GRACE_S) as swarm:
        swarm.start_node(0)
        swarm.start_node(1)
        swarm.wait_enrolled([0, 1])
        data, out = tmp_path / "data", tmp_path / "out"
        data.mkdir()
        shutil.copy(shard(swarm, 0), data / "train.npz")
        shutil.copy(swarm.work / "test.npz", data / "test.npz")
        env = dict(swarm.env, SWARMNODE_LOCAL_API=swarm.socket(0), TRAIN_DATA=str(data),
                   TRAIN_OUTPUT=str(out), SITE="hospital-1", TRAIN_EPOCHS="1",
                   PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
        with open(swarm.log(0, "trainer"), "ab") as log:
            site = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(RANKS), str(EXAMPLE)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            peer = swarm.start_trainer(1, epochs=1)
            codes = swarm.wait_processes([site, peer], TRAIN_TIMEOUT)
        finally:
            _stop(site)
        assert codes[0] == 0, swarm.tail(0, "trainer", 40)
        final = chain_final_digest(swarm)
        scores = json.loads((out / "scores.json").read_text())
        assert scores["ranks"] == RANKS and scores["rounds"] >= 2
        assert scores["final_digest"] == scores["callback_final_digest"] == final
        assert serde.digest((out / "final.safetensors").read_bytes()).hex() == final
        assert swarm.result(1)["final_digest"] == final
        assert [w for _, w in checkins_of(swarm, 0)][:-1] == [scores["samples"]] * scores["rounds"]
