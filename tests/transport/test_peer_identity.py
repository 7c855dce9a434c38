"""Peer API identity: mutual TLS plus the chain binding, each refusal naming its reason.

A real PeerServer with real certificates; after every test the good client must still be served.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from transport_support import NOW, MemoryAuthority, MemoryHandler, Pki, model_state, raw_stub

from swarmnode.errors import IdentityError, PeerRefused, PeerUnavailable, RoundError
from swarmnode.identity import TlsFiles, create_ca, make_bundle
from swarmnode.transport import serde
from swarmnode.transport._rpc import ADDRESS_KEY, swarm_error_name
from swarmnode.transport.peer import PeerClient, PeerServer
from swarmnode.transport.proto import peer_pb2
from swarmnode.transport.tlscheck import probe

LEADER, ALICE, BOB, REVOKED = "0xLEADER", "0xA11CE", "0xB0B", "0xREV0KED"


@dataclass
class Swarm:
    pki: Pki
    authority: MemoryAuthority
    handler: MemoryHandler
    server: PeerServer
    endpoint: str
    tls: dict[str, TlsFiles]

    def client(self, who: str, address: str | None = None, authority: MemoryAuthority | None = None,
               peer: str = LEADER) -> PeerClient:
        return PeerClient(self.endpoint, self.tls[who], address or who, peer,
                          authority or self.authority)


@pytest.fixture(scope="module")
def swarm(pki: Pki) -> Iterator[Swarm]:
    tls = {name: pki.node(name.lower()) for name in (LEADER, ALICE, BOB, REVOKED)}
    authority = MemoryAuthority(
        fingerprints={name: files.fingerprint() for name, files in tls.items()},
        participants={1: {LEADER, ALICE}},
    )
    authority.fingerprints[REVOKED] = None  # enrolled once, revoked since
    handler = MemoryHandler(merged_models={1: serde.encode(model_state(9))})
    server = PeerServer("127.0.0.1:0", tls[LEADER], authority, handler,
                        serde.ParamSpec.from_state(model_state()), max_bytes=1 << 20)
    port = server.start()
    yield Swarm(pki, authority, handler, server, f"127.0.0.1:{port}", tls)
    server.stop(0)


@pytest.fixture(autouse=True)
def still_serving(swarm: Swarm) -> Iterator[None]:
    yield
    with swarm.client(ALICE) as good:
        assert good.health(timeout=5)["stage"] == "collecting"


def test_good_client(swarm: Swarm) -> None:
    with swarm.client(ALICE) as client:
        assert client.reachable is None  # not tried yet
        health = client.health(timeout=5)
        assert client.reachable is True  # what the node's swarmnode_peers metric counts
        assert health.pop("data_port") == swarm.server.data.port  # where model bytes go
        assert health == {"round": 1, "stage": "collecting"}
        assert client.pull_merged(1, timeout=5) == swarm.handler.merged_models[1]


def test_client_without_certificate(swarm: Swarm) -> None:
    channel, stub = raw_stub(swarm.endpoint, swarm.pki.trust)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.Health(peer_pb2.HealthRequest(), timeout=5, metadata=((ADDRESS_KEY, ALICE),))
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(PeerRefused, match="we sent no client certificate"):
        probe(swarm.endpoint, None, None, swarm.pki.trust, timeout=5)


def test_client_from_a_foreign_ca(swarm: Swarm) -> None:
    root = swarm.pki.root / "foreign"
    rogue_ca = create_ca(root / "ca", "Rogue CA")
    # The rogue trusts the swarm's CA (so it accepts the server), but the swarm does not trust it.
    rogue = swarm.pki.node("rogue", ca=rogue_ca, trust=make_bundle(
        [swarm.pki.ca[0], rogue_ca[0]], root / "trust.pem"))
    swarm.authority.fingerprints["0xR0GUE"] = rogue.fingerprint()  # even if the chain knew it
    with PeerClient(swarm.endpoint, rogue, "0xR0GUE", LEADER, swarm.authority) as client:
        with pytest.raises(PeerRefused, match=r"closed the TLS handshake: our certificate is not "
                                              r"trusted by it \(foreign CA\?\)"):
            client.health(timeout=5)
    # with only its own CA in its bundle, the client can also say why
    alone = TlsFiles(rogue.cert, rogue.key, make_bundle([swarm.pki.ca[0]], root / "swarm.pem"))
    with pytest.raises(PeerRefused, match=r"issuer CN=Rogue CA is not in our trust bundle"):
        probe(swarm.endpoint, alone.cert, alone.key, alone.trust, timeout=5)


def test_client_with_an_expired_certificate(swarm: Swarm) -> None:
    old = swarm.pki.node("old", not_before=NOW - dt.timedelta(days=30),
                         not_after=NOW - dt.timedelta(days=1))
    swarm.authority.fingerprints["0x01D"] = old.fingerprint()
    with pytest.raises(IdentityError, match=r"old\.pem expired on"):
        PeerClient(swarm.endpoint, old, "0x01D", LEADER, swarm.authority)  # refused at home
    channel, stub = raw_stub(swarm.endpoint, swarm.pki.trust, old)  # and by the server
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.Health(peer_pb2.HealthRequest(), timeout=5, metadata=((ADDRESS_KEY, "0x01D"),))
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(PeerRefused, match=r"closed the TLS handshake.*old\.pem expired on"):
        probe(swarm.endpoint, old.cert, old.key, old.trust, timeout=5)


def test_certificate_not_the_one_on_chain_for_the_claimed_address(swarm: Swarm) -> None:
    with swarm.client(BOB, address=ALICE) as impostor:  # Bob's valid cert, claiming Alice
        with pytest.raises(PeerRefused, match=r"is not the one the contract holds for 0xA11CE"):
            impostor.health(timeout=5)
        with pytest.raises(PeerRefused, match="is not the one the contract holds"):
            impostor.push_update(1, 5, serde.encode(model_state()), timeout=5)
    assert (1, ALICE) not in swarm.handler.updates


def test_revoked_node(swarm: Swarm) -> None:
    with swarm.client(REVOKED) as client:
        with pytest.raises(PeerRefused, match=r"0xREV0KED is not an enrolled node on chain .*"
                                              r"revoked"):
            client.health(timeout=5)


def test_not_a_participant_of_the_round(swarm: Swarm) -> None:
    with swarm.client(BOB) as bob:
        assert bob.health(timeout=5)  # an enrolled node may ask for health
        with pytest.raises(PeerRefused, match="0xB0B is not a participant of round 1"):
            bob.push_update(1, 5, serde.encode(model_state()), timeout=5)
        with pytest.raises(PeerRefused, match="0xB0B is not a participant of round 1"):
            bob.pull_merged(1, timeout=5)
    assert (1, BOB) not in swarm.handler.updates


def test_call_without_a_claimed_address(swarm: Swarm) -> None:
    channel, stub = raw_stub(swarm.endpoint, swarm.pki.trust, swarm.tls[ALICE])
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.Health(peer_pb2.HealthRequest(), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "names no chain address" in err.value.details()
        assert swarm_error_name(err.value) == "PeerRefused"
        reply = stub.Health(peer_pb2.HealthRequest(), timeout=5,
                            metadata=((ADDRESS_KEY, ALICE),))
        assert json.loads(reply.json)["round"] == 1  # the generated stubs speak the protocol too


def test_client_refuses_a_server_that_is_not_the_peer_it_wanted(swarm: Swarm) -> None:
    # The chain says 0xA11CE is reachable at this endpoint, but the leader's certificate answers.
    with swarm.client(BOB, peer=ALICE) as client:
        with pytest.raises(PeerRefused, match=r"presented certificate CN=0xleader.*but the "
                                              r"contract holds .* for 0xA11CE.*nothing was sent"):
            client.push_update(1, 5, serde.encode(model_state()), timeout=5)
    client_view = MemoryAuthority(fingerprints={LEADER: None})
    with swarm.client(ALICE, authority=client_view) as client:  # the peer we want was revoked
        with pytest.raises(PeerRefused, match="0xLEADER is not an enrolled node on chain"):
            client.health(timeout=5)
    assert swarm.handler.updates == {}


def test_unreachable_peer(swarm: Swarm, unused_port: int) -> None:
    with PeerClient(f"127.0.0.1:{unused_port}", swarm.tls[ALICE], ALICE, LEADER,
                    swarm.authority) as client:
        with pytest.raises(PeerUnavailable, match=r"cannot reach peer 0xLEADER at 127\.0\.0\.1"):
            client.health(timeout=2)
        assert client.reachable is False


def test_pull_of_a_round_this_node_does_not_hold(swarm: Swarm) -> None:
    swarm.authority.participants.setdefault(2, set()).add(ALICE)
    with swarm.client(ALICE) as client:
        with pytest.raises(RoundError, match="does not hold the merged model of round 2"):
            client.pull_merged(2, timeout=5)


@pytest.fixture()
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("call", ["push", "pull"])
def test_a_frozen_peer_costs_a_call_its_timeout_once(swarm: Swarm, call: str) -> None:
    """A peer that froze (SIGSTOP: the kernel still accepts its connections, nothing answers):
    the push or pull fails within its timeout, not once per step (looking up the peer's data
    plane, probing TLS, the gRPC fallback): before, a push to a frozen leader took 2-3 times its
    timeout and held the member back from re-electing."""
    import socket
    import time

    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)  # accepts into the backlog, never reads: a stopped process
    try:
        endpoint = f"127.0.0.1:{frozen.getsockname()[1]}"
        with PeerClient(endpoint, swarm.tls[ALICE], ALICE, LEADER, swarm.authority) as client:
            started = time.monotonic()
            with pytest.raises(PeerUnavailable):
                if call == "push":
                    client.push_update(1, 10, serde.encode(model_state(1)), timeout=2.0)
                else:
                    client.pull(1, timeout=2.0)
            took = time.monotonic() - started
    finally:
        frozen.close()
    assert took < 2.0 + 1.5, took  # the timeout, plus a margin for a loaded machine
