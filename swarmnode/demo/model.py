"""The demo's model and its training loop: a small classifier for the breast-cancer shards.

``make_model`` builds input normalisation followed by logistic regression (one linear layer), with
the same initial weights for the same seed. The normalisation is a BatchNorm layer without learned
affine parameters: each hospital learns its running mean and variance from its own batches only,
and the swarm merges them with the other parameters (a weighted mean of the hospitals' statistics;
``num_batches_tracked``, an int buffer, takes the max). No pooled statistic is ever computed.

The model outputs one logit per sample: the log-odds of malignant (label ``MALIGNANT`` = 1).
``train_local`` trains one model on one data set: the local-only and the central baselines.
``EPOCHS``, ``BATCH_SIZE``, ``LR`` (Adam) and ``SYNC_FREQUENCY`` are the demo's settings, chosen so
that on the default split the central model reaches AUC ~0.99, the scarce hospital alone is clearly
worse, and the swarm matches the central model. Measured on seed 0 (tests/demo/test_data.py checks
it with an in-process simulation of the swarm): test AUC local-only 0.992 / 0.998 / 0.976 (the
scarce hospital, which finds 79% of the malignant cases where the others find 96-98%), swarm
0.992, central 0.995. One process trains a local model in well under a second on one CPU core.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swarmnode.demo.data import MALIGNANT
from swarmnode.errors import ConfigError

__all__ = [
    "BATCH_SIZE",
    "EPOCHS",
    "LR",
    "MALIGNANT",
    "OPTIMIZER",
    "SYNC_FREQUENCY",
    "DemoNet",
    "InputNorm",
    "accuracy_fn",
    "evaluate",
    "loss_fn",
    "make_loader",
    "make_model",
    "make_optimizer",
    "train_epoch",
    "train_local",
]

EPOCHS = 20  # passes over a hospital's own shard
BATCH_SIZE = 16
LR = 0.01
OPTIMIZER = "adam"  # what make_optimizer builds
SYNC_FREQUENCY = 4  # batches between merges in the demo's swarm


class InputNorm(nn.BatchNorm1d):
    """BatchNorm over the input features; a batch of one sample uses the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:  # batch statistics need two samples
            return F.batch_norm(
                x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps
            )
        return super().forward(x)


class DemoNet(nn.Module):
    """Input normalisation, then logistic regression; ``forward`` returns logits of shape [n]."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.norm = InputNorm(n_features, affine=False)
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x)).squeeze(-1)


def make_model(n_features: int, seed: int) -> DemoNet:
    """The demo model with initial weights drawn from ``seed`` (the global RNG is left alone)."""
    if n_features < 1:
        raise ConfigError(f"the demo model needs at least one feature, not {n_features}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DemoNet(n_features)


def make_optimizer(model: nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    """The demo's optimizer (``OPTIMIZER``) over ``model``'s parameters."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def make_loader(X: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> DataLoader:
    """Shuffled mini-batches of (features float32, labels float32), reshuffled each epoch."""
    dataset = TensorDataset(
        torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the logits against labels (1 = malignant)."""
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.reshape(-1).float())


def accuracy_fn(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Share of samples whose predicted class (logit >= 0) is the label."""
    predicted = (logits.reshape(-1) >= 0).long()
    return float((predicted == y.reshape(-1).long()).float().mean())


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    on_batch_end: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One pass over ``loader``; the mean training loss per sample.

    ``loss``: the task's loss (default: this model's :func:`loss_fn`). ``on_batch_end`` is called
    after every optimizer step (where ``SwarmCallback.on_batch_end``
    goes); the epoch ends early once ``should_stop()`` is true.
    """
    model.train()
    total, count = 0.0, 0
    for X, y in loader:
        optimizer.zero_grad()
        value = (loss or loss_fn)(model(X), y)
        value.backward()
        optimizer.step()
        total += float(value.detach()) * len(y)
        count += len(y)
        if on_batch_end is not None:
            on_batch_end()
        if should_stop is not None and should_stop():
            break
    return total / max(count, 1)


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Scores of ``model`` on (X, y): AUC (malignant = positive class), accuracy, loss, and
    sensitivity (the share of malignant cases predicted malignant)."""
    labels = np.asarray(y).reshape(-1)
    if len(np.unique(labels)) < 2:
        raise ConfigError(
            "evaluate needs both classes (malignant and benign) in its labels to compute AUC; "
            "use the shared test set"
        )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X, dtype=torch.float32))
        targets = torch.as_tensor(labels, dtype=torch.float32)
        loss = float(loss_fn(logits, targets))
        accuracy = accuracy_fn(logits, targets)
    model.train(was_training)
    positive = labels == MALIGNANT
    auc = float(roc_auc_score(positive, logits.numpy()))
    sensitivity = float((logits.numpy()[positive] >= 0).mean())
    return {"auc": auc, "accuracy": accuracy, "loss": loss, "sensitivity": sensitivity}


def train_local(
    X: np.ndarray,
    y: np.ndarray,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
) -> DemoNet:
    """A model trained on (X, y) alone: the local-only and the central baselines."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ConfigError(
            f"train_local needs epochs >= 0, batch_size >= 1 and lr > 0; got {epochs}, "
            f"{batch_size}, {lr}"
        )
    model = make_model(np.asarray(X).shape[1], seed)
    optimizer = make_optimizer(model, lr)
    loader = make_loader(X, y, batch_size, seed)
    for _ in range(epochs):
        train_epoch(model, loader, optimizer)
    model.eval()
    return model
