"""One site's training script: a ``lightning.LightningModule`` and ``lightning.Trainer`` plus
swarmnode's ``SwarmCallback``.

The digits example (8x8 handwritten digits, 10 classes): a small MLP as a LightningModule. The
only swarm-specific line is the callback in ``callbacks=[...]``: the Trainer runs it, it merges the
parameters with the other sites every ``SYNC_FREQUENCY`` optimizer steps, and ``trainer.fit()``
returns with the swarm's final model in the module. The script trains the same model twice on
this site's shard: once alone (the local-only baseline) and once with the swarm, and writes both
test-set scores and the final model.

Settings come from the environment, so the same script runs in the `ml` container of
compose/hospital.yaml and as a plain process:

    TRAIN_DATA     folder with train.npz and test.npz (arrays X float32 [n, 64], y int64)  [/data]
    TRAIN_OUTPUT   folder for final.safetensors and scores.json               [/workspace/out]
    SITE           this site's name                                                      [site]
    TRAIN_SEED     seed of the initial weights and the batch order                          [0]
    SWARMNODE_LOCAL_API   the node service's local API (the compose file sets it)

Needs torch, numpy, lightning and swarmnode. ``initial_state()`` is the model the swarm's
training spec is made from (see README.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swarmnode.integrations.lightning import SwarmCallback
from swarmnode.transport import serde

# The swarm's settings: every site runs the same ones (the contract's training spec pins them).
SYNC_FREQUENCY = 4  # optimizer steps between merges
MIN_PEERS = 2
MERGE_METHOD = "mean"
# Local training.
EPOCHS = 5
BATCH_SIZE = 32
LR = 0.01
HIDDEN = 64


class DigitsMLP(L.LightningModule):
    """pixels -> hidden layer (ReLU) -> one logit per digit, trained with cross-entropy."""

    def __init__(self, n_features: int = 64, hidden: int = HIDDEN, classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.hidden(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                      batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR)


def make_model(seed: int) -> DigitsMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsMLP()


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's parameters as the swarm sees them: the training spec is made from these."""
    return {k: v.detach().cpu().contiguous() for k, v in make_model(seed).state_dict().items()}


def save_initial(path: str, seed: int = 0) -> None:
    """Write the initial weights for `swarmnode spec` (see README.md)."""
    Path(path).write_bytes(serde.encode(initial_state(seed)))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == y).float().mean())


def evaluate(model: DigitsMLP, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X))
    predicted = logits.argmax(dim=-1).numpy()
    per_class = {str(c): float((predicted[y == c] == c).mean()) for c in np.unique(y)}
    return {"accuracy": float((predicted == y).mean()),
            "loss": float(F.cross_entropy(logits, torch.as_tensor(y))),
            "per_class_accuracy": per_class}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:  # never unpickle data files
        return archive["X"].astype(np.float32), archive["y"].astype(np.int64)


def loader(X: np.ndarray, y: np.ndarray, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.as_tensor(X), torch.as_tensor(y)),
                      batch_size=BATCH_SIZE, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def train(model: DigitsMLP, batches: DataLoader, out: Path,
          swarm: SwarmCallback | None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(out), callbacks=[swarm] if swarm is not None else None,
    )
    with warnings.catch_warnings():  # one process per site: no DataLoader workers on purpose
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, batches)
    return trainer


def main() -> None:
    site = os.environ.get("SITE", "site")
    data = Path(os.environ.get("TRAIN_DATA", "/data"))
    out = Path(os.environ.get("TRAIN_OUTPUT", "/workspace/out"))
    seed = int(os.environ.get("TRAIN_SEED", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {site} trainer %(message)s")
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    X, y = load(data / "train.npz")
    X_test, y_test = load(data / "test.npz")

    local = make_model(seed)  # the local-only baseline: this site alone
    train(local, loader(X, y, seed), out, None)
    local_scores = evaluate(local, X_test, y_test)

    model = make_model(seed)  # the same Trainer, with the swarm
    # num_samples (this site's merge weight) defaults to the length of the training set;
    # val_data: the local model's loss and accuracy on its own training data, reported on chain
    # at every merge
    swarm = SwarmCallback(
        sync_frequency=SYNC_FREQUENCY, min_peers=MIN_PEERS, merge_method=MERGE_METHOD,
        val_data=(torch.as_tensor(X), torch.as_tensor(y)), loss_fn=F.cross_entropy,
        metric_fn=accuracy,
    )
    started = time.monotonic()
    trainer = train(model, loader(X, y, seed), out, swarm)
    # the Trainer called on_train_end: the swarm's final round is over, its model is in `model`
    swarm_scores = evaluate(model, X_test, y_test)

    out.mkdir(parents=True, exist_ok=True)
    final = serde.encode({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    (out / "final.safetensors").write_bytes(final)
    state = swarm.swarm.state if swarm.swarm is not None else None
    result = {
        "name": site, "samples": int(len(y)), "classes": sorted(set(y.tolist())),
        "local": local_scores, "swarm": swarm_scores, "final_digest": serde.digest(final).hex(),
        "callback_final_digest": state.final_digest if state else "",
        "rounds": state.rounds if state else 0, "final_round": state.last_round if state else 0,
        "steps": trainer.global_step, "seconds": time.monotonic() - started,
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    logging.info("done: local accuracy %.4f, swarm accuracy %.4f, final model %s",
                 local_scores["accuracy"], swarm_scores["accuracy"], result["final_digest"][:16])


if __name__ == "__main__":
    main()
