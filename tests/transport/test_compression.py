"""The update codec (swarmnode.transport.compression) alone: round-trip error bounds, the same
bytes for the same update, integer tensors untouched, error feedback that loses nothing for good,
the two layouts a pushed update may have, and the spec option's checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swarmnode.errors import ConfigError, PayloadRejected
from swarmnode.spec import TrainingSpec
from swarmnode.transport import compression as cp
from swarmnode.transport import serde


def _params(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in state.items()}


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 700, generator=g),  # 7000 values: not a multiple of BLOCK
        "fc.bias": torch.randn(10, generator=g),
        "bn.num_batches_tracked": torch.tensor(17),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(8, generator=g).to(torch.bfloat16),
    }


def _trained(base: dict[str, torch.Tensor], seed: int, size: float = 0.01) -> dict[str,
                                                                                 torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (t + size * torch.randn(t.shape, generator=g).to(t.dtype)
                if t.is_floating_point() else t + 1 if t.dtype != torch.bool else ~t)
            for n, t in base.items()}


def _round_trip(state, base, mode, residual=None):  # type: ignore[no-untyped-def]
    coded = cp.encode(state, base, mode, residual)
    assert coded is not None
    wire, kept = coded
    data = serde.encode(wire)
    spec = cp.UpdateSpec(_params(base), mode)
    got = serde.view_state(data, spec=spec, reject_nonfinite=True)  # the receiver's check
    assert spec.is_compressed(_params(got)) == (mode != "none")
    return cp.decode(got, base, spec.params, mode), data, kept


def wire_change(change: torch.Tensor, mode: str) -> torch.Tensor:
    return change.to(torch.bfloat16 if mode == "bf16" else torch.float16).float()


@pytest.mark.parametrize("mode, rel", [("bf16", 2.0 ** -8), ("fp16", 2.0 ** -10)])
def test_half_precision_changes_come_back_within_their_rounding(mode: str, rel: float) -> None:
    base = _model(0)
    state = _trained(base, 1)
    out, data, kept = _round_trip(state, base, mode)
    for name in ("conv.weight", "fc.weight", "fc.bias"):
        change, back = state[name] - base[name], out[name] - base[name]
        # what the rounding dropped is kept for the next round
        torch.testing.assert_close(kept[name], change - wire_change(change, mode), rtol=0,
                                   atol=0)
        assert out[name].dtype == torch.float32
        # nearest rounding of the change, plus the float32 rounding of base + change
        bound = rel * change.abs() + 2.0 ** -23 * (base[name].abs() + change.abs()) * 2
        assert bool(((back - change).abs() <= bound).all()), name
    # about half of float32's bytes
    assert len(data) < 0.55 * len(serde.encode(state))


def test_int8_changes_come_back_within_half_a_step_of_their_block() -> None:
    base = _model(0)
    state = _trained(base, 2)
    out, data, kept = _round_trip(state, base, "int8")
    assert torch.equal(out["fc.bias"], state["fc.bias"])  # under BLOCK values: sent whole
    assert "fc.bias" not in kept
    for name in ("conv.weight", "fc.weight"):
        change = (state[name] - base[name]).reshape(-1)
        n = change.numel()
        blocks = torch.nn.functional.pad(change, (0, -n % cp.BLOCK)).view(-1, cp.BLOCK)
        step = (blocks.abs().amax(dim=1) / 127).repeat_interleave(cp.BLOCK)[:n]
        err = (out[name] - state[name]).reshape(-1).abs()
        assert bool((err <= step / 2 + 1e-6).all()), name
        assert torch.allclose(kept[name].reshape(-1), change - (out[name] - base[name])
                              .reshape(-1), atol=1e-6)
    assert len(data) < 0.3 * len(serde.encode(state))


@pytest.mark.parametrize("mode", cp.MODES)
def test_the_same_update_gives_the_same_bytes_and_other_tensors_travel_whole(mode: str) -> None:
    base = _model(0)
    state = _trained(base, 3)
    first = _round_trip(state, base, mode)
    again = _round_trip({n: t.clone() for n, t in state.items()},
                        {n: t.clone() for n, t in base.items()}, mode)
    assert first[1] == again[1]
    out = first[0]
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == 18
    assert torch.equal(out["mask"], state["mask"])
    # a bfloat16 tensor is no wider than a 16-bit code: sent whole, exactly
    if mode != "int8":
        assert torch.equal(out["half"], state["half"])
    assert {n: (tuple(t.shape), t.dtype) for n, t in out.items()} == \
        {n: (tuple(t.shape), t.dtype) for n, t in state.items()}


def test_error_feedback_sends_what_rounding_dropped_in_later_rounds() -> None:
    """Over 40 rounds of small changes, the decoded changes add up to the true ones up to the
    last round's residual; without the residual the rounding errors pile up."""
    base = {"w": torch.zeros(4096)}
    g = torch.Generator().manual_seed(7)
    true_sum = torch.zeros(4096)
    fed_sum, plain_sum = torch.zeros(4096), torch.zeros(4096)
    residual: dict[str, torch.Tensor] = {}
    for _ in range(40):
        # one large value per block sets a coarse step: most changes round to 0 without feedback
        change = 2e-3 + 5e-4 * torch.randn(4096, generator=g)  # a steady drift
        change[:: cp.BLOCK] = 1.0
        true_sum += change
        state = {"w": base["w"] + change}
        fed, _, residual = _round_trip(state, base, "int8", residual)
        plain, _, _ = _round_trip(state, base, "int8")
        fed_sum += fed["w"] - base["w"]
        plain_sum += plain["w"] - base["w"]
    assert torch.allclose(true_sum - fed_sum, residual["w"], atol=1e-4)
    fed_err = float((fed_sum - true_sum).abs().max())
    plain_err = float((plain_sum - true_sum).abs().max())
    assert fed_err <= 1.0 / 254 + 1e-4  # at most half a step of one round
    assert plain_err > 10 * fed_err


def test_a_change_the_code_cannot_hold_is_sent_whole() -> None:
    base = {"w": torch.zeros(3)}
    assert cp.encode({"w": torch.tensor([1.0, 7e4, 0.0])}, base, "fp16") is None
    assert cp.encode({"w": torch.tensor([1.0, float("inf"), 0.0])}, base, "bf16") is None
    big = torch.zeros(cp.BLOCK)
    big[1] = float("nan")
    assert cp.encode({"w": big}, {"w": torch.zeros(cp.BLOCK)}, "int8") is None
    assert cp.encode({"w": torch.tensor([1.0, 7e4, 0.0])}, base, "bf16") is not None


def test_an_update_is_whole_or_compressed_never_a_mix() -> None:
    base = _model(0)
    spec = cp.UpdateSpec(_params(base), "bf16")
    whole = serde.encode(_trained(base, 4))
    assert serde.view_state(whole, spec=spec, reject_nonfinite=True)  # the first round's kind
    wire, _ = cp.encode(_trained(base, 4), base, "bf16")  # type: ignore[misc]
    mixed = dict(wire, **{"fc.bias": torch.zeros(10)})  # one tensor whole, the others coded
    with pytest.raises(PayloadRejected, match=r"bf16-compressed update.*'fc.bias' has dtype "
                                              r"float32, the spec says bfloat16"):
        serde.view_state(serde.encode(mixed), spec=spec, reject_nonfinite=True)
    int8 = cp.encode(_trained(base, 4), base, "int8")[0]  # type: ignore[index]
    with pytest.raises(PayloadRejected):
        serde.view_state(serde.encode(int8), spec=spec, reject_nonfinite=True)
    # the size limits of the receivers are those of the whole model
    assert spec.payload_bytes == serde.ParamSpec(_params(base)).payload_bytes
    assert cp.wire_bytes(_params(base), "bf16") < spec.payload_bytes


def test_the_site_codec_sends_one_encoding_per_round_and_needs_the_rounds_start() -> None:
    base = _model(0)
    held = {1: None, 2: serde.encode(base)}  # round 1 starts from nothing, round 2 from base

    def start_of(round: int, pull: bool) -> serde.Buffer | None:
        return held[round]

    member = cp.UpdateCodec("int8", _params(base), start_of)
    leader = cp.UpdateCodec("int8", _params(base), start_of)
    first = _trained(base, 5)
    payload = serde.encode(first)
    assert member.outgoing(1, first, payload) is payload  # nothing committed yet: whole
    state = _trained(base, 6)
    sent = member.outgoing(2, state, serde.encode(state))
    assert len(sent) < 0.3 * len(payload)
    residual = dict(member._residual)
    assert member.outgoing(2, state, serde.encode(state)) is sent  # a retried push
    assert all(torch.equal(residual[n], member._residual[n]) for n in residual)
    wire = serde.view_state(sent, spec=leader.update_spec, reject_nonfinite=True)
    folded = leader.incoming(2, wire, "0xmember")
    # the leader's own update is folded as a member's would be
    own = member.own(2, state, serde.encode(state))
    assert all(torch.equal(folded[n], own[n]) for n in folded)
    with pytest.raises(PayloadRejected, match="no model was committed before this round"):
        leader.incoming(1, wire, "0xmember")


def test_the_spec_option_is_checked_and_left_out_of_the_json_when_none() -> None:
    base = _model(0)
    spec = TrainingSpec.from_state(base, sync_frequency=2, min_peers=2, merge_method="mean")
    assert "compression" not in spec.to_json()  # specs pinned before the option hash the same
    for mode in cp.MODES[1:]:
        text = dataclasses.replace(spec, compression=mode).to_json()
        assert TrainingSpec.from_json(text).compression == mode
    bad = dataclasses.replace(spec, compression="bf16").to_json().replace("bf16", "zstd")
    with pytest.raises(ConfigError, match="compression must be one of none, bf16, fp16, int8, "
                                          "got 'zstd'"):
        TrainingSpec.from_json(bad)
    clash = {"w": torch.zeros(cp.BLOCK), "w" + cp.SCALE_SUFFIX: torch.zeros(1)}
    with pytest.raises(ConfigError, match="rename that tensor or use compression bf16"):
        cp.layout(_params(clash), "int8")


def test_a_chain_outage_is_retried_by_the_round_not_answered_with_a_whole_update() -> None:
    """What a round sends must not depend on a passing outage (the same seed, the same digest):
    the outage reaches the round's loop, which retries the step; a model that cannot be had
    (a failed fetch) sends the update whole."""
    from swarmnode.errors import ChainUnavailable, RoundError

    base = _model(0)
    state = _trained(base, 8)
    payload = serde.encode(state)
    failures = [ChainUnavailable("the chain is restarting"), RoundError("no member serves it")]

    def start_of(round: int, pull: bool) -> serde.Buffer | None:
        if failures:
            raise failures.pop(0)
        return serde.encode(base)

    codec = cp.UpdateCodec("bf16", _params(base), start_of)
    with pytest.raises(ChainUnavailable):
        codec.outgoing(2, state, payload)
    assert codec.outgoing(2, state, payload) is payload  # the fetch failed: whole, said in the log
    assert len(codec.outgoing(3, state, payload)) < 0.55 * len(payload)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_half_precision_error_feedback_keeps_the_rounding_from_piling_up(mode: str) -> None:
    """A change of 1 + 1e-3 each round rounds to 1 in bfloat16 (steps of 2^-7 near 1): without
    feedback 40 rounds lose 0.04, with it never more than half a step."""
    base = {"w": torch.zeros(512)}
    true_sum, fed_sum = torch.zeros(512), torch.zeros(512)
    residual: dict[str, torch.Tensor] = {}
    for _ in range(40):
        change = torch.full((512,), 1.0 + 1e-3)
        true_sum += change
        fed, _, residual = _round_trip({"w": change}, base, mode, residual)
        fed_sum += fed["w"]
    step = 2.0 ** -7 if mode == "bf16" else 2.0 ** -10
    assert float((fed_sum - true_sum).abs().max()) <= step / 2 + 1e-4
