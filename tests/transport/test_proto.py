"""The committed protobuf code matches the .proto files; the fast chunk codec matches protobuf."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarmnode.errors import PayloadRejected
from swarmnode.transport import _wire
from swarmnode.transport.proto import generate, local_pb2, peer_pb2

PROTO_DIR = Path(generate.__file__).parent


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["local_pb2.py", "local_pb2_grpc.py", "peer_pb2.py", "peer_pb2_grpc.py"]
    for fresh in written:
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run `python -m swarmnode.transport.proto.generate`"
        )


def test_generated_imports_are_package_relative(tmp_path: Path) -> None:
    for name in ("peer_pb2_grpc.py", "local_pb2_grpc.py"):
        text = (PROTO_DIR / name).read_text()
        assert "from . import " in text and "\nimport peer_pb2" not in text
    # importable from another working directory, as an installed package would be
    env = dict(os.environ, PYTHONPATH=str(PROTO_DIR.parents[2]))
    code = ("from swarmnode.transport.proto import peer_pb2_grpc, local_pb2_grpc; "
            "print(peer_pb2_grpc.PeerStub.__name__, local_pb2_grpc.LocalStub.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True)
    assert out.stdout.split() == ["PeerStub", "LocalStub"]


@pytest.mark.parametrize("cls", [peer_pb2.Chunk, local_pb2.Frame])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 1 << 20, (1 << 20) + 17])
def test_data_chunks_encode_like_protobuf(cls: type, size: int) -> None:
    data = os.urandom(size)
    wire = _wire.encode(memoryview(data))
    assert wire == cls(data=data).SerializeToString()
    piece = _wire.decoder(cls)(wire)
    assert _wire.piece_data(piece) == data and _wire.header_of(piece) is None


def test_headers_and_odd_messages_go_through_protobuf() -> None:
    decode = _wire.decoder(peer_pb2.Chunk)
    header = peer_pb2.Chunk(header=peer_pb2.Header(round=3, weight=7, total_bytes=9,
                                                   digest=b"d" * 32))
    got = decode(_wire.encode(header))
    assert _wire.header_of(got) == header.header and _wire.piece_data(got) is None
    # a data chunk followed by an unknown field still parses (via protobuf)
    odd = peer_pb2.Chunk(data=b"abc").SerializeToString() + b"\x18\x05"
    assert _wire.piece_data(decode(odd)) == b"abc"
    broken = decode(b"\x12\x10abc")  # announces 16 bytes, carries 3
    with pytest.raises(PayloadRejected, match="not a valid Chunk"):
        _wire.piece_data(broken)
