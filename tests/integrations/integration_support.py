"""Helpers of the integration tests: a two-site LocalSwarm and a peer trainer in its own process.

Each test module trains site 0 in the test process and site 1 with the same framework in a
separate process (the module run as a script), against real node services, a real anvil chain and
real mTLS between the sites.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from swarmnode.demo.swarm import LocalSwarm
from swarmnode.transport import serde

SYNC_FREQUENCY = 4  # LocalSwarm's default spec
BATCH_SIZE = 16
PEER_TIMEOUT = 120.0  # seconds a peer trainer may take; the whole training takes ~20 s


@contextmanager
def two_site_swarm(workdir: Path) -> Iterator[LocalSwarm]:
    """A LocalSwarm of 2 sites (min_peers=2) with both node services running and enrolled."""
    with LocalSwarm(workdir, 2, min_peers=2, sync_frequency=SYNC_FREQUENCY) as swarm:
        swarm.start_node(0)
        swarm.start_node(1)
        swarm.wait_enrolled([0, 1])
        yield swarm


def shard(swarm: LocalSwarm, i: int) -> Path:
    return swarm.work / f"{swarm.names[i]}.npz"


def expected_rounds(steps: int, sync_frequency: int = SYNC_FREQUENCY) -> int:
    """Syncs of a trainer that ran ``steps`` optimizer steps: one at the start, one every
    ``sync_frequency`` steps, and one at the end for the steps since the last one."""
    return 1 + steps // sync_frequency + (1 if steps % sync_frequency else 0)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """The safetensors digest the chain records for a model (hex)."""
    return serde.digest(serde.encode(state)).hex()


def chain_final_digest(swarm: LocalSwarm) -> str:
    finished = swarm.contract.events(names={"TrainingFinished"})
    assert finished, "no TrainingFinished event on chain"
    return bytes(finished[-1].args["digest"]).hex()


def chain_final_round(swarm: LocalSwarm) -> int:
    finished = swarm.contract.events(names={"TrainingFinished"})
    assert finished, "no TrainingFinished event on chain"
    return int(finished[-1].args["round"])


def checkins_of(swarm: LocalSwarm, i: int) -> list[tuple[int, int]]:
    """Site ``i``'s check-ins on chain as (round, weight), in chain order."""
    me = swarm.accounts[i].address
    return [(int(e.args["round"]), int(e.args["weight"]))
            for e in swarm.contract.events(names={"CheckedIn"}) if e.args["node"] == me]


def write_result(out: Path, model: torch.nn.Module, result: dict[str, Any]) -> None:
    """What a peer process reports: its final parameters (safetensors) and its counters."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "final.safetensors").write_bytes(serde.encode(cpu_state(model)))
    (out / "result.json").write_text(json.dumps(result))


@dataclass
class PeerResult:
    state: dict[str, torch.Tensor]
    result: dict[str, Any]


@contextmanager
def peer_process(script: str, swarm: LocalSwarm, i: int, out: Path) -> Iterator[
    subprocess.Popen[bytes]
]:
    """Run ``script`` as site ``i``'s trainer in its own process; always stopped on exit.

    Yields once site ``i`` has checked in for its first round. A peer that starts slowly (torch and
    the framework take seconds to import on a loaded machine) would otherwise miss the rounds the
    test's own site trains in; the swarm then marks it absent and merges without it, as it should
    for a dead site, and the test would check a different run from the one it means."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "trainer.log"
    cmd = [sys.executable, script, "--shard", str(shard(swarm, i)),
           "--local-api", swarm.socket(i), "--out", str(out)]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=swarm.env)
    try:
        def checked_in() -> bool:
            if proc.poll() is not None:
                tail = "\n".join(log.read_text().splitlines()[-30:])
                raise AssertionError(f"peer trainer exited ({proc.returncode}) before its first "
                                     f"check-in:\n{tail}")
            return bool(checkins_of(swarm, i))

        swarm.wait_until(checked_in, PEER_TIMEOUT, f"site {i}'s trainer to check in", poll=0.25)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def peer_result(proc: subprocess.Popen[bytes], out: Path) -> PeerResult:
    """Wait for the peer trainer and read what it wrote; its log tail on failure."""
    try:
        code = proc.wait(PEER_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        tail = "\n".join((out / "trainer.log").read_text().splitlines()[-30:])
        raise AssertionError(f"peer trainer failed (exit {code}):\n{tail}")
    payload = (out / "final.safetensors").read_bytes()
    state = serde.decode(payload, expected_digest=None, spec=None, max_bytes=len(payload),
                         reject_nonfinite=True)
    return PeerResult(state, json.loads((out / "result.json").read_text()))
