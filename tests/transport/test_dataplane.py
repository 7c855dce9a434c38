"""The bulk data plane as an attacker meets it: a real server (mutual TLS sockets), hostile
clients written against the wire format, and an honest node pushing and pulling meanwhile."""

from __future__ import annotations

import gc
import json
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from transport_support import MemoryAuthority, MemoryHandler, Pki, model_state

from swarmnode.errors import PeerRefused, RoundError
from swarmnode.identity import TlsFiles
from swarmnode.transport import serde
from swarmnode.transport.dataplane import DataClient, stripe_blocks
from swarmnode.transport.peer import PeerClient, PeerServer

LEADER, ALICE, MALLORY, BOB = ("0x" + c * 40 for c in "1234")
GRACE_S = 1.0


@pytest.fixture(scope="module")
def plane(pki: Pki) -> Iterator[dict[str, Any]]:
    tls = {LEADER: pki.node("d-leader"), ALICE: pki.node("d-alice"),
           MALLORY: pki.node("d-mallory"), BOB: pki.node("d-bob")}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE, MALLORY}})
    handler = MemoryHandler(merged_models={1: serde.encode(model_state(7))})
    srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler,
                     serde.ParamSpec.from_state(model_state()), max_bytes=1 << 24,
                     rate_grace_s=GRACE_S, min_rate_bytes_s=1 << 20, per_peer_streams=2)
    port = srv.start()
    assert srv.data is not None
    try:
        yield {"endpoint": f"127.0.0.1:{port}", "data_port": srv.data.port, "tls": tls,
               "handler": handler, "authority": authority, "server": srv}
    finally:
        srv.stop(0)


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
    """The server's verdict frame, or how the connection ended without one."""
    try:
        head = sock.recv(4)
        if len(head) < 4:
            return "closed"
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


def _push_header(address: str, total: int, **kw: Any) -> dict[str, Any]:
    return {"op": "push", "address": address, "round": 1, "weight": 5, "total_bytes": total,
            "digest": "00" * 32, "stripe": 0, "stripes": 1, **kw}


def _honest(plane: dict[str, Any]) -> float:
    """Alice pushes her update and pulls the merged model over the data plane; seconds taken."""
    t0 = time.monotonic()
    tls = plane["tls"]
    with PeerClient(plane["endpoint"], tls[ALICE], ALICE, LEADER, plane["authority"]) as alice:
        alice.push_update(1, 5, serde.encode(model_state(3)), timeout=20)
        got = alice.pull(1, timeout=20)
        assert bytes(got.data) == serde.encode(model_state(7))
        assert alice._data is not None  # it went over the data plane, not gRPC
    return time.monotonic() - t0


def test_honest_push_and_pull_go_over_the_data_plane(plane) -> None:
    plane["handler"].updates.clear()
    assert _honest(plane) < 10
    weight, state, _ = plane["handler"].updates[(1, ALICE)]
    assert weight == 5 and torch.equal(state["fc.weight"], model_state(3)["fc.weight"])


def test_many_idle_connections_do_not_stop_honest_peers(plane) -> None:
    plane["handler"].updates.clear()
    port, tls = plane["data_port"], plane["tls"]
    size = len(serde.encode(model_state()))

    def idle(i: int) -> tuple[dict[str, Any] | str, float]:
        t0 = time.monotonic()
        with _connect(port, tls[MALLORY]) as sock:  # announces an update, sends nothing
            _send(sock, _push_header(MALLORY, size, digest=f"{i:064x}"))
            return _reply(sock), time.monotonic() - t0

    with ThreadPoolExecutor(20) as pool:
        attacks = [pool.submit(idle, i) for i in range(20)]
        time.sleep(0.5)
        assert _honest(plane) < 10
        outcomes = [a.result(timeout=60) for a in attacks]
    assert (1, ALICE) in plane["handler"].updates
    assert (1, MALLORY) not in plane["handler"].updates
    def refused(o: dict[str, Any] | str) -> bool:  # at once: one update, a few connections
        return isinstance(o, dict) and any(m in o.get("message", "") for m in (
            "connection(s) open", "already sending another update"))

    assert sum(refused(o) for o, _ in outcomes) >= 19, outcomes
    cut = [(o, s) for o, s in outcomes if not refused(o)]
    assert all(s < GRACE_S + 10 for _, s in cut), outcomes  # the idle one is cut, not kept


def test_a_trickle_after_the_header_is_cut_off(plane) -> None:
    plane["handler"].updates.clear()
    port, tls = plane["data_port"], plane["tls"]
    stop = threading.Event()

    def trickle() -> tuple[dict[str, Any] | str, float]:
        t0 = time.monotonic()
        with _connect(port, tls[MALLORY]) as sock:
            _send(sock, _push_header(MALLORY, len(serde.encode(model_state()))))
            try:
                while not stop.is_set() and time.monotonic() - t0 < 30:
                    sock.sendall(b"\0")  # one byte at a time: far below the minimum rate
                    time.sleep(0.2)
            except (OSError, ssl.SSLError):
                pass
            return _reply(sock), time.monotonic() - t0

    with ThreadPoolExecutor(1) as pool:
        attack = pool.submit(trickle)
        assert _honest(plane) < 10
        outcome, seconds = attack.result(timeout=60)
        stop.set()
    assert seconds < GRACE_S + 10, (outcome, seconds)
    assert isinstance(outcome, str) or "minimum rate" in outcome.get("message", ""), outcome
    assert (1, MALLORY) not in plane["handler"].updates


@pytest.mark.parametrize(("who", "header", "expect"), [
    (BOB, {}, "not a participant of round 1"),  # enrolled, not in the round
    (MALLORY, {"address": ALICE}, "not the one the contract holds for"),  # claims Alice
    (MALLORY, {"address": ""}, "names no chain address"),
    (MALLORY, {"total_bytes": 1 << 23}, "more than a model of the training spec takes"),
    (MALLORY, {"total_bytes": 1 << 30}, "over the limit of"),
    (MALLORY, {"stripes": 64}, "'stripes' must be an integer in [1, 16]"),
    (MALLORY, {"stripe": 2, "stripes": 2}, "'stripe' must be an integer in [0, 1]"),
    (MALLORY, {"digest": "zz"}, "not a SHA-256"),
    (MALLORY, {"op": "exec"}, "unknown data plane operation"),
])
def test_requests_are_refused_before_any_payload_byte(plane, who, header, expect) -> None:
    """The verdict comes although not one payload byte was sent."""
    size = len(serde.encode(model_state()))
    with _connect(plane["data_port"], plane["tls"][who]) as sock:
        _send(sock, {**_push_header(who, size), **header})
        reply = _reply(sock)
    assert isinstance(reply, dict) and not reply["ok"] and expect in reply["message"], reply


def test_a_set_of_stripes_that_never_completes_is_dropped(plane) -> None:
    """Stripe 0 of 2 arrives in full; stripe 1 never comes: the update is refused, not kept."""
    plane["handler"].updates.clear()
    payload = serde.encode(model_state(5))
    stripe0 = b"".join(payload[s:e] for s, e in stripe_blocks(len(payload), 0, 2))
    t0 = time.monotonic()
    with _connect(plane["data_port"], plane["tls"][MALLORY]) as sock:
        _send(sock, _push_header(MALLORY, len(payload), stripes=2,
                                 digest=serde.digest(payload).hex()))
        sock.sendall(stripe0)
        reply = _reply(sock)
    assert isinstance(reply, dict) and "stripes arrived" in reply["message"], reply
    assert time.monotonic() - t0 < GRACE_S + 10
    assert (1, MALLORY) not in plane["handler"].updates


def test_a_client_refuses_a_server_that_is_not_the_peer_it_meant(plane) -> None:
    """The data plane at the right address, but the contract pins another certificate for the
    peer: nothing is sent."""
    tls = plane["tls"]
    client = DataClient("127.0.0.1", plane["data_port"], tls[ALICE], ALICE,
                        lambda: tls[BOB].fingerprint(), "peer 0xBOB")
    plane["handler"].updates.clear()
    with pytest.raises(PeerRefused, match="not the one the contract holds"):
        client.push(1, 5, serde.encode(model_state(3)), serde.digest(serde.encode(model_state(3))),
                    timeout=10)
    assert (1, ALICE) not in plane["handler"].updates


def test_a_pull_checks_the_digest_the_server_announced(plane) -> None:
    tls = plane["tls"]
    handler: MemoryHandler = plane["handler"]
    good = serde.encode(model_state(7))
    handler.merged_models[1] = good
    client = DataClient("127.0.0.1", plane["data_port"], tls[ALICE], ALICE,
                        lambda: tls[LEADER].fingerprint(), "peer 0xLEADER", stripes=3)
    client.stripes_for = lambda total: 3  # type: ignore[method-assign]
    got = client.pull(1, timeout=10, wait_s=0)
    assert bytes(got.data) == good and got.digest == serde.digest(good)
    del handler.merged_models[1]
    try:
        with pytest.raises(RoundError, match="does not hold the merged model of round 1"):
            client.pull(1, timeout=10, wait_s=0)
    finally:
        handler.merged_models[1] = good
    with pytest.raises(PeerRefused, match="not a participant of round 9"):
        client.pull(9, timeout=10, wait_s=0)


def test_transfers_that_ask_for_a_peers_data_plane_at_once_all_get_it(plane) -> None:
    """A sharded round's transfers (a slice to each owner, the merged slices from them) ask a
    peer for its data plane at the same moment: those that ask while the first one's Health
    ask is under way wait for its answer, not fail with 'names no data plane' (which only
    the first would have escaped) and leave the peer unreachable for a minute."""
    with PeerClient(plane["endpoint"], plane["tls"][ALICE], ALICE, LEADER,
                    plane["authority"]) as alice:
        health = alice.health

        def slow_health(timeout: float) -> dict[str, Any]:  # a peer slow to answer
            time.sleep(0.5)
            return health(timeout)

        alice.health = slow_health  # type: ignore[method-assign]
        start = threading.Barrier(4)

        def ask(_: int) -> object:
            start.wait(10)
            return alice._data_plane(20)

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, range(4)))
        assert got[0] is not None and all(g is got[0] for g in got), got


def test_a_peer_whose_data_plane_is_unreachable_gets_models_over_grpc(pki: Pki) -> None:
    """A site that cannot open its data port (firewall, data_port=-1, or the listener gone):
    pushes and pulls still work, over the peer API."""
    tls = {LEADER: pki.node("f-leader"), ALICE: pki.node("f-alice")}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE}})
    handler = MemoryHandler(merged_models={1: serde.encode(model_state(7))})
    srv = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler,
                     serde.ParamSpec.from_state(model_state()), max_bytes=1 << 24)
    port = srv.start()
    try:
        assert srv.data is not None
        srv.data.stop()  # advertised in Health, but nobody listens there any more
        with PeerClient(f"127.0.0.1:{port}", tls[ALICE], ALICE, LEADER, authority) as alice:
            alice.push_update(1, 5, serde.encode(model_state(3)), timeout=20)
            assert bytes(alice.pull(1, timeout=20).data) == serde.encode(model_state(7))
            assert alice._data is None  # it fell back to gRPC and said so in the log
        assert (1, ALICE) in handler.updates
    finally:
        srv.stop(0)


def test_waiting_updates_are_admitted_in_the_leaders_fold_order() -> None:
    from swarmnode.transport.dataplane import _OrderedSlots

    slots = _OrderedSlots(1)
    assert slots.acquire((1, "0xff"), timeout=1)  # the slot is taken
    admitted: list[str] = []
    waiting = threading.Event()

    def push(sender: str) -> None:
        assert slots.acquire((1, sender), timeout=30)
        admitted.append(sender)
        slots.release()

    threads = [threading.Thread(target=push, args=(s,)) for s in ("0xc", "0xa", "0xb")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(slots._waiting) < 3 and time.monotonic() < deadline:  # all three are waiting
        waiting.wait(0.01)
    assert len(slots._waiting) == 3
    slots.release()
    for t in threads:
        t.join(30)
    assert admitted == ["0xa", "0xb", "0xc"]  # by address, not by arrival
    assert not slots._waiting
    assert slots.acquire((1, "0x1"), timeout=1)
    assert not slots.acquire((1, "0x0"), timeout=0.2)  # no slot: refused after the timeout
    slots.release()


@pytest.mark.parametrize("total", [0, 1, 4 << 20, (4 << 20) + 1, 37 * (1 << 20) + 12345])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 16])
def test_stripes_cover_the_payload_once_in_interleaved_blocks(total: int, count: int) -> None:
    covered = sorted(r for i in range(count) for r in stripe_blocks(total, i, count))
    assert [b for r in covered for b in r][1:-1:2] == [b for r in covered for b in r][2::2]
    assert sum(e - s for s, e in covered) == total
    assert (covered[0][0] if covered else 0) == 0
    for i in range(count):
        blocks = stripe_blocks(total, i, count)
        assert all(s % (4 << 20) == 0 and (s // (4 << 20)) % count == i for s, _ in blocks)


def test_a_refused_pull_leaves_no_cycle_that_keeps_the_callers_memory(plane) -> None:
    """A member long-polls the leader for the merged model ("not merged yet" until it is): each
    refusal must be freed at once. Before, the error kept the striping frame in a reference
    cycle, and through it the caller's frame, whose pulled model then stayed in memory until a
    full garbage collection (at 25M x 8, several models per node)."""
    tls = plane["tls"]
    client = DataClient("127.0.0.1", plane["data_port"], tls[ALICE], ALICE,
                        lambda: tls[LEADER].fingerprint(), "peer 0xLEADER", stripes=3)

    class Model:
        pass

    def poll() -> weakref.ref[Model]:
        held = Model()  # stands for a model the polling frame holds
        with pytest.raises(RoundError, match="does not hold the merged model"):
            client.pull(2, timeout=10, wait_s=0.0)
        return weakref.ref(held)

    plane["authority"].participants[2] = {LEADER, ALICE}  # round 2: nobody merged it yet
    gc.disable()
    try:
        ref = poll()
        assert ref() is None, "the refusal kept the caller's frame alive (a reference cycle)"
    finally:
        gc.enable()
