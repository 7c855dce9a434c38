"""One hospital's training script with differential privacy: DP-SGD (Opacus) plus SwarmCallback.

The digits example's data (8x8 handwritten digits split over three hospitals, each lacking some
digits; `examples/digits/data/hospital-N/`) with a model Opacus supports: a small MLP (no
BatchNorm: per-sample gradients need layers without cross-sample statistics). The hospital's
optimizer clips every sample's gradient and adds Gaussian noise, sized so the whole training
spends at most ``DP_EPSILON`` at ``DP_DELTA``; the swarm merges the wrapped model like any other
and the node reports the site's epsilon with its metrics. A hospital with ``DP_EPSILON=off`` trains
the same model without DP in the same swarm (the training spec is the same).

Settings come from the environment, as in the other examples:

    TRAIN_DATA     folder with train.npz and test.npz (X float32 [n, 64] pixels 0..16, y int64)
                                                                                        [/data]
    TRAIN_OUTPUT   folder for final.safetensors and scores.json               [/workspace/out]
    SITE           this hospital's name                                              [hospital]
    TRAIN_SEED     seed of the initial weights and the batch order                          [0]
    TRAIN_EPOCHS   local epochs                                                             [12]
    DP_EPSILON     the privacy budget of the whole training, or "off" for no DP              [8]
    DP_DELTA       delta of that budget (below 1 / the number of samples)                 [1e-5]
    SWARMNODE_LOCAL_API   the node service's local API

`python train.py --initial initial.safetensors` writes the initial weights (for `swarmnode spec`).

Needs torch, numpy, opacus and swarmnode (`pip install swarmnode[dp]`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

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
MERGE_METHOD = "mean"
# Local training (DP-SGD: plain SGD, per-sample clipping at MAX_GRAD_NORM, noise from the budget).
EPOCHS = 12
BATCH_SIZE = 32
LR = 0.5
MAX_GRAD_NORM = 1.0


class Net(nn.Module):
    """Pixels scaled to [0, 1] (a fixed scale: no statistic of the data), a 64-32-10 MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x / 16.0)))


def make_model(seed: int) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net()


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y.long())


def accuracy_fn(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == y.long()).float().mean())


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(X))
    labels = torch.as_tensor(y)
    return {"accuracy": accuracy_fn(logits, labels), "loss": float(loss_fn(logits, labels))}


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:  # never unpickle data files
        return archive["X"].astype(np.float32), archive["y"].astype(np.int64)


def loader(X: np.ndarray, y: np.ndarray, seed: int) -> DataLoader:
    data = TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    return DataLoader(data, batch_size=BATCH_SIZE, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def make_private(model: nn.Module, batches: DataLoader, epochs: int, epsilon: float,
                 delta: float) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, Any]:
    """Opacus' DP-SGD: the wrapped model (GradSampleModule), its optimizer, its Poisson-sampled
    loader and the engine whose accountant says the epsilon spent (RDP: fast to ask)."""
    from opacus import PrivacyEngine

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with warnings.catch_warnings():  # Opacus warns that its RNG is not cryptographically secure
        warnings.simplefilter("ignore")  # (secure_mode=True for production: needs torchcsprng)
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, batches = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=batches, epochs=epochs,
            target_epsilon=epsilon, target_delta=delta, max_grad_norm=MAX_GRAD_NORM)
    return model, optimizer, batches, engine


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: DataLoader, epochs: int,
          swarm: SwarmCallback | None) -> None:
    model.train()
    for epoch in range(epochs):
        for x, y in batches:
            if len(y) == 0:  # Poisson sampling may draw an empty batch
                continue
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

    save_file({k: v.contiguous() for k, v in make_model(seed).state_dict().items()}, str(path))


def budget(text: str) -> float | None:
    """DP_EPSILON: a positive number, or off/none/0 for training without DP."""
    if text.strip().lower() in ("off", "none", "0", ""):
        return None
    value = float(text)
    if value <= 0:
        raise SystemExit(f"DP_EPSILON must be a positive number or 'off', got {text!r}")
    return value


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--initial":
        save_initial(sys.argv[2])
        return
    site = os.environ.get("SITE", "hospital")
    data = Path(os.environ.get("TRAIN_DATA", "/data"))
    out = Path(os.environ.get("TRAIN_OUTPUT", "/workspace/out"))
    seed = int(os.environ.get("TRAIN_SEED", "0"))
    epochs = int(os.environ.get("TRAIN_EPOCHS", str(EPOCHS)))
    epsilon = budget(os.environ.get("DP_EPSILON", "8"))
    delta = float(os.environ.get("DP_DELTA", "1e-5"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {site} trainer %(message)s")
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    X, y = load(data / "train.npz")
    X_test, y_test = load(data / "test.npz")

    model: nn.Module = make_model(seed)
    batches = loader(X, y, seed)
    engine = None
    if epsilon is None:
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    else:
        model, optimizer, batches, engine = make_private(model, batches, epochs, epsilon, delta)
        logging.info("DP-SGD: noise multiplier %.3f for epsilon %g at delta %g over %d epochs",
                     optimizer.noise_multiplier, epsilon, delta, epochs)
    swarm = SwarmCallback(
        model, sync_frequency=SYNC_FREQUENCY, min_peers=MIN_PEERS, merge_method=MERGE_METHOD,
        # the loss and metric go on chain every round, outside the accountant's epsilon: they
        # are measured on held-out data, never on the private training data
        num_samples=len(y), val_data=(torch.as_tensor(X_test), torch.as_tensor(y_test)),
        loss_fn=loss_fn, metric_fn=accuracy_fn,
        privacy_engine=engine, target_delta=delta if engine is not None else None,
    )
    started = time.monotonic()
    swarm.on_train_begin()
    if not swarm.should_stop:
        train(model, optimizer, batches, epochs, swarm)
    swarm.on_train_end()  # waits for the swarm's final round and loads the final model
    scores = evaluate(model, X_test, y_test)

    out.mkdir(parents=True, exist_ok=True)
    final = serde.encode({k: v.detach().cpu().contiguous()
                          for k, v in swarm.model.state_dict().items()})
    (out / "final.safetensors").write_bytes(final)
    result = {
        "name": site, "samples": int(len(y)), "swarm": scores, "epsilon": swarm.epsilon(),
        "delta": delta if engine is not None else None,
        "final_digest": serde.digest(final).hex(), "callback_final_digest":
        swarm.state.final_digest, "rounds": swarm.state.rounds,
        "seconds": time.monotonic() - started,
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    logging.info("done: swarm accuracy %.3f, epsilon %s, final model %s", scores["accuracy"],
                 result["epsilon"], result["final_digest"][:16])


if __name__ == "__main__":
    main()
