"""One port for the peer API and the data plane, told apart by the ALPN of the ClientHello.

A site that can open only one port runs the node with ``one_port: true``: the data plane's
listener (:class:`~swarmnode.transport.listener.TlsListener`) takes every connection on the peer
port, and before any TLS work peeks at the client's ClientHello (:mod:`hello`):

* ALPN :data:`DATA_ALPN` (``swarmnode-data/1``, what :class:`~dataplane.DataClient` offers):
  the data plane's own TLS handshake and request on that same socket, as on a data port;
* ALPN ``h2`` (every gRPC client): the connection's bytes, the ClientHello included, are
  relayed unread to the gRPC server, which listens on loopback only. gRPC runs its own mutual
  TLS handshake with the client and sees the client's own certificate, so the peer API's
  identity checks are exactly those of a two-port node;
* anything else (no ALPN, another protocol, not a ClientHello at all) is closed.

A connection holds one of the listener's pending slots until it is routed (the same per-address
and total limits and the same deadline from the accept as a handshake on the data port). The
relay (:class:`Splicer`) is one thread with a selector: it never takes a data plane worker, and
bounds what it carries: at most ``per_address`` relayed connections from one IP address and
``total`` in all (when full, the oldest of the address holding the most is dropped for the
newcomer); a relayed connection whose client has not sent a TLS application-data record within
the listener's ``handshake_timeout_s`` of the accept (its handshake is not done: a slowloris
ClientHello) is dropped, and so is one that moved no byte either way for ``idle_s`` (gRPC pings
every 30 s while a call is open; an idle channel reconnects on its next call).
"""

from __future__ import annotations

import collections
import errno
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from swarmnode.errors import ConfigError
from swarmnode.transport import hello

__all__ = ["DATA_ALPN", "GRPC_ALPN", "OnePortRouter", "SpliceLimits", "Splicer"]

log = logging.getLogger("swarmnode.transport.oneport")

DATA_ALPN = "swarmnode-data/1"
GRPC_ALPN = "h2"
_BUF = 256 * 1024  # bytes buffered per direction of a relayed connection
_APPLICATION_DATA = 23


@dataclass(frozen=True)
class SpliceLimits:
    """What connections relayed to the gRPC server may take."""

    per_address: int = 64
    total: int = 256
    idle_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("per_address", "total"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65536:
                raise ConfigError(f"splice {name}={v!r}: must be a whole number in [1, 65536]")
        if self.per_address > self.total:
            raise ConfigError(f"splice per_address={self.per_address} is more than total="
                              f"{self.total}: one address could take every slot; lower it")
        if not isinstance(self.idle_s, int | float) or not 30 < self.idle_s <= 86400:
            raise ConfigError(f"splice idle_s={self.idle_s!r}: must be seconds in (30, 86400] "
                              "(gRPC pings an open call every 30 s)")


class _Splice:
    __slots__ = ("address", "client", "connected", "deadline", "down", "gone", "hdr", "last",
                 "peer", "server", "since", "skip", "up")

    def __init__(self, client: socket.socket, peer: tuple[str, int], deadline: float) -> None:
        self.client, self.peer, self.address = client, peer, peer[0]
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setblocking(False)
        self.deadline: float | None = deadline  # None once the client's handshake is done
        self.since = self.last = time.monotonic()
        self.up, self.down = bytearray(), bytearray()  # client -> server, server -> client
        self.connected = self.gone = False
        self.hdr, self.skip = b"", 0  # the client's TLS record being read past, until mature

    def watch_records(self, data: bytes) -> bool:
        """Follow the client's TLS records until its first application-data record (its
        handshake flight is done); False when the bytes are not TLS records."""
        pos = 0
        while pos < len(data) and self.deadline is not None:
            if self.skip:
                step = min(self.skip, len(data) - pos)
                self.skip -= step
                pos += step
                continue
            take = min(5 - len(self.hdr), len(data) - pos)
            self.hdr += data[pos:pos + take]
            pos += take
            if len(self.hdr) < 5:
                break
            kind, length = self.hdr[0], int.from_bytes(self.hdr[3:5], "big")
            if kind not in (20, 21, 22, 23) or length > (1 << 14) + 2048:
                return False
            if kind == _APPLICATION_DATA:
                self.deadline = None
            self.hdr, self.skip = b"", length
        return True


class Splicer:
    """Relays whole TCP connections to ``target`` (host, port) on one thread, bounded by
    ``limits``; :meth:`add` hands one over (from any thread)."""

    def __init__(self, target: tuple[str, int], limits: SpliceLimits | None = None,
                 name: str = "one-port") -> None:
        self.target, self.limits, self.name = target, limits or SpliceLimits(), name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._incoming: collections.deque[tuple[socket.socket, tuple[str, int], float]] = \
            collections.deque()
        self._splices: dict[int, _Splice] = {}  # id -> splice
        self._per_address: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"spliced": 0, "refused_per_address": 0, "evicted": 0, "timed_out": 0,
                      "idle": 0, "failed_connect": 0}

    @property
    def active(self) -> int:
        return len(self._splices)

    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-splice",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def add(self, client: socket.socket, peer: tuple[str, int], deadline: float) -> None:
        """Relay ``client`` (non-blocking, nothing read from it yet); its handshake must be done
        by ``deadline`` (monotonic)."""
        if self._stop.is_set():
            client.close()
            return
        self._incoming.append((client, peer, deadline))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the relay thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                nearest = min((s.deadline for s in self._splices.values()
                               if s.deadline is not None), default=now + 1.0)
                for key, events in self._sel.select(max(0.0, min(nearest - now, 1.0))):
                    if key.data is None:
                        self._take_incoming()
                        continue
                    splice, side = key.data
                    if splice.gone:
                        continue
                    try:
                        self._step(splice, side, events)
                    except OSError as exc:
                        log.debug("%s: relay of %s:%d ended: %s", self.name, *splice.peer[:2],
                                  exc)
                        self._close(splice)
                    except Exception:  # noqa: BLE001 - one connection never ends the relay
                        log.exception("%s: relaying %s:%d failed", self.name, *splice.peer[:2])
                        self._close(splice)
                self._expire(time.monotonic())
        finally:
            for splice in list(self._splices.values()):
                self._close(splice)
            for client, _, _ in self._incoming:
                client.close()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_incoming(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._incoming:
            client, peer, deadline = self._incoming.popleft()
            address = peer[0]
            if self._per_address.get(address, 0) >= self.limits.per_address:
                self.stats["refused_per_address"] += 1
                log.debug("%s: refused %s: %d relayed connections from that address", self.name,
                          address, self.limits.per_address)
                client.close()
                continue
            if len(self._splices) >= self.limits.total:
                self._evict()
            splice = _Splice(client, peer, deadline)
            err = splice.server.connect_ex(self.target)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                self.stats["failed_connect"] += 1
                log.warning("%s: cannot reach the peer API at %s:%d: %s", self.name,
                            *self.target, errno.errorcode.get(err, err))
                client.close()
                splice.server.close()
                continue
            self._splices[id(splice)] = splice
            self._per_address[address] = self._per_address.get(address, 0) + 1
            self.stats["spliced"] += 1
            self._sel.register(client, selectors.EVENT_READ, (splice, "client"))
            self._sel.register(splice.server, selectors.EVENT_WRITE, (splice, "server"))

    def _evict(self) -> None:
        busiest = max(self._per_address, key=lambda a: self._per_address[a])
        oldest = min((s for s in self._splices.values() if s.address == busiest),
                     key=lambda s: s.since)
        self.stats["evicted"] += 1
        log.info("%s: %d relayed connections (the limit): dropped the oldest of %s (%d)",
                 self.name, len(self._splices), busiest, self._per_address[busiest])
        self._close(oldest)

    def _step(self, s: _Splice, side: str, events: int) -> None:
        if side == "server" and not s.connected:
            err = s.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.stats["failed_connect"] += 1
                raise OSError(err, f"the peer API at {self.target[0]}:{self.target[1]}: "
                              f"{errno.errorcode.get(err, err)}")
            s.connected = True
        src, dst = (s.client, s.server) if side == "client" else (s.server, s.client)
        inbound, outbound = (s.up, s.down) if side == "client" else (s.down, s.up)
        if events & selectors.EVENT_READ and len(inbound) < _BUF:
            try:
                data = src.recv(_BUF - len(inbound))
            except (BlockingIOError, InterruptedError):
                data = None
            if data == b"":  # one side closed: pass on what is buffered, then close both
                self._flush(s)
                self._close(s)
                return
            if data:
                if side == "client" and s.deadline is not None and not s.watch_records(data):
                    raise OSError(f"{s.address} sent bytes that are not TLS records")
                inbound += data
                s.last = time.monotonic()
        if events & selectors.EVENT_WRITE and outbound:
            try:
                n = src.send(outbound)
            except (BlockingIOError, InterruptedError):
                n = 0
            del outbound[:n]
            s.last = time.monotonic()
        if inbound and (side == "server" or s.connected):
            try:
                n = dst.send(inbound)
            except (BlockingIOError, InterruptedError):
                n = 0
            del inbound[:n]
        self._interest(s)

    def _interest(self, s: _Splice) -> None:
        client = (selectors.EVENT_READ if len(s.up) < _BUF else 0) | \
            (selectors.EVENT_WRITE if s.down else 0)
        if not s.connected:
            server = selectors.EVENT_WRITE  # the connect's completion
        else:
            server = (selectors.EVENT_READ if len(s.down) < _BUF else 0) | \
                (selectors.EVENT_WRITE if s.up else 0)
        self._want(s.client, client, (s, "client"))
        self._want(s.server, server, (s, "server"))

    def _want(self, sock: socket.socket, events: int, data: tuple[_Splice, str]) -> None:
        """Watch ``sock`` for ``events`` (none: a full buffer waits for the other side)."""
        try:
            key = self._sel.get_key(sock)
        except KeyError:
            if events:
                self._sel.register(sock, events, data)
            return
        if not events:
            self._sel.unregister(sock)
        elif events != key.events:
            self._sel.modify(sock, events, data)

    def _flush(self, s: _Splice) -> None:
        for sock, buf in ((s.server, s.up), (s.client, s.down)):
            if buf and (sock is s.client or s.connected):
                try:
                    sock.send(buf)
                except OSError:
                    pass

    def _expire(self, now: float) -> None:
        for s in list(self._splices.values()):
            if s.deadline is not None and s.deadline <= now:
                self.stats["timed_out"] += 1
                log.info("%s: dropped %s:%d: TLS handshake not done in time", self.name,
                         *s.peer[:2])
                self._close(s)
            elif now - s.last > self.limits.idle_s:
                self.stats["idle"] += 1
                log.info("%s: dropped %s:%d: idle for %g s", self.name, *s.peer[:2],
                         self.limits.idle_s)
                self._close(s)

    def _close(self, s: _Splice) -> None:
        if s.gone:
            return
        s.gone = True
        self._splices.pop(id(s), None)
        left = self._per_address.get(s.address, 1) - 1
        if left > 0:
            self._per_address[s.address] = left
        else:
            self._per_address.pop(s.address, None)
        for sock in (s.client, s.server):
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()


class OnePortRouter:
    """What :class:`~swarmnode.transport.listener.TlsListener` asks about a new connection's
    first bytes (:meth:`route`), and where it hands the gRPC ones (:meth:`splice`)."""

    max_peek = hello.MAX_PEEK

    def __init__(self, grpc_target: tuple[str, int], limits: SpliceLimits | None = None) -> None:
        self.splicer = Splicer(grpc_target, limits)

    def start(self) -> None:
        self.splicer.start()

    def stop(self) -> None:
        self.splicer.stop()

    @staticmethod
    def route(first: bytes) -> str | int:
        """``"tls"`` (the data plane), ``"splice"`` (gRPC), or the bytes still needed;
        :class:`~swarmnode.transport.hello.HelloError` to refuse the connection."""
        got = hello.parse(first)
        if isinstance(got, int):
            return got
        if DATA_ALPN.encode() in got.alpn:
            return "tls"
        if GRPC_ALPN.encode() in got.alpn:
            return "splice"
        offered = ", ".join(repr(p.decode("ascii", "replace")) for p in got.alpn) or "nothing"
        raise hello.HelloError(f"its ClientHello's ALPN offers {offered}; this port takes "
                               f"{DATA_ALPN!r} (data plane) or {GRPC_ALPN!r} (peer API)")

    def splice(self, client: socket.socket, peer: tuple[str, int], deadline: float) -> None:
        self.splicer.add(client, peer, deadline)
