"""Parts of a merged model over the real data plane (mutual TLS sockets): a member fetches its
share from the leader and the rest from another member that is still receiving it, every part
verified on arrival; a lying member's part is refused and costs only a retry elsewhere."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from transport_support import MemoryAuthority, MemoryHandler, Pki

from swarmnode.errors import PayloadRejected, PeerRefused, RoundError
from swarmnode.transport.dataplane import DataClient
from swarmnode.transport.parts import MIN_PART_SIZE, FullSource, Manifest, PartBuffer, plan
from swarmnode.transport.peer import PeerServer

LEADER, ALICE, BOB, MALLORY = ("0x" + c * 40 for c in "5678")
MODEL = os.urandom(5 * MIN_PART_SIZE + 777)  # 6 parts
OTHER = os.urandom(len(MODEL))


@dataclass
class PartsHandler(MemoryHandler):
    """A node that serves parts: a whole model (FullSource) or one it is receiving."""

    sources: dict[int, Any] = field(default_factory=dict)
    served_to: list[str] = field(default_factory=list)

    def part_source(self, round: int, timeout: float, to: str | None = None) -> Any:
        return self.sources.get(round)


@pytest.fixture(scope="module")
def nodes(pki: Pki) -> Iterator[dict[str, Any]]:
    tls = {a: pki.node(f"p-{a[2:4]}") for a in (LEADER, ALICE, BOB, MALLORY)}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={r: {LEADER, ALICE, BOB} for r in (1, 2)})
    handlers: dict[str, PartsHandler] = {}
    servers = {}
    for who in (LEADER, BOB, MALLORY):
        handlers[who] = PartsHandler()
        srv = PeerServer("127.0.0.1:0", tls[who], authority, handlers[who], None,
                         max_bytes=1 << 24)
        srv.start()
        assert srv.data is not None
        servers[who] = srv
    try:
        yield {"tls": tls, "handlers": handlers, "servers": servers}
    finally:
        for srv in servers.values():
            srv.stop(0)


def client(nodes: dict[str, Any], me: str, peer: str) -> DataClient:
    tls = nodes["tls"]
    return DataClient("127.0.0.1", nodes["servers"][peer].data.port, tls[me], me,
                      lambda: tls[peer].fingerprint(), f"node {peer[:6]}")


def test_a_member_takes_its_share_from_the_leader_and_the_rest_from_a_member_receiving_it(
        nodes: dict[str, Any]) -> None:
    served: list[str] = []
    nodes["handlers"][LEADER].sources[1] = FullSource(MODEL, on_served=served.append)
    manifest = client(nodes, BOB, LEADER).manifest(1, MIN_PART_SIZE, timeout=30)
    assert manifest == Manifest.of(MODEL, MIN_PART_SIZE)
    bob_buf = PartBuffer(manifest)
    nodes["handlers"][BOB].sources[1] = bob_buf  # Bob serves what he has as it comes in

    alice_buf = PartBuffer(client(nodes, ALICE, LEADER).manifest(1, MIN_PART_SIZE, timeout=30))
    members = sorted([ALICE, BOB])
    alice_plan = plan(manifest.count, members, ALICE, LEADER)
    alice_from_bob = [i for i, srcs in enumerate(alice_plan) if srcs[0] == BOB]
    alice_from_leader = [i for i, srcs in enumerate(alice_plan) if srcs[0] == LEADER]
    bob_from_leader = [i for i, srcs in enumerate(plan(manifest.count, members, BOB, LEADER))
                       if srcs[0] == LEADER]
    assert sorted(alice_from_leader + bob_from_leader) == list(range(manifest.count))

    # Alice asks Bob first, before Bob has a byte: Bob serves each part as it arrives
    got: dict[str, set[int]] = {}
    asking = threading.Thread(target=lambda: got.__setitem__("bob", client(
        nodes, ALICE, BOB).fetch_parts(1, alice_buf, alice_from_bob, timeout=30, wait_s=20)))
    asking.start()
    assert client(nodes, BOB, LEADER).fetch_parts(1, bob_buf, bob_from_leader, timeout=30,
                                                  wait_s=2) == set(bob_from_leader)
    got["leader"] = client(nodes, ALICE, LEADER).fetch_parts(1, alice_buf, alice_from_leader,
                                                             timeout=30, wait_s=2)
    asking.join(60)
    assert got == {"bob": set(alice_from_bob), "leader": set(alice_from_leader)}
    alice_buf.finish(hashlib.sha256(MODEL).digest())
    assert bytes(alice_buf.buf) == MODEL
    # every part left the leader once: the leader learns the swarm holds the model
    assert served == [ALICE]


def test_a_lying_member_costs_a_retry_not_a_wrong_model(nodes: dict[str, Any]) -> None:
    nodes["handlers"][LEADER].sources[1] = FullSource(MODEL)
    nodes["handlers"][BOB].sources[1] = FullSource(OTHER)  # Bob serves another model
    manifest = client(nodes, ALICE, LEADER).manifest(1, MIN_PART_SIZE, timeout=30)
    buf = PartBuffer(manifest)
    with pytest.raises(PayloadRejected, match="does not hash"):
        client(nodes, ALICE, BOB).fetch_parts(1, buf, [0, 1], timeout=30, wait_s=1)
    assert buf.missing() == list(range(manifest.count))  # nothing of Bob's was kept
    assert client(nodes, ALICE, LEADER).fetch_parts(
        1, buf, buf.missing(), timeout=30, wait_s=1) == set(range(manifest.count))
    buf.finish(hashlib.sha256(MODEL).digest())


def test_parts_are_served_only_to_the_rounds_participants_and_only_by_a_holder(
        nodes: dict[str, Any]) -> None:
    nodes["handlers"][LEADER].sources[1] = FullSource(MODEL)
    with pytest.raises(PeerRefused, match="not a participant"):
        client(nodes, MALLORY, LEADER).manifest(1, MIN_PART_SIZE, timeout=30)
    with pytest.raises(RoundError, match="holds no part"):
        client(nodes, ALICE, LEADER).manifest(2, MIN_PART_SIZE, timeout=30)  # not merged yet
    with pytest.raises(PayloadRejected, match="power of two"):
        client(nodes, ALICE, LEADER).manifest(1, MIN_PART_SIZE + 1, timeout=30)
    # a member that holds nothing of the round answers at once, so the asker moves on
    nodes["handlers"][BOB].sources.pop(1, None)
    buf = PartBuffer(Manifest.of(MODEL, MIN_PART_SIZE))
    with pytest.raises(RoundError, match="holds no part"):
        client(nodes, ALICE, BOB).fetch_parts(1, buf, [0], timeout=30, wait_s=1)


class _CutAt:
    """A whole model served in parts that counts the bytes it sends and, once ``fraction`` of
    them went out, takes the server down (``cut``: the link is gone) once."""

    def __init__(self, data: bytes, fraction: float, cut: Any) -> None:
        self.full = FullSource(data)
        self.total, self.fraction, self.cut = len(data), fraction, cut
        self.sent = 0
        self.lock = threading.Lock()
        self.done_cut = threading.Event()

    def manifest_for(self, part_size: int) -> Manifest:
        return self.full.manifest_for(part_size)

    def slice(self, i: int, part_size: int, timeout: float) -> Any:
        with self.lock:
            if self.done_cut.is_set() is False and self.sent >= self.fraction * self.total:
                self.done_cut.set()
                threading.Thread(target=self.cut, daemon=True).start()
            got = self.full.slice(i, part_size, timeout)
            if got is not None:
                self.sent += len(got)
            return got


def test_a_pull_cut_at_90_percent_resumes_from_the_last_verified_part(pki: Pki) -> None:
    """The leader's data plane goes away after 90% of the model left it (every connection cut,
    new ones refused) and comes back on the same port 3 s later: the member's fetch
    (parts.fetch_resumable, what its prefetch runs) keeps the parts it verified and completes
    with the rest, moving at most 15% more bytes than the model."""
    from swarmnode.errors import SwarmError
    from swarmnode.transport.parts import fetch_resumable

    model = os.urandom(40 * MIN_PART_SIZE + 123)  # 10 MiB in 41 parts
    tls = {a: pki.node(f"r-{a[2:4]}") for a in (LEADER, ALICE)}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE}})
    handler = PartsHandler()
    servers: list[PeerServer] = []

    def serve(port: int = 0) -> int:
        srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler, None,
                         max_bytes=1 << 26, data_port=port or None)
        srv.start()
        servers.append(srv)
        assert srv.data is not None
        return srv.data.port

    port = serve()
    back = threading.Event()

    def cut() -> None:
        servers[-1].stop(0)  # the link is gone: connections cut, nothing listens
        threading.Timer(3.0, lambda: (serve(port), back.set())).start()

    source = _CutAt(model, 0.9, cut)
    handler.sources[1] = source
    try:
        plane = DataClient("127.0.0.1", port, tls[ALICE], ALICE,
                           lambda: tls[LEADER].fingerprint(), "the leader")
        buf = PartBuffer(plane.manifest(1, MIN_PART_SIZE, timeout=30))

        def fetch(src: str, wanted: list[int]) -> None:
            try:
                plane.fetch_parts(1, buf, wanted, timeout=30, wait_s=1)
            except SwarmError:
                pass  # what arrived verified is kept; the rest is asked for again

        assert fetch_resumable(buf, [[LEADER]] * buf.manifest.count, fetch, deadline_s=60,
                               pause_s=0.5)
        assert source.done_cut.is_set() and back.is_set()  # the cut and the return happened
        buf.finish(hashlib.sha256(model).digest())
        assert bytes(buf.buf) == model
        assert len(model) <= source.sent <= 1.15 * len(model), source.sent / len(model)
        print(f"resumed pull: {source.sent / len(model):.3f}x the model's bytes")
    finally:
        for srv in servers:
            srv.stop(0)
