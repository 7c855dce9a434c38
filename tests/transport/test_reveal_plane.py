"""The seed-reveal request of secure aggregation over the real data plane (mutual TLS sockets):
the caller is the address its certificate binds (never what it claims), the handler's answer
or refusal comes back as sent, and malformed replies are refused. Who may be answered is the
node's rule (NodeService.reveal_seeds, SecureAggregation.answer_reveal): the in-process swarm
test (tests/node/test_inproc_secure.py) runs it with real node services and contracts; here a
handler stands in for the node to test the transport alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from transport_support import MemoryAuthority, MemoryHandler, Pki

from swarmnode.errors import PeerRefused, RoundError
from swarmnode.transport.dataplane import DataClient, DataServer

LEADER, ALICE, BOB = ("0x" + c * 40 for c in "9ab")
DROPOUT = "0x" + "d" * 40


class RevealingHandler(MemoryHandler):
    """Answers the round's leader (LEADER) with one seed; anyone else is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int, str]] = []

    def reveal_seeds(self, round: int, caller: str) -> list[tuple[str, bytes]]:
        self.asked.append((round, caller))
        if caller != LEADER:
            raise PeerRefused(f"round {round}: {caller} is not the round's elected leader")
        if round == 9:
            raise RoundError("round 9: its check-ins are not closed")
        return [(DROPOUT, bytes(range(32)))]


@pytest.fixture(scope="module")
def certs(pki: Pki) -> dict[str, Any]:
    return {a: pki.node(f"rv-{a[2:4]}") for a in (LEADER, ALICE, BOB)}


@pytest.fixture()
def plane(certs: dict[str, Any]) -> Iterator[tuple[DataServer, RevealingHandler]]:
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in certs.items()},
                                participants={3: {LEADER, ALICE, BOB}})
    handler = RevealingHandler()
    server = DataServer("127.0.0.1", 0, certs[ALICE], authority, handler, None, 1 << 20)
    server.start()
    try:
        yield server, handler
    finally:
        server.stop()


def _client(certs: dict[str, Any], port: int, me: str, claims: str | None = None) -> DataClient:
    return DataClient("127.0.0.1", port, certs[me], claims or me,
                      lambda: certs[ALICE].fingerprint(), "alice")


def test_the_leader_gets_the_seeds_and_others_the_refusal(
        certs: dict[str, Any], plane: tuple[DataServer, RevealingHandler]) -> None:
    server, handler = plane
    assert _client(certs, server.port, LEADER).reveal_seeds(3, timeout=10) == [
        (DROPOUT, bytes(range(32)))]
    with pytest.raises(PeerRefused, match="not the round's elected leader"):
        _client(certs, server.port, BOB).reveal_seeds(3, timeout=10)
    # BOB's certificate claiming the leader's address is refused before the handler is asked
    with pytest.raises(PeerRefused):
        _client(certs, server.port, BOB, claims=LEADER).reveal_seeds(3, timeout=10)
    with pytest.raises(RoundError, match="not closed"):
        _client(certs, server.port, LEADER).reveal_seeds(9, timeout=10)
    assert handler.asked == [(3, LEADER), (3, BOB), (9, LEADER)]


def test_a_node_without_secure_aggregation_refuses_reveal_requests(
        certs: dict[str, Any]) -> None:
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in certs.items()},
                                participants={3: {LEADER, ALICE, BOB}})
    server = DataServer("127.0.0.1", 0, certs[ALICE], authority, MemoryHandler(), None, 1 << 20)
    server.start()
    try:
        with pytest.raises(PeerRefused, match="does not run secure aggregation"):
            _client(certs, server.port, LEADER).reveal_seeds(3, timeout=10)
    finally:
        server.stop()


class EvidenceHandler(MemoryHandler):
    """Gives round 3's evidence bytes to BOB; anyone else, or another round, is refused."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def secure_evidence(self, round: int, caller: str) -> bytes:
        if caller != BOB:
            raise PeerRefused(f"{caller} is not a member of this training")
        if round != 3:
            raise RoundError(f"round {round} is open: evidence is given for committed rounds")
        return self.data


def test_a_rounds_evidence_travels_to_a_member_and_refusals_come_back_typed(
        certs: dict[str, Any]) -> None:
    """The `evidence` request (secure aggregation: a member checks the leader's sum) over the
    real data plane: the bytes arrive whole (3 MB here), the caller is its certificate's
    address, refusals keep their class; a node without secure aggregation refuses it."""
    data = bytes(range(256)) * (3 << 12)
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in certs.items()},
                                participants={3: {LEADER, ALICE, BOB}})
    server = DataServer("127.0.0.1", 0, certs[ALICE], authority, EvidenceHandler(data), None,
                        1 << 20)
    plain = DataServer("127.0.0.1", 0, certs[ALICE], authority, MemoryHandler(), None, 1 << 20)
    server.start()
    plain.start()
    try:
        assert _client(certs, server.port, BOB).secure_evidence(3, timeout=30) == data
        with pytest.raises(PeerRefused, match="not a member"):
            _client(certs, server.port, LEADER).secure_evidence(3, timeout=10)
        with pytest.raises(PeerRefused):  # LEADER's certificate claiming BOB's address
            _client(certs, server.port, LEADER, claims=BOB).secure_evidence(3, timeout=10)
        with pytest.raises(RoundError, match="committed rounds"):
            _client(certs, server.port, BOB).secure_evidence(4, timeout=10)
        with pytest.raises(PeerRefused, match="does not run secure aggregation"):
            _client(certs, plain.port, BOB).secure_evidence(3, timeout=10)
    finally:
        server.stop()
        plain.stop()
