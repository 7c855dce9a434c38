"""The digits task: a small CNN on scikit-learn's bundled 8x8 handwritten digits, label-skewed.

Each hospital sees only some of the ten classes (``missing_classes_split``): hospital ``i`` of
``n`` holds the classes ``c`` with ``c % n != i`` — for three hospitals 6 or 7 of the 10 digits
each, every digit held by two of them — and each class's samples are shared evenly among the
hospitals that hold it. A model trained at one hospital cannot know the digits it never saw, so
local-only accuracy stays near the share of classes it holds; the swarm sees every class. This is
the case where no site can learn alone. ``uneven_split`` (sizes n : n-1 : ... : 1, every class
everywhere) is the control case for the quality study.

The shards use the same format as the breast-cancer demo (``X`` float32 [n, 64] raw pixel values
0..16, ``y`` int64 [n] digit) and travel as ``.npz`` (never pickle). The model scales the pixels by
a fixed 1/16 (no statistic of any data set), then two 3x3 convolutions with max pooling and one
linear layer (trained with SGD, momentum 0.9): a few seconds of training on one CPU core.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

from swarmnode.demo.data import MIN_SHARD, DemoData, Shard, _apportion, shard_sizes
from swarmnode.errors import ConfigError

__all__ = [
    "BATCH_SIZE",
    "CLASSES",
    "EPOCHS",
    "LR",
    "SYNC_FREQUENCY",
    "DigitsNet",
    "accuracy_fn",
    "evaluate",
    "loss_fn",
    "make_model",
    "missing_classes_split",
    "uneven_split",
]

CLASSES = 10
# SGD with momentum 0.9: with Adam's per-site moment estimates the label-skewed sites drift apart
# between merges (swarm 0.83-0.86 vs central 0.98 on seeds 0-1 in the in-process simulation);
# with SGD and a merge every 2 batches the swarm lands within 0.01 of central.
EPOCHS = 16
BATCH_SIZE = 32
LR = 0.05
SYNC_FREQUENCY = 2


class DigitsNet(nn.Module):
    """Pixels / 16, conv 3x3 (16) + pool, conv 3x3 (32) + pool, linear to 10 logits."""

    def __init__(self, n_features: int = 64) -> None:
        super().__init__()
        if n_features != 64:
            raise ConfigError(f"the digits model takes 8x8 images (64 features), not {n_features}")
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.out = nn.Linear(32 * 2 * 2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8) / 16.0
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(x.flatten(1))


def make_model(n_features: int, seed: int) -> DigitsNet:
    """The digits model with initial weights drawn from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsNet(n_features)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits [n, 10] against the digits [n]."""
    return F.cross_entropy(logits, y.reshape(-1).long())


def accuracy_fn(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Share of samples whose most likely digit is the label."""
    return float((logits.argmax(dim=1) == y.reshape(-1).long()).float().mean())


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Scores on (X, y): accuracy, loss, macro one-vs-rest AUC over the classes present, and
    sensitivity as the mean recall per class (balanced accuracy)."""
    labels = np.asarray(y).reshape(-1)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X, dtype=torch.float32))
        targets = torch.as_tensor(labels)
        loss = float(loss_fn(logits, targets))
        accuracy = accuracy_fn(logits, targets)
        probs = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    model.train(was_training)
    present = np.unique(labels)
    if len(present) < 2:
        raise ConfigError("evaluate needs at least two digits in its labels; use the shared "
                          "test set")
    auc = float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
    predicted = probs.argmax(axis=1)
    recall = float(np.mean([(predicted[labels == c] == c).mean() for c in present]))
    return {"auc": auc, "accuracy": accuracy, "loss": loss, "sensitivity": recall}


def _load(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not 0.05 <= test_fraction <= 0.5:
        raise ConfigError(
            f"test_fraction={test_fraction!r} is out of range; use a fraction between 0.05 and 0.5"
        )
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    y = y.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    return X, y, train_idx, test_idx


def _check_hospitals(n_hospitals: int, most: int) -> None:
    if isinstance(n_hospitals, bool) or not isinstance(n_hospitals, int) or n_hospitals < 2:
        raise ConfigError(f"the digits task needs at least 2 hospitals, not {n_hospitals!r}")
    if n_hospitals > most:
        raise ConfigError(
            f"{n_hospitals} hospitals is too many for the digits task; use at most {most}"
        )


def _data(X: np.ndarray, y: np.ndarray, shards: list[np.ndarray], test_idx: np.ndarray,
          rng: np.random.Generator) -> DemoData:
    hospitals = []
    for idx in shards:
        idx = rng.permutation(idx)
        hospitals.append(Shard(X[idx], y[idx]))
    smallest = min(range(len(hospitals)), key=lambda i: (len(hospitals[i].y), -i))
    return DemoData(
        hospitals=tuple(hospitals),
        X_test=X[test_idx],
        y_test=y[test_idx],
        names=tuple(f"hospital-{i + 1}" for i in range(len(hospitals))),
        scarce=smallest,
        feature_names=tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8)),
    )


def missing_classes_split(n_hospitals: int = 3, seed: int = 0,
                          test_fraction: float = 0.25) -> DemoData:
    """Hospital ``i`` holds the digits ``c`` with ``c % n != i`` only, each class shared evenly
    among the hospitals that hold it; one stratified test set with every digit."""
    _check_hospitals(n_hospitals, CLASSES)
    X, y, train_idx, test_idx = _load(seed, test_fraction)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_hospitals)]
    for c in range(CLASSES):
        holders = [i for i in range(n_hospitals) if c % n_hospitals != i]
        members = rng.permutation(train_idx[y[train_idx] == c])
        for i, chunk in zip(holders, np.array_split(members, len(holders)), strict=True):
            parts[i].append(chunk)
    return _data(X, y, [np.concatenate(p) for p in parts], test_idx, rng)


def uneven_split(n_hospitals: int = 3, seed: int = 0, test_fraction: float = 0.25) -> DemoData:
    """Every digit at every hospital, sizes proportional to n, n-1, ..., 1 (stratified)."""
    _check_hospitals(n_hospitals, 8)
    X, y, train_idx, test_idx = _load(seed, test_fraction)
    rng = np.random.default_rng(seed)
    sizes = shard_sizes(len(train_idx), n_hospitals)
    if sizes[-1] < MIN_SHARD:
        raise ConfigError(f"{n_hospitals} hospitals leave the smallest too few samples")
    parts: list[list[np.ndarray]] = [[] for _ in range(n_hospitals)]
    for c in range(CLASSES):
        members = rng.permutation(train_idx[y[train_idx] == c])
        counts = _apportion(len(members), [float(s) for s in sizes])
        at = 0
        for i, k in enumerate(counts):
            parts[i].append(members[at:at + k])
            at += k
    return _data(X, y, [np.concatenate(p) for p in parts], test_idx, rng)
