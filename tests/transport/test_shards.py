"""The sharded topology's cut (transport.shards): merging slice by slice with the leader's own
collector gives the very bytes the whole merge gives, for every coordinate-wise rule, and the spec
refuses what cannot shard; slices and merged slices over the real data plane."""

from __future__ import annotations

import pytest
import torch
from transport_support import Pki

from swarmnode.errors import ConfigError, PayloadRejected
from swarmnode.node.collector import Collector
from swarmnode.spec import TrainingSpec
from swarmnode.transport import serde
from swarmnode.transport.shards import ALIGN, ShardLayout
from swarmnode.types import Update


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(7, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(7, generator=g),
        "fc.weight": torch.randn(13, 29, generator=g).double(),
        "half.weight": torch.randn(33, generator=g).half(),
        "bn.num_batches_tracked": torch.tensor(seed * 3 + 1),
        "mask": torch.rand(11, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }


OWNERS = ["0xCc", "0xaa", "0xBb", "0xdd", "0xee"]


def _whole(method: str, options: dict[str, float], states: list[dict[str, torch.Tensor]],
           weights: list[float], spec: serde.ParamSpec) -> bytes:
    c = Collector(1, 1, method, options, spec=spec)
    c.expect(OWNERS[: len(states)])
    for s, w, node in zip(states, weights, OWNERS, strict=False):
        c.add(Update(s, w, node))
    merged, _, _ = c.seal()
    done = c.encoded()
    return bytes(done[0]) if done is not None else serde.encode(merged)


def _decode(raw: serde.Buffer, spec: serde.ParamSpec) -> dict[str, torch.Tensor]:
    return serde.decode(bytes(raw), expected_digest=None, spec=spec, max_bytes=1 << 30,
                        reject_nonfinite=True)


def _sharded(method: str, options: dict[str, float], states: list[dict[str, torch.Tensor]],
             weights: list[float], spec: serde.ParamSpec) -> bytes:
    layout = ShardLayout(spec, OWNERS)
    payloads = [serde.encode(s) for s in states]
    out, _ = spec.allocate()
    for i in range(len(layout.owners)):
        if layout.empty(i):
            continue
        c = Collector(1, 1, method, options, spec=layout.slice_spec(i))
        c.expect(OWNERS[: len(states)])
        for p, w, node in zip(payloads, weights, OWNERS, strict=False):
            raw = layout.encode(p, i).to_bytes()  # what travels: the slice's safetensors
            c.add(Update(_decode(raw, layout.slice_spec(i)), w, node))
        merged, _, _ = c.seal()
        done = c.encoded()
        state = _decode(done[0], layout.slice_spec(i)) if done is not None else merged
        layout.place(out, i, state)
    return bytes(out)


@pytest.mark.parametrize("method,options", [("mean", {}), ("coordmedian", {}),
                                            ("trimmedmean", {"trim": 0.2})])
@pytest.mark.parametrize("sites", [2, 5])
def test_a_sharded_merge_gives_the_whole_merges_bytes(method: str, options: dict[str, float],
                                                      sites: int) -> None:
    states = [_model(s) for s in range(sites)]
    weights = [float(10 + 7 * s) for s in range(sites)]
    spec = serde.ParamSpec.from_state(states[0])
    whole = _whole(method, options, states, weights, spec)
    assert _sharded(method, options, states, weights, spec) == whole
    # and the bytes are a real merge, not a copy of one input
    assert whole not in [serde.encode(s) for s in states]


def test_slices_cover_the_tensor_bytes_once_on_aligned_cuts() -> None:
    spec = serde.ParamSpec.from_state(_model(0))
    for n in (1, 2, 3, 5, 8, 40):
        layout = ShardLayout(spec, [f"0x{i:02x}" for i in range(n)])
        assert layout.ranges[0][0] == 0 and layout.ranges[-1][1] == spec.nbytes
        for (lo, hi), (lo2, _) in zip(layout.ranges, layout.ranges[1:], strict=False):
            assert hi == lo2 and lo % ALIGN == 0
        covered = sum(s.nbytes for i in range(n) for s in layout.segments(i))
        assert covered == spec.nbytes
        sizes = [hi - lo for lo, hi in layout.ranges]
        assert max(sizes) - min(sizes) <= 2 * ALIGN or n * ALIGN > spec.nbytes


def test_a_slice_travels_as_its_header_and_a_view_of_the_payload() -> None:
    """encode copies nothing and gives the very bytes (and SHA-256) of the slice encoded as a
    state dict of its own; slice_body finds the tensors' bytes of a canonical slice and refuses
    one whose header is not the layout's."""
    spec = serde.ParamSpec.from_state(_model(0))
    payload = bytearray(serde.encode(_model(3)))
    for n in (1, 3, 5, 8):
        layout = ShardLayout(spec, [f"0x{i:02x}" for i in range(n)])
        for i in range(n):
            if layout.empty(i):
                continue
            piece = layout.encode(payload, i)
            whole, digest = serde.Encoded(layout.cut(payload, i)).to_buffer()
            assert piece.to_bytes() == bytes(whole) and piece.digest == digest
            assert piece.nbytes == layout.slice_payload_bytes(i)
            assert piece.body.obj is payload  # a view, not a copy
            assert bytes(layout.slice_body(whole, i)) == bytes(piece.body)
            other = (i + 1) % n
            if n > 1 and layout.header(other) != layout.header(i):
                with pytest.raises(PayloadRejected, match="not a canonical slice"):
                    layout.slice_body(whole, other)


def test_owners_are_in_fold_order_whatever_order_they_come_in() -> None:
    spec = serde.ParamSpec.from_state(_model(0))
    a = ShardLayout(spec, ["0xBb", "0xaa", "0xCc"])
    b = ShardLayout(spec, ["0xCc", "0xBb", "0xaa"])
    assert a.owners == b.owners == ("0xaa", "0xBb", "0xCc")
    assert a.index_of("0xbb") == 1 and a.index_of("0x99") is None


def test_a_slice_of_the_wrong_shape_or_a_foreign_payload_is_refused() -> None:
    state = _model(0)
    spec = serde.ParamSpec.from_state(state)
    layout = ShardLayout(spec, OWNERS)
    out, _ = spec.allocate()
    wrong = {k: v[:-1] if v.numel() > 1 else v for k, v in layout.cut(serde.encode(state),
                                                                      0).items()}
    with pytest.raises(PayloadRejected, match="slice 0"):
        layout.place(out, 0, wrong)
    with pytest.raises(PayloadRejected, match="not a canonical payload"):
        layout.cut(serde.encode({"other": torch.zeros(3)}), 0)


@pytest.mark.parametrize("method,options,needs", [
    ("geomedian", {}, "needs whole updates"),
    ("mean", {"clip_norm": 1.0}, "clip_norm"),
])
def test_the_spec_refuses_rules_that_cannot_shard(method: str, options: dict[str, float],
                                                  needs: str) -> None:
    with pytest.raises(ConfigError, match=needs):
        TrainingSpec(8, 2, method, merge_options=options, topology="sharded")
    with pytest.raises(ConfigError, match="topology must be one of"):
        TrainingSpec(8, 2, "mean", topology="ring")
    for mode in ("bf16", "fp16", "int8"):  # each slice travels as its coded change
        assert TrainingSpec(8, 2, "mean", topology="sharded", compression=mode).compression \
            == mode


def test_topology_is_pinned_in_the_spec_and_the_default_keeps_old_hashes() -> None:
    plain = TrainingSpec(8, 2, "mean")
    assert "topology" not in plain.to_json()  # specs deployed before keep their hash
    sharded = TrainingSpec(8, 2, "mean", topology="sharded")
    assert TrainingSpec.from_json(sharded.to_json()).topology == "sharded"
    # a swarm policy, not a trainer setting: a trainer's spec (which never names it) matches
    assert sharded.differences(plain) == []


def test_every_number_of_owners_and_odd_tensor_lengths_give_the_same_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Cuts land at every position of vectorised loops (odd lengths, 2-8 byte dtypes)."""
    def model(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"a": torch.randn(4099, generator=g), "b": torch.randn(1023, generator=g).half(),
                "c": torch.randn(777, generator=g).double(),
                "d": torch.randn(333, generator=g).bfloat16()}

    for owners in range(2, 10):
        monkeypatch.setitem(globals(), "OWNERS", [f"0x{i:02x}" for i in range(owners)])
        for method, options in (("mean", {}), ("trimmedmean", {"trim": 0.2})):
            states = [model(s) for s in range(3)]
            spec = serde.ParamSpec.from_state(states[0])
            for weights in ([3.0, 8.0, 13.0], [1.0, 1.0, 1.0]):
                assert (_sharded(method, options, states, weights, spec)
                        == _whole(method, options, states, weights, spec)), (owners, method)


def test_a_slice_and_a_merged_slice_travel_over_the_real_data_plane(pki: Pki) -> None:
    """push_shard sends the header and the payload's view; the owner's server checks and takes
    the very bytes encode gives. pull_shard_into puts a merged slice's tensor bytes straight
    into their place in the model being assembled, and refuses one whose header is not the
    layout's before taking its body."""
    from transport_support import MemoryAuthority

    from swarmnode.transport.dataplane import DataClient
    from swarmnode.transport.peer import PeerServer

    me, owner = "0x" + "c" * 40, "0x" + "d" * 40
    tls = {a: pki.node(f"sh-{a[2:4]}") for a in (me, owner)}
    state = _model(5)
    spec = serde.ParamSpec.from_state(state)
    layout = ShardLayout(spec, [me, owner])
    index = layout.index_of(owner)
    assert index is not None
    payload = serde.encode(state)
    merged = {index: serde.Encoded(layout.cut(serde.encode(_model(6)), index)).to_bytes()}

    class Owner:
        taken: dict[str, torch.Tensor] = {}

        def check_shard(self, round: int, attempt: int, i: int, sender: str,
                        weight: int) -> serde.ParamSpec:
            return layout.slice_spec(i)

        def accept_shard(self, round: int, attempt: int, i: int, sender: str, weight: int,
                         state: dict[str, torch.Tensor]) -> None:
            Owner.taken = {k: v.clone() for k, v in state.items()}

        def merged_shard(self, round: int, attempt: int, i: int, timeout: float,
                         to: str | None = None) -> bytes | None:
            return merged[i]

    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {me, owner}})
    srv = PeerServer("127.0.0.1:0", tls[owner], authority, Owner(), spec, max_bytes=1 << 24)
    srv.start()
    try:
        assert srv.data is not None
        plane = DataClient("127.0.0.1", srv.data.port, tls[me], me,
                           lambda: tls[owner].fingerprint(), "the owner")
        piece = layout.encode(payload, index)
        plane.push_shard(1, 1, index, 7, piece, timeout=30)
        assert serde.encode(Owner.taken) == piece.to_bytes()

        out, _ = spec.allocate()
        into = layout.body(out, index)
        plane.pull_shard_into(1, 1, index, layout.header(index), into, timeout=30, wait_s=1)
        assert bytes(into) == bytes(layout.slice_body(merged[index], index))
        with pytest.raises(PayloadRejected, match="header is not the slice's"):
            other = bytearray(layout.header(index))
            other[-1:] = b"x"  # same length, another header
            plane.pull_shard_into(1, 1, index, bytes(other), into, timeout=30, wait_s=1)
        into.release()
    finally:
        srv.stop(0)
