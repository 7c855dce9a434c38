"""The demo's tasks: what each example trains, on which split, with which settings.

``digits`` (the default of ``swarmnode demo``): a small CNN on the bundled 8x8 digits, each
hospital holding only some of the classes — no hospital can learn alone. ``breast-cancer``: the
tabular example, uneven hospital sizes and one hospital with almost no malignant cases (the
container demo runs this one). Each task names its splits (the quality study runs them all), its
model, loss, scores, and its training settings; the trainer, the local-only and central baselines
and the quality study all train through :meth:`Task.train`, so they train the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from swarmnode.demo import data as bc_data
from swarmnode.demo import digits
from swarmnode.demo import model as bc_model
from swarmnode.demo.data import DemoData
from swarmnode.errors import ConfigError

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "get_task"]


@dataclass(frozen=True)
class Task:
    name: str
    headline: str  # the score the demo's verdict compares: "auc" or "accuracy"
    splits: dict[str, Callable[..., DemoData]]  # the first is the default
    make_model: Callable[[int, int], nn.Module]  # (n_features, seed)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], float]
    evaluate: Callable[[nn.Module, np.ndarray, np.ndarray], dict[str, float]]
    describe_labels: Callable[[np.ndarray], str]
    epochs: int
    batch_size: int
    lr: float
    sync_frequency: int
    optimizer: str = "adam"  # or "sgd" (momentum 0.9)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_split(self) -> str:
        return next(iter(self.splits))

    def split(self, n_hospitals: int, seed: int, split: str | None = None) -> DemoData:
        name = split or self.default_split
        if name not in self.splits:
            raise ConfigError(f"task {self.name} has no split {name!r}; choose one of "
                              f"{', '.join(self.splits)}")
        return self.splits[name](n_hospitals, seed=seed)

    def make_optimizer(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        lr = self.lr if lr is None else lr
        if self.optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        return torch.optim.Adam(model.parameters(), lr=lr)

    def train_epoch(self, model: nn.Module, batches: Iterable[Any],
                    optimizer: torch.optim.Optimizer, **hooks: Any) -> float:
        return bc_model.train_epoch(model, batches, optimizer, loss=self.loss_fn,  # type: ignore[arg-type]
                                    **hooks)

    def train_local(self, X: np.ndarray, y: np.ndarray, seed: int = 0,
                    epochs: int | None = None) -> nn.Module:
        """A model trained on (X, y) alone: the local-only and central baselines."""
        model = self.make_model(np.asarray(X).shape[1], seed)
        optimizer = self.make_optimizer(model)
        loader = bc_model.make_loader(X, y, self.batch_size, seed)
        for _ in range(self.epochs if epochs is None else epochs):
            self.train_epoch(model, loader, optimizer)
        model.eval()
        return model


def _malignant(y: np.ndarray) -> str:
    return f"{int((np.asarray(y) == bc_data.MALIGNANT).sum())} malignant"


def _classes(y: np.ndarray) -> str:
    present = sorted(int(c) for c in np.unique(y))
    return "digits " + "".join(str(c) for c in present)


TASKS: dict[str, Task] = {
    "digits": Task(
        name="digits", headline="accuracy",
        splits={"missing-classes": digits.missing_classes_split, "uneven": digits.uneven_split},
        make_model=digits.make_model, loss_fn=digits.loss_fn, accuracy_fn=digits.accuracy_fn,
        evaluate=digits.evaluate, describe_labels=_classes,
        epochs=digits.EPOCHS, batch_size=digits.BATCH_SIZE, lr=digits.LR,
        sync_frequency=digits.SYNC_FREQUENCY, optimizer="sgd",
    ),
    "breast-cancer": Task(
        name="breast-cancer", headline="auc",
        splits={"uneven-scarce": bc_data.hospital_splits,
                "class-ratio": bc_data.class_ratio_splits},
        make_model=bc_model.make_model, loss_fn=bc_model.loss_fn, accuracy_fn=bc_model.accuracy_fn,
        evaluate=bc_model.evaluate, describe_labels=_malignant,
        epochs=bc_model.EPOCHS, batch_size=bc_model.BATCH_SIZE, lr=bc_model.LR,
        sync_frequency=bc_model.SYNC_FREQUENCY, optimizer="adam",
    ),
}
DEFAULT_TASK = "digits"


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown demo example {name!r}; choose one of {', '.join(TASKS)}"
        ) from None
