"""`SwarmTrainerCallback`: swarm learning for the Hugging Face ``transformers.Trainer``.

    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=train_set,
                      callbacks=[SwarmTrainerCallback(sync_frequency=4, min_peers=2,
                                                      local_api="unix:///run/swarm/node.sock")])
    trainer.train()   # ends with the swarm's final model in ``model``

Hooks map one to one onto :class:`~swarmnode.callback.SwarmCallback`'s; one optimizer step is one
batch (with gradient accumulation, ``sync_frequency`` counts optimizer steps). The model is the one
the Trainer passes to its callbacks (``trainer.model``, wherever it lives: CPU or GPU), and
``num_samples`` defaults to the length of the training set. Once the swarm's training is over the
callback sets ``control.should_training_stop``.
"""

from __future__ import annotations

import math
from typing import Any

from swarmnode.callback import SwarmCallback as _PlainSwarmCallback
from swarmnode.integrations import LazySwarm, dataset_length, require

transformers = require("transformers", "transformers", "SwarmTrainerCallback")

__all__ = ["SwarmCallback", "SwarmTrainerCallback"]


class SwarmTrainerCallback(transformers.TrainerCallback):  # type: ignore[misc,name-defined]
    """A ``transformers.TrainerCallback`` that runs a :class:`SwarmCallback` for the Trainer.

    Takes SwarmCallback's parameters except ``model`` (snake-case or HPE aliases).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lazy = LazySwarm(args, kwargs)

    @property
    def swarm(self) -> _PlainSwarmCallback | None:
        """The wrapped SwarmCallback, once training has started."""
        return self._lazy.swarm

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Called when training starts: joins the swarm and starts from the swarm's weights."""
        swarm = self._lazy.build(kwargs.get("model"),
                                 dataset_length(kwargs.get("train_dataloader")))
        swarm.on_train_begin()
        return self._stop_if_over(control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Called when an optimizer step ends: merges every ``sync_frequency`` steps."""
        self._lazy.started("on_step_end").on_batch_end()
        return self._stop_if_over(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Called when an epoch ends."""
        swarm = self._lazy.started("on_epoch_end")
        swarm.on_epoch_end(max(math.ceil(state.epoch or 0) - 1, 0))  # Trainer: epoch 0 ends at 1.0
        return self._stop_if_over(control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Called when training ends: waits for the swarm's final round, loads the final model."""
        self._lazy.started("on_train_end").on_train_end()
        return control

    def state_dict(self) -> dict[str, Any]:
        """The swarm callback's progress as JSON-able values (never pickle)."""
        return self._lazy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict` (before or after training started)."""
        self._lazy.load_state_dict(state)

    def _stop_if_over(self, control: Any) -> Any:
        if self._lazy.swarm is not None and self._lazy.swarm.should_stop:
            control.should_training_stop = True
        return control


# `from swarmnode.integrations.hf import SwarmCallback` is this adapter, not the plain
# callback (which the framework would never call)
SwarmCallback = SwarmTrainerCallback
