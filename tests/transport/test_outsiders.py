"""The data plane closed to outsiders (issue 19 item 5), with real sockets, real TLS and real
certificates: a separate process holds 200 connections to a node's data port (no certificate,
a certificate from a CA the node does not trust, or one from its CA whose address is not
enrolled) while an honest member pushes and pulls; an enrolled non-participant's push is
refused before a payload byte is read (the server's own byte counter); a slow sender's admission
slot goes to an honest one waiting."""

from __future__ import annotations

import json
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transport_support import MemoryAuthority, MemoryHandler, Pki, send_blind

from swarmnode.demo.swarm import wait_until
from swarmnode.errors import ConfigError
from swarmnode.identity import TlsFiles, create_ca, make_bundle
from swarmnode.transport import serde
from swarmnode.transport.listener import ListenerLimits
from swarmnode.transport.peer import PeerClient, PeerServer

LEADER, ALICE, BOB, MALLORY, CAROL = ("0x" + c * 40 for c in "56789")
HOSTILE = 200
HANDSHAKE_S = 3.0  # small, to keep the test short; the default is 10 s
GRACE_S = 1.0


def big_state(seed: int) -> dict[str, torch.Tensor]:
    """About 8 MB of float32: long enough a transfer to be slowed by a starved server."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(2048, 1024, generator=g), "b": torch.randn(1024, generator=g)}


@dataclass
class ChainLikeAuthority(MemoryAuthority):
    """Like the chain's authority: once a round is committed any enrolled node may pull it (so
    this check alone lets an enrolled non-participant through for a past round)."""

    committed: set[int] | None = None

    def is_participant(self, round: int, address: str) -> bool:
        if super().is_participant(round, address):
            return True
        return round in (self.committed or set()) and self.fingerprint_of(address) is not None


@pytest.fixture(scope="module")
def node(pki: Pki) -> Iterator[dict[str, Any]]:
    tls = {a: pki.node(f"o-{a[2:4]}") for a in (LEADER, ALICE, BOB, MALLORY, CAROL)}
    authority = ChainLikeAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                   participants={1: {LEADER, ALICE, MALLORY, CAROL}},
                                   committed={1})
    handler = MemoryHandler(current_round=2)
    srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler,
                     serde.ParamSpec.from_state(big_state(0)), max_bytes=1 << 26,
                     rate_grace_s=GRACE_S, min_rate_bytes_s=1 << 20,
                     listener=ListenerLimits(HANDSHAKE_S, 64, 256))
    port = srv.start()
    assert srv.data is not None
    try:
        yield {"endpoint": f"127.0.0.1:{port}", "data": srv.data, "tls": tls,
               "handler": handler, "authority": authority, "pki": pki, "round": [10]}
    finally:
        srv.stop(0)


def _transfers(node: dict[str, Any], times: int) -> tuple[list[float], list[float]]:
    """Alice pushes an update and pulls the merged model ``times`` times (a round each, over
    the data plane); the seconds each push and each pull took."""
    handler: MemoryHandler = node["handler"]
    pushes, pulls = [], []
    for _ in range(times):
        rnd = node["round"][0] = node["round"][0] + 1
        node["authority"].participants[rnd] = {LEADER, ALICE}
        handler.current_round = rnd
        merged = serde.encode(big_state(rnd + 100))
        handler.merged_models[rnd] = merged
        update = serde.encode(big_state(rnd))
        with PeerClient(node["endpoint"], node["tls"][ALICE], ALICE, LEADER,
                        node["authority"]) as alice:
            alice._check_peer(20)  # the gRPC pin and the data port: not part of the transfer
            assert alice._data_plane(20) is not None
            t0 = time.monotonic()
            alice.push_update(rnd, 5, update, timeout=30)
            t1 = time.monotonic()
            got = alice.pull(rnd, timeout=30)
            t2 = time.monotonic()
            assert alice._data is not None  # over the data plane, not the gRPC fallback
        assert bytes(got.data) == merged
        assert handler.updates[(rnd, ALICE)][2] == serde.digest(update)
        pushes.append(t1 - t0)
        pulls.append(t2 - t1)
    return pushes, pulls


def _hostile(node: dict[str, Any], mode: str, cert: TlsFiles | None) -> subprocess.Popen[str]:
    files = [str(cert.cert), str(cert.key), str(cert.trust)] if cert is not None else []
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("hostile_clients.py")), mode, "127.0.0.1",
         str(node["data"].port), str(HOSTILE), "4", *files],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        pytest.fail(f"the hostile process could not open its connections: {line!r}")
    return proc


def _outsider(node: dict[str, Any], kind: str) -> tuple[str, TlsFiles | None]:
    pki: Pki = node["pki"]
    if kind == "no certificate":
        return "tcp", None
    if kind == "foreign CA":
        root = pki.root / "foreign"
        ca = create_ca(root / "ca", "Foreign CA", org="Elsewhere")
        return "hello", pki.node("o-foreign", ca=ca, trust=make_bundle([ca[0]],
                                                                        root / "trust.pem"))
    return "unenrolled", pki.node("o-eve")  # the node's own CA, address not on chain


@pytest.mark.parametrize("kind", ["no certificate", "foreign CA", "trusted CA, not enrolled"])
def test_200_outsider_connections_do_not_slow_an_honest_member(node, kind) -> None:
    data = node["data"]
    listener = data._listener
    base_push, base_pull = _transfers(node, 3)
    mode, cert = _outsider(node, kind)
    handed, timed_out = listener.stats["handed"], listener.stats["timed_out"]
    proc = _hostile(node, mode, cert)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # how many connections the outsiders hold while Alice works
        while not done.wait(0.02):
            samples.append(listener.pending)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        push, pull = _transfers(node, 3)
        done.set()
        sampler.join()
        assert proc.poll() is None
        # each is dropped at the handshake timeout (and opened again): none is kept
        wait_until(lambda: listener.stats["timed_out"] >= timed_out + HOSTILE,
                   timeout=HANDSHAKE_S + 30, what="the handshake timeout to drop them")
    finally:
        done.set()
        out, _ = proc.communicate("", timeout=60)
    print(f"\n{kind}: {HOSTILE} hostile connections (median {statistics.median(samples)} "
          f"pending while Alice worked; {out.strip()}); honest push "
          f"{statistics.median(base_push):.3f} s -> {statistics.median(push):.3f} s, pull "
          f"{statistics.median(base_pull):.3f} s -> {statistics.median(pull):.3f} s (median of 3)")
    assert statistics.median(samples) >= HOSTILE * 0.9, samples
    # no outsider connection was ever handed a worker: only Alice's (3 pushes, 3 pulls, their
    # stripes)
    assert listener.stats["handed"] - handed <= 3 * 2 * 4
    for before, during in ((base_push, push), (base_pull, pull)):
        assert max(during) < 3 * statistics.median(before) + 2.0, (kind, before, during)


def test_the_total_limit_drops_the_busiest_address_not_the_honest_member(pki: Pki) -> None:
    """With room for fewer pending connections than the outsiders open, the busiest address's
    oldest is dropped for each new one, and the honest member still gets through."""
    tls = {LEADER: pki.node("t-leader"), ALICE: pki.node("t-alice")}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={})
    handler = MemoryHandler(current_round=0)
    srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler,
                     serde.ParamSpec.from_state(big_state(0)), max_bytes=1 << 26,
                     listener=ListenerLimits(HANDSHAKE_S, 64, 120))
    srv.start()
    assert srv.data is not None
    node = {"endpoint": f"127.0.0.1:{srv.port}", "data": srv.data, "tls": tls,
            "handler": handler, "authority": authority, "pki": pki, "round": [0]}
    try:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("hostile_clients.py")), "tcp",
             "127.0.0.1", str(srv.data.port), "120", "3"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            listener = srv.data._listener
            wait_until(lambda: listener.pending >= 115, timeout=30,
                       what="the listener to take the outsiders' connections")  # full, or nearly
            pushes, pulls = _transfers(node, 2)
            stats = dict(srv.data._listener.stats)
        finally:
            out, _ = proc.communicate("", timeout=60)
        print(f"\ntotal limit 120, 120 outsiders on 3 addresses: push {max(pushes):.3f} s, pull "
              f"{max(pulls):.3f} s; evicted {stats['evicted']} ({out.strip()})")
        assert stats["evicted"] >= 1  # Alice's connections made room for themselves
        assert max(pushes + pulls) < 10
    finally:
        srv.stop(0)


def test_one_address_cannot_take_more_than_its_pending_slots(pki: Pki) -> None:
    tls = pki.node("p-leader")
    srv = PeerServer("127.0.0.1:0", tls, MemoryAuthority(), MemoryHandler(),
                     serde.ParamSpec.from_state(big_state(0)), max_bytes=1 << 26,
                     listener=ListenerLimits(HANDSHAKE_S, 8, 256))
    srv.start()
    assert srv.data is not None
    socks = []
    try:
        for _ in range(12):
            socks.append(socket.create_connection(("127.0.0.1", srv.data.port), timeout=10,
                                                  source_address=("127.0.0.2", 0)))
        listener = srv.data._listener
        wait_until(lambda: listener.stats["accepted"] >= 12, timeout=20, what="the accepts")
        assert listener.pending == 8
        assert listener.stats["refused_per_address"] == 4
        t0 = time.monotonic()
        wait_until(lambda: listener.pending == 0, timeout=HANDSHAKE_S + 20,
                   what="the handshake timeout to drop them")
        assert time.monotonic() - t0 < HANDSHAKE_S + 20
        assert listener.stats["timed_out"] == 8 and listener.stats["handed"] == 0
    finally:
        for s in socks:
            s.close()
        srv.stop(0)


@pytest.mark.parametrize(("values", "expect"), [
    ({"handshake_timeout_s": 0}, "handshake_timeout_s=0"),
    ({"pending_per_address": 0}, "pending_per_address=0"),
    ({"pending_per_address": 300}, "more than pending_total=256"),
    ({"pending_total": 1.5}, "pending_total=1.5"),
])
def test_bad_listener_limits_are_refused_with_a_reason(values, expect) -> None:
    with pytest.raises(ConfigError, match=expect):
        ListenerLimits(**values)


# -- before the first payload byte ----------------------------------------------------------------
def _connect(port: int, tls: TlsFiles) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(tls.trust))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.check_hostname = False
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30))
    sock.settimeout(30)
    return sock


def _send(sock: ssl.SSLSocket, obj: dict[str, Any]) -> None:
    raw = json.dumps(obj).encode()
    sock.sendall(struct.pack("<I", len(raw)) + raw)


def _reply(sock: ssl.SSLSocket) -> dict[str, Any] | str:
    try:
        head = b""
        while len(head) < 4:
            more = sock.recv(4 - len(head))
            if not more:
                return "closed"
            head += more
        (n,) = struct.unpack("<I", head)
        body = b""
        while len(body) < n:
            more = sock.recv(n - len(body))
            if not more:
                return "closed"
            body += more
        return json.loads(body)
    except (OSError, ssl.SSLError) as exc:
        return f"closed: {exc}"


def _header(address: str, rnd: int, payload: bytes, **kw: Any) -> dict[str, Any]:
    return {"op": "push", "address": address, "round": rnd, "weight": 5,
            "total_bytes": len(payload), "digest": serde.digest(payload).hex(), "stripe": 0,
            "stripes": 1, **kw}


@pytest.mark.parametrize(("rnd", "expect"), [
    (1, "is not the current round"),  # past, committed: the chain lets any enrolled node pull
    (2, "not a participant of round 2"),  # current
    (3, "not a participant of round 3"),  # future
])
def test_an_enrolled_non_participant_push_is_refused_before_a_payload_byte(node, rnd,
                                                                           expect) -> None:
    """Bob is enrolled, not a participant: his header and the whole payload behind it go out at
    once, yet the server's payload counter does not move and nothing is parsed."""
    data, handler = node["data"], node["handler"]
    handler.current_round = 2
    payload = serde.encode(big_state(rnd))
    before = data.payload_bytes_in
    with _connect(data.port, node["tls"][BOB]) as sock:
        _send(sock, _header(BOB, rnd, payload))
        reply = send_blind(sock, payload)  # not waiting for a verdict: as a hostile sender
    assert isinstance(reply, dict) and not reply["ok"] and expect in reply["message"], reply
    assert data.payload_bytes_in == before
    assert (rnd, BOB) not in handler.updates


def test_a_slow_sender_loses_its_slot_to_a_waiting_honest_one(node) -> None:
    """Mallory and Carol (participants) hold both admission slots: each sends most of her update
    at full speed, then a trickle far below the minimum rate (a rate averaged since the start
    would keep them in for seconds more). The watchdog cuts them; Alice, who waited, gets in.
    Meanwhile a non-participant's push is refused at once: it never waits for a slot."""
    data, handler = node["data"], node["handler"]
    rnd = node["round"][0] = node["round"][0] + 1
    node["authority"].participants[rnd] = {LEADER, ALICE, MALLORY, CAROL}
    handler.current_round = rnd
    stop = threading.Event()
    admitted = threading.Barrier(3)

    def slow(who: str) -> tuple[dict[str, Any] | str, float]:
        payload = serde.encode(big_state(len(who) + ord(who[2])))
        with _connect(data.port, node["tls"][who]) as sock:
            _send(sock, _header(who, rnd, payload))
            sock.sendall(payload[:len(payload) * 9 // 10])  # admitted: most of it, fast
            admitted.wait(timeout=30)
            t0 = time.monotonic()
            try:
                for i in range(len(payload) * 9 // 10, len(payload), 512):
                    if stop.wait(0.1):  # 5 KB/s from now on
                        break
                    sock.sendall(payload[i:i + 512])
            except (OSError, ssl.SSLError):
                pass
            return _reply(sock), time.monotonic() - t0

    with ThreadPoolExecutor(2) as pool:
        slow_ones = [pool.submit(slow, who) for who in (MALLORY, CAROL)]
        admitted.wait(timeout=30)  # both slots are held now
        t0 = time.monotonic()
        with _connect(data.port, node["tls"][BOB]) as sock:  # not a participant: not queued
            payload = serde.encode(big_state(1))
            _send(sock, _header(BOB, rnd, payload))
            refused = _reply(sock)
        refused_s = time.monotonic() - t0
        update = serde.encode(big_state(rnd))
        with PeerClient(node["endpoint"], node["tls"][ALICE], ALICE, LEADER,
                        node["authority"]) as alice:
            alice.push_update(rnd, 5, update, timeout=60)  # waits for a slot, then goes in
        alice_s = time.monotonic() - t0
        outcomes = [f.result(timeout=60) for f in slow_ones]
        stop.set()
    print(f"\nslots held by two slow senders: Alice's push done after {alice_s:.2f} s, the slow "
          f"ones cut after {[round(s, 2) for _, s in outcomes]} s of trickling; a "
          f"non-participant refused in {refused_s:.3f} s")
    assert isinstance(refused, dict) and "not a participant" in refused["message"], refused
    assert refused_s < 5
    assert (rnd, ALICE) in handler.updates
    assert (rnd, MALLORY) not in handler.updates and (rnd, CAROL) not in handler.updates
    for outcome, seconds in outcomes:  # cut long before their trickle would have finished
        assert seconds < 30, outcomes
        assert isinstance(outcome, str) or "minimum rate" in outcome.get("message", ""), outcome
    assert alice_s < 30


def test_the_grpc_push_path_runs_the_same_header_checks(node) -> None:
    """Over the peer API (the fallback when a site has no data port) Bob's push for the past,
    committed round passes the chain's participant rule for pulls, but the handler's header
    check refuses it right after the header chunk (the servicer reads no payload chunk: the
    order is in PushUpdate; gRPC's own flow control may have buffered some)."""
    import grpc
    from transport_support import raw_stub

    from swarmnode.transport._rpc import ADDRESS_KEY, error_from_rpc
    from swarmnode.transport.proto import peer_pb2 as pb

    handler: MemoryHandler = node["handler"]
    handler.current_round = 2
    payload = serde.encode(big_state(1))

    def chunks() -> Iterator[pb.Chunk]:
        yield pb.Chunk(header=pb.Header(round=1, weight=5, total_bytes=len(payload),
                                        digest=serde.digest(payload)))
        for piece in serde.chunks(payload):
            yield pb.Chunk(data=bytes(piece))

    bob = node["tls"][BOB]
    channel, stub = raw_stub(node["endpoint"], bob.trust, bob)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.PushUpdate(chunks(), timeout=30, metadata=((ADDRESS_KEY, BOB),))
    refused = error_from_rpc(err.value)
    assert "is not the current round" in str(refused), refused
    assert (1, BOB) in handler.checked and (1, BOB) not in handler.updates


@pytest.mark.parametrize(("lines", "expect"), [
    ("", None),
    ("data_handshake_timeout_s: 0\n", "data_handshake_timeout_s in"),
    ("data_pending_per_address: 0\n", "data_pending_per_address in"),
    ("data_pending_per_address: 300\n", "is more than data_pending_total 256"),
    ("data_pending_total: lots\n", "data_pending_total in"),
])
def test_the_node_config_carries_the_listener_limits(tmp_path: Path, lines: str,
                                                      expect: str | None) -> None:
    from swarmnode.config import load_config

    path = tmp_path / "node.yaml"
    path.write_text("name: a\ncontract: '0x" + "1" * 40 + "'\nkey_index: 1\ncert: c.pem\n"
                    "key: c.key\ntrust: t.pem\npeer_endpoint: site-a.example.org:7441\n" + lines)
    if expect is None:
        assert load_config(path, env={}).listener_limits == ListenerLimits(10.0, 64, 256)
    else:
        with pytest.raises(ConfigError, match=expect):
            load_config(path, env={})
