"""One hospital's training script in the demo: an ordinary PyTorch loop plus `SwarmCallback`.

    python -m swarmnode.demo.trainer --shard h1.npz --test test.npz --out h1.json \\
        --local-api unix:///.../node.sock --sync-frequency 4 --min-peers 2

It trains the same model twice on its own shard: once alone (the local-only baseline) and once
with the swarm, and writes both test-set scores and the final model's digest to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from swarmnode.callback import SwarmCallback
from swarmnode.demo import model as demo_model
from swarmnode.demo.data import load_shard
from swarmnode.demo.tasks import get_task
from swarmnode.transport import serde


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--shard", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local-api", required=True)
    p.add_argument("--sync-frequency", type=int, default=4)
    p.add_argument("--min-peers", type=int, default=2)
    p.add_argument("--merge", default="mean")
    p.add_argument("--clip-norm", type=float, default=None,
                   help="The swarm's merge option clip_norm (secure aggregation needs it).")
    p.add_argument("--task", default="breast-cancer", help="The demo example: digits or "
                   "breast-cancer (its model, loss, scores and default settings).")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-delay", type=float, default=0.0,
                   help="Seconds of extra work per batch (tests: a slower, larger site).")
    p.add_argument("--on-train-end", default="inactive", choices=["inactive", "snapshot", "active"])
    args = p.parse_args(argv)
    task = get_task(args.task)
    epochs = task.epochs if args.epochs is None else args.epochs
    batch_size = task.batch_size if args.batch_size is None else args.batch_size
    lr = task.lr if args.lr is None else args.lr
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s trainer-{args.name} %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    X, y = load_shard(args.shard)
    X_test, y_test = load_shard(args.test)

    # The local-only baseline: this hospital alone.
    local = task.train_local(X, y, seed=args.seed, epochs=epochs)
    local_scores = task.evaluate(local, X_test, y_test)

    # The same loop with the swarm.
    model = task.make_model(X.shape[1], args.seed)
    optimizer = task.make_optimizer(model, lr=lr)
    swarm = SwarmCallback(
        model, sync_frequency=args.sync_frequency, min_peers=args.min_peers,
        merge_method=args.merge, num_samples=len(y), local_api=args.local_api,
        merge_options={"clip_norm": args.clip_norm} if args.clip_norm is not None else None,
        val_data=(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)),
        loss_fn=task.loss_fn, metric_fn=task.accuracy_fn,
        on_train_end_policy=args.on_train_end,
    )
    loader = demo_model.make_loader(X, y, batch_size, args.seed)
    started = time.monotonic()
    swarm.on_train_begin()
    for epoch in range(epochs):
        if swarm.should_stop:
            break
        def on_batch_end() -> None:
            if args.batch_delay:
                time.sleep(args.batch_delay)
            swarm.on_batch_end()

        task.train_epoch(model, loader, optimizer, on_batch_end=on_batch_end,
                         should_stop=lambda: swarm.should_stop)
        swarm.on_epoch_end(epoch)
    swarm.on_train_end()
    swarm_scores = task.evaluate(model, X_test, y_test)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    result = {
        "name": args.name,
        "samples": int(len(y)),
        "malignant": int((y == demo_model.MALIGNANT).sum()),
        "labels": task.describe_labels(y),
        "local": local_scores,
        "swarm": swarm_scores,
        "final_digest": serde.digest(serde.encode(state)).hex(),
        "callback_final_digest": swarm.state.final_digest,
        "rounds": swarm.state.rounds,
        "joined_at_round": int(swarm.node_info.get("latest_round", 0)),
        "final_round": swarm.state.last_round,
        "seconds": time.monotonic() - started,
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
