"""`SwarmLightningCallback`: swarm learning for PyTorch Lightning (``lightning.pytorch``).

    trainer = L.Trainer(max_epochs=5, callbacks=[
        SwarmLightningCallback(sync_frequency=4, min_peers=2,
                               local_api="unix:///run/swarm/node.sock")])
    trainer.fit(module, train_loader)   # ends with the swarm's final model in ``module``

Hooks map one to one onto :class:`~swarmnode.callback.SwarmCallback`'s; the model is the
LightningModule (on whatever device the trainer put it). A batch counts for ``sync_frequency`` only
when it advanced ``trainer.global_step`` (an optimizer step), so with ``accumulate_grad_batches``
the swarm merges every ``sync_frequency`` optimizer steps, as with the Hugging Face adapter.
``num_samples`` defaults to the length of the training DataLoader's dataset. Once the swarm's
training is over the callback sets ``trainer.should_stop``. Its progress is saved in Lightning
checkpoints as JSON-able values (``state_dict``), never pickled objects of its own.
"""

from __future__ import annotations

from typing import Any

from swarmnode.callback import SwarmCallback as _PlainSwarmCallback
from swarmnode.integrations import LazySwarm, dataset_length, require

pl = require("lightning.pytorch", "lightning", "SwarmLightningCallback")

__all__ = ["SwarmCallback", "SwarmLightningCallback"]


class SwarmLightningCallback(pl.Callback):  # type: ignore[misc,name-defined]
    """A ``lightning.pytorch.Callback`` that runs a :class:`SwarmCallback` for the Trainer.

    Takes SwarmCallback's parameters except ``model`` (snake-case or HPE aliases).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lazy = LazySwarm(args, kwargs)
        self._last_step = 0

    @property
    def swarm(self) -> _PlainSwarmCallback | None:
        """The wrapped SwarmCallback, once training has started."""
        return self._lazy.swarm

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Called when training starts: joins the swarm and starts from the swarm's weights."""
        swarm = self._lazy.build(pl_module, dataset_length(trainer.train_dataloader))
        self._last_step = trainer.global_step
        swarm.on_train_begin()
        self._stop_if_over(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Called when a training batch ends: merges every ``sync_frequency`` optimizer steps."""
        swarm = self._lazy.started("on_train_batch_end")
        if trainer.global_step != self._last_step:  # not a batch that only accumulated gradients
            self._last_step = trainer.global_step
            swarm.on_batch_end()
        self._stop_if_over(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Called when a training epoch ends."""
        self._lazy.started("on_train_epoch_end").on_epoch_end(trainer.current_epoch)
        self._stop_if_over(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Called when training ends: waits for the swarm's final round, loads the final model."""
        self._lazy.started("on_train_end").on_train_end()

    def state_dict(self) -> dict[str, Any]:
        """The swarm callback's progress as JSON-able values (never pickle)."""
        return self._lazy.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict` (before or after training started)."""
        self._lazy.load_state_dict(state_dict)

    def _stop_if_over(self, trainer: Any) -> None:
        if self._lazy.swarm is not None and self._lazy.swarm.should_stop:
            trainer.should_stop = True


# `from swarmnode.integrations.lightning import SwarmCallback` is this adapter, not the plain
# callback (which the framework would never call)
SwarmCallback = SwarmLightningCallback
