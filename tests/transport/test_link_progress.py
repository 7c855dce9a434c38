"""A transfer's timeout judges the node's link, not one stream's place in a queue (real data plane,
mutual TLS over loopback, timeouts shrunk so the test is short): a push queued behind the
admission slot is told its place and waits past its own no-progress timeout while the slot's
holder moves bytes; a pull stream the receiver leaves unread past the server's write timeout
waits on while another stream on the same link moves bytes, and is still cut when nothing
moves. Every transfer's bytes cross once (no retry): the counters say so."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transport_support import MemoryAuthority, MemoryHandler, Pki

from swarmnode.demo.swarm import wait_until
from swarmnode.transport import dataplane, serde
from swarmnode.transport.dataplane import DataClient, DataServer

LEADER, ALICE, BOB, CAROL = ("0x" + c * 40 for c in "5678")


def _payload(mib: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return serde.encode({"w": torch.randn(mib << 18, generator=g)})  # mib MiB of float32


@pytest.fixture(scope="module")
def certs(pki: Pki) -> dict[str, Any]:
    return {a: pki.node(f"lp-{a[2:4]}") for a in (LEADER, ALICE, BOB, CAROL)}


@pytest.fixture()
def node(certs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    tls = certs
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {LEADER, ALICE, BOB, CAROL}})
    handler = MemoryHandler(merged_models={1: _payload(24, 9)})
    # one admission slot; a stream's own write timeout of 2 s; rate rules out of the way
    srv = DataServer("127.0.0.1", 0, tls[LEADER], authority, handler, None, 1 << 28,
                     inflight=1, idle_s=2.0, min_rate=16 * 1024, grace_s=30.0)
    port = srv.start()
    try:
        yield {"port": port, "tls": tls, "handler": handler, "server": srv}
    finally:
        srv.stop()


def _client(node: dict[str, Any], me: str) -> DataClient:
    tls = node["tls"]
    return DataClient("127.0.0.1", node["port"], tls[me], me, lambda: tls[LEADER].fingerprint(),
                      "the leader")


def _slow_push(node: dict[str, Any], me: str, data: bytes, rate: float, out: dict) -> None:
    """A push of ``data`` that trickles at ``rate`` bytes a second (an admitted update on a
    slow link): the server's verdict lands in ``out[me]``."""
    with _client(node, me)._connect(30) as tls:
        dataplane._send_frame(tls, {"op": "push", "address": me, "round": 1, "weight": 3,
                                    "total_bytes": len(data),
                                    "digest": serde.digest(data).hex(), "stripe": 0,
                                    "stripes": 1})
        step = 128 * 1024
        for at in range(0, len(data), step):
            tls.sendall(data[at:at + step])
            time.sleep(step / rate)
        out[me] = dataplane._recv_frame(tls, "verdict")


def test_a_queued_push_waits_while_the_slot_holder_moves_bytes(node: dict[str, Any],
                                                               monkeypatch) -> None:
    """Bob holds the only admission slot for about 6 s; Alice's push, queued behind him, waits
    past her own 2 s no-progress timeout (before: 'no verdict' after it) and is accepted; her
    bytes cross once."""
    monkeypatch.setattr(dataplane, "_PROGRESS_S", 2.0)
    monkeypatch.setattr(dataplane, "_NOTE_S", 0.2, raising=False)
    bob, out = _payload(12, 1), {}
    holder = threading.Thread(target=_slow_push, args=(node, BOB, bob, 2e6, out))
    holder.start()
    wait_until(lambda: not node["server"]._admit._free, 30, "Bob's admission", poll=0.01)
    alice = _payload(2, 2)
    sent0, t0 = dataplane.TRAFFIC.sent, time.monotonic()
    _client(node, ALICE).push(1, 5, alice, serde.digest(alice), timeout=60)
    waited = time.monotonic() - t0
    holder.join(60)
    assert out[BOB] == {"ok": True}
    assert {(r, s) for r, s in node["handler"].updates} == {(1, BOB), (1, ALICE)}
    assert waited > 3.0  # it queued well past its own no-progress timeout
    assert dataplane.TRAFFIC.sent - sent0 == len(alice)  # sent once, no retry


def _paced_pull(node: dict[str, Any], me: str, pause: float, rate: float,
                out: dict) -> None:
    """A one-stripe pull that reads nothing for ``pause`` seconds, then ``rate`` bytes a
    second; what it got (or how it ended) lands in ``out[me]``."""
    try:
        with _client(node, me)._connect(30) as tls:
            tls.settimeout(30)
            dataplane._send_frame(tls, {"op": "pull", "address": me, "round": 1, "stripe": 0,
                                        "stripes": 1, "wait_s": 0})
            total = dataplane._recv_frame(tls, "pull")["total_bytes"]
            time.sleep(pause)
            buf = bytearray(total)
            view, pos = memoryview(buf), 0
            while pos < total:
                n = tls.recv_into(view[pos:pos + 256 * 1024])
                if not n:
                    out[me] = f"ended after {pos} of {total} bytes"
                    return
                pos += n
                time.sleep(n / rate)
            out[me] = bytes(buf)
    except OSError as exc:
        out[me] = f"ended: {exc}"


def test_a_starved_pull_stream_waits_while_the_link_moves_and_not_otherwise(
        node: dict[str, Any]) -> None:
    """Carol leaves her pull unread for 5 s (the server's write timeout is 2 s) while Alice's
    pull moves bytes on the same link the whole time (24 MiB at 4 MB/s): both get the model,
    and the leader sent it exactly twice. Alone, the same starved pull is cut (nothing moved on
    the link)."""
    model = node["handler"].merged_models[1]
    out: dict[str, Any] = {}
    sent0 = dataplane.TRAFFIC.sent
    pulls = [threading.Thread(target=_paced_pull, args=(node, ALICE, 0.0, 4e6, out)),
             threading.Thread(target=_paced_pull, args=(node, CAROL, 5.0, 1e9, out))]
    for t in pulls:
        t.start()
    for t in pulls:
        t.join(120)
    assert out[ALICE] == model
    assert out[CAROL] == model  # before: cut by the 2 s write timeout
    assert dataplane.TRAFFIC.sent - sent0 == 2 * len(model)

    alone: dict[str, Any] = {}
    _paced_pull(node, CAROL, 5.0, 1e9, alone)
    assert isinstance(alone[CAROL], str) and "ended" in alone[CAROL]
