"""One site's training script: a Hugging Face ``Trainer`` plus swarmnode's ``SwarmCallback``.

The digits example (8x8 handwritten digits, 10 classes): a small ``PreTrainedModel`` (an MLP,
built from its config in code: nothing is downloaded) trained by ``transformers.Trainer``. The only
swarm-specific line is the callback in ``callbacks=[...]``: the Trainer runs it, it merges the
parameters with the other sites every ``SYNC_FREQUENCY`` optimizer steps, and ``trainer.train()``
returns with the swarm's final model in ``model``. The script trains the same model twice on this
site's shard: once alone (the local-only baseline) and once with the swarm, and writes both
test-set scores and the final model.

Settings come from the environment, so the same script runs in the `ml` container of
compose/hospital.yaml and as a plain process:

    TRAIN_DATA     folder with train.npz and test.npz (arrays X float32 [n, 64], y int64)  [/data]
    TRAIN_OUTPUT   folder for final.safetensors and scores.json               [/workspace/out]
    SITE           this site's name                                                      [site]
    TRAIN_SEED     seed of the initial weights and the batch order                          [0]
    SWARMNODE_LOCAL_API   the node service's local API (the compose file sets it)

Needs torch, numpy, transformers (with accelerate, which its Trainer needs) and swarmnode.
``initial_state()`` is the model the swarm's training spec is made from (see README.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from its config: no downloads

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from swarmnode.integrations.hf import SwarmCallback
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


class DigitsConfig(PretrainedConfig):
    """The model's settings: what ``DigitsMLP`` is built from (no pretrained weights)."""

    model_type = "swarmnode-digits-mlp"

    def __init__(self, n_features: int = 64, hidden_size: int = HIDDEN, num_labels: int = 10,
                 **kwargs: object) -> None:
        self.n_features = n_features
        self.hidden_size = hidden_size
        super().__init__(num_labels=num_labels, **kwargs)


class DigitsMLP(PreTrainedModel):
    """pixels -> hidden layer (ReLU) -> one logit per digit; the loss when labels are given."""

    config_class = DigitsConfig
    base_model_prefix = "digits"

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__(config)
        self.hidden = nn.Linear(config.n_features, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.reset_parameters()  # torch's default initialisation, seeded by TRAIN_SEED

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs: object) -> SequenceClassifierOutput:
        logits = self.classifier(F.relu(self.hidden(pixel_values)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Digits(torch.utils.data.Dataset):
    """A site's arrays as the dictionaries the Trainer feeds to the model."""

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y = torch.as_tensor(X), torch.as_tensor(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.X[i], "labels": self.y[i]}


def make_model(seed: int) -> DigitsMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsMLP(DigitsConfig())


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's parameters as the swarm sees them: the training spec is made from these."""
    return {k: v.detach().cpu().contiguous() for k, v in make_model(seed).state_dict().items()}


def save_initial(path: str, seed: int = 0) -> None:
    """Write the initial weights for `swarmnode spec` (see README.md)."""
    Path(path).write_bytes(serde.encode(initial_state(seed)))


def evaluate(model: DigitsMLP, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=torch.as_tensor(X), labels=torch.as_tensor(y))
    predicted = out.logits.argmax(dim=-1).numpy()
    per_class = {str(c): float((predicted[y == c] == c).mean()) for c in np.unique(y)}
    return {"accuracy": float((predicted == y).mean()), "loss": float(out.loss),
            "per_class_accuracy": per_class}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:  # never unpickle data files
        return archive["X"].astype(np.float32), archive["y"].astype(np.int64)


def train(model: DigitsMLP, data: Digits, out: Path, seed: int,
          swarm: SwarmCallback | None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", seed=seed, data_seed=seed,
        num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH_SIZE, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, save_strategy="no",
        logging_strategy="epoch", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[swarm] if swarm is not None else None)
    trainer.train()
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
    train(local, Digits(X, y), out / "trainer-local", seed, None)
    local_scores = evaluate(local, X_test, y_test)

    model = make_model(seed)  # the same Trainer, with the swarm
    # num_samples (this site's merge weight) defaults to the length of the Trainer's training set
    swarm = SwarmCallback(sync_frequency=SYNC_FREQUENCY, min_peers=MIN_PEERS,
                          merge_method=MERGE_METHOD)
    started = time.monotonic()
    trainer = train(model, Digits(X, y), out / "trainer-swarm", seed, swarm)
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
        "steps": trainer.state.global_step, "seconds": time.monotonic() - started,
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    logging.info("done: local accuracy %.4f, swarm accuracy %.4f, final model %s",
                 local_scores["accuracy"], swarm_scores["accuracy"], result["final_digest"][:16])


if __name__ == "__main__":
    main()
