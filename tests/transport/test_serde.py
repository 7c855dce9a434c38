"""The wire format: canonical safetensors bytes, digests, and every way decode refuses bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from swarmnode.errors import PayloadRejected
from swarmnode.transport import serde

LIMIT = 1 << 20


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "layer.weight": torch.randn(5, 3, generator=g),
        "layer.bias": torch.randn(5, generator=g, dtype=torch.float64),
        "half": torch.randn(4, generator=g).to(torch.float16),
        "brain": torch.randn(6, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int16),
        "bytes": torch.arange(3, dtype=torch.uint8),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(3, 4, generator=g).t(),  # not contiguous
    }


def _decode(data: bytes, **kw: object) -> dict[str, torch.Tensor]:
    args: dict[str, object] = dict(expected_digest=None, spec=None, max_bytes=LIMIT,
                                   reject_nonfinite=True)
    args.update(kw)
    return serde.decode(data, **args)  # type: ignore[arg-type]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_round_trip_every_dtype() -> None:
    state = _state()
    data = serde.encode(state)
    out = _decode(data, expected_digest=serde.digest(data), spec=serde.ParamSpec.from_state(state))
    _same(out, state)
    out["layer.weight"] += 1  # decoded tensors are writable and do not alias the input
    assert serde.encode(state) == data


def test_deterministic() -> None:
    state = _state()
    reordered = {k: v.clone() for k, v in reversed(list(state.items()))}
    assert serde.encode(state) == serde.encode(reordered) == serde.encode(_state())
    changed = dict(state, steps=torch.tensor(8, dtype=torch.int64))
    assert serde.encode(changed) != serde.encode(state)


def test_canonical_layout_and_interop_with_safetensors() -> None:
    state = _state()
    data = serde.encode(state)
    (hlen,) = struct.unpack("<Q", data[:8])
    assert hlen % 8 == 0  # tensors start aligned
    header = json.loads(data[8 : 8 + hlen])
    assert "__metadata__" not in header and list(header) == sorted(header)
    for entry in header.values():  # every tensor aligned to its item size
        size = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(entry["dtype"], 1)
        assert entry["data_offsets"][0] % size == 0
    _same(safetensors.torch.load(data), {k: v.contiguous() for k, v in state.items()})
    foreign = safetensors.torch.save({k: v.contiguous() for k, v in state.items()},
                                     metadata={"producer": "someone else"})
    _same(_decode(foreign), state)


def test_digest_is_sha256_of_the_bytes() -> None:
    data = serde.encode(_state())
    assert serde.digest(data) == hashlib.sha256(data).digest()
    assert len(serde.digest(data)) == 32


def test_chunks_are_views_covering_the_data() -> None:
    data = os.urandom(10_000)
    pieces = list(serde.chunks(data, 4096))
    assert [len(p) for p in pieces] == [4096, 4096, 1808]
    assert all(isinstance(p, memoryview) and p.obj is data for p in pieces)
    assert b"".join(pieces) == data
    assert list(serde.chunks(b"")) == []


def test_param_spec_json_and_check() -> None:
    state = _state()
    spec = serde.ParamSpec.from_state(state)
    text = spec.to_json()
    assert serde.ParamSpec.from_json(text) == spec and json.loads(text)["steps"] == {
        "dtype": "int64", "shape": []}
    assert text == serde.ParamSpec.from_state(dict(reversed(list(state.items())))).to_json()
    spec.check(state)
    with pytest.raises(PayloadRejected, match=r"lacks tensor\(s\) 'mask'"):
        spec.check({k: v for k, v in state.items() if k != "mask"})
    with pytest.raises(PayloadRejected, match="has tensor.*'extra' that the spec does not name"):
        spec.check(dict(state, extra=torch.zeros(1)))
    with pytest.raises(PayloadRejected, match=r"'layer.weight' has shape \[3, 5\], the spec says"):
        spec.check(dict(state, **{"layer.weight": torch.zeros(3, 5)}))
    with pytest.raises(PayloadRejected, match="'steps' has dtype int32, the spec says int64"):
        spec.check(dict(state, steps=torch.tensor(1, dtype=torch.int32)))


# -- rejections -----------------------------------------------------------------------------------
def test_size_is_checked_first() -> None:
    data = serde.encode(_state())
    with pytest.raises(PayloadRejected, match=f"payload of {len(data)} bytes exceeds the limit"):
        _decode(data, max_bytes=len(data) - 1, expected_digest=b"\0" * 32)


def test_wrong_digest() -> None:
    data = serde.encode(_state())
    with pytest.raises(PayloadRejected, match="digest .* differs from the expected"):
        _decode(data, expected_digest=hashlib.sha256(b"other").digest())


@pytest.mark.parametrize("data", [b"", b"\x01\x02", os.urandom(4096)], ids=["empty", "2B", "4KiB"])
def test_random_bytes(data: bytes) -> None:
    with pytest.raises(PayloadRejected, match="payload is not safetensors"):
        _decode(data)


def test_truncated() -> None:
    data = serde.encode(_state())
    with pytest.raises(PayloadRejected, match="truncated or malformed"):
        _decode(data[:-3])
    with pytest.raises(PayloadRejected, match="announce a .*-byte header"):
        _decode(data[:40])


class _Armed:
    """Unpickling this creates ``marker``: proof that a decoder ran the payload's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_pickle_payloads_are_named_and_never_run(tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Armed(armed)))  # the payload really would run code
    assert armed.exists()
    marker = tmp_path / "pwned"
    with pytest.raises(PayloadRejected, match="a pickle stream .*could run its code"):
        _decode(pickle.dumps({"w": torch.zeros(2), "x": _Armed(marker)}))
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": _Armed(marker)}, buf)
    with pytest.raises(PayloadRejected, match=r"a zip archive \(torch.save output\?\)"):
        _decode(buf.getvalue())
    buf = io.BytesIO()
    torch.save({"x": _Armed(marker)}, buf, _use_new_zipfile_serialization=False)
    with pytest.raises(PayloadRejected, match="pickle"):
        _decode(buf.getvalue())
    assert not marker.exists()


def _raw(header: object, body: bytes = b"", raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_raw(None, raw_header=b"\xff\xfe{"), "the header is not JSON"),
        (_raw([1, 2]), "the header is not a JSON object"),
        (_raw(None, raw_header=b'{"a":1,"a":2}'), "duplicate key"),
        (_raw({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
         "unknown dtype 'C64'"),
        (_raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "invalid shape"),
        (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
         "needs 8 bytes, data_offsets give 4"),
        (_raw({"w": {"dtype": "F32", "shape": [1]}}), "needs exactly dtype, shape and"),
        (_raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
               "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3),
         "overlaps the previous tensor"),
        (_raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3),
         "leaves a hole"),
        (_raw({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
         "bool but holds bytes other than 0 and 1"),
    ],
    ids=["utf8", "array", "dup", "dtype", "shape", "size", "keys", "overlap", "hole", "bool"],
)
def test_malformed_headers(data: bytes, message: str) -> None:
    with pytest.raises(PayloadRejected, match=message):
        _decode(data)


def test_deeply_nested_header_cannot_crash_a_node() -> None:
    """web3's dependencies raise the recursion limit to 100000; json's C parser would then
    overflow the C stack (a segfault) on a header of nested brackets before raising."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        for opener in (b"[", b'{"a":'):
            with pytest.raises(PayloadRejected, match="nests deeper than 4 levels"):
                _decode(_raw(None, raw_header=opener * 60_000))
    finally:
        sys.setrecursionlimit(old)
    quoted = {"we[ir{d\\\"na[me": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    assert list(_decode(_raw(quoted, b"\x01"))) == ['we[ir{d\\\"na[me']  # brackets in strings


def test_misaligned_tensors_still_decode() -> None:
    """Other writers may not align; such tensors are copied rather than refused."""
    w = torch.arange(3, dtype=torch.float32)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + b"\x05" + w.numpy().tobytes()
    out = _decode(data)
    assert torch.equal(out["w"], w) and out["a"].item() == 5


def test_spec_mismatches_are_named() -> None:
    state = _state()
    spec = serde.ParamSpec.from_state(state)
    renamed = dict(state)
    renamed["layer.kernel"] = renamed.pop("layer.weight")
    with pytest.raises(PayloadRejected, match="lacks tensor.*'layer.weight'.*'layer.kernel'"):
        _decode(serde.encode(renamed), spec=spec)
    with pytest.raises(PayloadRejected, match=r"'layer.weight' has shape \[15\]"):
        _decode(serde.encode(dict(state, **{"layer.weight": torch.zeros(15)})), spec=spec)
    with pytest.raises(PayloadRejected, match="'layer.weight' has dtype float64"):
        bad = dict(state, **{"layer.weight": state["layer.weight"].double()})
        _decode(serde.encode(bad), spec=spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite(dtype: torch.dtype, bad: float) -> None:
    w = torch.ones(10, dtype=dtype)
    w[7] = bad
    data = serde.encode({"w": w, "ok": torch.zeros(3)})
    with pytest.raises(PayloadRejected, match=r"tensor 'w' holds 1 NaN/Inf value"):
        _decode(data)
    out = _decode(data, reject_nonfinite=False)
    assert not bool(torch.isfinite(out["w"][7]))
    huge = torch.full((4,), 1e308, dtype=torch.float64)  # finite, though its sum overflows
    _decode(serde.encode({"w": huge}))


def test_encode_refuses_what_safetensors_cannot_carry() -> None:
    with pytest.raises(PayloadRejected, match="dtype complex64 has no safetensors code"):
        serde.encode({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(PayloadRejected, match="not a tensor"):
        serde.encode({"z": [1, 2]})  # type: ignore[dict-item]


# -- the assembler -------------------------------------------------------------------------------
def test_assembler_collects_and_hashes() -> None:
    data = serde.encode(_state())
    asm = serde.Assembler(len(data), LIMIT)
    for piece in serde.chunks(data, 100):
        asm.add(piece)
    received = asm.finish()
    assert bytes(received.data) == data and received.digest == serde.digest(data)
    _same(received.decode(expected_digest=serde.digest(data), spec=None, reject_nonfinite=True),
          _state())


def test_assembler_refuses_early() -> None:
    with pytest.raises(PayloadRejected, match=r"announced 2000 bytes, over the limit of 1000"):
        serde.Assembler(2000, 1000)
    asm = serde.Assembler(100, 1000)
    asm.add(b"x" * 60)
    with pytest.raises(PayloadRejected, match="more than the 100 bytes announced"):
        asm.add(b"x" * 60)
    assert asm.received == 60  # the overflowing piece was not buffered
    short = serde.Assembler(100, 1000)
    short.add(b"x" * 10)
    with pytest.raises(PayloadRejected, match="ended after 10 of the 100 bytes"):
        short.finish()
