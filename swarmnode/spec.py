"""The training spec: the settings every node of one swarm must share.

The spec is canonical JSON (sorted keys, no whitespace); its SHA-256 is pinned in the contract at
deployment and the full JSON is published in the contract's ``SpecPublished`` event, so any node can
read the swarm's spec from the chain and compare its own settings field by field. A node whose
settings differ is refused with a :class:`SpecMismatch` that names the differing setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmnode.errors import ConfigError, SpecMismatch
from swarmnode.privacy.guards import check_noise
from swarmnode.privacy.guards import check_spec as check_secure_aggregation
from swarmnode.privacy.noise import DistributedNoise
from swarmnode.transport.compression import check_mode

__all__ = ["TensorSpec", "TrainingSpec", "dtype_name"]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TrainingSpec:
    """Settings pinned on chain. ``params`` maps each parameter name to its shape and dtype."""

    sync_frequency: int
    min_peers: int
    merge_method: str
    params: Mapping[str, TensorSpec] = field(default_factory=dict)
    merge_options: Mapping[str, float] = field(default_factory=dict)
    # The largest weight (sample count x node_weight) one node may contribute with; None: no cap.
    # A swarm policy set at deployment (the contract refuses heavier check-ins), not a trainer
    # setting: trainers are not compared on it.
    max_weight: int | None = None
    # How a round's updates are merged: "leader" (every update to the round's leader, which
    # merges and serves the merged model) or "sharded" (each participant merges one slice of
    # the parameters, see swarmnode.transport.shards); both give the same merged bytes.
    topology: str = "leader"
    # How members send their updates (to the leader; sharded: each slice to its owner):
    # "none" (the whole model), "bf16" / "fp16" (the change from the round's starting model,
    # rounded) or "int8" (8-bit, with error feedback); see swarmnode.transport.compression. A
    # swarm policy, like max_weight: trainers are not compared on it.
    compression: str = "none"
    # Secure aggregation (swarmnode.privacy, swarmnode.node.secure): the round's leader learns
    # only the sum of the updates (a node without a data plane refuses it at start:
    # swarmnode.privacy.guards.refuse_until_wired).
    secure_aggregation: bool = False
    # Distributed noise on the masked sum (swarmnode.privacy.noise; only with secure
    # aggregation): each site adds its share of discrete Gaussian noise before masking, and the
    # swarm's epsilon is reported per round and in total (swarmnode.privacy.accountant).
    distributed_noise: DistributedNoise | None = None

    def __post_init__(self) -> None:
        try:
            if self.secure_aggregation:
                check_secure_aggregation(
                    merge_method=self.merge_method, merge_options=self.merge_options,
                    min_peers=self.min_peers, topology=self.topology,
                    compression=self.compression, max_weight=self.max_weight)
            check_noise(self.distributed_noise, secure_aggregation=self.secure_aggregation,
                        merge_options=self.merge_options, max_weight=self.max_weight,
                        params=self.params)
            check_topology(self.topology, self.merge_method, self.merge_options)
        except ValueError as exc:
            raise ConfigError(f"training spec: {exc}") from None

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, torch.Tensor],
        *,
        sync_frequency: int,
        min_peers: int,
        merge_method: str,
        merge_options: Mapping[str, float] | None = None,
    ) -> TrainingSpec:
        params = {
            name: TensorSpec(tuple(int(d) for d in t.shape), dtype_name(t.dtype))
            for name, t in state.items()
        }
        return cls(sync_frequency, min_peers, merge_method, params, dict(merge_options or {}))

    # -- canonical form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "swarmnode-spec/1",
            "sync_frequency": self.sync_frequency,
            "min_peers": self.min_peers,
            "merge_method": self.merge_method,
            "merge_options": dict(sorted(self.merge_options.items())),
            "params": {
                name: {"shape": list(p.shape), "dtype": p.dtype}
                for name, p in sorted(self.params.items())
            },
        } | ({"max_weight": self.max_weight} if self.max_weight is not None else {}) | (
            {"topology": self.topology} if self.topology != "leader" else {}) | (
            {"compression": self.compression} if self.compression != "none" else {}) | (
            {"secure_aggregation": True} if self.secure_aggregation else {}) | (
            {"distributed_noise": self.distributed_noise.to_dict()}
            if self.distributed_noise is not None else {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.to_json().encode()).digest()

    @classmethod
    def from_json(cls, text: str, source: str = "spec") -> TrainingSpec:
        try:
            raw = json.loads(text)
            if raw.get("format") != "swarmnode-spec/1":
                raise ValueError(f"unknown format {raw.get('format')!r}")
            params = {
                name: TensorSpec(tuple(int(d) for d in p["shape"]), str(p["dtype"]))
                for name, p in raw["params"].items()
            }
            return cls(
                sync_frequency=int(raw["sync_frequency"]),
                min_peers=int(raw["min_peers"]),
                merge_method=str(raw["merge_method"]),
                params=params,
                merge_options={k: float(v) for k, v in raw.get("merge_options", {}).items()},
                max_weight=_max_weight(raw.get("max_weight")),
                topology=str(raw.get("topology", "leader")),
                compression=check_mode(raw.get("compression", "none")),
                secure_aggregation=_flag(raw.get("secure_aggregation", False),
                                         "secure_aggregation"),
                distributed_noise=DistributedNoise.from_raw(raw.get("distributed_noise")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{source} is not a valid swarmnode training spec ({exc}); "
                "write one with `swarmnode spec` or TrainingSpec.to_json()"
            ) from None

    # -- comparison -------------------------------------------------------------------------------
    def differences(self, other: TrainingSpec) -> list[tuple[str, Any, Any]]:
        """(setting, swarm's value, other's value) for every setting where ``other`` differs.

        Parameters appear as ``params[NAME]`` with ``dtype[shape]`` values (None: absent)."""
        diffs: list[tuple[str, Any, Any]] = []
        for name in ("sync_frequency", "min_peers", "merge_method"):
            if getattr(self, name) != getattr(other, name):
                diffs.append((name, getattr(self, name), getattr(other, name)))
        if dict(self.merge_options) != dict(other.merge_options):
            diffs.append(("merge_options", dict(self.merge_options), dict(other.merge_options)))
        for name in sorted(set(self.params) | set(other.params)):
            ours, theirs = self.params.get(name), other.params.get(name)
            if ours != theirs:
                diffs.append((f"params[{name}]", _show(ours), _show(theirs)))
        return diffs

    def require_same(self, other: TrainingSpec, who: str = "this trainer") -> None:
        """Raise SpecMismatch naming the first differing setting (and how many differ)."""
        diffs = self.differences(other)
        if not diffs:
            return
        setting, swarm, mine = diffs[0]
        more = f" (and {len(diffs) - 1} more differing settings)" if len(diffs) > 1 else ""
        if setting.startswith("params[") and swarm is None:
            what = f"{who}'s model has tensor {setting[7:-1]} ({mine}), which the swarm's has not"
        elif setting.startswith("params[") and mine is None:
            what = f"{who}'s model lacks tensor {setting[7:-1]} ({swarm}) of the swarm's model"
        else:
            what = f"{who}'s setting {setting} = {mine!r} differs from the swarm's {swarm!r}"
        raise SpecMismatch(
            f"{what}{more}; use the swarm's settings and model (see `swarmnode status "
            "--format json`, field spec)",
            setting=setting,
        )


def _show(p: TensorSpec | None) -> str | None:
    return None if p is None else f"{p.dtype}[{', '.join(map(str, p.shape))}]"


TOPOLOGIES = ("leader", "sharded")
# Rules that merge every coordinate on its own: a slice of the parameters merges alone.
SHARDABLE = ("mean", "coordmedian", "trimmedmean")


def check_topology(topology: str, merge_method: str, merge_options: Mapping[str, float]) -> None:
    """ValueError unless ``topology`` is known and the merge rule can run under it. Every
    ``compression`` runs under both topologies (sharded: each slice travels as its coded change,
    node.sharding.scatter)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    if topology != "sharded":
        return
    if merge_method not in SHARDABLE:
        raise ValueError(
            f"topology 'sharded' merges each slice of the parameters apart, which only "
            f"coordinate-wise rules allow ({', '.join(SHARDABLE)}); '{merge_method}' needs whole "
            "updates: use topology 'leader' with it")
    if "clip_norm" in merge_options:
        raise ValueError(
            "topology 'sharded' cannot clip updates by norm (clip_norm): an update's norm spans "
            "every slice and no slice owner sees it whole; use topology 'leader' with clip_norm")


MAX_WEIGHT = (1 << 96) - 1  # what the contract can hold


def _max_weight(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"max_weight must be a whole number, got {value!r}")
    if not 1 <= int(value) <= MAX_WEIGHT:
        raise ValueError(f"max_weight must be between 1 and 2^96-1, got {value!r}")
    return int(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value
