"""One site's trainer for the DDP swarm tests: plain PyTorch DDP, Lightning's DDP strategy or the
Hugging Face Trainer, run under ``torchrun --nproc-per-node 2`` (a site of 2 ranks, gloo on CPU)
or as one plain process (a single-process site).

Only the talking rank (rank 0) is given the node's local API; the test also keeps
``SWARMNODE_LOCAL_API`` out of the environment, so a rank that tried to talk to the node would
fail. Every rank writes ``rank-<r>.json``: the digest of its final model (canonical safetensors,
as the chain records it) and its callback's counters. ``--die-rank R --die-after S`` makes rank R
exit abruptly S seconds after training starts (the dead-rank test).

Per-rank batch size is ``BATCH_SIZE / world size``: a site's optimizer steps per epoch do not
depend on how many ranks it trains on.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from swarmnode.callback import SwarmCallback
from swarmnode.demo import model as demo_model
from swarmnode.demo.data import load_shard
from swarmnode.transport import serde

BATCH_SIZE = 16  # the site's global batch
SETTINGS: dict[str, Any] = dict(sync_frequency=4, min_peers=2, on_train_end_policy="inactive",
                                timeout=120)


def digest(model: torch.nn.Module) -> str:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return serde.digest(serde.encode(state)).hex()


def report(out: Path, rank: int, model: torch.nn.Module, swarm: SwarmCallback,
           steps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "digest": digest(model), "final_digest": swarm.state.final_digest, "steps": steps,
        "batches": swarm.state.batches, "rounds": swarm.state.rounds,
        "last_round": swarm.state.last_round, "talked": swarm.client is not None,
        "num_samples": swarm.num_samples, "world_size": world_size(),
        "env_local_api": os.environ.get("SWARMNODE_LOCAL_API"),
    }))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_api(local_api: str) -> str | None:
    """The local API for the talking rank only."""
    return local_api if int(os.environ.get("RANK", "0")) == 0 else None


# -- plain PyTorch DDP --
def train_plain(X: np.ndarray, y: np.ndarray, local_api: str, out: Path) -> None:
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    net = demo_model.make_model(X.shape[1], seed=0)
    model: torch.nn.Module = (torch.nn.parallel.DistributedDataParallel(net)
                              if dist.is_initialized() else net)
    dataset = TensorDataset(torch.as_tensor(X, dtype=torch.float32),
                            torch.as_tensor(y, dtype=torch.float32))
    sampler = DistributedSampler(dataset, seed=0) if dist.is_initialized() else None
    loader = DataLoader(dataset, batch_size=BATCH_SIZE // size, sampler=sampler,
                        shuffle=sampler is None)
    optimizer = demo_model.make_optimizer(model)
    # the DDP wrapper is unwrapped; num_samples is the site's whole shard on every rank
    swarm = SwarmCallback(model, num_samples=len(dataset), local_api=rank_api(local_api),
                          val_data=(X, y), loss_fn=demo_model.loss_fn,
                          metric_fn=demo_model.accuracy_fn, **SETTINGS)
    swarm.on_train_begin()
    steps = 0
    for epoch in range(1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for xb, yb in loader:
            if swarm.should_stop:
                break
            optimizer.zero_grad()
            demo_model.loss_fn(model(xb), yb).backward()
            optimizer.step()
            steps += 1
            swarm.on_batch_end()
        swarm.on_epoch_end(epoch)
    swarm.on_train_end()
    report(out, rank, net, swarm, steps)
    if dist.is_initialized():
        dist.destroy_process_group()


# -- Lightning, DDP strategy --
def train_lightning(X: np.ndarray, y: np.ndarray, local_api: str, out: Path) -> None:
    import lightning.pytorch as pl

    from swarmnode.integrations.lightning import SwarmLightningCallback

    class LitDemoNet(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            net = demo_model.make_model(X.shape[1], 0)
            self.norm, self.linear = net.norm, net.linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return demo_model.DemoNet.forward(self, x)  # type: ignore[arg-type]

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return demo_model.loss_fn(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return demo_model.make_optimizer(self)

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    callback = SwarmLightningCallback(local_api=rank_api(local_api), **SETTINGS)
    module = LitDemoNet()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=ranks,
        strategy="ddp" if ranks > 1 else "auto", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
        callbacks=[callback],
    )
    loader = demo_model.make_loader(X, y, BATCH_SIZE // ranks, seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, loader)
    assert callback.swarm is not None
    report(out, trainer.global_rank, module, callback.swarm, trainer.global_step)


# -- Hugging Face Trainer --
def train_hf(X: np.ndarray, y: np.ndarray, local_api: str, out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from swarmnode.integrations.hf import SwarmTrainerCallback

    class HFDemoNet(demo_model.DemoNet):
        def forward(  # type: ignore[override]
            self, x: torch.Tensor, labels: torch.Tensor | None = None
        ) -> dict[str, torch.Tensor]:
            logits = super().forward(x)
            result = {"logits": logits}
            if labels is not None:
                result["loss"] = demo_model.loss_fn(logits, labels)
            return result

    class ShardDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.as_tensor(X[i], dtype=torch.float32),
                    "labels": torch.as_tensor(y[i], dtype=torch.float32)}

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    model = HFDemoNet(X.shape[1])
    model.load_state_dict(demo_model.make_model(X.shape[1], seed=0).state_dict())
    args = TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=True, report_to=[], num_train_epochs=1,
        per_device_train_batch_size=BATCH_SIZE // ranks, learning_rate=demo_model.LR, seed=0,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
        ddp_backend="gloo" if ranks > 1 else None,
    )
    callback = SwarmTrainerCallback(local_api=rank_api(local_api), **SETTINGS)
    trainer = Trainer(model=model, args=args, train_dataset=ShardDataset(), callbacks=[callback])
    trainer.train()
    assert callback.swarm is not None
    report(out, trainer.args.process_index, model, callback.swarm, trainer.state.global_step)


FRAMEWORKS = {"plain": train_plain, "lightning": train_lightning, "hf": train_hf}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", choices=sorted(FRAMEWORKS), required=True)
    p.add_argument("--shard", type=Path, required=True)
    p.add_argument("--local-api", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--die-rank", type=int, default=-1)
    p.add_argument("--die-after", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    if int(os.environ.get("RANK", "0")) == a.die_rank:
        threading.Timer(a.die_after, os._exit, (3,)).start()
    X, y = load_shard(a.shard)
    FRAMEWORKS[a.framework](X, y, a.local_api, a.out)


if __name__ == "__main__":
    main()
