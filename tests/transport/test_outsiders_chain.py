"""The data plane's header checks with the node's own rules: a real NodeService (the leader of a
committed round) serving a real data plane over real TLS, its identity and round answers from the
real contracts (eth-tester), and pushes for past rounds from an enrolled site that never took
part and from a participant, whole updates and a sharded round's slices: refused before a
payload byte is read (the server's counter)."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from typing import Any

import torch
from transport_support import send_blind

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.models import RoundStatus
from swarmnode.identity import TlsFiles, describe, issue_node_cert
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm
from swarmnode.transport import serde
from swarmnode.transport.peer import PeerServer

INITIAL = {"w": torch.zeros(64, 32), "b": torch.zeros(32)}
ROUNDS = 2


def step(site, k, model):  # type: ignore[no-untyped-def]
    if k >= ROUNDS:
        return None
    base = model if model is not None else INITIAL
    return {n: t + 0.1 * (site.index + 1) for n, t in base.items()}, 10


def _push(port: int, tls: TlsFiles, address: str, rnd: int, payload: bytes,
          op: dict[str, Any] | None = None) -> dict[str, Any]:
    """Header and the whole payload at once (no wait for a verdict), then the server's reply.
    ``op``: another request than a whole update's push (a sharded round's slice)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(tls.trust))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.check_hostname = False
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30)) as sock:
        sock.settimeout(30)
        raw = json.dumps({"op": "push", "address": address, "round": rnd, "weight": 10,
                          "total_bytes": len(payload), "digest": serde.digest(payload).hex(),
                          "stripe": 0, "stripes": 1, **(op or {})}).encode()
        sock.sendall(struct.pack("<I", len(raw)) + raw)
        reply = send_blind(sock, payload)
    assert isinstance(reply, dict), f"the server closed without a verdict ({reply})"
    return reply


def test_past_round_pushes_are_refused_before_a_payload_byte_on_a_real_chain() -> None:
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    with InProcessSwarm(2, spec, min_peers=2, grace_s=2, deadline_s=8) as swarm:
        chain = swarm.admin
        # Eve: authorised and enrolled with the consortium's CA, never a participant
        eve = dev_account(5)
        swarm.w3.eth.send_transaction({"from": swarm.w3.eth.accounts[0], "to": eve.address,
                                       "value": 10**20})
        cert, key = issue_node_cert(swarm.workdir / "ca" / "ca.pem", swarm.workdir / "ca" /
                                    "ca.key", swarm.workdir / "eve", "eve", dns=["eve.inproc"],
                                    ips=[])
        chain.authorize(eve.address, describe(cert).fingerprint)
        chain.with_account(eve).enroll("eve.inproc:7441")
        eve_tls = TlsFiles(cert, key, swarm.workdir / "trust.pem")
        sites = swarm.run(step, timeout=180)
        final = swarm.final_round()
        assert final is not None
        past = next(chain.round(r) for r in range(1, final + 1)
                    if chain.round(r).status is RoundStatus.COMMITTED)
        assert eve.address not in past.participants
        leader = next(s for s in sites if s.address == past.leader)
        member = next(s for s in sites if s is not leader)
        service = leader.service
        # the chain's rule for pulls lets Eve in: she may pull a committed round
        assert service.authority.is_participant(past.round, eve.address)
        server = PeerServer("127.0.0.1:0", service.tls, service.authority, service,
                            spec=service.param_spec, max_bytes=service.max_bytes)
        server.start()
        try:
            assert server.data is not None
            payload = serde.encode({n: t + 1 for n, t in INITIAL.items()})
            for who, tls in ((eve.address, eve_tls), (member.address, member.service.tls)):
                reply = _push(server.data.port, tls, who, past.round, payload)
                assert reply["ok"] is False and "not the round's leader (status committed" in \
                    reply["message"], reply
                # a sharded round's slice, for a round that is not a sharded attempt now
                reply = _push(server.data.port, tls, who, past.round, payload,
                              {"op": "shard_push", "attempt": 1, "index": 0})
                assert reply["ok"] is False and "is not a sharded attempt" in \
                    reply["message"], reply
            assert server.data.payload_bytes_in == 0
        finally:
            server.stop(0)
