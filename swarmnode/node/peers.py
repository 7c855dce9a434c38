"""The chain as the source of truth for who a peer is: identity binding and peer connections."""

from __future__ import annotations

import threading
import time

from swarmnode.chain.client import RoundStatus, SwarmContract
from swarmnode.errors import PeerUnavailable
from swarmnode.identity import TlsFiles
from swarmnode.transport.peer import PeerClient

__all__ = ["ChainAuthority", "PeerPool"]


class ChainAuthority:
    """Answers the peer API's identity questions from the contract (PeerAuthority protocol).

    A certificate is accepted for an address only while the contract holds its fingerprint for an
    enrolled, non-revoked node. Short caches keep a busy round from hammering the RPC node; a
    revocation takes effect within ``ttl`` seconds.
    """

    def __init__(self, chain: SwarmContract, ttl: float = 1.0) -> None:
        self.chain = chain
        self.ttl = ttl
        self._lock = threading.Lock()
        self._nodes: dict[str, tuple[float, bytes | None]] = {}

    def fingerprint_of(self, address: str) -> bytes | None:
        now = time.monotonic()
        with self._lock:
            hit = self._nodes.get(address.lower())
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        info = self.chain.node(address)
        fp = info.fingerprint if info.enrolled and not info.revoked else None
        with self._lock:
            self._nodes[address.lower()] = (now, fp)
        return fp

    def is_participant(self, round: int, address: str) -> bool:
        """A participant of ``round``; once it is committed, any enrolled node may pull it."""
        info = self.chain.round(round)
        if any(p.lower() == address.lower() for p in info.participants):
            return True
        return info.status is RoundStatus.COMMITTED and self.fingerprint_of(address) is not None


class PeerPool:
    """PeerClients by chain address, built from the endpoint the contract holds."""

    def __init__(self, chain: SwarmContract, me: str, tls: TlsFiles, authority: ChainAuthority):
        self.chain, self.me, self.tls, self.authority = chain, me, tls, authority
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, PeerClient]] = {}

    def client(self, address: str) -> PeerClient:
        info = self.chain.node(address)
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
            return client

    def drop(self, address: str) -> None:
        with self._lock:
            cached = self._clients.pop(address, None)
        if cached:
            cached[1].close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, {}
        for _, client in clients.values():
            client.close()
