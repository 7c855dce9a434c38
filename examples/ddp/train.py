"""One hospital's training script on several processes: PyTorch DDP plus SwarmCallback.

The digits hospital of ``examples/digits/`` (the same CNN, the same training spec, so this site
joins that swarm as one hospital), trained by ``torchrun`` on N ranks of this site's machines:

    torchrun --nproc-per-node 2 train.py                      # 2 CPU processes (gloo)
    torchrun --nproc-per-node 4 train.py                      # 4 GPUs of one machine (NCCL)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint head:29500 train.py   # 2 machines

Every rank builds the model, wraps it in ``DistributedDataParallel``, builds ``SwarmCallback``
with the same settings and calls its hooks at the same steps. The site is one site of the swarm:
rank 0 alone talks to the node service (only it needs ``SWARMNODE_LOCAL_API``); every other rank
waits at each hook for rank 0's decision and receives the merged model over the job's own process
group. ``num_samples`` is the site's whole training set (every rank passes the same number).

Settings come from the environment, as in the other examples:

    TRAIN_DATA     folder with train.npz and test.npz (X float32 [n, 64] pixels 0..16, y int64)
                                                                                        [/data]
    TRAIN_OUTPUT   folder for final.safetensors and scores.json (rank 0)      [/workspace/out]
    SITE           this hospital's name                                              [hospital]
    TRAIN_SEED     seed of the initial weights and the batch order                          [0]
    TRAIN_EPOCHS   passes over the site's data                                             [16]
    SWARMNODE_LOCAL_API   the node service's local API: rank 0's only

Needs torch, numpy and swarmnode (the training side: ``pip install swarmnode``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from swarmnode.callback import SwarmCallback
from swarmnode.transport import serde

# The swarm's settings: those of examples/digits (its consortium/spec.json).
SYNC_FREQUENCY = 2  # optimizer steps between merges
MIN_PEERS = 2
MERGE_METHOD = "mean"
BATCH_SIZE = 32  # the site's batch: each rank takes BATCH_SIZE / ranks of it
LR = 0.05


class Net(nn.Module):
    """examples/digits' CNN: pixels / 16, conv 3x3 (16) + pool, conv 3x3 (32) + pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.out = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8) / 16.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(x.flatten(1))


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y.reshape(-1).long())


def accuracy_fn(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y.reshape(-1).long()).float().mean())


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path, allow_pickle=False) as archive:  # never unpickle data files
        return (torch.as_tensor(archive["X"].astype(np.float32)),
                torch.as_tensor(archive["y"].astype(np.int64)))


def main() -> None:
    site = os.environ.get("SITE", "hospital")
    data = Path(os.environ.get("TRAIN_DATA", "/data"))
    out = Path(os.environ.get("TRAIN_OUTPUT", "/workspace/out"))
    seed = int(os.environ.get("TRAIN_SEED", "0"))
    epochs = int(os.environ.get("TRAIN_EPOCHS", "16"))
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")  # torchrun sets rank and world size
    rank, ranks = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {site} rank {rank} trainer %(message)s")
    torch.set_num_threads(1)

    X, y = load(data / "train.npz")
    X_test, y_test = load(data / "test.npz")
    dataset = TensorDataset(X, y)
    sampler = DistributedSampler(dataset, seed=seed)  # each rank its part of every epoch
    batches = DataLoader(dataset, batch_size=max(BATCH_SIZE // ranks, 1), sampler=sampler)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Net().to(device)  # the same initial weights on every rank
    model = DistributedDataParallel(net, device_ids=[device.index] if gpu else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    # the same on every rank; rank 0 alone finds SWARMNODE_LOCAL_API and talks to the node.
    # num_samples: the site's whole training set, not this rank's part of it
    swarm = SwarmCallback(model, sync_frequency=SYNC_FREQUENCY, min_peers=MIN_PEERS,
                          merge_method=MERGE_METHOD, num_samples=len(dataset),
                          val_data=(X, y), loss_fn=loss_fn, metric_fn=accuracy_fn)
    started = time.monotonic()
    swarm.on_train_begin()
    for epoch in range(epochs):
        if swarm.should_stop:  # the same answer on every rank
            break
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in batches:
            optimizer.zero_grad()
            loss_fn(model(xb.to(device)), yb.to(device)).backward()
            optimizer.step()
            swarm.on_batch_end()  # every rank; rank 0 decides whether this step merges
            if swarm.should_stop:
                break
        swarm.on_epoch_end(epoch)
    swarm.on_train_end()  # every rank ends with the swarm's final model

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    final = serde.encode(state)
    if rank == 0:
        net.eval()
        with torch.no_grad():
            accuracy = accuracy_fn(net(X_test.to(device)).cpu(), y_test)
        out.mkdir(parents=True, exist_ok=True)
        (out / "final.safetensors").write_bytes(final)
        (out / "scores.json").write_text(json.dumps({
            "name": site, "ranks": ranks, "samples": len(dataset), "accuracy": accuracy,
            "final_digest": serde.digest(final).hex(), "rounds": swarm.state.rounds,
            "callback_final_digest": swarm.state.final_digest,
            "seconds": time.monotonic() - started}, indent=2))
        logging.info("done: swarm accuracy %.3f on %d ranks, final model %s", accuracy, ranks,
                     serde.digest(final).hex()[:16])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
