"""Run by ``torchrun --nproc-per-node 2`` (gloo on CPU) for tests/integrations/test_ranks.py: the
cases of a distributed site that need no node service, one after the other in one process group
whose timeout is ``PG_TIMEOUT_S``. Each rank writes ``rank-<r>.json``: per case, what it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import swarmnode.ranks
from swarmnode.callback import SwarmCallback
from swarmnode.errors import SwarmError
from swarmnode.ranks import SiteRanks
from swarmnode.transport import serde

PG_TIMEOUT_S = 4.0
TALKER_WAIT_S = 8.0  # longer than the group's timeout: only the heartbeats keep rank 1 waiting


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)
        self.register_buffer("mask", torch.zeros(5, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def digest(module: torch.nn.Module) -> str:
    return serde.digest(serde.encode({k: v.contiguous() for k, v in
                                      module.state_dict().items()})).hex()


def outcome(fn: Any) -> dict[str, Any]:
    began = time.monotonic()
    try:
        fn()
    except (SwarmError, RuntimeError) as exc:
        return {"error": type(exc).__name__, "message": str(exc),
                "seconds": time.monotonic() - began}
    return {"error": None, "seconds": time.monotonic() - began}


def die(rank: int, missing_socket: str) -> None:
    """Rank 0 waits up to 120 s for a node that is not there (heartbeats keep rank 1 waiting);
    rank 1 dies 3 s in. Nothing here ends rank 0: torchrun does, as for any rank that fails."""
    swarm = SwarmCallback(Net(), sync_frequency=4, min_peers=2, num_samples=100,
                          local_api=missing_socket if rank == 0 else None, timeout=120)
    swarmnode.ranks.HEARTBEAT_S = 0.5
    if rank == 1:
        threading.Timer(3.0, os._exit, (3,)).start()
    swarm.on_train_begin()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--missing-socket", required=True)
    p.add_argument("--die", action="store_true",
                   help="rank 1 exits 3 s into a sync in which rank 0 waits for the node")
    a = p.parse_args()
    torch.set_num_threads(1)
    # built before init_process_group under torchrun, without a local API: the error says to
    # build it after (then only rank 0 needs the local API)
    early = outcome(lambda: SwarmCallback(Net(), sync_frequency=4, min_peers=2))
    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    rank = dist.get_rank()
    seen: dict[str, Any] = {"early": early}
    if a.die:
        die(rank, a.missing_socket)
        return

    # the merged state reaches every rank in place: parameters and buffers (bool, int64 too)
    torch.manual_seed(rank)
    net = Net()
    if rank == 0:
        with torch.no_grad():
            net.mask[::2] = True
            net.steps.fill_(7)
    ranks = SiteRanks.detect()
    assert ranks is not None
    if ranks.is_talker:
        ranks.publish("on_batch_end", {"state": "x"}, net)
        seen["header"] = {"state": "x"}
    else:
        header = ranks.follow("on_batch_end", net)
        seen["header"] = {k: v for k, v in (header or {}).items() if k != "layout"}
    seen["digest"] = digest(net)

    # a process_group of the caller's and another talking rank: rank 1 of that group sends
    group = dist.new_group([0, 1])
    other = SiteRanks.detect(group, talking_rank=1)
    assert other is not None
    torch.manual_seed(10 + rank)
    net = Net()
    if other.is_talker:
        other.publish("on_train_end", {}, net)
    else:
        other.follow("on_train_end", net)
    seen["group_digest"] = digest(net)
    seen["group_talker"] = other.is_talker

    # settings that differ between ranks: every rank refuses, naming each rank's value
    samples = 100 if rank == 0 else 50
    swarm = SwarmCallback(Net(), sync_frequency=4, min_peers=2, num_samples=samples,
                          local_api=a.missing_socket if rank == 0 else None, timeout=1)
    seen["talked"] = swarm.client is not None
    seen["mismatch"] = outcome(swarm.on_train_begin)

    # the talking rank fails after waiting longer than the group's timeout: its heartbeats keep
    # rank 1 waiting, then rank 1 raises what rank 0 raised
    swarmnode.ranks.HEARTBEAT_S = 0.5
    swarm = SwarmCallback(Net(), sync_frequency=4, min_peers=2, num_samples=100,
                          local_api=a.missing_socket if rank == 0 else None,
                          timeout=TALKER_WAIT_S)
    seen["talker_fails"] = outcome(swarm.on_train_begin)

    # a rank at another hook than the talking rank's: a clear error, not a hang
    if ranks.is_talker:
        ranks.tick("on_batch_end")
        seen["wrong_hook"] = {"error": None}
    else:
        seen["wrong_hook"] = outcome(lambda: ranks.follow("on_train_end", Net()))
    (a.out / f"rank-{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
