"""The merged model reaches the trainer's module in place: the callback copies each tensor of the
node's reply into the parameter or buffer that already holds it (no new storage, onto the
tensor's own device), and the reply's pages leave the trainer's memory as they are copied."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from swarmnode.callback import SwarmCallback
from swarmnode.errors import PayloadRejected
from swarmnode.spec import TrainingSpec
from swarmnode.transport import serde
from swarmnode.transport.local import LocalServer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.Linear(32, 2))


class _Merges:
    """A node stand-in behind a real local API server: every sync answers with the mean of the
    trainer's parameters and a fixed other site's (integer buffers: the max)."""

    def __init__(self, other: dict[str, torch.Tensor]) -> None:
        self.other = other
        self.last: dict[str, torch.Tensor] = {}

    def call(self, method: str, args: dict[str, Any], payload: Any) -> tuple[dict, Any]:
        if method == "hello":
            TrainingSpec.from_json(args["spec"])
            return {"latest_round": 0, "training_finished": False}, None
        state = serde.decode(payload, expected_digest=None, spec=None, max_bytes=1 << 30,
                             reject_nonfinite=True)
        self.last = {k: (v + self.other[k]) / 2 if v.is_floating_point()
                     else torch.maximum(v, self.other[k]) for k, v in state.items()}
        data = serde.encode(self.last)
        return {"round": 1, "digest": serde.digest(data).hex(), "training_finished": False}, data


def test_the_merged_model_lands_in_the_parameters_own_storage(tmp_path: Path) -> None:
    model = _model()
    other = {k: (torch.randn_like(v) if v.is_floating_point() else v + 3)
             for k, v in model.state_dict().items()}
    handler = _Merges(other)
    storages = {k: v.untyped_storage().data_ptr() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    target = f"unix://{tmp_path / 'node.sock'}"
    with LocalServer(target, handler):
        swarm = SwarmCallback(model, sync_frequency=1, min_peers=2, num_samples=10,
                              local_api=target, timeout=60)
        swarm.on_train_begin()  # the first sync: the merged model comes back
        with torch.no_grad():
            model[0].weight.add_(1.0)  # a training step
        swarm.on_batch_end()  # the second
    assert handler.last
    for name, tensor in model.state_dict().items():
        assert tensor.untyped_storage().data_ptr() == storages[name], name  # not reallocated
        assert torch.equal(tensor, handler.last[name]), name  # and holds the merged values
    assert [id(p) for p in model.parameters()] == params


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_mapped_reply_leaves_memory_as_it_is_copied(tmp_path: Path) -> None:
    """64 MiB in 16 tensors, mapped from a file as the local API hands a reply over: after
    loading, the targets hold the values and the mapping's pages are not resident (without the
    eviction the whole reply would stay: 64 MiB more)."""
    state = {f"t{i:02d}": torch.full((1 << 20,), float(i)) for i in range(16)}
    path = tmp_path / "reply"
    path.write_bytes(serde.encode(state))
    targets = {k: torch.zeros_like(v) for k, v in state.items()}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = serde.SpillMap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
    before = _rss_file()
    serde.load_into(data, targets)
    grown = _rss_file() - before
    assert all(torch.equal(targets[k], state[k]) for k in state)
    assert grown < 8 << 20, f"{grown / 2**20:.1f} MiB of the reply stayed resident"


def test_a_reply_naming_a_tensor_the_model_lacks_is_refused_before_copying() -> None:
    targets = {"a": torch.zeros(3)}
    data = bytearray(serde.encode({"a": torch.ones(3), "stray": torch.ones(2)}))
    with pytest.raises(PayloadRejected, match="'stray'"):
        serde.load_into(data, targets)
    assert torch.equal(targets["a"], torch.zeros(3))  # nothing copied
