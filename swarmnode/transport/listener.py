"""A TLS listener that gives a connection a worker only once its TLS handshake is done.

One thread accepts TCP connections and runs every TLS handshake without blocking (and, when
asked, reads the client's first request frame), each within ``handshake_timeout_s`` counted from
the TCP accept, whatever the client trickles. Only then is the connection handed to a worker of a
bounded pool. So a client without a certificate, or with one from a CA the node does not trust,
never holds a worker: it holds at most a slot among the *pending* connections, and those are
bounded twice:

* ``pending_per_address``: pending connections from one IP address at a time; the next one from
  that address is closed at once (that address alone pays);
* ``pending_total``: pending connections in all; when full, the oldest pending connection of the
  address holding the most is dropped to make room (honest handshakes take milliseconds, so the
  ones still pending are almost always an attacker's).

A connection whose handshake succeeded but whose request frame does not arrive in time is
dropped the same way, so a trusted certificate that is not enrolled cannot hold workers either.

With a ``router`` (the one-port mode, :mod:`swarmnode.transport.oneport`), a new connection is
first only peeked at, as a pending one under the same limits and deadline: the router reads its
ClientHello and says whether this listener runs the TLS handshake, the connection goes to the
router whole (nothing read from it), or it is closed.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from swarmnode.errors import ConfigError

__all__ = ["ListenerLimits", "TlsListener"]

log = logging.getLogger("swarmnode.transport.listener")


@dataclass(frozen=True)
class ListenerLimits:
    """What connections that have not finished their TLS handshake (and first frame) may take."""

    handshake_timeout_s: float = 10.0  # accept -> handshake done (-> first frame read), in all
    pending_per_address: int = 64  # pending connections from one IP address
    pending_total: int = 256  # pending connections in all

    def __post_init__(self) -> None:
        t = self.handshake_timeout_s
        if not isinstance(t, int | float) or isinstance(t, bool) or not 0 < t <= 300:
            raise ConfigError(f"handshake_timeout_s={t!r}: must be a number of seconds in "
                              "(0, 300]; 10 suits sites on WAN links")
        for name in ("pending_per_address", "pending_total"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65536:
                raise ConfigError(f"{name}={v!r}: must be a whole number in [1, 65536]")
        if self.pending_per_address > self.pending_total:
            raise ConfigError(
                f"pending_per_address={self.pending_per_address} is more than pending_total="
                f"{self.pending_total}: one address could take every pending slot; lower it")


# (buffer so far) -> bytes the first frame takes in all, or None while that is not known yet
FrameLength = Callable[[bytes], int | None]
# (TLS socket, blocking, "ip:port", the first frame's bytes (b"" without frame_length))
Serve = Callable[[ssl.SSLSocket, str, bytes], None]


class Router(Protocol):
    """Routes a new connection by its first bytes, before any TLS work (one-port mode)."""

    max_peek: int  # the most bytes of a connection's start it may need to see

    def route(self, first: bytes) -> str | int:
        """``"tls"``: this listener takes it; ``"splice"``: :meth:`splice` takes it; an int: the
        bytes needed before it can say (more than ``len(first)``); ValueError: refuse it."""
        ...

    def splice(self, sock: socket.socket, peer: tuple[str, int], deadline: float) -> None:
        """Take ``sock`` over (non-blocking, nothing read from it); ``deadline``: the accept's
        handshake deadline (monotonic)."""
        ...


class _Pending:
    __slots__ = ("address", "buf", "deadline", "done", "fd", "gone", "peeked", "peer", "since",
                 "tls")

    def __init__(self, tls: ssl.SSLSocket | socket.socket, peer: tuple[str, int],
                 deadline: float) -> None:
        self.tls, self.peer, self.address = tls, peer, peer[0]
        self.peeked = -1  # bytes of the ClientHello seen (router only; -1: routed, or none)
        self.deadline, self.since = deadline, time.monotonic()
        self.done = False  # the handshake is done
        self.buf = b""
        self.fd = tls.fileno()
        self.gone = False  # no longer pending (handed over or dropped)


class TlsListener:
    """``TlsListener(host, port, ctx, serve, limits, workers=64).start()`` returns the port;
    ``serve(tls, where, first)`` runs in a worker once the handshake (and the first frame, if
    ``frame_length`` is given) arrived; it must not close over the limits of this class."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, serve: Serve,
                 limits: ListenerLimits | None = None, *, workers: int = 64,
                 frame_length: FrameLength | None = None, name: str = "tls",
                 router: Router | None = None) -> None:
        self.host, self.port, self.ctx, self.serve = host, port, ctx, serve
        self.router = router
        self.limits = limits or ListenerLimits()
        self.workers, self.frame_length, self.name = workers, frame_length, name
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._busy = 0
        self._pending: dict[int, _Pending] = {}  # fd -> pending connection
        self._per_address: dict[str, int] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.stats = {"accepted": 0, "handed": 0, "failed_handshakes": 0, "timed_out": 0,
                      "refused_per_address": 0, "evicted": 0, "refused_busy": 0,
                      "refused_hello": 0, "spliced": 0}

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._sel.register(sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-accept",
                                        daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- the accept / handshake thread ------------------------------------------------------------
    def _loop(self) -> None:
        assert self._listener is not None
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                nearest = min((p.deadline for p in self._pending.values()), default=now + 1.0)
                for key, _ in self._sel.select(max(0.0, min(nearest - now, 1.0))):
                    try:
                        if key.fileobj is self._listener:
                            self._accept()
                        elif key.fileobj is self._wake_r:
                            self._wake_r.recv(64)
                        else:
                            self._step(key.data)
                    except Exception:  # noqa: BLE001 - one connection never ends the listener
                        log.exception("%s: accepting or handshaking failed", self.name)
                        if isinstance(key.data, _Pending):
                            self._drop(key.data)
                now = time.monotonic()
                for p in [p for p in self._pending.values() if p.deadline <= now]:
                    self.stats["timed_out"] += 1
                    log.info("%s: dropped %s:%d: TLS handshake%s not done within %g s",
                             self.name, *p.peer[:2], " and request" if p.done else "",
                             self.limits.handshake_timeout_s)
                    self._drop(p)
        finally:
            for p in list(self._pending.values()):
                self._drop(p)
            self._sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(256):  # drain the backlog a batch at a time
            try:
                conn, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.name, exc)
                return
            self.stats["accepted"] += 1
            address = peer[0]
            if self._per_address.get(address, 0) >= self.limits.pending_per_address:
                self.stats["refused_per_address"] += 1
                log.debug("%s: refused %s: %d handshakes pending from that address", self.name,
                          address, self.limits.pending_per_address)
                conn.close()
                continue
            if len(self._pending) >= self.limits.pending_total:
                self._evict()
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.router is not None:  # peeked at first, wrapped once routed here
                    tls: ssl.SSLSocket | socket.socket = conn
                    _low_water(conn, _RECORD_HEADER)
                else:
                    tls = self.ctx.wrap_socket(conn, server_side=True,
                                               do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                conn.close()
                continue
            p = _Pending(tls, peer, time.monotonic() + self.limits.handshake_timeout_s)
            if self.router is not None:
                p.peeked = 0
            with self._lock:
                self._pending[p.fd] = p
            self._per_address[address] = self._per_address.get(address, 0) + 1
            self._sel.register(tls, selectors.EVENT_READ, p)
            self._step(p)

    def _evict(self) -> None:
        """Room for one more: drop the oldest pending connection of the busiest address."""
        busiest = max(self._per_address, key=lambda a: self._per_address[a])
        oldest = min((p for p in self._pending.values() if p.address == busiest),
                     key=lambda p: p.since)
        self.stats["evicted"] += 1
        log.info("%s: %d connections pending (the limit): dropped the oldest of %s (%d pending)",
                 self.name, len(self._pending), busiest, self._per_address[busiest])
        self._drop(oldest)

    def _want(self, p: _Pending, events: int) -> None:
        self._sel.modify(p.tls, events, p)

    def _step(self, p: _Pending) -> None:
        """Take the handshake, then the first frame, as far as the bytes that came allow."""
        if p.peeked >= 0 and not self._route(p):
            return None
        assert isinstance(p.tls, ssl.SSLSocket)
        try:
            if not p.done:
                try:
                    p.tls.do_handshake()
                except ssl.SSLWantReadError:
                    return self._want(p, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    return self._want(p, selectors.EVENT_WRITE)
                p.done = True
                self._want(p, selectors.EVENT_READ)
            while self.frame_length is not None:
                need = self.frame_length(p.buf)
                if need is not None and len(p.buf) >= need:
                    break
                want = (need - len(p.buf)) if need is not None else 1
                try:
                    got = p.tls.recv(min(max(1, want), 65536 + 4))
                except ssl.SSLWantReadError:
                    return None
                except ssl.SSLWantWriteError:
                    return self._want(p, selectors.EVENT_WRITE)
                if not got:
                    raise ConnectionResetError("closed before its request")
                p.buf += got
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.stats["failed_handshakes"] += 1
            quiet = not isinstance(exc, ssl.SSLError) or isinstance(exc, ssl.SSLEOFError)
            log.log(logging.DEBUG if quiet else logging.INFO,
                    "%s: refused %s:%d: %s (a peer presents its certificate from the "
                    "consortium's CA)", self.name, *p.peer[:2], exc)
            self._drop(p)
            return None
        self._hand_over(p)
        return None

    def _route(self, p: _Pending) -> bool:
        """Peek at the ClientHello and route the connection; True once it is this listener's
        TLS socket (the handshake goes on), False while the router needs more bytes or when the
        connection left (refused, or the router took it)."""
        assert self.router is not None
        try:
            first = p.tls.recv(self.router.max_peek, socket.MSG_PEEK)
            if not first:
                raise ConnectionResetError("closed before its ClientHello")
            if len(first) <= p.peeked:  # woken without a byte more: not a client taking turns
                raise ValueError(f"its ClientHello stopped at {len(first)} bytes")
            p.peeked = len(first)
            way = self.router.route(first)
            if isinstance(way, int):  # wait (no wakeup) until that many bytes are here
                _low_water(p.tls, min(way, self.router.max_peek))
                return False
            _low_water(p.tls, 1)
        except (BlockingIOError, InterruptedError):
            return False
        except ValueError as exc:
            self.stats["refused_hello"] += 1
            log.info("%s: refused %s:%d: %s", self.name, *p.peer[:2], exc)
            self._drop(p)
            return False
        except OSError as exc:
            self.stats["failed_handshakes"] += 1
            log.debug("%s: %s:%d: %s", self.name, *p.peer[:2], exc)
            self._drop(p)
            return False
        if way == "splice":
            self._forget(p)
            self.stats["spliced"] += 1
            self.router.splice(p.tls, p.peer, p.deadline)
            return False
        if way != "tls":
            raise RuntimeError(f"router answered {way!r}")
        self._sel.unregister(p.tls)
        try:
            p.tls = self.ctx.wrap_socket(p.tls, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as exc:
            self.stats["failed_handshakes"] += 1
            log.debug("%s: %s:%d: %s", self.name, *p.peer[:2], exc)
            self._forget(p)
            p.tls.close()
            return False
        p.peeked = -1
        self._sel.register(p.tls, selectors.EVENT_READ, p)
        return True

    def _forget(self, p: _Pending) -> None:
        if p.gone:
            return
        p.gone = True
        with self._lock:
            self._pending.pop(p.fd, None)
        left = self._per_address.get(p.address, 1) - 1
        if left > 0:
            self._per_address[p.address] = left
        else:
            self._per_address.pop(p.address, None)
        try:
            self._sel.unregister(p.tls)
        except (KeyError, ValueError):
            pass

    def _drop(self, p: _Pending) -> None:
        self._forget(p)
        try:
            p.tls.close()
        except OSError:
            pass

    def _hand_over(self, p: _Pending) -> None:
        self._forget(p)
        assert isinstance(p.tls, ssl.SSLSocket)
        with self._lock:
            full = self._busy >= self.workers
            if not full:
                self._busy += 1
        if full:  # every worker busy: refuse now rather than queue behind them
            self.stats["refused_busy"] += 1
            log.warning("%s: refused %s:%d: all %d workers busy", self.name, *p.peer[:2],
                        self.workers)
            p.tls.close()
            return
        self.stats["handed"] += 1
        p.tls.setblocking(True)
        try:
            self._pool.submit(self._run, p.tls, f"{p.peer[0]}:{p.peer[1]}", p.buf)
        except RuntimeError:  # stopping
            with self._lock:
                self._busy -= 1
            p.tls.close()

    def _run(self, tls: ssl.SSLSocket, where: str, first: bytes) -> None:
        try:
            self.serve(tls, where, first)
        except Exception:  # noqa: BLE001 - one connection's failure never ends the listener
            log.exception("%s: connection from %s failed", self.name, where)
        finally:
            with self._lock:
                self._busy -= 1
            try:
                tls.close()
            except OSError:
                pass


_RECORD_HEADER = 5  # a TLS record's header: no routing decision before it


def _low_water(sock: socket.socket, nbytes: int) -> None:
    """Wake for reads only once ``nbytes`` are here (or at EOF): a connection that trickles its
    ClientHello costs no wakeups until it is whole. Best effort where the OS lacks it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, nbytes))
    except (OSError, AttributeError):
        pass
