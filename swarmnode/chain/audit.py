"""Check a training's audit log on chain: every round's events agree with the protocol's rules.

Anyone with read access to the chain can run it; it needs no node and no parameters. With a model
file it also proves that the file is the swarm's final model (its SHA-256 is the final digest).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from swarmnode.chain.client import SwarmContract
from swarmnode.errors import ConfigError, SwarmError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (a zip archive) since torch 1.6
SAVE_HINT = ("save the state dict with safetensors.torch.save_file({k: v.contiguous() for k, v "
             "in model.state_dict().items()}, PATH), or torch.save(model.state_dict(), PATH)")

__all__ = ["AuditReport", "audit", "tensors_digest"]


@dataclass
class AuditReport:
    rounds_committed: int = 0
    rounds_abandoned: int = 0
    reelections: int = 0
    final_round: int | None = None
    final_digest: bytes | None = None
    problems: list[str] = field(default_factory=list)
    model_matches: bool | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.model_matches is not False

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "rounds_committed": self.rounds_committed,
            "rounds_abandoned": self.rounds_abandoned, "reelections": self.reelections,
            "final_round": self.final_round,
            "final_digest": self.final_digest.hex() if self.final_digest else None,
            "model_matches_final_digest": self.model_matches, "problems": self.problems,
        }


def audit(contract: SwarmContract, model_digest: bytes | None = None) -> AuditReport:
    """Replay the training's events, with its registry's, and check each round against the
    protocol's rules (v2: identities in the registry, rounds and metrics in the training)."""
    report = AuditReport()
    registry = contract.registry
    if contract.address not in registry.trainings():
        report.problems.append(f"the registry {registry.address} does not list this training")
    authorized: set[str] = set()
    revoked: set[str] = set()
    enrolled: set[str] = set()
    joined: set[str] = set()
    checked_in: dict[int, set[str]] = defaultdict(set)
    leader: dict[int, str] = {}
    committed: dict[int, bytes] = {}
    for ev in contract.events():
        a = ev.args
        if ev.name == "Authorized":
            authorized.add(a["site"])
        elif ev.name == "Revoked":
            revoked.add(a["site"])
        elif ev.name == "Enrolled":
            if a["site"] not in authorized:
                report.problems.append(f"{a['site']} enrolled without an authorisation")
            enrolled.add(a["site"])
        elif ev.name == "Joined":
            if a["node"] not in enrolled or a["node"] in revoked:
                report.problems.append(f"{a['node']} joined without a live enrolment")
            joined.add(a["node"])
        elif ev.name == "CheckedIn":
            if a["node"] in revoked:
                report.problems.append(f"round {a['round']}: revoked {a['node']} checked in")
            if a["node"] not in joined:
                report.problems.append(f"round {a['round']}: {a['node']} checked in unjoined")
            checked_in[a["round"]].add(a["node"])
        elif ev.name == "LeaderElected":
            if a["leader"] not in checked_in[a["round"]]:
                report.problems.append(f"round {a['round']}: leader {a['leader']} did not check in")
            report.reelections += a["attempt"] > 1
            leader[a["round"]] = a["leader"]
        elif ev.name == "MergeCommitted":
            r = a["round"]
            if leader.get(r) != a["leader"]:
                report.problems.append(f"round {r}: committed by {a['leader']}, not its leader")
            strangers = set(a["members"]) - checked_in[r]
            if strangers:
                report.problems.append(f"round {r}: members {sorted(strangers)} did not check in")
            committed[r] = a["digest"]
            report.rounds_committed += 1
        elif ev.name == "MetricsReported":
            r = a["round"]
            if r not in committed or a["node"] not in checked_in[r]:
                report.problems.append(
                    f"round {r}: metrics from {a['node']}, which did not take part in a "
                    "committed round")
        elif ev.name == "RoundAbandoned":
            report.rounds_abandoned += 1
        elif ev.name == "TrainingFinished":
            report.final_round, report.final_digest = a["round"], a["digest"]
            if committed.get(a["round"]) != a["digest"]:
                report.problems.append(
                    f"final round {a['round']}: digest differs from its MergeCommitted digest"
                )
    if model_digest is not None:
        report.model_matches = report.final_digest == model_digest
        if report.final_digest is None:
            report.problems.append("the training has not finished: there is no final digest yet")
    return report


def tensors_digest(raw: bytes, name: str) -> bytes:
    """The digest of the tensors in a model file, in the swarm's canonical layout (what the
    chain's digests hash): a safetensors file from any writer, or a ``torch.save``d state dict
    (read with ``torch.load(weights_only=True)``, which loads tensors and plain containers only
    and runs no pickled code). Anything else is refused, naming how to save the model."""
    from swarmnode.transport import serde

    if raw[:4] == ZIP_MAGIC:
        state = _torch_state(raw, name)
    elif raw[:1] == b"\x80":
        raise ConfigError(f"{name} is a pickle stream (pickle.dumps, or torch.save with the old "
                          f"format): not unpickled, it could run any code; {SAVE_HINT}")
    else:
        try:
            state = serde.decode(raw, expected_digest=None, spec=None, max_bytes=len(raw),
                                 reject_nonfinite=False)
        except SwarmError:
            raise ConfigError(f"{name} is neither a safetensors file nor a torch.save'd state "
                              f"dict; {SAVE_HINT}") from None
    return serde.digest(serde.encode(state))


def _torch_state(raw: bytes, name: str) -> dict[str, Any]:
    import io
    import pickle

    import torch

    try:
        loaded = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{name} is a torch.save file that holds more than tensors (a whole model object? "
            f"torch.load(weights_only=True) refused it: {first}); it is not unpickled. "
            f"{SAVE_HINT}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise ConfigError(f"{name} holds a {type(loaded).__name__}, not a state dict; "
                          f"{SAVE_HINT}")
    bad = [str(k) for k, v in loaded.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{name} holds entries that are not named tensors ({', '.join(bad[:5])}"
                          f"): a checkpoint, not a state dict; {SAVE_HINT}")
    return dict(loaded)
