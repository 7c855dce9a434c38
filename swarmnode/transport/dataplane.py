"""The bulk data plane: whole models between node services over mutual-TLS sockets, striped.

gRPC carries the control calls (identity checks, health); model bytes go here, because gRPC
Python copies every received message twice under the GIL and once more on sending, which caps a
stream at ~0.4 GB/s where a TLS socket that decrypts straight into its destination (``recv_into``)
reaches ~1 GB/s per connection. Each transfer goes over ``stripes`` TLS connections at once, stripe
``i`` carrying every ``stripes``-th block of 4 MiB from block ``i`` on (:func:`stripe_blocks`),
received in parallel straight into one buffer of the announced size and hashed in order right
behind the stripes.

Security is the peer API's, on every connection:

* TLS 1.2+ with client certificates required, both sides verifying the chain against the swarm's
  trust bundle. The server then binds the connection to a chain address: the client names its
  address in the request, and the SHA-256 of the certificate it presented on *this* connection must
  be the fingerprint the contract holds for that enrolled, non-revoked address. The client checks
  the server's certificate on the same connection against the contract's fingerprint for the peer
  it meant to reach before it sends a byte of payload (no second probe connection, no gap).
* A request is one bounded JSON frame (at most 64 KiB, read with a deadline), checked (identity,
  participant of the round, announced size under the limit, stripe geometry) before any payload
  byte is read; the buffer is an anonymous mapping whose pages the kernel commits only as data
  arrives, so a lying size costs address space, not memory.
* Outsiders: connections are accepted and their TLS handshakes run, together with the reading
  of the request frame, by :class:`~swarmnode.transport.listener.TlsListener`, on one thread and
  within ``handshake_timeout_s`` (10 s) of the accept, with at most ``pending_per_address`` (64)
  and ``pending_total`` (256) such connections; only a connection that completed both takes one
  of the ``workers``. A client without a certificate, with one from a CA outside the trust bundle,
  or with one whose address is not enrolled holds no worker and no admission slot.
* Pushes are checked on the header, before they wait for admission and before any payload byte
  is read: identity, participant of the round, size, stripe geometry, digest, and the handler's
  own ``check_push`` (this node leads that round's election, the sender is one of its
  participants with its checked-in weight, and has not sent its update yet), for every round,
  past ones included. So admission slots go only to updates that can be accepted.
* Limits of a shared server: at most ``per_peer`` connections per chain address at a time, a
  server-side deadline per connection, and a minimum progress rate: an admitted push must bring
  ``min_rate`` bytes a second over every window of ``grace_s`` seconds (a watchdog judges the
  bytes taken in, so a trickle of TLS fragments does not escape it), else it is cut and its
  admission slot goes to the next update waiting; a pull is cut once its average rate since its
  start falls below ``min_rate`` after ``grace_s``. Streams share the node's link, so each is
  held to its share of ``min_rate`` (divided among the streams moving that way at once).
  ``payload_bytes_in`` counts the payload bytes pushes brought in.
* Timeouts judge the link, not one stream's place in a queue: a send or receive whose socket
  timed out goes on while this node's link moved bytes that way on any stream within that
  timeout (TCP may starve one of many streams for a while), up to the transfer's deadline; a
  push waiting for an admission slot is told its place every few seconds and waits while that
  queue moves.
* An update counts only when every stripe arrived, its SHA-256 equals the announced digest, and it
  passes the same checks as any payload (:mod:`serde`: header, spec, NaN/Inf; never pickle).
* Resumable pushes: when a push's link breaks mid-stream (not when it is refused), the server
  keeps what arrived (the buffer, the in-order hash so far, the bytes of each stripe) for
  ``resume_s`` (120 s), keyed by sender, round and digest: one update per sender (a newer push
  from it replaces it), ``max_partials`` (4) in all, dropped once a later round's push arrives,
  or once a push from that sender for that round is refused on its header. The client's next
  push of the same update asks to resume; every check runs again on its header, then the server
  says how many bytes of each stripe it holds and only the rest travels. Each byte is hashed
  once, in order, whatever the cuts; the digest is checked at the end as for any push.

Wire format (little-endian): a frame is a 4-byte length then UTF-8 JSON. Push: request frame
``{"op": "push", "address", "round", "weight", "total_bytes", "digest" (hex), "stripe",
"stripes"}`` then the stripe's bytes; the reply frame ``{"ok": true}`` or ``{"ok": false,
"error": class name, "message"}`` comes once the whole update was accepted or refused. A push
that adds ``"admit": true`` (every push of this client; ``"resume": true`` too) waits for
``{"ok": true, "from": n}`` (or a refusal) before it sends the stripe's bytes from byte ``n`` of
the stripe on (0 unless it resumes); while it waits for admission it gets ``{"queued": place,
"moved": bytes}`` (updates ahead of it, bytes this node's link took in so far) every
:data:`_NOTE_S`. Pull:
``{"op": "pull", "address", "round", "stripe", "stripes", "wait_s"}``; the reply frame
``{"ok": true, "total_bytes", "digest"}`` then the stripe's bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarmnode.errors import (
    PayloadRejected,
    PeerRefused,
    PeerUnavailable,
    RoundError,
    SwarmError,
    TransportError,
    error_class,
)
from swarmnode.identity import TlsFiles, fingerprint
from swarmnode.transport import parts, serde
from swarmnode.transport.listener import ListenerLimits, Router, TlsListener
from swarmnode.transport.oneport import DATA_ALPN
from swarmnode.transport.shards import EncodedSlice

__all__ = ["TRAFFIC", "DataClient", "DataServer", "Traffic", "bind_address", "check_push",
           "stripe_blocks"]

log = logging.getLogger("swarmnode.transport.data")

MAX_FRAME = 64 * 1024
MAX_STRIPES = 16
STRIPE_MIN = 16 << 20  # bytes: smaller transfers use fewer stripes
STRIPE_BLOCK = 4 << 20  # stripes interleave blocks of this size (whole pages and elements)
_STALL_S = 5.0  # seconds an admitted push may go without a byte
_REPLY_S = 5.0  # seconds a refusal's reply frame may take to leave
_WATCH_S = 0.25  # how often the watchdog looks at the admitted pushes' progress
_NOTE_S = 2.0  # how often a push waiting for admission is told its place in the queue
# Client: seconds one send or receive may go without progress on the node's link (a peer that
# froze: SIGSTOP, a hung host) before the transfer fails, whatever the transfer's overall
# timeout; a push queued for admission waits while its queue moves (DataClient._admitted).
_PROGRESS_S = 30.0
# Client: the slowest a server is assumed to check a received payload (bytes a second; a loaded
# 2-core leader hashes, parses and folds a 1 GB update in about 20 s): the verdict's extra wait.
_CHECK_RATE = 16 << 20


def stripe_blocks(total: int, index: int, count: int) -> list[tuple[int, int]]:
    """The byte ranges [start, end) that stripe ``index`` of ``count`` carries over ``total``
    bytes, in order: every ``count``-th block of :data:`STRIPE_BLOCK` bytes, from block
    ``index`` on. The stripes move through the payload side by side, so the receiver hashes it
    in order right behind them (and holds little that is received but not yet hashed)."""
    step = count * STRIPE_BLOCK
    return [(b, min(total, b + STRIPE_BLOCK)) for b in range(index * STRIPE_BLOCK, total, step)]


def _skip(blocks: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``blocks`` without their first ``n`` bytes (what a resumed stripe still carries)."""
    out = []
    for start, end in blocks:
        if n >= end - start:
            n -= end - start
            continue
        out.append((start + n, end))
        n = 0
    return out


def _send_frame(sock: ssl.SSLSocket, obj: dict[str, Any]) -> None:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack("<I", len(raw)) + raw)


def _recv_exact(sock: ssl.SSLSocket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:])
        if not got:
            raise TransportError(f"{what}: the connection closed after {pos} of {n} bytes")
        pos += got
    return bytes(buf)


def _frame_length(buf: bytes) -> int | None:
    """Bytes the frame starting ``buf`` takes in all (None until its length arrived); just the
    length field for a frame over the limit (refused once parsed)."""
    if len(buf) < 4:
        return None
    (n,) = struct.unpack_from("<I", buf)
    return 4 + n if n <= MAX_FRAME else 4


def _parse_frame(raw: bytes, what: str) -> dict[str, Any]:
    """The JSON object of one whole frame (length field included)."""
    if len(raw) < 4:
        raise PayloadRejected(f"{what}: the connection closed before its request frame")
    (n,) = struct.unpack_from("<I", raw)
    if n > MAX_FRAME:
        raise PayloadRejected(f"{what}: a {n}-byte request frame, over the {MAX_FRAME} limit")
    try:
        obj = json.loads(raw[4:4 + n])
    except (UnicodeDecodeError, ValueError):
        raise PayloadRejected(f"{what}: the request frame is not JSON") from None
    if not isinstance(obj, dict):
        raise PayloadRejected(f"{what}: the request frame is not a JSON object")
    return obj


def _header_digest(hdr: dict[str, Any], what: str) -> bytes:
    """The SHA-256 a request header announces for its payload; PayloadRejected if it is none."""
    try:
        digest = bytes.fromhex(str(hdr.get("digest", "")))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise PayloadRejected(f"{what}: the header's digest is not a SHA-256 (32 bytes)")
    return digest


def _recv_frame(sock: ssl.SSLSocket, what: str) -> dict[str, Any]:
    head = _recv_exact(sock, 4, what)
    (n,) = struct.unpack("<I", head)
    if n > MAX_FRAME:
        raise PayloadRejected(f"{what}: a {n}-byte frame, over the {MAX_FRAME} limit")
    return _parse_frame(head + _recv_exact(sock, n, what), what)


def _int(obj: dict[str, Any], key: str, what: str, low: int = 0, high: int = 1 << 62) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise PayloadRejected(f"{what}: field {key!r} must be an integer in [{low}, {high}]")
    return v


def bind_address(authority: Any, claimed: str, certificate: bytes) -> str:
    """``claimed``, once ``certificate`` (PEM or DER, the one presented on this connection) is
    the one the contract holds for that enrolled, non-revoked address; PeerRefused otherwise.
    Both servers (the peer API and the data plane) bind callers this way."""
    got = fingerprint(certificate)
    # an authority that bounds the chain reads a certificate's claims cost (node.peers)
    claimed_fingerprint = getattr(authority, "claimed_fingerprint", None)
    expected = (claimed_fingerprint(claimed, got) if claimed_fingerprint is not None
                else authority.fingerprint_of(claimed))
    if expected is None:
        raise PeerRefused(
            f"{claimed} is not an enrolled node on chain (never enrolled, or revoked); "
            "its calls are refused"
        )
    if got != expected:
        raise PeerRefused(
            f"the client certificate (sha256 {got.hex()[:16]}...) is not the one the contract "
            f"holds for {claimed} ({expected.hex()[:16]}...): the caller is not that node, or "
            "its certificate was replaced without re-authorising it"
        )
    return claimed


class Traffic:
    """Payload bytes this process moved on data planes, sent and received, as server and as
    client (what a node's metrics report), and when its link last moved bytes each way: the
    clock a stream's timeout judges (:func:`_link_moved`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.received = 0
        self.last_sent = self.last_received = -1e9  # time.monotonic() of the last bytes moved

    def add(self, sent: int = 0, received: int = 0) -> None:
        now = time.monotonic()
        with self._lock:
            self.sent += sent
            self.received += received
            if sent:
                self.last_sent = now
            if received:
                self.last_received = now


TRAFFIC = Traffic()
_COUNT_EVERY = 1 << 20  # bytes a stream moves between its updates of TRAFFIC


def _link_moved(sending: bool, within: float) -> bool:
    """Whether this node's link moved bytes that way (on any data plane stream) in the last
    ``within`` seconds. A stream whose own socket timed out waits on while it did: the link is
    busy with the round's own traffic (a queue of streams shares it; TCP may starve one of them
    for a while), which is not a frozen peer."""
    last = TRAFFIC.last_sent if sending else TRAFFIC.last_received
    return time.monotonic() - last < within


def _recv_blocks(tls: ssl.SSLSocket, view: memoryview, blocks: list[tuple[int, int]],
                 what: str, progress: Callable[[int], None], until: float | None = None) -> None:
    """Fill the ``blocks`` of ``view`` from ``tls`` (decrypted straight into place), calling
    ``progress(bytes so far)`` after every read; TransportError if the stream ends first.

    A read that times out (the socket's timeout) is tried again while this node's link
    received bytes on any stream within that timeout (:func:`_link_moved`), up to ``until``
    (a ``time.monotonic()`` deadline; None: no other bound); then the timeout is raised."""
    want = sum(end - start for start, end in blocks)
    got = counted = 0
    patience = tls.gettimeout()
    try:
        for start, end in blocks:
            pos = start
            while pos < end:
                try:
                    n = tls.recv_into(view[pos:end])
                except TimeoutError:
                    if (patience is None or not _link_moved(False, patience)
                            or (until is not None and time.monotonic() > until)):
                        raise
                    continue
                if not n:
                    raise TransportError(f"{what}: the stream ended after {got} of {want} "
                                         "bytes")
                pos += n
                got += n
                if got - counted >= _COUNT_EVERY:
                    TRAFFIC.add(received=got - counted)
                    counted = got
                progress(got)
    finally:
        if got > counted:
            TRAFFIC.add(received=got - counted)


def _send_blocks(tls: ssl.SSLSocket, view: memoryview, blocks: list[tuple[int, int]],
                 sent: Callable[[int, int], None], until: float | None = None) -> None:
    """Send the ``blocks`` of ``view``; ``sent(start, end)`` after each piece went out. A send
    that times out is tried again (the same bytes: OpenSSL resumes the record it began) while
    this node's link sent bytes on any stream within the socket's timeout, up to ``until``."""
    patience = tls.gettimeout()
    moved = counted = 0
    try:
        for start, end in blocks:
            pos = start
            while pos < end:
                try:
                    n = tls.send(view[pos:min(end, pos + _COUNT_EVERY)])
                except TimeoutError:
                    if (patience is None or not _link_moved(True, patience)
                            or (until is not None and time.monotonic() > until)):
                        raise
                    continue
                moved += n
                if moved - counted >= _COUNT_EVERY:
                    TRAFFIC.add(sent=moved - counted)
                    counted = moved
                sent(pos, pos + n)
                pos += n
    finally:
        if moved > counted:
            TRAFFIC.add(sent=moved - counted)


def _context(tls: TlsFiles, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(tls.trust))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    # the data plane's protocol: what routes a connection here on a one-port node (oneport.py)
    ctx.set_alpn_protocols([DATA_ALPN])
    if not server:
        # The peer is pinned by the fingerprint the contract holds (checked on this connection),
        # which is stronger than a host name; endpoints may be IPs without SANs.
        ctx.check_hostname = False
    return ctx


class _OrderedSlots:
    """``slots`` updates admitted at once; when one frees, the waiting update with the smallest
    key goes in (round, then sender address: the order the leader folds updates in), so updates
    mostly arrive in their fold order and few wait, whole, for their turn at the leader."""

    def __init__(self, slots: int) -> None:
        self._cv = threading.Condition()
        self._free = slots
        self._waiting: list[tuple[Any, int]] = []
        self._seq = 0

    def acquire(self, key: Any, timeout: float,
                note: Callable[[int], bool] | None = None) -> bool:
        """Wait for a slot (False after ``timeout``). ``note(place)`` is called every
        :data:`_NOTE_S` while waiting, outside the lock, with the number of updates ahead in the
        queue; when it returns False the wait ends (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._seq += 1
            entry = (key, self._seq)
            self._waiting.append(entry)
        try:
            while True:
                with self._cv:
                    until = min(deadline, time.monotonic() + _NOTE_S)
                    while not (self._free > 0 and entry == min(self._waiting)):
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    else:
                        self._free -= 1
                        return True
                    if time.monotonic() >= deadline:
                        return False
                    place = sum(1 for e in self._waiting if e < entry) + (self._free <= 0)
                if note is not None and not note(place):
                    return False
        finally:
            with self._cv:
                self._waiting.remove(entry)
                self._cv.notify_all()

    def place(self, key: Any) -> int:
        """Updates ahead of the first waiting update with ``key`` (0 if none waits)."""
        with self._cv:
            mine = [e for e in self._waiting if e[0] == key]
            if not mine:
                return 0
            return sum(1 for e in self._waiting if e < mine[0]) + (self._free <= 0)

    def release(self) -> None:
        with self._cv:
            self._free += 1
            self._cv.notify_all()


class _OrderedHash:
    """SHA-256 of a buffer that several stripes fill at once, computed in order by a helper
    thread as the bytes arrive (hashlib releases the GIL): the digest is ready moments after the
    last byte, instead of one more pass over the model afterwards."""

    def __init__(self, buf: mmap.mmap | bytearray, total: int, stripes: int) -> None:
        self._buf = buf
        self._view = memoryview(buf)
        # every block in payload order: (start, end, its stripe, where it begins in that stripe)
        self._blocks = sorted((start, end, i, j * STRIPE_BLOCK) for i in range(stripes)
                              for j, (start, end) in enumerate(stripe_blocks(total, i, stripes)))
        self._filled = [0] * stripes
        self._cond = threading.Condition()
        self._cancelled = False
        self._sha = hashlib.sha256()
        self._thread = threading.Thread(target=self._run, name="data-plane-hash", daemon=True)
        self._thread.start()

    def advance(self, stripe: int, filled: int) -> None:
        with self._cond:
            self._filled[stripe] = filled
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def result(self) -> bytes:
        self._thread.join()
        return self._sha.digest()

    def _run(self) -> None:
        try:
            for start, end, i, at in self._blocks:
                done = 0
                while done < end - start:
                    with self._cond:
                        self._cond.wait_for(lambda i=i, d=at + done: self._filled[i] > d
                                            or self._cancelled)
                        if self._cancelled:
                            return
                        upto = min(end - start, self._filled[i] - at)
                    self._sha.update(self._view[start + done : start + upto])
                    serde.evict(self._buf, start + done, start + upto)  # hashed: not needed now
                    done = upto
        finally:
            self._view.release()
            self._buf = None


# -- server ---------------------------------------------------------------------------------------
def check_push(handler: Any, round: int, sender: str, weight: int) -> None:
    """The handler's own checks of a push (leader of that elected round, participant, weight, not
    a duplicate), run on the header before admission and before any payload byte; both servers
    (the peer API and the data plane) call this. A handler without ``check_push`` (a benchmark's
    sink) checks in ``accept_update`` only."""
    check = getattr(handler, "check_push", None)
    if check is not None:
        check(round, sender, weight)


def _cut(conn: ssl.SSLSocket) -> None:
    """End ``conn`` under a thread blocked reading it (at the socket, below TLS)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)


@dataclass(eq=False)
class _Watched:
    """An admitted push stripe's progress, as the watchdog sees it."""

    tls: ssl.SSLSocket
    what: str
    started: float
    mark_t: float
    moved: int = 0
    mark_moved: int = 0
    reason: str | None = None


@dataclass(eq=False)
class _Inbound:
    """One update arriving over ``stripes`` connections into one buffer."""

    sender: str
    round: int
    weight: int
    digest: bytes
    total: int
    stripes: int
    buf: Any = None  # mmap | bytearray, once admitted
    hasher: Any = None  # _OrderedHash, once admitted
    ready: threading.Event = field(default_factory=threading.Event)
    admitted: bool = False
    done_stripes: set[int] = field(default_factory=set)
    claimed: set[int] = field(default_factory=set)
    receiving: set[ssl.SSLSocket] = field(default_factory=set)  # stripes still taking bytes
    finished: threading.Event = field(default_factory=threading.Event)
    error: SwarmError | None = None
    have: list[int] = field(default_factory=list)  # bytes of each stripe in the buffer
    kept_at: float | None = None  # cut and kept to be resumed (DataServer._partials) since


class DataServer:
    """Serves pushes and pulls of whole models; ``start()`` returns the bound port."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: TlsFiles,
        authority: Any,
        handler: Any,
        spec: serde.ParamSpec | None,
        max_bytes: int,
        reject_nonfinite: bool = True,
        *,
        workers: int = 64,
        per_peer: int = 8,
        inflight: int = 2,
        deadline_s: float = 900.0,
        min_rate: float = 256 * 1024,
        grace_s: float = 10.0,
        idle_s: float = 10.0,
        spill_dir: str | None = None,
        limits: ListenerLimits | None = None,
        resume_s: float = 120.0,
        max_partials: int = 4,
        router: Router | None = None,
    ) -> None:
        """``resume_s``, ``max_partials``: how long, and for how many senders at once (one
        each), the bytes of a push cut mid-stream are kept for the sender to resume
        (:meth:`_keep`). ``limits``: what connections still in their TLS handshake may take
        (:class:`~swarmnode.transport.listener.TlsListener`). ``spill_dir``: receive updates of
        SPILL_MIN bytes or more into files there (see
        :func:`serde.spill_buffer`) instead of anonymous memory, so an update waiting for its
        turn, or being received, is not resident; then updates are checked and handed over one
        at a time, and only the one being checked or folded is in memory."""
        self.host, self.port = host, port
        self.spill_dir = spill_dir
        self.authority, self.handler, self.spec = authority, handler, spec
        self.max_bytes, self.reject_nonfinite = max_bytes, reject_nonfinite
        # A payload of the spec's model is its canonical size; a non-canonical header may be
        # larger. Anything beyond is refused before a byte is read (and memory is committed).
        self.size_limit = max_bytes
        if spec is not None:
            canonical = spec.payload_bytes
            self.size_limit = min(max_bytes, 2 * canonical - spec.nbytes + 65536)
        self.per_peer, self.deadline_s = per_peer, deadline_s
        self.min_rate, self.grace_s, self.idle_s = min_rate, grace_s, idle_s
        self._ctx = _context(tls, server=True)
        self.limits = limits or ListenerLimits()
        self._workers = workers
        self._lock = threading.Lock()
        # payload bytes taken in by pushes, over the server's life (what the tests count)
        self.payload_bytes_in = 0
        self._watched: dict[int, _Watched] = {}
        self._sending = 0  # streams sending (pulls, parts, slices) at once: _check_rate
        self._watch_thread = threading.Thread(target=self._watch, name="data-plane-watch",
                                              daemon=True)
        self._per_peer: dict[str, int] = {}
        self._inbound: dict[tuple[str, int, bytes], _Inbound] = {}
        # Pushes cut mid-stream, kept for their sender to resume: sender (lower case) -> update
        self._partials: dict[str, _Inbound] = {}
        self.resume_s, self.max_partials = resume_s, max(0, max_partials)
        # Updates received at once: each is a model's worth of memory until it is folded in,
        # so the others wait (before their first byte is read) instead of all arriving together;
        # the waiting one first in the leader's fold order (by address) goes in first.
        self._admit = _OrderedSlots(max(1, inflight))
        self._listener: TlsListener | None = None
        self._stop = threading.Event()
        self._router = router  # one-port mode: the peer API's connections go there (oneport.py)

    def start(self) -> int:
        self._listener = TlsListener(self.host, self.port, self._ctx, self._serve, self.limits,
                                     workers=self._workers, frame_length=_frame_length,
                                     name="data-plane", router=self._router)
        self.port = self._listener.start()
        self._watch_thread.start()
        log.info("data plane listening on %s:%d (mutual TLS; handshake within %g s, %d pending "
                 "per address, %d in all)", self.host, self.port,
                 self.limits.handshake_timeout_s, self.limits.pending_per_address,
                 self.limits.pending_total)
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.stop()
        self._drop_partials(lambda p: True)

    # -- one connection ---------------------------------------------------------------------------
    def _serve(self, tls: ssl.SSLSocket, where: str, first: bytes) -> None:
        """One connection, once its handshake is done and its request frame ``first`` arrived
        (the listener's work, before this worker was taken)."""
        sender = ""
        started = time.monotonic()
        try:
            try:
                hdr = _parse_frame(first, f"data plane request from {where}")
                sender = self._identify(tls, hdr)
                self._enter(sender)
            except SwarmError as exc:
                log.warning("data plane: refused %s: %s", where, exc)
                tls.settimeout(_REPLY_S)
                self._reply_error(tls, exc)
                return
            try:
                tls.settimeout(self.idle_s)
                op = hdr.get("op")
                if op == "push":
                    self._push(tls, sender, hdr, started)
                elif op == "pull":
                    self._pull(tls, sender, hdr, started)
                elif op == "manifest":
                    self._manifest(tls, sender, hdr)
                elif op == "parts":
                    self._parts(tls, sender, hdr, started)
                elif op == "shard_push":
                    self._shard_push(tls, sender, hdr)
                elif op == "shard_pull":
                    self._shard_pull(tls, sender, hdr, started)
                elif op == "reveal":
                    self._reveal(tls, sender, hdr)
                elif op == "evidence":
                    self._evidence(tls, sender, hdr)
                else:
                    raise PayloadRejected(f"unknown data plane operation {op!r}")
            except SwarmError as exc:
                log.warning("data plane %s from %s refused: %s", hdr.get("op"), sender, exc)
                tls.settimeout(_REPLY_S)
                self._reply_error(tls, exc)
            finally:
                self._leave(sender)
        except (OSError, ssl.SSLError) as exc:  # peer gone, timeouts
            log.info("data plane connection from %s (%s) ended: %s", where, sender or "?", exc)

    def _reply_error(self, tls: ssl.SSLSocket, exc: SwarmError) -> None:
        try:
            _send_frame(tls, {"ok": False, "error": type(exc).__name__, "message": str(exc)})
        except (OSError, ssl.SSLError):
            pass

    def _identify(self, tls: ssl.SSLSocket, hdr: dict[str, Any]) -> str:
        claimed = hdr.get("address")
        if not isinstance(claimed, str) or not claimed:
            raise PeerRefused("the request names no chain address")
        der = tls.getpeercert(binary_form=True)
        if not der:
            raise PeerRefused("the connection carries no client certificate")
        return bind_address(self.authority, claimed, der)

    def _enter(self, peer: str) -> None:
        with self._lock:
            peer = peer.lower()  # one identity, however the sender spells its address
            busy = self._per_peer.get(peer, 0)
            if busy >= self.per_peer:
                raise PeerRefused(f"{peer} already has {busy} data plane connection(s) open to "
                                  f"this node (the limit is {self.per_peer}); finish them first")
            self._per_peer[peer] = busy + 1

    def _leave(self, peer: str) -> None:
        peer = peer.lower()
        with self._lock:
            left = self._per_peer.get(peer, 1) - 1
            if left > 0:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)

    def _watch(self) -> None:
        """Cut an admitted push whose link moves too little: in every window of ``grace_s``
        seconds after admission it must bring ``min_rate`` bytes a second (a trickle of TLS
        record fragments keeps a socket timeout from firing, so this looks at the bytes taken
        in, not at the reads). Its admission slot then goes to the next update waiting."""
        while not self._stop.wait(_WATCH_S):
            now = time.monotonic()
            self._drop_partials(lambda p, t=now: t - (p.kept_at or t) > self.resume_s)
            with self._lock:
                watched = list(self._watched.values())
            # the link's rate is shared: each admitted stripe must bring its share of min_rate
            share = self.min_rate / max(1, len(watched))
            for w in watched:
                span = now - w.mark_t
                if now - w.started > self.deadline_s:
                    w.reason = f"ran past the server's {self.deadline_s:g} s deadline"
                elif span < self.grace_s:
                    continue
                elif w.moved - w.mark_moved >= share * span:
                    w.mark_t, w.mark_moved = now, w.moved
                    continue
                else:
                    w.reason = (f"moved {w.moved - w.mark_moved} bytes in {span:.1f} s, below "
                                f"its share ({share:.0f} B/s) of the minimum rate of "
                                f"{self.min_rate:g} B/s; its admission slot goes to the next "
                                "update waiting")
                log.warning("data plane: %s cut off: %s", w.what, w.reason)
                with self._lock:
                    self._watched.pop(id(w), None)
                _cut(w.tls)

    def _check_rate(self, started: float, moved: int, who: str) -> None:
        """A stream this node sends on moves at least its share of ``min_rate`` (divided among
        the streams sending at once: they share the node's uplink) after ``grace_s``."""
        age = time.monotonic() - started
        if age > self.deadline_s:
            raise TransportError(f"{who}: ran past the server's {self.deadline_s:g} s deadline")
        share = self.min_rate / max(1, self._sending)
        if age > self.grace_s and moved < share * (age - self.grace_s):
            raise TransportError(f"{who}: moved {moved} bytes in {age:.1f} s, below its share "
                                 f"({share:.0f} B/s) of the minimum rate of {self.min_rate:g} "
                                 "B/s")

    @contextlib.contextmanager
    def _outgoing(self) -> Any:
        """One more stream sending on this node's uplink while inside."""
        with self._lock:
            self._sending += 1
        try:
            yield
        finally:
            with self._lock:
                self._sending -= 1

    # -- push -------------------------------------------------------------------------------------
    def _push(self, tls: ssl.SSLSocket, sender: str, hdr: dict[str, Any], started: float) -> None:
        """Every check runs on the header (and the identity the TLS connection proved) before
        the update may wait for admission and before a byte of its payload is read."""
        rnd = _int(hdr, "round", "push")
        what = f"update for round {rnd} from {sender}"
        if not self.authority.is_participant(rnd, sender):
            raise PeerRefused(f"{sender} is not a participant of round {rnd}")
        total = _int(hdr, "total_bytes", what)
        if total > self.max_bytes:
            raise PayloadRejected(
                f"{what}: the sender announced {total} bytes, over the limit of {self.max_bytes} "
                "bytes (raise max_update_mb if the model really is that large)")
        if total > self.size_limit:
            raise PayloadRejected(
                f"{what}: the sender announced {total} bytes, more than a model of the training "
                f"spec takes ({self.spec.payload_bytes if self.spec else '?'} bytes as canonical "
                "safetensors); the sender's model differs from the swarm's training spec")
        weight = _int(hdr, "weight", what)
        stripes = _int(hdr, "stripes", what, 1, MAX_STRIPES)
        index = _int(hdr, "stripe", what, 0, stripes - 1)
        digest = _header_digest(hdr, what)
        try:
            check_push(self.handler, rnd, sender, weight)  # leadership, participant, duplicate
        except SwarmError:  # that round is over for this sender here: nothing to resume
            self._drop_partials(lambda p: p.sender.lower() == sender.lower()
                                and p.round == rnd)
            raise
        self._drop_partials(lambda p: p.round < rnd)  # a later round began here
        resume = hdr.get("resume") is True
        # "admit": the sender waits for {"ok": true, "from": n} before it sends a byte and
        # meanwhile is told its place in the admission queue, {"queued": place, "moved": bytes
        # this node's link took in so far}, every _NOTE_S: a queue with its holders moving
        # bytes is not a stalled transfer
        told = resume or hdr.get("admit") is True

        def note(place: int) -> bool:
            if not told:
                return True
            try:
                _send_frame(tls, {"queued": place, "moved": TRAFFIC.received})
                return True
            except (OSError, ssl.SSLError):
                return False  # the sender is gone: it leaves the queue

        inbound = self._join(sender, rnd, weight, digest, total, stripes, index, what, resume,
                             note)
        base = inbound.have[index]  # bytes of this stripe already held (a resumed push)
        started = time.monotonic()  # waiting for admission does not count against the rate
        # An admitted sender was blocked sending: its bytes flow at once. One that stalls holds
        # memory and the admission others wait for, so it is cut sooner than an idle request;
        # one that trickles is cut by the watchdog (its slot goes to the next update waiting).
        tls.settimeout(min(self.idle_s, _STALL_S))
        watched = _Watched(tls, f"{what}, stripe {index}", started, started)
        with self._lock:
            self._watched[id(watched)] = watched
            inbound.receiving.add(tls)
        try:
            if told:  # inside: a sender gone before this reply frees its admission too
                _send_frame(tls, {"ok": True, "from": base})

            def progress(got: int) -> None:
                watched.moved = got
                inbound.have[index] = base + got
                inbound.hasher.advance(index, base + got)

            with memoryview(inbound.buf) as view:
                _recv_blocks(tls, view, _skip(stripe_blocks(total, index, stripes), base),
                             f"{what}, stripe {index}", progress,
                             until=started + self.deadline_s)
        except BaseException as exc:
            err: BaseException = exc
            if watched.reason is not None:
                err = TransportError(f"{what}: stripe {index} {watched.reason}")
            elif inbound.error is not None:
                err = inbound.error
            link = isinstance(exc, OSError | ssl.SSLError | TransportError)  # not a refusal
            self._fail(inbound, err if isinstance(err, SwarmError)
                       else TransportError(f"{what}: stripe {index} broke off: {err}"),
                       keep=link)
            raise err from None
        finally:
            with self._lock:
                self._watched.pop(id(watched), None)
                inbound.receiving.discard(tls)
                self.payload_bytes_in += watched.moved
        self._stripe_done(inbound, index)
        # Stripes that started are cut by their own limits; one that never starts is waited for
        # idle_s at most, so an unfinished set of stripes cannot hold this thread.
        until = time.monotonic() + self.idle_s
        while not inbound.finished.wait(0.25):
            if time.monotonic() > until and len(inbound.claimed) < inbound.stripes:
                self._fail(inbound, keep=True, exc=TransportError(
                    f"{what}: only {len(inbound.claimed)} of {inbound.stripes} stripes arrived"))
            elif time.monotonic() - started > self.deadline_s:
                self._fail(inbound, TransportError(f"{what}: ran past the deadline"))
        if inbound.error is not None:
            raise inbound.error
        _send_frame(tls, {"ok": True})

    def _join(self, sender: str, rnd: int, weight: int, digest: bytes, total: int, stripes: int,
              index: int, what: str, resume: bool = False,
              note: Callable[[int], bool] | None = None) -> _Inbound:
        """The update this stripe belongs to, with its buffer, once it is admitted. The first
        stripe of a push that asks to ``resume`` takes the bytes kept of the same update (same
        sender, round, digest, size, stripes and weight) cut earlier; any other push from that
        sender drops them."""
        key = (sender.lower(), rnd, digest)  # one identity, however it spells its address
        partial = None
        with self._lock:
            inbound = self._inbound.get(key)
            creator = inbound is None or inbound.finished.is_set()
            if creator and any(k[0] == key[0] and k[1] == rnd and not v.finished.is_set()
                               for k, v in self._inbound.items()):
                raise PeerRefused(f"{what}: {sender} is already sending another update for "
                                  f"round {rnd}; one at a time")
            if creator:
                inbound = _Inbound(sender, rnd, weight, digest, total, stripes,
                                   have=[0] * stripes)
                self._inbound[key] = inbound
                partial = self._partials.pop(sender.lower(), None)
                if partial is not None and not (resume and (
                        partial.round, partial.digest, partial.total, partial.stripes,
                        partial.weight) == (rnd, digest, total, stripes, weight)):
                    partial.hasher.cancel()  # another update: what was kept of it goes
                    partial = None
            assert inbound is not None
            if (inbound.weight, inbound.total, inbound.stripes) != (weight, total, stripes):
                raise PayloadRejected(f"{what}: stripe {index} disagrees with the others on "
                                      "weight, size or stripe count")
            if index in inbound.claimed:
                raise PayloadRejected(f"{what}: stripe {index} sent twice")
            inbound.claimed.add(index)
        if creator:
            if not self._admit.acquire((rnd, sender.lower()), self.deadline_s, note):
                if partial is not None:
                    partial.hasher.cancel()
                self._fail(inbound, TransportError(f"{what}: not admitted in time"))
            else:
                with self._lock:
                    inbound.admitted = True
                if partial is not None and self._settled(partial):
                    inbound.buf, inbound.hasher = partial.buf, partial.hasher
                    inbound.have = list(partial.have)
                    log.info("data plane: %s resumes at %d of %d bytes", what,
                             sum(inbound.have), total)
                else:
                    if partial is not None:
                        partial.hasher.cancel()
                    inbound.buf = serde.buffer(total, self.spill_dir,
                                               populate=self.spec is not None)
                    inbound.hasher = _OrderedHash(inbound.buf, total, stripes)
            inbound.ready.set()
        else:
            until = time.monotonic() + self.deadline_s
            while not inbound.ready.wait(_NOTE_S):
                if time.monotonic() > until or (
                        note is not None
                        and not note(self._admit.place((rnd, sender.lower())))):
                    self._fail(inbound, TransportError(f"{what}: not admitted in time"))
                    break
        if inbound.error is not None:
            raise inbound.error
        return inbound

    @staticmethod
    def _settled(partial: _Inbound) -> bool:
        """Whether every stripe of a cut push stopped filling its buffer (they end at once once
        cut; waited for up to _STALL_S)."""
        until = time.monotonic() + _STALL_S
        while partial.receiving:
            if time.monotonic() > until:
                return False
            time.sleep(0.01)
        return True

    def _keep(self, inbound: _Inbound) -> list[_Inbound]:
        """Keep a push cut mid-stream (its buffer, its in-order hash so far, the bytes of each
        stripe) for its sender to resume within ``resume_s``: one per sender (a newer one
        replaces it), ``max_partials`` in all (the oldest goes). Called under the lock; returns
        the partials dropped to make room."""
        dropped = []
        old = self._partials.pop(inbound.sender.lower(), None)
        if old is not None:
            dropped.append(old)
        while self._partials and len(self._partials) >= self.max_partials:
            oldest = min(self._partials, key=lambda k: self._partials[k].kept_at or 0.0)
            dropped.append(self._partials.pop(oldest))
        if self.max_partials:
            inbound.kept_at = time.monotonic()
            self._partials[inbound.sender.lower()] = inbound
        return dropped

    def partials(self) -> dict[str, tuple[int, bytes, int]]:
        """The pushes kept to be resumed: sender -> (round, digest, bytes held)."""
        with self._lock:
            return {p.sender: (p.round, p.digest, sum(p.have)) for p in self._partials.values()}

    def _drop_partials(self, which: Callable[[_Inbound], bool]) -> None:
        """Forget the kept partial pushes ``which`` selects (their memory goes)."""
        with self._lock:
            gone = [k for k, v in self._partials.items() if which(v)]
            dropped = [self._partials.pop(k) for k in gone]
        for p in dropped:
            p.hasher.cancel()
            log.info("data plane: dropped the partial update for round %d from %s (%d of %d "
                     "bytes)", p.round, p.sender, sum(p.have), p.total)

    def _finish(self, inbound: _Inbound) -> None:
        """The update is done (accepted or refused): let the next one in."""
        with self._lock:
            release, inbound.admitted = inbound.admitted, False
        inbound.finished.set()
        if release:
            self._admit.release()

    def _fail(self, inbound: _Inbound, exc: SwarmError, keep: bool = False) -> None:
        """The update failed: its other stripes are cut and its admission slot goes. ``keep``:
        the link broke (not a refusal): what arrived is kept for the sender to resume
        (:meth:`_keep`) when it is the first failure of an admitted update."""
        dropped: list[_Inbound] = []
        with self._lock:
            first = inbound.error is None and not inbound.finished.is_set()
            if first:
                inbound.error = exc
            # worth resuming (a block, or a tenth of the update): a sender cannot pin a
            # model-sized buffer with a byte
            if (first and keep and inbound.admitted and inbound.hasher is not None
                    and sum(inbound.have) >= min(STRIPE_BLOCK, max(1, inbound.total // 10))):
                dropped = self._keep(inbound)
            cut = list(inbound.receiving)
        if inbound.hasher is not None and inbound.kept_at is None:
            inbound.hasher.cancel()
        for p in dropped:
            p.hasher.cancel()
        for conn in cut:  # the other stripes stop filling a buffer that is given up (or kept)
            _cut(conn)
        with self._lock:
            key = (inbound.sender.lower(), inbound.round, inbound.digest)
            if self._inbound.get(key) is inbound:
                del self._inbound[key]
        inbound.ready.set()
        self._finish(inbound)

    def _stripe_done(self, inbound: _Inbound, index: int) -> None:
        with self._lock:
            inbound.done_stripes.add(index)
            complete = len(inbound.done_stripes) == inbound.stripes
            key = (inbound.sender.lower(), inbound.round, inbound.digest)
            if complete and self._inbound.get(key) is inbound:
                del self._inbound[key]
        if not complete:
            return
        what = f"update for round {inbound.round} from {inbound.sender}"
        buf = inbound.buf
        spilled = isinstance(buf, serde.SpillMap)
        # Spilled updates are checked one at a time: only the one being read is resident.
        with serde.READING if spilled else contextlib.nullcontext():
            try:
                try:
                    serde.Received(buf, inbound.hasher.result()).check_digest(inbound.digest)
                    state = serde.view_state(buf, spec=self.spec,
                                             reject_nonfinite=self.reject_nonfinite)
                except PayloadRejected as exc:
                    raise PayloadRejected(f"{what}: {exc}") from None
                extra = {"evict": lambda: serde.evict(buf)} if spilled else {}
                self.handler.accept_update(inbound.round, inbound.sender, inbound.weight, state,
                                           inbound.digest, **extra)
            except SwarmError as exc:
                inbound.error = exc
            except Exception as exc:  # a bug: refuse the update, keep serving
                log.exception("data plane: %s failed", what)
                inbound.error = TransportError(f"{what}: {type(exc).__name__}: {exc}")
            finally:
                serde.evict(buf)  # kept (waiting for its turn) or not: read back when needed
        inbound.buf = buf = None  # the handler folded what it needed; the memory goes now
        self._finish(inbound)

    # -- pull -------------------------------------------------------------------------------------
    def _pull(self, tls: ssl.SSLSocket, caller: str, hdr: dict[str, Any], started: float) -> None:
        rnd = _int(hdr, "round", "pull")
        if not self.authority.is_participant(rnd, caller):
            raise PeerRefused(f"{caller} is not a participant of round {rnd}")
        stripes = _int(hdr, "stripes", "pull", 1, MAX_STRIPES)
        index = _int(hdr, "stripe", "pull", 0, stripes - 1)
        wait = hdr.get("wait_s", 0.0)
        wait = max(0.0, min(float(wait), 3600.0)) if isinstance(wait, int | float) else 0.0
        held = self.handler.merged(rnd, wait, caller)
        if held is None:
            raise RoundError(f"this node does not hold the merged model of round {rnd} (yet); "
                             "pull it from another member of the round")
        data, digest = held if isinstance(held, tuple) else (held, serde.digest(held))
        view = memoryview(data).cast("B")
        _send_frame(tls, {"ok": True, "total_bytes": len(view), "digest": digest.hex()})
        moved = [0]

        def sent(start: int, end: int) -> None:
            serde.evict(data, start, end)  # a stored model's file: sent, not kept resident
            moved[0] += end - start
            self._check_rate(started, moved[0], f"pull of round {rnd} by {caller}")

        with self._outgoing():
            _send_blocks(tls, view, stripe_blocks(len(view), index, stripes), sent,
                         until=started + self.deadline_s)


    # -- parts: members serve each other the merged model (transport.parts) -----------------------
    def _part_source(self, caller: str, hdr: dict[str, Any], what: str
                     ) -> tuple[int, int, float, Any]:
        rnd = _int(hdr, "round", what)
        if not self.authority.is_participant(rnd, caller):
            raise PeerRefused(f"{caller} is not a participant of round {rnd}")
        part_size = _int(hdr, "part_size", what, parts.MIN_PART_SIZE, parts.MAX_PART_SIZE)
        try:
            parts.check_part_size(part_size)
        except ValueError as exc:
            raise PayloadRejected(f"{what}: {exc}") from None
        wait = hdr.get("wait_s", 0.0)
        wait = max(0.0, min(float(wait), 60.0)) if isinstance(wait, int | float) else 0.0
        find = getattr(self.handler, "part_source", None)
        source = find(rnd, wait, caller) if find is not None else None
        if source is None:
            raise RoundError(f"this node holds no part of round {rnd}'s merged model (yet); "
                             "ask another member of the round, or its leader")
        return rnd, part_size, wait, source

    def _manifest(self, tls: ssl.SSLSocket, caller: str, hdr: dict[str, Any]) -> None:
        """``{"op": "manifest", "address", "round", "part_size", "wait_s"}``: the manifest of
        the round's merged model in parts of ``part_size`` (reply frame ``{"ok": true,
        "bytes": n}`` then the manifest's bytes)."""
        rnd, part_size, _wait, source = self._part_source(caller, hdr, "manifest")
        manifest = source.manifest_for(part_size)
        if manifest is None:
            raise RoundError(f"this node receives round {rnd}'s model in parts of another size; "
                             "ask the round's leader for the manifest")
        raw = manifest.to_bytes()
        _send_frame(tls, {"ok": True, "bytes": len(raw)})
        tls.sendall(raw)

    def _parts(self, tls: ssl.SSLSocket, caller: str, hdr: dict[str, Any],
               started: float) -> None:
        """``{"op": "parts", "address", "round", "part_size", "parts": [i, ...], "wait_s"}``:
        each part in the order asked, as soon as this node holds it: a frame ``{"part": i,
        "bytes": n}`` then its bytes, or ``{"part": i, "bytes": -1}`` for one it did not get
        within ``wait_s``; then ``{"ok": true}``. The asker verifies every part itself."""
        rnd, part_size, wait, source = self._part_source(caller, hdr, "parts")
        wanted = hdr.get("parts")
        if (not isinstance(wanted, list) or len(wanted) > parts.MAX_PARTS
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i
                           < parts.MAX_PARTS for i in wanted)):
            raise PayloadRejected(f"parts: 'parts' must be a list of at most {parts.MAX_PARTS} "
                                  "part numbers")
        _send_frame(tls, {"ok": True})
        with self._outgoing():
            self._send_parts(tls, caller, rnd, part_size, wait, source, wanted, started)
        _send_frame(tls, {"ok": True, "end": True})

    def _send_parts(self, tls: ssl.SSLSocket, caller: str, rnd: int, part_size: int,
                    wait: float, source: Any, wanted: list[int], started: float) -> None:
        moved = 0
        for i in wanted:
            t0 = time.monotonic()
            data = source.slice(i, part_size, wait)
            started += time.monotonic() - t0  # waiting for a part to arrive is not a slow link
            if data is None:
                _send_frame(tls, {"part": i, "bytes": -1})
                continue
            _send_frame(tls, {"part": i, "bytes": len(data)})
            with memoryview(data) as view:
                _send_blocks(tls, view.cast("B"), [(0, len(view))], lambda _s, _e: None,
                             until=started + self.deadline_s)
            moved += len(data)
            self._check_rate(started, moved, f"parts of round {rnd} for {caller}")
            note = getattr(source, "sent", None)
            if note is not None:
                note(i, part_size, caller)


    # -- slices of a sharded round (node.sharding) -------------------------------------------------
    def _shard_header(self, caller: str, hdr: dict[str, Any], op: str) -> tuple[int, int, int]:
        rnd = _int(hdr, "round", op)
        attempt = _int(hdr, "attempt", op, 1, 1 << 16)
        index = _int(hdr, "index", op, 0, 1 << 16)
        if not self.authority.is_participant(rnd, caller):
            raise PeerRefused(f"{caller} is not a participant of round {rnd}")
        return rnd, attempt, index

    def _shard_push(self, tls: ssl.SSLSocket, sender: str, hdr: dict[str, Any]) -> None:
        """``{"op": "shard_push", "address", "round", "attempt", "index", "weight",
        "total_bytes"}`` then the slice's bytes (canonical safetensors); the reply frame once
        it was accepted or refused. Every check (participant, sharded attempt, this node owns
        the slice, weight, duplicate, exact size) runs on the header, before a byte of payload
        is read. A slice is not hashed: TLS authenticates its bytes and the merged model's
        digest checks the result; a header that still names a ``digest`` has it checked."""
        rnd, attempt, index = self._shard_header(sender, hdr, "shard_push")
        what = f"slice {index} of round {rnd} from {sender}"
        check = getattr(self.handler, "check_shard", None)
        if check is None:
            raise PayloadRejected(f"{what}: this node takes no slices")
        spec = check(rnd, attempt, index, sender, _int(hdr, "weight", what))
        total = _int(hdr, "total_bytes", what)
        sizes = spec.payload_sizes()
        if total not in sizes:
            raise PayloadRejected(f"{what}: {total} bytes announced, the slice takes "
                                  f"{' or '.join(map(str, sizes))}; the sender's model differs "
                                  "from the swarm's training spec")
        digest = _header_digest(hdr, what) if "digest" in hdr else None
        started = time.monotonic()
        tls.settimeout(min(self.idle_s, _STALL_S))
        watched = _Watched(tls, what, started, started)
        with self._lock:
            self._watched[id(watched)] = watched
        buf = serde.buffer(total, populate=True)
        try:
            def progress(got: int) -> None:
                watched.moved = got

            with memoryview(buf) as view:
                _recv_blocks(tls, view, [(0, total)], what, progress,
                             until=started + self.deadline_s)
        except (OSError, ssl.SSLError, TransportError) as exc:
            raise TransportError(f"{what}: {watched.reason or exc}") from None
        finally:
            with self._lock:
                self._watched.pop(id(watched), None)
                self.payload_bytes_in += watched.moved
        try:
            if digest is not None:
                serde.Received(buf, serde.digest(buf)).check_digest(digest)
            state = serde.view_state(buf, spec=spec, reject_nonfinite=self.reject_nonfinite)
        except PayloadRejected as exc:
            raise PayloadRejected(f"{what}: {exc}") from None
        self.handler.accept_shard(rnd, attempt, index, sender, _int(hdr, "weight", what), state)
        _send_frame(tls, {"ok": True})

    def _reveal(self, tls: ssl.SSLSocket, caller: str, hdr: dict[str, Any]) -> None:
        """``{"op": "reveal", "address", "round"}``: secure aggregation, this node's round seeds
        with the mask-set sites that never checked in, for the round's elected leader only (the
        handler's ``reveal_seeds`` decides): ``{"ok": true, "reveals": [[site, seed hex],
        ...]}``."""
        rnd = _int(hdr, "round", f"seed reveal request from {caller}", 1, 1 << 62)
        reveal = getattr(self.handler, "reveal_seeds", None)
        if reveal is None:
            raise PeerRefused("this node does not run secure aggregation: no seed to reveal")
        pairs = reveal(rnd, caller)
        _send_frame(tls, {"ok": True, "reveals": [[str(m), bytes(seed).hex()]
                                                   for m, seed in pairs]})

    def _evidence(self, tls: ssl.SSLSocket, caller: str, hdr: dict[str, Any]) -> None:
        """``{"op": "evidence", "address", "round"}``: secure aggregation, the evidence of a
        committed round this node summed (privacy.evidence: masked updates, reveals, the sum),
        for a member of the training (the handler's ``secure_evidence`` decides): reply frame
        ``{"ok": true, "bytes": n}`` then its bytes."""
        rnd = _int(hdr, "round", f"evidence request from {caller}", 1, 1 << 62)
        find = getattr(self.handler, "secure_evidence", None)
        if find is None:
            raise PeerRefused("this node does not run secure aggregation: no evidence to give")
        data = find(rnd, caller)
        _send_frame(tls, {"ok": True, "bytes": len(data)})
        tls.sendall(data)

    def _shard_pull(self, tls: ssl.SSLSocket, caller: str, hdr: dict[str, Any],
                    started: float) -> None:
        """``{"op": "shard_pull", "address", "round", "attempt", "index", "wait_s"}``: this
        node's merged slice, once merged (held up to ``wait_s``, at most 10 s): the reply frame
        ``{"ok": true, "total_bytes"}`` then its bytes (no digest: TLS authenticates the hop,
        and the asker checks the assembled model's against the one the leader commits)."""
        rnd, attempt, index = self._shard_header(caller, hdr, "shard_pull")
        wait = hdr.get("wait_s", 0.0)
        wait = max(0.0, min(float(wait), 10.0)) if isinstance(wait, int | float) else 0.0
        find = getattr(self.handler, "merged_shard", None)
        t0 = time.monotonic()
        held = find(rnd, attempt, index, wait, caller) if find is not None else None
        started += time.monotonic() - t0  # waiting for the merge is not a slow link
        if held is None:
            raise RoundError(f"round {rnd}: slice {index} is not merged here (yet)")
        view = memoryview(held).cast("B")
        _send_frame(tls, {"ok": True, "total_bytes": len(view)})
        moved = [0]

        def sent(start: int, end: int) -> None:
            moved[0] += end - start
            self._check_rate(started, moved[0], f"slice {index} of round {rnd} for {caller}")

        with self._outgoing():
            _send_blocks(tls, view, [(0, len(view))], sent, until=started + self.deadline_s)


# -- client ---------------------------------------------------------------------------------------
class DataClient:
    """Pushes to and pulls from one peer's data plane, ``stripes`` connections per transfer."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: TlsFiles,
        own_address: str,
        expected_fingerprint: Callable[[], bytes | None],
        who: str,
        *,
        stripes: int = 4,
        max_bytes: int = 4 << 30,
    ) -> None:
        self.host, self.port, self.own_address = host, port, own_address
        self.expected, self.who = expected_fingerprint, who
        self.stripes, self.max_bytes = max(1, min(stripes, MAX_STRIPES)), max_bytes
        self._ctx = _context(tls, server=False)
        # pushes whose link broke, (round, digest) -> when: the next try asks the server how far
        # it got
        self._cut: dict[tuple[int, bytes], float] = {}
        self._cut_lock = threading.Lock()

    def _connect(self, timeout: float) -> ssl.SSLSocket:
        try:
            raw = socket.create_connection((self.host, self.port), timeout=min(timeout, 10.0))
        except OSError as exc:
            raise PeerUnavailable(f"cannot reach the data plane of {self.who} at "
                                  f"{self.host}:{self.port}: {exc.strerror or exc}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self._ctx.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise PeerRefused(f"{self.who} presented a certificate we do not trust: "
                              f"{exc.verify_message}") from None
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise PeerRefused(f"TLS handshake with the data plane of {self.who} failed: "
                              f"{exc}") from None
        der = tls.getpeercert(binary_form=True) or b""
        expected = self.expected()
        got = fingerprint(der)
        if expected is None or got != expected:
            tls.close()
            raise PeerRefused(
                f"the data plane at {self.host}:{self.port} presented certificate sha256 "
                f"{got.hex()[:16]}..., not the one the contract holds for {self.who}; nothing "
                "was sent")
        tls.settimeout(min(timeout, _PROGRESS_S))
        return tls

    @staticmethod
    def _verdict(reply: dict[str, Any], what: str) -> None:
        if reply.get("ok") is True:
            return
        cls = error_class(str(reply.get("error", "SwarmError")))
        raise cls(f"{what}: {reply.get('message', 'refused')}")

    def _send_for_verdict(self, tls: ssl.SSLSocket, view: memoryview,
                          blocks: list[tuple[int, int]], sent: Callable[[int, int], None],
                          what: str, head: bytes = b"", until: float | None = None) -> None:
        """Send ``head`` then ``blocks`` of a request's payload, then take the server's
        verdict; a server that refused early (on the header) cut the connection: raise its
        reason. The verdict comes once the server checked the whole payload (digest, header,
        NaN/Inf, the fold): the wait for it grows with the payload's size (a 1 GB update on a
        loaded leader takes longer than _PROGRESS_S to check)."""
        try:
            if head:
                tls.sendall(head)
            _send_blocks(tls, view, blocks, sent, until)
        except (OSError, ssl.SSLError) as exc:
            with contextlib.suppress(OSError, ssl.SSLError):
                self._verdict(_recv_frame(tls, what), what)
            raise TransportError(f"{what}: the connection broke: {exc}") from None
        tls.settimeout(_PROGRESS_S + len(view) / _CHECK_RATE)
        try:
            reply = _recv_frame(tls, what)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"{what}: no verdict: {exc}") from None
        self._verdict(reply, what)

    def _parallel(self, fn: Callable[[int], Any], count: int) -> list[Any]:
        if count == 1:
            return [fn(0)]
        results: list[Any] = [None] * count
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = fn(i)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,), daemon=True)
                   for i in range(1, count)]
        for t in threads:
            t.start()
        run(0)
        for t in threads:
            t.join()
        if errors:
            swarm = [e for e in errors if isinstance(e, SwarmError)]
            first = (swarm or errors)[0]
            errors.clear()
            del swarm
            try:
                raise first
            finally:
                # the traceback holds this frame: without its locals it holds no cycle, and
                # the caller's frames (a pulled model among their locals) are freed at once,
                # not at the next full garbage collection
                first = None  # type: ignore[assignment]
        return results

    def push(self, round: int, weight: int, payload: serde.Buffer, digest: bytes,
             timeout: float) -> None:
        """Send an update. A push whose link broke is resumed by the next push of the same
        update (round and digest): each stripe asks the server how many of its bytes it kept
        (``"resume": true``; the server answers ``{"ok": true, "from": n}`` once every check
        passed and the update is admitted) and sends only the rest."""
        view = memoryview(payload).cast("B")
        total = len(view)
        what = f"push of round {round} to {self.who}"
        count = self.stripes_for(total)
        key = (round, digest)
        with self._cut_lock:
            resume = key in self._cut

        until = time.monotonic() + timeout

        def stripe(i: int) -> None:
            with self._connect(timeout) as tls:
                hdr = {"op": "push", "address": self.own_address, "round": round,
                       "weight": weight, "total_bytes": total, "digest": digest.hex(),
                       "stripe": i, "stripes": count, "admit": True}
                blocks = stripe_blocks(total, i, count)
                _send_frame(tls, {**hdr, "resume": True} if resume else hdr)
                reply = self._admitted(tls, what, total, until)
                held = _int(reply, "from", what, 0, sum(e - s for s, e in blocks))
                self._send_for_verdict(tls, view, _skip(blocks, held),
                                       lambda start, end: serde.evict(payload, start, end), what,
                                       until=until)

        try:
            self._parallel(stripe, count)
        except PeerUnavailable:  # not reached: nothing sent, a push cut before stays resumable
            raise
        except SwarmError as exc:
            cut = (isinstance(exc, TransportError)  # the link broke mid-push, not a refusal
                   and not isinstance(exc, PeerRefused | PayloadRejected))
            with self._cut_lock:
                self._cut.pop(key, None)
                if cut:
                    self._cut[key] = time.monotonic()
                    while len(self._cut) > 8:
                        del self._cut[next(iter(self._cut))]
            raise
        with self._cut_lock:
            self._cut.pop(key, None)

    def _admitted(self, tls: ssl.SSLSocket, what: str, total: int,
                  until: float) -> dict[str, Any]:
        """Wait for the server to admit a push (``{"ok": true, "from": n}``; its refusal
        raises). While the update waits for an admission slot the server tells it its place
        every few seconds, with the bytes its link took in so far: the push waits on as long
        as that queue moves (its place or those bytes change within _PROGRESS_S plus the time
        a received update takes to check), whatever its own socket did meanwhile."""
        allowance = _PROGRESS_S + total / _CHECK_RATE
        changed, seen = time.monotonic(), None
        while True:
            try:
                reply = _recv_frame(tls, what)
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"{what}: no answer: {exc}") from None
            if "queued" not in reply:
                self._verdict(reply, what)
                return reply
            now = time.monotonic()
            state = (reply.get("queued"), reply.get("moved"))
            if state != seen:
                changed, seen = now, state
            if now - changed > allowance:
                raise TransportError(f"{what}: queued for admission (place {state[0]}) for "
                                     f"{now - changed:.0f} s while that queue did not move")
            if now > until:
                raise TransportError(f"{what}: still queued for admission (place {state[0]}) "
                                     "at the transfer's deadline")

    def resumable(self, round: int, digest: bytes) -> bool:
        """Whether a push of this update broke off less than a minute ago (the server keeps
        what arrived for longer): its next try resumes it."""
        with self._cut_lock:
            return time.monotonic() - self._cut.get((round, digest), -1e9) < 60.0

    def stripes_for(self, total: int) -> int:
        """Stripes for ``total`` bytes: one per STRIPE_MIN bytes, at most ``stripes`` (a TLS
        handshake costs more than it saves on a small model)."""
        return max(1, min(self.stripes, total // STRIPE_MIN))

    def pull(self, round: int, timeout: float, wait_s: float,
             size_hint: int | None = None) -> serde.Received:
        """``size_hint``: the model's size if known (the training spec), to choose the stripes."""
        what = f"merged model of round {round} from {self.who}"
        count = self.stripes if size_hint is None else self.stripes_for(size_hint)
        until = time.monotonic() + timeout
        lock = threading.Lock()
        shared: dict[str, Any] = {}

        def stripe(i: int) -> None:
            with self._connect(timeout) as tls:
                _send_frame(tls, {"op": "pull", "address": self.own_address, "round": round,
                                  "stripe": i, "stripes": count, "wait_s": wait_s})
                try:
                    reply = _recv_frame(tls, what)
                except (OSError, ssl.SSLError) as exc:
                    raise TransportError(f"{what}: no answer: {exc}") from None
                self._verdict(reply, what)
                total = _int(reply, "total_bytes", what)
                with lock:
                    if "buf" not in shared:
                        if total > self.max_bytes:
                            raise PayloadRejected(f"{what}: {total} bytes, over the limit of "
                                                  f"{self.max_bytes} bytes")
                        shared["total"], shared["digest"] = total, str(reply.get("digest", ""))
                        expected = size_hint is not None and total <= size_hint + (1 << 20)
                        shared["buf"] = serde.buffer(total, populate=expected)
                        shared["hash"] = _OrderedHash(shared["buf"], total, count)
                    if (total, str(reply.get("digest", ""))) != (shared["total"],
                                                                  shared["digest"]):
                        raise PayloadRejected(f"{what}: the stripes disagree on size or digest")
                    buf, hasher = shared["buf"], shared["hash"]
                try:
                    with memoryview(buf) as view:
                        _recv_blocks(tls, view, stripe_blocks(total, i, count),
                                     f"{what}, stripe {i}", lambda got: hasher.advance(i, got),
                                     until)
                except (OSError, ssl.SSLError) as exc:
                    raise TransportError(f"{what}: the connection broke: {exc}") from None

        try:
            self._parallel(stripe, count)
        except BaseException:
            if "hash" in shared:
                shared["hash"].cancel()
            raise
        buf = shared["buf"]
        received = serde.Received(buf, shared["hash"].result())
        try:
            received.check_digest(bytes.fromhex(shared["digest"]))
        except (ValueError, PayloadRejected) as exc:
            raise PayloadRejected(f"{what}: {exc}") from None
        return received

    # -- parts (transport.parts): a member's share from the leader, the rest from other members --
    def manifest(self, round: int, part_size: int, timeout: float,
                 wait_s: float = 2.0) -> parts.Manifest:
        """The manifest of round ``round``'s merged model in parts of ``part_size`` (RoundError
        while this peer holds no part of it: ask again, or elsewhere)."""
        what = f"manifest of round {round} from {self.who}"
        with self._connect(timeout) as tls:
            tls.settimeout(min(timeout, _PROGRESS_S + wait_s))
            _send_frame(tls, {"op": "manifest", "address": self.own_address, "round": round,
                              "part_size": part_size, "wait_s": wait_s})
            try:
                reply = _recv_frame(tls, what)
                self._verdict(reply, what)
                n = _int(reply, "bytes", what, 1, 64 + 32 * parts.MAX_PARTS)
                raw = _recv_exact(tls, n, what)
            except SwarmError:
                raise
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"{what}: the connection broke: {exc}") from None
        manifest = parts.Manifest.from_bytes(raw, self.max_bytes)
        if manifest.part_size != part_size:
            raise PayloadRejected(f"{what}: parts of {manifest.part_size} bytes, not "
                                  f"{part_size} as asked")
        return manifest

    def fetch_parts(self, round: int, into: parts.PartBuffer, wanted: list[int],
                    timeout: float, wait_s: float) -> set[int]:
        """Ask for ``wanted`` parts (served as this peer gets them, each waited for up to
        ``wait_s``) and put each into ``into``, which verifies it against the manifest. Returns
        the parts delivered; a part this peer did not have in time is left out. A part that
        fails verification ends the exchange with PayloadRejected (a lying or broken peer: ask
        the leader), keeping the parts verified before it."""
        what = f"parts of round {round} from {self.who}"
        m = into.manifest
        got: set[int] = set()
        until = time.monotonic() + timeout + wait_s
        with self._connect(timeout) as tls:
            tls.settimeout(min(timeout, _PROGRESS_S) + wait_s)
            _send_frame(tls, {"op": "parts", "address": self.own_address, "round": round,
                              "part_size": m.part_size, "parts": wanted, "wait_s": wait_s})
            try:
                self._verdict(_recv_frame(tls, what), what)
                for i in wanted:
                    head = _recv_frame(tls, what)
                    if head.get("part") != i:
                        raise PayloadRejected(f"{what}: part {head.get('part')!r} came where "
                                              f"part {i} was due")
                    n = head.get("bytes")
                    if n == -1:
                        continue
                    start, end = m.span(i)
                    if n != end - start:
                        raise PayloadRejected(f"{what}: part {i} announced as {n!r} bytes, the "
                                              f"manifest says {end - start}")
                    data = bytearray(end - start)
                    view = memoryview(data)
                    _recv_blocks(tls, view, [(0, len(data))], f"{what}, part {i}",
                                 lambda _n: None, until)
                    into.put(i, data)  # PayloadRejected: not the manifest's part
                    got.add(i)
                self._verdict(_recv_frame(tls, what), what)
            except SwarmError:
                raise
            except (OSError, ssl.SSLError) as exc:
                if not got:
                    raise TransportError(f"{what}: the connection broke: {exc}") from None
                log.info("%s: the connection broke after %d parts: %s", what, len(got), exc)
        return got

    # -- slices of a sharded round (node.sharding) ---------------------------------------------
    def push_shard(self, round: int, attempt: int, index: int, weight: int,
                   piece: EncodedSlice, timeout: float) -> None:
        """Send slice ``index`` of this node's update to its owner: its header, then its body
        straight from the payload it views (no copy, not hashed)."""
        what = f"slice {index} of round {round} to {self.who}"
        body = piece.body.cast("B")
        with self._connect(timeout) as tls:
            _send_frame(tls, {"op": "shard_push", "address": self.own_address, "round": round,
                              "attempt": attempt, "index": index, "weight": weight,
                              "total_bytes": piece.nbytes})
            self._send_for_verdict(tls, body, [(0, len(body))], lambda start, end: None, what,
                                   head=piece.head, until=time.monotonic() + timeout)

    def reveal_seeds(self, round: int, timeout: float) -> list[tuple[str, bytes]]:
        """Secure aggregation: the peer's round seeds with the sites that never checked in
        (answered only when this node is the round's elected leader), as (site, 32-byte seed)."""
        what = f"seed reveals of round {round} from {self.who}"
        with self._connect(timeout) as tls:
            tls.settimeout(min(timeout, _PROGRESS_S))
            _send_frame(tls, {"op": "reveal", "address": self.own_address, "round": round})
            try:
                reply = _recv_frame(tls, what)
            except SwarmError:
                raise
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"{what}: the connection broke: {exc}") from None
        self._verdict(reply, what)
        got = reply.get("reveals")
        out: list[tuple[str, bytes]] = []
        if not isinstance(got, list) or len(got) > 4096:
            raise PayloadRejected(f"{what}: the reply holds no list of reveals")
        for item in got:
            ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                  and isinstance(item[1], str) and len(item[1]) == 64)
            try:
                seed = bytes.fromhex(item[1]) if ok else b""
            except ValueError:
                seed = b""
            if len(seed) != 32 or len(item[0]) != 42 or not item[0].startswith("0x"):
                raise PayloadRejected(f"{what}: a reveal is not [site address, 32-byte seed "
                                      "as hex]")
            out.append((item[0], seed))
        return out

    def secure_evidence(self, round: int, timeout: float) -> bytes:
        """Secure aggregation: the evidence of committed round ``round`` from the node that
        summed it (privacy.evidence bytes; the caller checks them)."""
        what = f"evidence of round {round} from {self.who}"
        with self._connect(timeout) as tls:
            tls.settimeout(min(timeout, _PROGRESS_S))
            _send_frame(tls, {"op": "evidence", "address": self.own_address, "round": round})
            try:
                reply = _recv_frame(tls, what)
                self._verdict(reply, what)
                n = _int(reply, "bytes", what, 1, self.max_bytes)
                return _recv_exact(tls, n, what)
            except SwarmError:
                raise
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"{what}: the connection broke: {exc}") from None

    def pull_shard_into(self, round: int, attempt: int, index: int, head: bytes,
                        into: memoryview, timeout: float, wait_s: float) -> None:
        """The owner's merged slice ``index`` (RoundError while it is not merged: ask again):
        its header, which must be ``head`` (the layout's), and its tensors' bytes received
        straight into ``into`` (their place in the model being assembled). Nothing is hashed
        here: the assembled model's digest checks every byte (node.sharding.gather)."""
        what = f"merged slice {index} of round {round} from {self.who}"
        with self._connect(timeout) as tls:
            tls.settimeout(min(timeout, _PROGRESS_S) + wait_s)
            _send_frame(tls, {"op": "shard_pull", "address": self.own_address, "round": round,
                              "attempt": attempt, "index": index, "wait_s": wait_s})
            try:
                reply = _recv_frame(tls, what)
                self._verdict(reply, what)
                total = _int(reply, "total_bytes", what, 0, self.max_bytes)
                if total != len(head) + len(into):
                    raise PayloadRejected(f"{what}: {total} bytes announced, the slice takes "
                                          f"{len(head) + len(into)}; the owner's model differs "
                                          "from the swarm's training spec")
                tls.settimeout(min(timeout, _PROGRESS_S))
                if _recv_exact(tls, len(head), what) != head:
                    raise PayloadRejected(f"{what}: its header is not the slice's of the "
                                          "training spec; the owner's model differs")
                _recv_blocks(tls, into, [(0, len(into))], what, lambda _n: None,
                             time.monotonic() + timeout)
            except SwarmError:
                raise
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"{what}: the connection broke: {exc}") from None
