"""One hospital's training script: an ordinary PyTorch loop plus SwarmCallback.

The breast-cancer example (tabular, 30 features): input normalisation then logistic regression.
It trains the same model twice on this hospital's shard: once alone (the local-only baseline) and
once with the swarm, and writes both test-set scores and the final model.

Settings come from the environment, so the same script runs in the `ml` container of
compose/hospital.yaml and as a plain process:

    TRAIN_DATA     folder with train.npz and test.npz (arrays X float32, y int64)   [/data]
    TRAIN_OUTPUT   folder for final.safetensors and scores.json               [/workspace/out]
    SITE           this hospital's name                                              [hospital]
    TRAIN_SEED     seed of the initial weights and the batch order                          [0]
    SWARMNODE_LOCAL_API   the node service's local API (the compose file sets it)
    SWARM_MIN_PEERS   the swarm's min_peers, if not the script's MIN_PEERS below          []
    SWARM_CLIP_NORM   the swarm's merge option clip_norm; a secure-aggregation spec needs it
                      (empty: none)                                                       []

Needs torch, numpy and swarmnode (the training side: `pip install swarmnode`); nothing else.
"""

from __future__ import annotations

import json
import logging
import os
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
SYNC_FREQUENCY = 4  # batches between merges
MIN_PEERS = 2
# a harness may state other settings (not MIN_PEERS: a kit's .env sets that for its contract)
MIN_PEERS = int(os.environ.get("SWARM_MIN_PEERS") or MIN_PEERS)
MERGE_METHOD = "mean"
# clip_norm: each update's change is clipped to this L2 norm (secure aggregation needs it)
CLIP_NORM = float(os.environ["SWARM_CLIP_NORM"]) if os.environ.get("SWARM_CLIP_NORM") else None
# Local training.
EPOCHS = 20
BATCH_SIZE = 16
LR = 0.01


class InputNorm(nn.BatchNorm1d):
    """BatchNorm over the input features; a batch of one sample uses the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0,
                                self.eps)
        return super().forward(x)


class Net(nn.Module):
    """Input normalisation (each site's statistics, merged by the swarm), then a linear layer."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.norm = InputNorm(n_features, affine=False)
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x)).squeeze(-1)


def make_model(n_features: int, seed: int) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net(n_features)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.reshape(-1).float())


def accuracy_fn(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(((logits.reshape(-1) >= 0).long() == y.reshape(-1).long()).float().mean())


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted as one half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X, dtype=torch.float32))
    positive = y == 1
    labels = torch.as_tensor(y)
    return {"auc": auc(logits.numpy(), positive), "accuracy": accuracy_fn(logits, labels),
            "loss": float(loss_fn(logits, labels)),
            "sensitivity": float((logits.numpy()[positive] >= 0).mean())}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:  # never unpickle data files
        return archive["X"].astype(np.float32), archive["y"].astype(np.int64)


def loader(X: np.ndarray, y: np.ndarray, seed: int) -> DataLoader:
    data = TensorDataset(torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float32))
    return DataLoader(data, batch_size=BATCH_SIZE, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, batches: DataLoader, epochs: int, swarm: SwarmCallback | None) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    for epoch in range(epochs):
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


def main() -> None:
    site = os.environ.get("SITE", "hospital")
    data = Path(os.environ.get("TRAIN_DATA", "/data"))
    out = Path(os.environ.get("TRAIN_OUTPUT", "/workspace/out"))
    seed = int(os.environ.get("TRAIN_SEED", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {site} trainer %(message)s")
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    X, y = load(data / "train.npz")
    X_test, y_test = load(data / "test.npz")

    local = make_model(X.shape[1], seed)  # the local-only baseline: this hospital alone
    train(local, loader(X, y, seed), EPOCHS, None)
    local_scores = evaluate(local, X_test, y_test)

    model = make_model(X.shape[1], seed)  # the same loop, with the swarm
    swarm = SwarmCallback(
        model, sync_frequency=SYNC_FREQUENCY, min_peers=MIN_PEERS, merge_method=MERGE_METHOD,
        merge_options={"clip_norm": CLIP_NORM} if CLIP_NORM is not None else None,
        num_samples=len(y), val_data=(torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float32)),
        loss_fn=loss_fn, metric_fn=accuracy_fn,
        # On this data the end-of-training policies score the same (results/quality.md);
        # inactive (the default) keeps the rounds reproducible.
        on_train_end_policy="inactive",
    )
    started = time.monotonic()
    swarm.on_train_begin()
    if not swarm.should_stop:
        train(model, loader(X, y, seed), EPOCHS, swarm)
    swarm.on_train_end()  # waits for the swarm's final round and loads the final model
    swarm_scores = evaluate(model, X_test, y_test)

    out.mkdir(parents=True, exist_ok=True)
    final = serde.encode({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    (out / "final.safetensors").write_bytes(final)
    result = {
        "name": site, "samples": int(len(y)), "malignant": int((y == 1).sum()),
        "local": local_scores, "swarm": swarm_scores, "final_digest": serde.digest(final).hex(),
        "callback_final_digest": swarm.state.final_digest, "rounds": swarm.state.rounds,
        "final_round": swarm.state.last_round, "seconds": time.monotonic() - started,
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    logging.info("done: local AUC %.4f, swarm AUC %.4f, final model %s", local_scores["auc"],
                 swarm_scores["auc"], result["final_digest"][:16])


if __name__ == "__main__":
    main()
