"""CUDA check of SwarmCallback: a model on the GPU syncs through a real local API server.

Run on a machine with a GPU (the device tool); writes results/cuda_callback.json. The node service
is replaced by a LocalServer whose handler merges the trainer's parameters with a fixed second
"site" (the mean of the two), so the check is about the callback's device handling: parameters
leave the GPU as safetensors bytes, the merged ones come back onto the GPU, validation runs there,
and training continues on the GPU after every sync.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from swarmnode.callback import SwarmCallback
from swarmnode.spec import TrainingSpec
from swarmnode.transport import serde
from swarmnode.transport.local import LocalServer


class MergeWithOtherSite:
    """LocalHandler: the mean of the trainer's parameters and a fixed other site's."""

    def __init__(self, other: dict[str, torch.Tensor]) -> None:
        self.other = other
        self.syncs = 0
        self.last_merged: dict[str, torch.Tensor] = {}

    def call(self, method, args, payload):  # type: ignore[no-untyped-def]
        if method == "hello":
            TrainingSpec.from_json(args["spec"])
            return {"latest_round": 0, "training_finished": False}, None
        state = serde.decode(payload, expected_digest=None, spec=None, max_bytes=1 << 30,
                             reject_nonfinite=True)
        merged = {k: (v + self.other[k]) / 2 if v.is_floating_point()
                  else torch.maximum(v, self.other[k]) for k, v in state.items()}
        self.syncs += 1
        self.last_merged = merged
        data = serde.encode(merged)
        return {"round": self.syncs, "digest": serde.digest(data).hex(),
                "training_finished": False}, data


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 1)).to(dev)
    other = {k: torch.randn_like(v.float()).to(v.dtype).cpu() if v.is_floating_point()
             else v.cpu().clone() for k, v in model.state_dict().items()}
    handler = MergeWithOtherSite(other)
    X = torch.randn(512, 64, device=dev)
    y = (X[:, 0] > 0).float()
    with tempfile.TemporaryDirectory() as tmp:
        target = f"unix://{Path(tmp) / 'node.sock'}"
        with LocalServer(target, handler):
            swarm = SwarmCallback(model, sync_frequency=4, min_peers=2, num_samples=512,
                                  local_api=target, val_data=(X[:128], y[:128]),
                                  loss_fn=lambda o, t: torch.nn.functional
                                  .binary_cross_entropy_with_logits(o.squeeze(-1), t),
                                  timeout=60)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            t0 = time.perf_counter()
            swarm.on_train_begin()
            checks = []
            for step in range(32):
                xb, yb = X[step * 16 % 512:][:16], y[step * 16 % 512:][:16]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    model(xb).squeeze(-1), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                swarm.on_batch_end()
                if swarm.state.batches_since_sync == 0:  # just synced: compare with the handler
                    got = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                    same = all(torch.equal(got[k], handler.last_merged[k]) for k in got)
                    on_gpu = all(p.is_cuda for p in model.parameters())
                    checks.append(same and on_gpu)
            elapsed = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "syncs": handler.syncs,
        "every_sync_loaded_the_merged_model_onto_the_gpu": all(checks) and len(checks) == 8,
        "params_on_gpu_after_training": all(p.is_cuda for p in model.parameters()),
        "seconds": round(elapsed, 3),
    }
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "results/cuda_callback.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["every_sync_loaded_the_merged_model_onto_the_gpu"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
