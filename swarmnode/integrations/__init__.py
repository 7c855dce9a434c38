"""Swarm learning for the Hugging Face ``Trainer`` and PyTorch Lightning.

    from swarmnode.integrations import SwarmTrainerCallback       # transformers.Trainer
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[SwarmTrainerCallback(sync_frequency=4, min_peers=2)])

    from swarmnode.integrations import SwarmLightningCallback     # lightning.pytorch.Trainer
    trainer = L.Trainer(callbacks=[SwarmLightningCallback(syncFrequency=4, minPeers=2)])

Each adapter takes :class:`~swarmnode.callback.SwarmCallback`'s parameters except the model, which
it takes from the trainer when training starts (snake-case names and HPE aliases alike pass through
unchanged). ``num_samples`` defaults to the length of the trainer's training set. One optimizer step
counts as one batch for ``sync_frequency``, so gradient accumulation does not change how often the
swarm merges. Neither framework is imported until its adapter is: a missing one raises
:class:`IntegrationUnavailable` naming the ``pip install`` that fixes it.

Under ``torch.distributed`` (Lightning's ``strategy="ddp"``; the Trainer under ``torchrun`` or
``accelerate launch``) the framework runs the adapter on every rank: the SwarmCallback it builds
when training starts (the process group is up by then) makes rank 0 the only one that talks to
the node (give ``local_api`` there, or ``SWARMNODE_LOCAL_API``; other ranks need neither); every
rank syncs at the same optimizer step, stops together and ends with the swarm's final model
(see :mod:`swarmnode.callback`). The model is the unwrapped module the framework passes, and the
default ``num_samples`` (the training DataLoader's dataset) is the site's whole training set on
every rank.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from swarmnode.callback import SwarmCallback
from swarmnode.errors import ConfigError

if TYPE_CHECKING:
    from swarmnode.integrations.hf import SwarmTrainerCallback
    from swarmnode.integrations.lightning import SwarmLightningCallback

__all__ = ["IntegrationUnavailable", "SwarmLightningCallback", "SwarmTrainerCallback"]

_ADAPTERS = {
    "SwarmLightningCallback": "swarmnode.integrations.lightning",
    "SwarmTrainerCallback": "swarmnode.integrations.hf",
}


class IntegrationUnavailable(ConfigError, ImportError):
    """The training framework an adapter wraps is not installed."""

    help = "the training framework of a swarmnode integration is not installed"


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        return getattr(importlib.import_module(_ADAPTERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require(module: str, package: str, adapter: str) -> ModuleType:
    """Import ``module`` or raise IntegrationUnavailable naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise IntegrationUnavailable(
            f"swarmnode's {adapter} needs {package!r}, which is not installed ({exc}); "
            f"run `pip install {package}` in the training environment"
        ) from None


class LazySwarm:
    """SwarmCallback's settings, kept until training starts and the model is known."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if "model" in kwargs:
            raise ConfigError(
                "swarmnode's trainer callbacks take the model from the trainer: drop model= "
                "from the callback's parameters"
            )
        self.args, self.kwargs = args, kwargs
        self.swarm: SwarmCallback | None = None
        self.pending_state: dict[str, Any] | None = None  # restored before training started

    def build(self, model: torch.nn.Module, num_samples: int | None) -> SwarmCallback:
        """The SwarmCallback for ``model`` (made on the first call, reused after)."""
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"the trainer passed no torch model to the swarm callback (got {type(model)!r}); "
                "give the trainer a torch.nn.Module"
            )
        if self.swarm is None or self.swarm.model is not model:
            if self.swarm is not None and self.swarm.client is not None:
                self.swarm.client.close()
            kwargs = dict(self.kwargs)
            if kwargs.get("num_samples") is None and num_samples is not None:
                kwargs["num_samples"] = num_samples
            self.swarm = SwarmCallback(model, *self.args, **kwargs)
            if self.pending_state is not None:
                self.swarm.load_state_dict(self.pending_state)
                self.pending_state = None
        return self.swarm

    def started(self, hook: str) -> SwarmCallback:
        """The SwarmCallback, or a clear error if training has not started through the trainer."""
        if self.swarm is None:
            raise ConfigError(
                f"{hook} was called before training started; pass the callback to the trainer "
                "(callbacks=[...]) instead of calling its hooks yourself"
            )
        return self.swarm

    def state_dict(self) -> dict[str, Any]:
        if self.swarm is not None:
            return self.swarm.state_dict()
        return dict(self.pending_state or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.swarm is not None:
            self.swarm.load_state_dict(state)
        else:
            self.pending_state = dict(state)


def dataset_length(loader: Any) -> int | None:
    """The number of samples of a DataLoader's dataset, when it has a length."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:  # an IterableDataset without __len__
        return None
