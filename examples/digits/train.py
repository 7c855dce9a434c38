"""One hospital's training script: an ordinary PyTorch loop plus SwarmCallback.

The digits example: a small CNN on 8x8 handwritten digits (scikit-learn's bundled set), where each
hospital holds only some of the ten digits, so no hospital can learn alone. It trains the same
model twice on this hospital's shard: once alone (the local-only baseline) and once with the
swarm, and writes both test-set scores and the final model.

Settings come from the environment, so the same script runs in the `ml` container of
compose/hospital.yaml and as a plain process:

    TRAIN_DATA     folder with train.npz and test.npz (X float32 [n, 64] pixels 0..16, y int64)
                                                                                        [/data]
    TRAIN_OUTPUT   folder for final.safetensors and scores.json               [/workspace/out]
    SITE           this hospital's name                                              [hospital]
    TRAIN_SEED     seed of the initial weights and the batch order                          [0]
    SWARMNODE_LOCAL_API   the node service's local API (the compose file sets it)

`python train.py --initial initial.safetensors` writes the initial weights instead (for
`swarmnode spec`, which makes the training spec the contract pins).

Needs torch, numpy and swarmnode (the training side: `pip install swarmnode`); nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swarmnode.callback import SwarmCallback
from swarmnode.transport import serde

# The swarm's settings: every hospital runs the same ones (the contract's training spec pins them).
SYNC_FREQUENCY = 2  # batches between merges
MIN_PEERS = 2
MERGE_METHOD = "mean"  # for label-skewed data: mean or trimmedmean, not coordmedian
# Local training. SGD with momentum: with Adam's per-site moment estimates, sites that hold
# different digits drift apart between merges.
EPOCHS = 16
BATCH_SIZE = 32
LR = 0.05


class Net(nn.Module):
    """Pixels / 16, conv 3x3 (16) + pool, conv 3x3 (32) + pool, linear to 10 logits."""

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


def make_model(seed: int) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net()


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y.reshape(-1).long())


def accuracy_fn(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y.reshape(-1).long()).float().mean())


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X))
    labels = torch.as_tensor(y)
    predicted = logits.argmax(dim=1).numpy()
    per_class = {int(c): float((predicted[y == c] == c).mean()) for c in np.unique(y)}
    return {"accuracy": accuracy_fn(logits, labels), "loss": float(loss_fn(logits, labels)),
            "per_digit_accuracy": per_class}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:  # never unpickle data files
        return archive["X"].astype(np.float32), archive["y"].astype(np.int64)


def loader(X: np.ndarray, y: np.ndarray, seed: int) -> DataLoader:
    data = TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    return DataLoader(data, batch_size=BATCH_SIZE, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, batches: DataLoader, swarm: SwarmCallback | None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    model.train()
    for epoch in range(EPOCHS):
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            if swarm is not None:
                swarm.on_batch_end()
                if swarm.should_stop:
                    return
        if swarm is not None:
            swarm.on_epoch_end(epoch)


def save_initial(path: str | Path, seed: int = 0) -> None:
    """The initial weights, for `swarmnode spec` (safetensors, never pickle)."""
    from safetensors.torch import save_file

    state = make_model(seed).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--initial":
        save_initial(sys.argv[2])
        return
    site = os.environ.get("SITE", "hospital")
    data = Path(os.environ.get("TRAIN_DATA", "/data"))
    out = Path(os.environ.get("TRAIN_OUTPUT", "/workspace/out"))
    seed = int(os.environ.get("TRAIN_SEED", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {site} trainer %(message)s")
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    X, y = load(data / "train.npz")
    X_test, y_test = load(data / "test.npz")
    logging.info("%d samples of the digits %s", len(y), "".join(map(str, np.unique(y))))

    local = make_model(seed)  # the local-only baseline: this hospital alone
    train(local, loader(X, y, seed), None)
    local_scores = evaluate(local, X_test, y_test)

    model = make_model(seed)  # the same loop, with the swarm
    swarm = SwarmCallback(
        model, sync_frequency=SYNC_FREQUENCY, min_peers=MIN_PEERS, merge_method=MERGE_METHOD,
        num_samples=len(y), val_data=(torch.as_tensor(X), torch.as_tensor(y)),
        loss_fn=loss_fn, metric_fn=accuracy_fn, on_train_end_policy="active",
    )
    started = time.monotonic()
    swarm.on_train_begin()
    if not swarm.should_stop:
        train(model, loader(X, y, seed), swarm)
    swarm.on_train_end()  # waits for the swarm's final round and loads the final model
    swarm_scores = evaluate(model, X_test, y_test)

    out.mkdir(parents=True, exist_ok=True)
    final = serde.encode({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    (out / "final.safetensors").write_bytes(final)
    result = {
        "name": site, "samples": int(len(y)), "digits": sorted(int(c) for c in np.unique(y)),
        "local": local_scores, "swarm": swarm_scores, "final_digest": serde.digest(final).hex(),
        "callback_final_digest": swarm.state.final_digest, "rounds": swarm.state.rounds,
        "final_round": swarm.state.last_round, "seconds": time.monotonic() - started,
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    logging.info("done: local accuracy %.3f, swarm accuracy %.3f, final model %s",
                 local_scores["accuracy"], swarm_scores["accuracy"], result["final_digest"][:16])


if __name__ == "__main__":
    main()
