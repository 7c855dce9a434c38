"""The chain as the source of truth for who a peer is: identity binding and peer connections."""

from __future__ import annotations

import threading
import time

from swarmnode.chain.client import RoundStatus, SwarmContract
from swarmnode.chain.models import NodeInfo
from swarmnode.errors import PeerUnavailable
from swarmnode.identity import TlsFiles
from swarmnode.transport.peer import PeerClient

__all__ = ["ChainAuthority", "PeerPool"]


class ChainAuthority:
    """Answers the peer API's identity questions from the contract (PeerAuthority protocol).

    A certificate is accepted for an address only while the contract holds its fingerprint for an
    enrolled, non-revoked node. Caches keep a busy round from hammering the RPC node (one read per
    node per ``ttl``, not one per call): a revocation takes effect within ``ttl`` seconds. A
    round's participants are read once it is elected (they are fixed from then on).
    """

    def __init__(self, chain: SwarmContract, ttl: float = 5.0) -> None:
        self.chain = chain
        self.ttl = ttl
        self._lock = threading.Lock()
        self._nodes: dict[str, tuple[float, NodeInfo]] = {}
        self._rounds: dict[int, tuple[RoundStatus, frozenset[str]]] = {}

    def node(self, address: str) -> NodeInfo:
        """The contract's record of ``address``, at most ``ttl`` seconds old."""
        now = time.monotonic()
        key = address.lower()
        with self._lock:
            hit = self._nodes.get(key)
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        info = self.chain.node(address)
        with self._lock:
            self._nodes[key] = (now, info)
        return info

    def forget(self, address: str) -> None:
        """Read ``address`` afresh next time (after a failed connection, say)."""
        with self._lock:
            self._nodes.pop(address.lower(), None)

    def fingerprint_of(self, address: str) -> bytes | None:
        info = self.node(address)
        return info.fingerprint if info.enrolled and not info.revoked else None

    def is_participant(self, round: int, address: str) -> bool:
        """A participant of ``round``; once it is committed, any enrolled node may pull it."""
        with self._lock:
            hit = self._rounds.get(round)
        if hit is not None and address.lower() in hit[1]:
            return True
        if hit is None or hit[0] is not RoundStatus.COMMITTED:
            info = self.chain.round(round)
            hit = (info.status, frozenset(p.lower() for p in info.participants))
            if info.status is not RoundStatus.OPEN:
                with self._lock:
                    self._rounds[round] = hit
                    for old in sorted(self._rounds)[:-8]:
                        del self._rounds[old]
        if address.lower() in hit[1]:
            return True
        return hit[0] is RoundStatus.COMMITTED and self.fingerprint_of(address) is not None


class PeerPool:
    """PeerClients by chain address, built from the endpoint the contract holds."""

    def __init__(self, chain: SwarmContract, me: str, tls: TlsFiles, authority: ChainAuthority):
        self.chain, self.me, self.tls, self.authority = chain, me, tls, authority
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, PeerClient]] = {}
        self._dropped: set[str] = set()  # dropped after a failure, not reached since

    def reachability(self) -> tuple[int, int]:
        """(peers reachable, peers not) as this node's last attempt to reach each found it; a
        peer not tried yet counts in neither."""
        with self._lock:
            states = {a: c.reachable for a, (_, c) in self._clients.items()}
            dropped = set(self._dropped)
        for address in dropped:
            if states.get(address) is None:
                states[address] = False
        return (sum(1 for v in states.values() if v is True),
                sum(1 for v in states.values() if v is False))

    def client(self, address: str) -> PeerClient:
        info = self.authority.node(address)
        if not info.enrolled or info.revoked:
            raise PeerUnavailable(f"node {address} is not enrolled or was revoked on chain")
        with self._lock:
            cached = self._clients.get(address)
            if cached and cached[0] == info.endpoint:
                return cached[1]
            if cached:
                cached[1].close()
            client = PeerClient(info.endpoint, self.tls, self.me, address, self.authority)
            self._clients[address] = (info.endpoint, client)
            if cached is None and address in self._dropped:
                client.reachable = False  # until it is reached again
            self._dropped.discard(address)
            return client

    def drop(self, address: str) -> None:
        self.authority.forget(address)
        with self._lock:
            cached = self._clients.pop(address, None)
            self._dropped.add(address)
        if cached:
            cached[1].close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, {}
        for _, client in clients.values():
            client.close()
