"""Hostile payloads on the peer API: each refused with a clear error, the server serving on.

The hostile clients hold valid identities (the chain knows them): these are the checks that stand
between a compromised or buggy participant and the merge.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from transport_support import MemoryAuthority, MemoryHandler, Pki, model_state, raw_stub

from swarmnode.errors import PayloadRejected, RoundError
from swarmnode.identity import TlsFiles
from swarmnode.transport import serde
from swarmnode.transport._rpc import ADDRESS_KEY, error_from_rpc
from swarmnode.transport.peer import PeerClient, PeerServer
from swarmnode.transport.proto import peer_pb2 as pb

LEADER, ALICE = "0xLEADER", "0xA11CE"
LIMIT = 1 << 20
MiB = 1 << 20


@dataclass
class Leader:
    handler: MemoryHandler
    endpoint: str
    trust: Path
    alice: TlsFiles
    authority: MemoryAuthority

    def client(self) -> PeerClient:
        return PeerClient(self.endpoint, self.alice, ALICE, LEADER, self.authority)

    def raw_push(self, chunks: Iterator[pb.Chunk]) -> PayloadRejected | None:
        """Push through the generated stub; the SwarmError it failed with, if any."""
        channel, stub = raw_stub(self.endpoint, self.trust, self.alice)
        with channel:
            try:
                stub.PushUpdate(chunks, timeout=10, metadata=((ADDRESS_KEY, ALICE),))
            except grpc.RpcError as err:
                return error_from_rpc(err)  # type: ignore[return-value]
        return None


@pytest.fixture(scope="module")
def leader(pki: Pki) -> Iterator[Leader]:
    tls = {LEADER: pki.node("leader"), ALICE: pki.node("alice")}
    authority = MemoryAuthority(
        fingerprints={a: t.fingerprint() for a, t in tls.items()},
        participants={1: {LEADER, ALICE}, 2: {ALICE}},
    )
    handler = MemoryHandler()
    server = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler,
                        serde.ParamSpec.from_state(model_state()), max_bytes=LIMIT)
    port = server.start()
    yield Leader(handler, f"127.0.0.1:{port}", pki.trust, tls[ALICE], authority)
    server.stop(0)


def _push(leader: Leader, payload: bytes, round: int = 1, **kw: bytes) -> None:
    with leader.client() as client:
        client.push_update(round, 5, payload, timeout=10, **kw)


@pytest.fixture(autouse=True)
def still_serving(leader: Leader) -> Iterator[None]:
    leader.handler.updates.clear()
    yield
    leader.handler.updates.clear()
    _push(leader, serde.encode(model_state(3)))  # a good client, after whatever happened
    weight, state, _ = leader.handler.updates[(1, ALICE)]
    assert weight == 5 and torch.equal(state["fc.weight"], model_state(3)["fc.weight"])
    leader.handler.updates.clear()


def _header(total: int, digest: bytes = b"\0" * 32, round: int = 1) -> pb.Chunk:
    return pb.Chunk(header=pb.Header(round=round, weight=5, total_bytes=total, digest=digest))


def test_good_update_arrives_intact(leader: Leader) -> None:
    payload = serde.encode(model_state(1))
    _push(leader, payload)
    weight, state, digest = leader.handler.updates[(1, ALICE)]
    assert weight == 5 and digest == serde.digest(payload)
    assert serde.encode(state) == payload


def test_truncated_stream(leader: Leader) -> None:
    payload = serde.encode(model_state())
    half = pb.Chunk(data=payload[: len(payload) // 2])
    err = leader.raw_push(iter([_header(len(payload), serde.digest(payload)), half]))
    assert isinstance(err, PayloadRejected)
    assert f"ended after {len(payload) // 2} of the {len(payload)} bytes announced" in str(err)


def test_wrong_digest(leader: Leader) -> None:
    with pytest.raises(PayloadRejected, match="update for round 1 from 0xA11CE: payload digest "
                                              ".* differs from the expected"):
        _push(leader, serde.encode(model_state()), digest=hashlib.sha256(b"x").digest())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {("fc.kernel" if k == "fc.weight" else k): v for k, v in s.items()},
         r"lacks tensor\(s\) 'fc.weight' and has tensor\(s\) 'fc.kernel'"),
        (lambda s: dict(s, **{"fc.weight": torch.zeros(4, 8)}),
         r"'fc.weight' has shape \[4, 8\], the spec says \[8, 4\]"),
        (lambda s: dict(s, **{"fc.bias": s["fc.bias"].half()}),
         "'fc.bias' has dtype float16, the spec says float32"),
        (lambda s: dict(s, **{"fc.bias": torch.full((8,), float("nan"))}),
         "'fc.bias' holds 8 NaN/Inf value"),
        (lambda s: dict(s, **{"fc.bias": torch.full((8,), float("inf"))}),
         "'fc.bias' holds 8 NaN/Inf value"),
    ],
    ids=["names", "shape", "dtype", "nan", "inf"],
)
def test_payload_that_does_not_fit_the_spec(leader: Leader, change, message: str) -> None:
    with pytest.raises(PayloadRejected, match=message):
        _push(leader, serde.encode(change(model_state())))
    assert leader.handler.updates == {}


def test_random_bytes(leader: Leader) -> None:
    with pytest.raises(PayloadRejected, match="payload is not safetensors"):
        _push(leader, os.urandom(4096))


class _Armed:
    """Unpickling this creates ``marker``: proof that someone ran the payload's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_pickle_payloads_never_run(leader: Leader, tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Armed(armed)))
    assert armed.exists()  # the payload is live: unpickling it does create the file
    marker = tmp_path / "pwned"
    with pytest.raises(PayloadRejected, match="pickle stream .*could run its code"):
        _push(leader, pickle.dumps({"fc.weight": _Armed(marker)}))
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(8, 4), "evil": _Armed(marker)}, buf)
    with pytest.raises(PayloadRejected, match=r"zip archive \(torch.save output\?\)"):
        _push(leader, buf.getvalue())
    assert not marker.exists()


def _counting(first: pb.Chunk, pieces: int, size: int, sent: list[int]) -> Iterator[pb.Chunk]:
    yield first
    block = os.urandom(size)
    for _ in range(pieces):
        sent.append(1)
        yield pb.Chunk(data=block)


def test_oversize_is_refused_before_the_data(leader: Leader) -> None:
    sent: list[int] = []
    err = leader.raw_push(_counting(_header(64 * MiB), 64, MiB, sent))
    assert isinstance(err, PayloadRejected)
    assert f"announced {64 * MiB} bytes, over the limit of {LIMIT} bytes" in str(err)
    assert len(sent) < 64  # refused on the header, not after buffering the stream


def test_stream_longer_than_its_header_is_cut_off(leader: Leader) -> None:
    sent: list[int] = []
    err = leader.raw_push(_counting(_header(1000), 64, MiB, sent))
    assert isinstance(err, PayloadRejected)
    assert "carries more than the 1000 bytes announced" in str(err)
    assert len(sent) < 64


def test_one_giant_message_is_refused_by_grpc(leader: Leader) -> None:
    err = leader.raw_push(iter([_header(1000), pb.Chunk(data=bytes(17 * MiB))]))
    assert isinstance(err, PayloadRejected) and "RESOURCE_EXHAUSTED" not in str(err)
    assert "larger than max" in str(err)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([pb.Chunk(data=b"abc")], "the first chunk must carry the header"),
        ([], "the first chunk must carry the header"),
        ([_header(3, b"short"), pb.Chunk(data=b"abc")], "digest is not a SHA-256"),
        ([_header(6), pb.Chunk(data=b"abc"), _header(3)], "a second header in the stream"),
    ],
    ids=["no-header", "empty", "digest-size", "two-headers"],
)
def test_malformed_streams(leader: Leader, chunks: list[pb.Chunk], message: str) -> None:
    err = leader.raw_push(iter(chunks))
    assert isinstance(err, PayloadRejected) and message in str(err)


def test_update_for_another_round(leader: Leader) -> None:
    with pytest.raises(RoundError, match="round 2 is not the current round 1; update refused"):
        _push(leader, serde.encode(model_state()), round=2)


def test_replayed_update(leader: Leader) -> None:
    payload = serde.encode(model_state(4))
    _push(leader, payload)
    with pytest.raises(RoundError, match=r"0xA11CE already sent its update \(replayed\?\)"):
        _push(leader, payload)


def test_a_stalled_stream_does_not_block_others(leader: Leader) -> None:
    release, started = threading.Event(), threading.Event()
    payload = serde.encode(model_state())

    def stalled() -> Iterator[pb.Chunk]:
        yield _header(len(payload), serde.digest(payload))
        started.set()
        release.wait(10)
        yield pb.Chunk(data=payload)

    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(leader.raw_push(stalled())))
    thread.start()
    try:
        assert started.wait(10)
        with leader.client() as other:
            assert other.health(timeout=5)["round"] == 1
    finally:
        release.set()
        thread.join(10)
    assert result == [None] and (1, ALICE) in leader.handler.updates
