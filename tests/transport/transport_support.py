"""Helpers for the transport tests: in-memory stand-ins for the chain and the node service.

They answer the peer API's questions (who holds which certificate fingerprint, who takes part in a
round) the way the chain-backed ones in ``swarmnode.node`` do; the certificates, the gRPC servers
and the TLS handshakes in the tests are real.
"""

from __future__ import annotations

import datetime as dt
import json
import select
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarmnode.errors import RoundError
from swarmnode.identity import TlsFiles, issue_node_cert

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Pki:
    root: Path
    ca: tuple[Path, Path]
    trust: Path

    def node(self, name: str, ca: tuple[Path, Path] | None = None, trust: Path | None = None,
             **kw: object) -> TlsFiles:
        cert, key = issue_node_cert(*(ca or self.ca), self.root / name, name,
                                    dns=["localhost"], ips=["127.0.0.1"], **kw)
        return TlsFiles(cert, key, trust or self.trust)


@dataclass
class MemoryAuthority:
    """PeerAuthority over dicts: address -> fingerprint (None: revoked), round -> participants."""

    fingerprints: dict[str, bytes | None] = field(default_factory=dict)
    participants: dict[int, set[str]] = field(default_factory=dict)

    def fingerprint_of(self, address: str) -> bytes | None:
        return self.fingerprints.get(address)

    def is_participant(self, round: int, address: str) -> bool:
        return address in self.participants.get(round, set())


@dataclass
class MemoryHandler:
    """PeerHandler: accepts one update per sender for the current round, serves merged models."""

    current_round: int = 1
    updates: dict[tuple[int, str], tuple[int, dict[str, torch.Tensor], bytes]] = field(
        default_factory=dict
    )
    merged_models: dict[int, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    evicted: list[str] = field(default_factory=list)  # senders whose update was evicted
    checked: list[tuple[int, str]] = field(default_factory=list)  # check_push calls

    def accept_update(self, round: int, sender: str, weight: int,
                      state: dict[str, torch.Tensor], digest: bytes,
                      evict: Callable[[], None] | None = None) -> None:
        if evict is not None:
            evict()
            self.evicted.append(sender)
        with self.lock:
            self._check_locked(round, sender)
            self.updates[(round, sender)] = (weight, state, digest)

    def check_push(self, round: int, sender: str, weight: int) -> None:
        """What accept_update refuses, from the header alone (the servers ask first)."""
        self.checked.append((round, sender))
        with self.lock:
            self._check_locked(round, sender)

    def _check_locked(self, round: int, sender: str) -> None:
        if round != self.current_round:
            raise RoundError(
                f"round {round} is not the current round {self.current_round}; "
                "update refused (stale or replayed)"
            )
        if (round, sender) in self.updates:
            raise RoundError(f"round {round}: {sender} already sent its update (replayed?)")

    def merged(self, round: int, timeout: float, to: str | None = None) -> bytes | None:
        return self.merged_models.get(round)

    def health(self) -> dict[str, object]:
        return {"round": self.current_round, "stage": "collecting"}


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(8, 4, generator=g),
        "fc.bias": torch.randn(8, generator=g),
        "bn.num_batches": torch.tensor(3, dtype=torch.int64),
    }


def raw_stub(endpoint: str, trust: Path, tls: TlsFiles | None = None):  # type: ignore[no-untyped-def]
    """A plain generated stub (no identity checks of our own), for hostile or broken clients."""
    import grpc

    from swarmnode.transport.proto import peer_pb2_grpc

    cert = key = None
    if tls is not None:
        cert, key = tls.cert.read_bytes(), tls.key.read_bytes()
    creds = grpc.ssl_channel_credentials(trust.read_bytes(), key, cert)
    channel = grpc.secure_channel(endpoint, creds)
    return channel, peer_pb2_grpc.PeerStub(channel)


def send_blind(sock: ssl.SSLSocket, data: bytes, timeout: float = 30.0) -> dict[str, Any] | str:
    """As a hostile sender: send all of ``data`` without waiting for a verdict, while taking the
    server's reply frame as it comes; the reply (a dict), or ``"closed: ..."`` when the server
    closed without one. One thread drives the TLS connection (an SSL object must never be read
    and written from two threads at once: OpenSSL is not thread-safe per connection, and doing
    so corrupts it, or crashes the process)."""
    sock.setblocking(False)
    view, sent, got = memoryview(data), 0, b""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            want_write = sent < len(view)
            ready_r, ready_w, _ = select.select([sock], [sock] if want_write else [], [], 0.5)
            if ready_r or sock.pending():
                try:
                    more = sock.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    more = None
                if more == b"":
                    return "closed: end of stream before a verdict"
                if more:
                    got += more
                    if len(got) >= 4 and len(got) >= 4 + struct.unpack("<I", got[:4])[0]:
                        n = struct.unpack("<I", got[:4])[0]
                        reply: dict[str, Any] = json.loads(got[4:4 + n])
                        return reply
            if want_write and ready_w:
                try:
                    sent += sock.send(view[sent:sent + (1 << 16)])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except (OSError, ssl.SSLError):
                    sent = len(view)  # the server stopped taking bytes: read what it said
        return "closed: no verdict in time"
    except (OSError, ssl.SSLError) as exc:
        return f"closed: {exc}"
