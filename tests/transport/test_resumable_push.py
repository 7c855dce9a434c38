"""Pushes resume over the real data plane (mutual TLS sockets through a TCP link that goes down
and comes back): a push cut at 90% completes from the bytes the receiver kept, every check runs
again on the resumed push before a byte, and a sender cannot make the receiver keep more than
one cut push."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from transport_support import MemoryAuthority, MemoryHandler, Pki

from swarmnode.demo.swarm import wait_until
from swarmnode.errors import RoundError, TransportError
from swarmnode.transport import serde
from swarmnode.transport.dataplane import STRIPE_MIN, DataClient
from swarmnode.transport.peer import PeerServer

LEADER, ALICE, BOB = ("0x" + c * 40 for c in "9ab")


class Link:
    """A TCP link to ``target`` that can go down (every connection through it cut, its port not
    listening: connects are refused) and come back on the same port; counts the bytes that went
    up (client to server) and goes down by itself once ``cut_after`` of them passed.

    Going down cuts the client's side at once; the server's side gets every byte the link
    already passed, then the end of the stream (as a router that drops the link after those
    bytes left it): so what the server took in is what went up before the cut, however slowly
    a loaded server reads, and a test's threshold on it holds."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, 0
        self.up = 0
        self.cut_after: int | None = None
        self.went_down = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []  # (client's, server's)
        self._listener: socket.socket | None = None
        self.come_back()

    def come_back(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.port = srv.getsockname()[1]
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def go_down(self) -> None:
        with self._lock:
            srv, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for s in [srv, *(c for c, _ in conns)] if srv is not None else [c for c, _ in conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for _, server in conns:  # what already went up arrives, then the end of the stream
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_WR)
        self.went_down.set()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns.append((client, server))
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            if up:
                with self._lock:
                    self.up += len(data)
                    trip = self.cut_after is not None and self.up >= self.cut_after
                    if trip:
                        self.cut_after = None
                if trip:
                    self.go_down()
                    return
            try:
                dst.sendall(data)
            except OSError:
                break
        if not up:  # the server's side ended: the connection is over both ways
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        else:  # the client ended its side: pass the end on, the server may still answer
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def certs(pki: Pki) -> dict[str, Any]:
    return {a: pki.node(f"rp-{a[2:4]}") for a in (LEADER, ALICE, BOB)}


@pytest.fixture()
def node(certs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A leader's data plane behind a link, for one test."""
    tls = certs
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE, BOB}, 2: {LEADER, ALICE, BOB}})
    handler = MemoryHandler()
    srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler, None, max_bytes=1 << 26)
    srv.start()
    assert srv.data is not None
    link = Link(srv.data.port)
    try:
        yield {"tls": tls, "handler": handler, "server": srv, "data": srv.data, "link": link}
    finally:
        link.go_down()
        srv.stop(0)


def _client(node: dict[str, Any], me: str, port: int) -> DataClient:
    tls = node["tls"]
    return DataClient("127.0.0.1", port, tls[me], me, lambda: tls[LEADER].fingerprint(),
                      "the leader")


def _payload(numel: int, seed: int) -> tuple[Any, bytes]:
    g = torch.Generator().manual_seed(seed)
    return serde.Encoded({"w": torch.randn(numel, generator=g)}).to_buffer()


def _kept(data: Any, digest: bytes) -> dict[str, tuple[int, bytes, int]] | None:
    """The pushes the leader keeps to be resumed, once Alice's push of ``digest`` is one."""
    kept = data.partials()
    return kept if kept.get(ALICE, (0, b"", 0))[1] == digest else None


def _retry(push: Callable[[], None], deadline_s: float = 30.0) -> int:
    """Push until it goes through (as the round machine retries a push), within the deadline;
    how many tries it took."""
    until = time.monotonic() + deadline_s
    tries = 0
    while True:
        tries += 1
        try:
            push()
            return tries
        except TransportError:
            if time.monotonic() > until:
                raise
            time.sleep(0.3)  # the round machine's retry cadence, not a synchronisation


def test_a_push_cut_at_90_percent_resumes_and_moves_at_most_15_percent_more(
        node: dict[str, Any]) -> None:
    """Two stripes; the link goes down after 90% of the model went up and comes back 1 s later:
    the retried push sends only what the leader lacks (counted on the server: payload bytes
    taken in), and the update it accepts is the very one an uncut push delivers."""
    payload, digest = _payload(STRIPE_MIN // 2 + 1234, seed=1)  # 2 stripes of 16 MiB and more
    total = len(payload)
    data, link, handler = node["data"], node["link"], node["handler"]
    plane = _client(node, ALICE, link.port)
    assert plane.stripes_for(total) == 2
    link.cut_after = int(0.9 * total)
    threading.Thread(target=lambda: (link.went_down.wait(30), time.sleep(1.0),
                                     link.come_back()), daemon=True).start()
    before = data.payload_bytes_in
    tries = _retry(lambda: plane.push(1, 5, payload, digest, timeout=30))
    moved = data.payload_bytes_in - before
    assert link.went_down.is_set() and tries >= 2  # it was cut, and it came back
    assert total <= moved <= 1.15 * total, moved / total
    print(f"resumed push: {moved / total:.3f}x the model's bytes taken in, {tries} tries")
    assert data.partials() == {}  # nothing kept once it completed

    # the same bytes pushed uncut by another site: the leader holds the same update
    _client(node, BOB, data.port).push(1, 5, payload, digest, timeout=30)
    cut_w, cut_state, cut_digest = handler.updates[(1, ALICE)]
    whole_w, whole_state, whole_digest = handler.updates[(1, BOB)]
    assert cut_digest == whole_digest == digest
    assert serde.digest(serde.encode(cut_state)) == serde.digest(serde.encode(whole_state))
    assert serde.digest(serde.encode(cut_state)) == digest


def test_a_resumed_push_is_checked_again_before_a_byte_and_the_kept_bytes_go(
        node: dict[str, Any]) -> None:
    """Cut at 90%; meanwhile the round moved on at the leader: the resumed push is refused on
    its header (no payload byte taken in) and the bytes kept of it are dropped."""
    payload, digest = _payload(2_000_000, seed=2)  # 8 MB, one stripe
    total = len(payload)
    data, link, handler = node["data"], node["link"], node["handler"]
    plane = _client(node, ALICE, link.port)
    link.cut_after = int(0.9 * total)
    with pytest.raises(TransportError):
        plane.push(1, 5, payload, digest, timeout=30)
    kept = wait_until(lambda: _kept(data, digest), 20, "the leader to keep the cut push")
    assert set(kept) == {ALICE} and kept[ALICE][0] == 1
    assert kept[ALICE][1] == digest and 0.5 * total < kept[ALICE][2] < total
    # the cut push's receiving thread counts its bytes as it ends, just after it keeps them
    wait_until(lambda: data.payload_bytes_in >= kept[ALICE][2], 20, "the cut push's bytes counted")
    handler.current_round = 2  # round 1 is over at the leader
    link.come_back()
    before = data.payload_bytes_in
    with pytest.raises(RoundError, match="not the current round"):
        plane.push(1, 5, payload, digest, timeout=30)
    assert data.payload_bytes_in == before
    assert data.partials() == {}


def test_a_sender_cannot_make_the_receiver_keep_more_than_one_cut_push(
        node: dict[str, Any]) -> None:
    """Alice's pushes of two different updates for the round are both cut: the leader keeps
    only the latest (one per sender), and a fresh push of the first update (not a resume)
    starts over and completes."""
    data, link = node["data"], node["link"]
    plane = _client(node, ALICE, link.port)
    sizes = []
    for seed in (3, 4):
        payload, digest = _payload(1_000_000, seed=seed)
        link.cut_after = link.up + int(0.8 * len(payload))
        with pytest.raises(TransportError):
            plane.push(1, 5, payload, digest, timeout=30)
        link.come_back()
        kept = wait_until(lambda d=digest: _kept(data, d), 20, "the leader to keep the cut")
        assert set(kept) == {ALICE}, kept
        sizes.append(kept[ALICE][2])
    assert all(0 < s < len(payload) for s in sizes)
    payload, digest = _payload(1_000_000, seed=3)
    fresh = _client(node, ALICE, data.port)  # knows of no cut push: sends it whole
    before = data.payload_bytes_in
    fresh.push(1, 5, payload, digest, timeout=30)
    assert data.payload_bytes_in - before == len(payload)
    assert data.partials() == {}
    assert node["handler"].updates[(1, ALICE)][2] == digest


def test_a_resume_reset_before_its_reply_frees_its_admission(certs: dict[str, Any]) -> None:
    """A participant asks to resume, then resets the connection while it waits for admission:
    once admitted, the server's reply fails; the admission slot and the update's entry must go,
    or two such resets would hold every push to the leader until it restarts."""
    import json
    import ssl
    import struct

    from swarmnode.transport.dataplane import DataServer, _context

    tls = certs
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE, BOB}})
    server = DataServer("127.0.0.1", 0, tls[LEADER], authority, MemoryHandler(), None, 1 << 26,
                        inflight=1, idle_s=1.0, deadline_s=6.0)
    port = server.start()
    payload, digest = _payload(200_000, 3)

    def raw(me: str, resume: bool) -> ssl.SSLSocket:
        sock = _context(tls[me], server=False).wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1")
        head = json.dumps({"op": "push", "address": me, "round": 1, "weight": 1,
                           "total_bytes": len(payload), "digest": digest.hex(), "stripe": 0,
                           "stripes": 1, **({"resume": True} if resume else {})}).encode()
        sock.sendall(struct.pack("<I", len(head)) + head)
        return sock

    try:
        holder = raw(BOB, resume=False)  # takes the one slot, then stalls (cut by the server)
        holder.sendall(bytes(payload[:1000]))
        wait_until(lambda: server._admit._free == 0, 10, "Bob admitted")  # noqa: SLF001
        waiting = raw(ALICE, resume=True)
        wait_until(lambda: any(k[0] == ALICE.lower() for k in server._inbound),  # noqa: SLF001
                   10, "Alice's header in, waiting for admission")
        waiting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        waiting.close()  # reset
        # the stalled holder is cut, Alice's push is admitted, its reply fails: all freed
        wait_until(lambda: server._admit._free == 1 and not server._inbound, 20,  # noqa: SLF001
                   "the admission slot back and no update entry left")
        _client({"tls": tls}, BOB, port).push(1, 1, payload, digest, timeout=15)
        holder.close()
    finally:
        server.stop()
