"""`swarmnode audit --model`: a model file proven to hold the swarm's final model, whatever wrote
it (safetensors, or a torch.save'd state dict read with weights_only=True), on a real anvil; what
cannot be read safely is refused, naming safetensors.torch.save_file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.cli import app
from swarmnode.transport import serde

runner = CliRunner()
SPEC_JSON = '{"merge_method": "mean", "min_peers": 2}'


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)


def finished_training(anvil: DevChain, digest: bytes) -> str:
    """A training of two sites whose final round committed ``digest``; its address."""
    admin = SwarmContract.deploy(connect(anvil.url), dev_account(0), SPEC_JSON, 2, 0, 60)
    sites = [admin.with_account(dev_account(i)) for i in (4, 5)]
    for i, site in enumerate(sites):
        admin.authorize(site.account_address, hashlib.sha256(f"cert {i}".encode()).digest())
        site.enroll(f"site-{i}.example.org:7441")
    by_address = {s.account_address: s for s in sites}

    def play(r: int, merged: bytes) -> None:
        for site in sites:
            site.checkin(r, 10)
        info = admin.round(r)
        if info.leader is None:
            sites[0].draw(r)
            info = admin.round(r)
        by_address[info.leader].commit_merge(r, merged, info.participants)

    play(1, hashlib.sha256(b"round 1").digest())
    for site in sites:
        site.finish()
    play(admin.final_round(), digest)
    assert admin.training_finished()
    return admin.address


def audit(anvil: DevChain, contract: str, model: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["audit", "--contract", contract, "--rpc-url", anvil.url,
                                 "--model", str(model), "--format", "json"])
    return result.exit_code, result.output


@pytest.mark.anvil
def test_audit_proves_a_torch_saved_state_dict_and_refuses_what_it_cannot_read_safely(
    anvil: DevChain, tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = Net()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    contract = finished_training(anvil, serde.digest(serde.encode(state)))

    saved = tmp_path / "saved_model.pt"  # what HPE's program writes, as a state dict
    torch.save(model.state_dict(), saved)
    code, out = audit(anvil, contract, saved)
    assert code == 0, out
    assert json.loads(out)["model_matches_final_digest"] is True
    safetensors_file = tmp_path / "saved_model.safetensors"
    save_file(state, str(safetensors_file))
    code, out = audit(anvil, contract, safetensors_file)
    assert code == 0 and json.loads(out)["model_matches_final_digest"] is True

    other = Net()  # another model's weights: read, and not the final model
    torch.save(other.state_dict(), tmp_path / "other.pt")
    code, out = audit(anvil, contract, tmp_path / "other.pt")
    assert code == 1 and json.loads(out)["model_matches_final_digest"] is False

    # HPE's own torch.save(model, ...): a pickled object, refused unread
    torch.save(model, tmp_path / "whole.pt")
    code, out = audit(anvil, contract, tmp_path / "whole.pt")
    report = json.loads(out)
    assert code == 1 and report["model_matches_final_digest"] is False
    assert any("safetensors.torch.save_file" in p and "not unpickled" in p
               for p in report["problems"]), report["problems"]
    # a checkpoint with more than tensors, and bytes that are no model at all
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    (tmp_path / "noise.bin").write_bytes(b"\x00" * 64)
    for name in ("checkpoint.pt", "noise.bin"):
        code, out = audit(anvil, contract, tmp_path / name)
        problems = json.loads(out)["problems"]
        assert code == 1 and any("safetensors.torch.save_file" in p for p in problems), problems
        assert not any("serde" in p for p in problems), problems
