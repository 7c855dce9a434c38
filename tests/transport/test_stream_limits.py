"""An enrolled node that abuses the peer API's streams cannot stop it from serving honest peers:
many idle push streams, and a stream that announces a size and then sends empty chunks forever,
are refused or cut off, while an honest push and pull go through (real mTLS gRPC server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from transport_support import MemoryAuthority, MemoryHandler, Pki, model_state, raw_stub

from swarmnode.transport import serde
from swarmnode.transport._rpc import ADDRESS_KEY
from swarmnode.transport.peer import PeerClient, PeerServer
from swarmnode.transport.proto import peer_pb2 as pb

LEADER, ALICE, MALLORY = "0x" + "1" * 40, "0x" + "2" * 40, "0x" + "3" * 40
GRACE_S, MIN_RATE = 1.0, 1 << 20


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[tuple[str, Pki, dict, MemoryHandler]]:
    tls = {LEADER: pki.node("s-leader"), ALICE: pki.node("s-alice"),
           MALLORY: pki.node("s-mallory")}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE, MALLORY}})
    handler = MemoryHandler(merged_models={1: serde.encode(model_state(7))})
    srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler,
                     serde.ParamSpec.from_state(model_state()), max_bytes=1 << 24,
                     rate_grace_s=GRACE_S, min_rate_bytes_s=MIN_RATE, per_peer_streams=2)
    port = srv.start()
    try:
        yield f"127.0.0.1:{port}", pki, tls, handler
    finally:
        srv.stop(0)


def _honest_round_trip(endpoint: str, tls: dict, authority_fps: MemoryAuthority) -> float:
    """Alice pushes her update and pulls the merged model; seconds it took."""
    t0 = time.monotonic()
    with PeerClient(endpoint, tls[ALICE], ALICE, LEADER, authority_fps) as alice:
        alice.push_update(1, 5, serde.encode(model_state(3)), timeout=20)
        assert alice.pull_merged(1, timeout=20) == serde.encode(model_state(7))
    return time.monotonic() - t0


def _attack(endpoint: str, pki: Pki, tls: dict, chunks) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """One of Mallory's pushes: how it ended and after how long."""
    channel, stub = raw_stub(endpoint, pki.trust, tls[MALLORY])
    t0 = time.monotonic()
    with channel:
        try:
            stub.PushUpdate(chunks(), timeout=60, metadata=((ADDRESS_KEY, MALLORY),))
            return "accepted", time.monotonic() - t0
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}", time.monotonic() - t0


def _authority(tls: dict) -> MemoryAuthority:
    return MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()})


def test_many_idle_push_streams_do_not_stop_honest_peers(server) -> None:
    endpoint, pki, tls, handler = server
    handler.updates.clear()
    release, lock = threading.Event(), threading.Lock()
    sent = [0]

    def idle() -> Iterator[pb.Chunk]:
        yield pb.Chunk(header=pb.Header(round=1, weight=5, total_bytes=1000, digest=b"\0" * 32))
        with lock:
            sent[0] += 1
        release.wait(60)

    with ThreadPoolExecutor(16) as pool:
        attacks = [pool.submit(_attack, endpoint, pki, tls, idle) for _ in range(16)]
        try:
            # every one of the 16 streams has sent its header or been refused already
            deadline = time.monotonic() + 20
            while sent[0] + sum(a.done() for a in attacks) < 16:
                assert time.monotonic() < deadline, (sent, [a.done() for a in attacks])
                time.sleep(0.05)
            assert _honest_round_trip(endpoint, tls, _authority(tls)) < 10
            outcomes = [a.result(timeout=30) for a in attacks]
        finally:
            release.set()
    assert (1, ALICE) in handler.updates
    refused = [o for o, _ in outcomes if "stream(s) open to this node" in o]
    cut = [(o, s) for o, s in outcomes if "CANCELLED" in o]
    assert len(refused) >= 14, outcomes  # at most two streams per node at a time
    assert cut and all(s < GRACE_S + 5 for _, s in cut), outcomes  # the rest: cut off


def test_a_stream_of_empty_chunks_is_cut_off(server) -> None:
    endpoint, pki, tls, handler = server
    handler.updates.clear()
    stop = threading.Event()

    def empty_forever() -> Iterator[pb.Chunk]:
        yield pb.Chunk(header=pb.Header(round=1, weight=5, total_bytes=1 << 20,
                                        digest=b"\0" * 32))
        while not stop.is_set():
            yield pb.Chunk(data=b"")
            time.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        attack = pool.submit(_attack, endpoint, pki, tls, empty_forever)
        try:
            assert _honest_round_trip(endpoint, tls, _authority(tls)) < 10
            outcome, seconds = attack.result(timeout=30)
        finally:
            stop.set()
    assert "CANCELLED" in outcome and seconds < GRACE_S + 5, (outcome, seconds)
    assert (1, ALICE) in handler.updates and (1, MALLORY) not in handler.updates
