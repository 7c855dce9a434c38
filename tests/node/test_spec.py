"""The training spec: canonical JSON, its hash, and field-by-field comparison."""

from __future__ import annotations

import pytest
import torch

from swarmnode.errors import ConfigError, SpecMismatch
from swarmnode.spec import TrainingSpec


def _spec(**kw) -> TrainingSpec:  # type: ignore[no-untyped-def]
    state = kw.pop("state", {"w": torch.zeros(3, 2), "b": torch.zeros(2)})
    args = dict(sync_frequency=4, min_peers=2, merge_method="mean") | kw
    return TrainingSpec.from_state(state, **args)


def test_round_trip_and_hash_are_canonical() -> None:
    s = _spec()
    again = TrainingSpec.from_json(s.to_json())
    assert again == s and again.digest == s.digest
    reordered = _spec(state={"b": torch.zeros(2), "w": torch.zeros(3, 2)})
    assert reordered.to_json() == s.to_json()


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        (dict(sync_frequency=5), "sync_frequency"),
        (dict(min_peers=3), "min_peers"),
        (dict(merge_method="coordmedian"), "merge_method"),
        (dict(state={"w": torch.zeros(3, 3), "b": torch.zeros(2)}), "params[w]"),
        (dict(state={"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(2)}),
         "params[w]"),
        (dict(state={"w": torch.zeros(3, 2)}), "params[b]"),
    ],
)
def test_a_difference_is_named(change: dict, setting: str) -> None:
    with pytest.raises(SpecMismatch) as exc:
        _spec().require_same(_spec(**change))
    assert exc.value.setting == setting
    assert setting.removeprefix("params[").removesuffix("]") in str(exc.value)


def test_malformed_spec_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid swarmnode training spec"):
        TrainingSpec.from_json('{"format": "other"}')
    with pytest.raises(ConfigError, match="not a valid swarmnode training spec"):
        TrainingSpec.from_json("not json")


def test_tensor_messages_read_well() -> None:
    with pytest.raises(SpecMismatch, match=r"setting params\[w\] = 'float32\[3, 3\]' differs "
                       r"from the swarm's 'float32\[3, 2\]'"):
        _spec().require_same(_spec(state={"w": torch.zeros(3, 3), "b": torch.zeros(2)}))
    with pytest.raises(SpecMismatch, match=r"lacks tensor b \(float32\[2\]\)"):
        _spec().require_same(_spec(state={"w": torch.zeros(3, 2)}))


def test_max_weight_is_a_swarm_policy_not_a_trainer_setting() -> None:
    """max_weight travels in the spec JSON (pinned on chain) when set, leaves the JSON (and so
    the hash) of specs without it unchanged, and is not compared with a trainer's settings."""
    import dataclasses

    base = _spec()
    capped = dataclasses.replace(base, max_weight=500)
    assert "max_weight" not in base.to_json() and '"max_weight":500' in capped.to_json()
    assert TrainingSpec.from_json(capped.to_json()).max_weight == 500
    capped.require_same(base)  # the trainer does not know the cap: no mismatch
    for bad in ("0", "2.5", "true", str(2**96)):
        with pytest.raises(ConfigError, match="max_weight"):
            TrainingSpec.from_json(base.to_json()[:-1] + f',"max_weight":{bad}}}')
