"""The peer API: node service <-> node service, gRPC with mutual TLS on every connection.

Identity binding. TLS alone proves only that a certificate comes from a CA in the swarm's trust
bundle; the contract says which certificate belongs to which chain address. So:

* Server side: the caller names its chain address in the call metadata (``swarm-address``). The
  server takes the caller's certificate from ``context.auth_context()`` and accepts the call only
  if its SHA-256 equals ``authority.fingerprint_of(address)`` (an enrolled, non-revoked node), and,
  for ``PushUpdate``/``PullMerged``, ``authority.is_participant(round, address)``. Refusals are
  PERMISSION_DENIED (UNAUTHENTICATED when no address is claimed) with the reason, and are logged.
* Client side: gRPC Python cannot show a client the server's certificate. gRPC itself verifies
  the server's chain against our trust bundle and its SAN against the endpoint's host on every
  connection. On top of that, before the first call and again every ``pin_ttl`` seconds or after a
  connection failure, :func:`swarmnode.transport.tlscheck.probe` does a TLS handshake of its own
  (same certificate, key and bundle) to the same endpoint and compares the server certificate's
  SHA-256 with the fingerprint the contract holds for the peer we meant to reach; a mismatch
  raises :class:`PeerRefused` and nothing is sent. The probe and gRPC's connection are two TCP
  connections, so an attacker who could switch who answers between them would also need a
  certificate from a trusted CA whose SAN names the peer's host: the SAN check closes that gap as
  far as the CAs issue SANs per node.

A TLS handshake that the server refuses (no certificate, a foreign CA, an expired certificate)
never reaches Python on either side: gRPC reports ``UNAVAILABLE: Socket closed``. The client then
runs the probe, which names the likely reason; the server's gRPC core logs the handshake error
(``Handshake failed ... certificate has expired``) when ``GRPC_VERBOSITY`` is ``INFO``.

Payloads stream as ~1 MiB chunks (the first chunk carries round, weight, size and SHA-256) into a
:class:`swarmnode.transport.serde.Assembler`, which refuses a stream as soon as it passes its
announced size or the limit, then :mod:`serde` checks digest, header, spec and NaN/Inf before the
handler sees a tensor. A hostile call ends that call only. Data chunks go through
:mod:`swarmnode.transport._wire` (the same bytes on the wire as the generated ``peer_pb2`` code,
fewer copies); ``benchmarks/transport.py`` measures the result against a raw socket.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import grpc
import torch

from swarmnode.errors import (
    ConfigError,
    PayloadRejected,
    PeerRefused,
    PeerUnavailable,
    RoundError,
    SwarmError,
)
from swarmnode.identity import TlsFiles
from swarmnode.transport import _wire, serde
from swarmnode.transport._rpc import (
    ADDRESS_KEY,
    abort,
    channel_options,
    error_from_rpc,
    host_port,
    server_options,
    swarm_error_name,
)
from swarmnode.transport.dataplane import (
    TRAFFIC,
    DataClient,
    DataServer,
    bind_address,
    check_push,
)
from swarmnode.transport.listener import ListenerLimits
from swarmnode.transport.oneport import OnePortRouter, SpliceLimits
from swarmnode.transport.proto import peer_pb2 as pb
from swarmnode.transport.shards import EncodedSlice
from swarmnode.transport.tlscheck import probe

__all__ = ["DEFAULT_MAX_BYTES", "PeerAuthority", "PeerClient", "PeerHandler", "PeerServer"]

log = logging.getLogger("swarmnode.transport.peer")

DEFAULT_MAX_BYTES = 4 << 30
T = TypeVar("T")
_SERVICE = pb.DESCRIPTOR.services_by_name["Peer"].full_name  # swarmnode.peer.v1.Peer


class PeerAuthority(Protocol):
    """Who a peer is, according to the chain."""

    def fingerprint_of(self, address: str) -> bytes | None:
        """On-chain certificate fingerprint of an enrolled, non-revoked address, else None."""
        ...

    def is_participant(self, round: int, address: str) -> bool: ...


class PeerHandler(Protocol):
    """What the node service does with peer calls; raise a SwarmError to refuse.

    A handler that leads rounds also has ``check_push(round, sender, weight)``: both servers call
    it with a push's header, before the push may wait for admission and before any payload byte
    is read, to refuse what :meth:`accept_update` would refuse anyway (this node does not lead
    that round's election, ``sender`` is not one of its participants, the weight is not the one
    checked in, ``sender`` already sent its update). See :func:`dataplane.check_push`.
    """

    def accept_update(
        self, round: int, sender: str, weight: int, state: dict[str, torch.Tensor], digest: bytes,
        evict: Callable[[], None] | None = None,
    ) -> None:
        """``evict``, when given: drops the update's bytes from resident memory (they stay
        readable), for a handler that keeps ``state`` without reading it for a while."""
        ...

    def merged(
        self, round: int, timeout: float, to: str | None = None
    ) -> serde.Buffer | tuple[serde.Buffer, bytes] | None:
        """The merged model of ``round`` (waiting up to ``timeout``), None if not held; with its
        SHA-256 when the handler knows it (else the server hashes it once per round); ``to`` is
        the caller's chain address."""
        ...

    def health(self) -> dict[str, Any]: ...


class _Unauthenticated(PeerRefused):
    """A call that names no chain address (travels as PeerRefused, status UNAUTHENTICATED)."""


class _StreamGuard:
    """Limits a shared server needs on every stream: at most ``per_peer`` streams at a time from
    one node (checked right after the caller is identified, before any payload byte is read), a
    server-side deadline, and a minimum progress rate once ``grace_s`` has passed. A stream that
    breaks a limit is cancelled by a monitor thread, which frees its worker thread: idle streams,
    or a header announcing a size followed by empty chunks, cannot starve honest peers."""

    def __init__(self, per_peer: int, deadline_s: float, min_rate: float, grace_s: float) -> None:
        self.per_peer, self.deadline_s = per_peer, deadline_s
        self.min_rate, self.grace_s = min_rate, grace_s
        self._lock = threading.Lock()
        self._streams: dict[int, list] = {}  # id -> [peer, context, started, bytes, rpc]
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="peer-stream-guard",
                                         daemon=True)
        self._monitor.start()

    def enter(self, peer: str, context: grpc.ServicerContext, rpc: str) -> list:
        with self._lock:
            busy = sum(1 for r in self._streams.values() if r[0] == peer)
            if busy >= self.per_peer:
                raise PeerRefused(
                    f"{peer} already has {busy} {rpc}/pull stream(s) open to this node (the "
                    f"limit is {self.per_peer}); finish or cancel them first"
                )
            record = [peer, context, time.monotonic(), 0, rpc]
            self._streams[id(record)] = record
            return record

    def progress(self, record: list, nbytes: int) -> None:
        record[3] += nbytes

    def leave(self, record: list) -> None:
        with self._lock:
            self._streams.pop(id(record), None)

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                records = list(self._streams.values())
            for record in records:
                peer, context, started, nbytes, rpc = record
                age = now - started
                if age > self.deadline_s:
                    why = f"it ran past the server's {self.deadline_s:g} s stream deadline"
                elif age > self.grace_s and nbytes < self.min_rate * (age - self.grace_s):
                    why = (f"it moved {nbytes} bytes in {age:.1f} s, below the minimum rate of "
                           f"{self.min_rate:g} B/s")
                else:
                    continue
                log.warning("peer API %s from %s cut off: %s", rpc, peer, why)
                context.cancel()
                self.leave(record)


class _Servicer:
    def __init__(self, owner: PeerServer) -> None:
        self.o = owner
        self._digests: dict[int, tuple[serde.Buffer, bytes]] = {}  # round -> (data, sha256)
        self._lock = threading.Lock()

    # -- identity --------------------------------------------------------------------------------
    def _identify(self, context: grpc.ServicerContext) -> str:
        """The caller's chain address, once its certificate is the one the chain holds for it."""
        claimed = next((v for k, v in context.invocation_metadata() if k == ADDRESS_KEY), "")
        if not claimed or not isinstance(claimed, str):
            raise _Unauthenticated(
                f"the call names no chain address (metadata {ADDRESS_KEY!r}); use swarmnode's "
                "PeerClient"
            )
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise _Unauthenticated("the connection carries no client certificate")
        return bind_address(self.o.authority, claimed, pems[0])

    def _participant(self, round: int, address: str) -> None:
        if not self.o.authority.is_participant(round, address):
            raise PeerRefused(f"{address} is not a participant of round {round}")

    def _run(self, context: grpc.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SwarmError as exc:
            err: SwarmError = exc
        except grpc.RpcError:  # the caller went away mid-stream
            log.info("peer API %s from %s: the caller cancelled", rpc, context.peer())
            raise
        except Exception as exc:
            log.exception("peer API %s from %s failed", rpc, context.peer())
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        log.warning("peer API %s from %s refused: %s", rpc, context.peer(), err)
        if isinstance(err, _Unauthenticated):
            abort(context, err, grpc.StatusCode.UNAUTHENTICATED)
        abort(context, err)

    # -- RPCs ------------------------------------------------------------------------------------
    def PushUpdate(self, request_iterator: Iterator[_wire.Piece], context: grpc.ServicerContext):
        def body() -> pb.PushReply:
            sender = self._identify(context)
            stream = self.o.guard.enter(sender, context, "PushUpdate")
            try:
                return receive(sender, stream)
            finally:
                self.o.guard.leave(stream)

        def receive(sender: str, stream: list) -> pb.PushReply:
            first = next(request_iterator, None)
            h = _wire.header_of(first) if first is not None else None
            if h is None:
                raise PayloadRejected(
                    f"update from {sender}: the first chunk must carry the header (round, weight, "
                    "total_bytes, digest)"
                )
            self._participant(h.round, sender)
            what = f"update for round {h.round} from {sender}"
            if len(h.digest) != 32:
                raise PayloadRejected(f"{what}: the header's digest is not a SHA-256 (32 bytes)")
            check_push(self.o.handler, h.round, sender, h.weight)  # before any payload chunk
            with serde.Assembler(h.total_bytes, self.o.max_bytes, what) as assembler:
                for piece in request_iterator:
                    data = _wire.piece_data(piece)
                    if data is None:
                        raise PayloadRejected(f"{what}: a second header in the stream")
                    self.o.guard.progress(stream, len(data))
                    assembler.add(data)
                    TRAFFIC.add(received=len(data))
                received = assembler.finish()
            try:
                state = received.decode(
                    expected_digest=h.digest, spec=self.o.spec,
                    reject_nonfinite=self.o.reject_nonfinite,
                )
            except PayloadRejected as exc:
                raise PayloadRejected(f"{what}: {exc}") from None
            self.o.handler.accept_update(h.round, sender, h.weight, state, received.digest)
            return pb.PushReply(message=f"round {h.round}: update accepted")

        return self._run(context, "PushUpdate", body)

    def PullMerged(self, request: pb.PullRequest, context: grpc.ServicerContext):
        def body() -> tuple[serde.Buffer, bytes, list]:
            caller = self._identify(context)
            self._participant(request.round, caller)
            stream = self.o.guard.enter(caller, context, "PullMerged")
            try:
                wait = max(0.0, min(request.wait_s, 3600.0))
                held = self.o.handler.merged(request.round, wait, caller)
                if held is None:
                    raise RoundError(
                        f"this node does not hold the merged model of round {request.round} "
                        "(yet); pull it from another member of the round"
                    )
                if isinstance(held, tuple):
                    return held[0], held[1], stream
                return held, self._digest(request.round, held), stream
            except BaseException:
                self.o.guard.leave(stream)
                raise

        data, digest, stream = self._run(context, "PullMerged", body)
        try:
            yield pb.Chunk(header=pb.Header(round=request.round, total_bytes=len(data),
                                            digest=digest))
            for chunk in serde.chunks(data):
                TRAFFIC.add(sent=len(chunk))
                yield chunk
                self.o.guard.progress(stream, len(chunk))
        finally:
            self.o.guard.leave(stream)

    def _digest(self, round: int, data: serde.Buffer) -> bytes:
        with self._lock:
            hit = self._digests.get(round)
            if hit is not None and hit[0] is data:
                return hit[1]
        digest = serde.digest(data)
        with self._lock:
            self._digests[round] = (data, digest)
            for old in sorted(self._digests)[:-2]:
                del self._digests[old]
        return digest

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        def body() -> pb.HealthReply:
            self._identify(context)
            info = dict(self.o.handler.health())
            if self.o.one_port:  # model bytes on this very port, by ALPN (oneport.py)
                info["one_port"] = True
            elif self.o.data is not None:
                info["data_port"] = self.o.data.port  # where this node takes model bytes
            return pb.HealthReply(json=json.dumps(info, default=str))

        return self._run(context, "Health", body)


def _handlers(servicer: _Servicer) -> grpc.GenericRpcHandler:
    """The Peer service with the fast chunk codec (same wire bytes as the generated stubs)."""
    return grpc.method_handlers_generic_handler(_SERVICE, {
        "PushUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.PushUpdate, request_deserializer=_wire.decoder(pb.Chunk),
            response_serializer=pb.PushReply.SerializeToString,
        ),
        "PullMerged": grpc.unary_stream_rpc_method_handler(
            servicer.PullMerged, request_deserializer=pb.PullRequest.FromString,
            response_serializer=_wire.encode,
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=pb.HealthRequest.FromString,
            response_serializer=pb.HealthReply.SerializeToString,
        ),
    })


class PeerServer:
    """Serves the peer API with mutual TLS; ``start()`` returns the bound port."""

    def __init__(
        self,
        bind: str,
        tls: TlsFiles,
        authority: PeerAuthority,
        handler: PeerHandler,
        spec: serde.ParamSpec | None,
        max_bytes: int,
        reject_nonfinite: bool = True,
        *,
        workers: int = 64,
        per_peer_streams: int = 4,
        stream_deadline_s: float = 900.0,
        min_rate_bytes_s: float = 256 * 1024,
        rate_grace_s: float = 10.0,
        data_port: int | None = None,
        spill_dir: str | None = None,
        listener: ListenerLimits | None = None,
        one_port: bool = False,
        splice: SpliceLimits | None = None,
    ) -> None:
        """``one_port``: serve the peer API and the data plane on ``bind``'s one port, told
        apart by ALPN (:mod:`~swarmnode.transport.oneport`): gRPC then listens on loopback
        only, its connections relayed (bounded by ``splice``). ``listener``: the data plane's
        limits on connections still in their TLS handshake
        (:class:`~swarmnode.transport.listener.ListenerLimits`). The stream limits: see
        :class:`_StreamGuard`. ``rate_grace_s`` covers a pull's wait for the merged model (up to
        2 s) and the slowest honest start of a stream.
        ``data_port``: the bulk data plane's port (:mod:`dataplane`, same host as ``bind``); by
        default the peer port + 1, or any free port when the peer port is 0; -1: no data plane
        (models then stream over gRPC). ``spill_dir``: where the data plane receives updates
        (see :class:`DataServer`)."""
        cert, key, trust = tls.load()
        self.bind, self.authority, self.handler = bind, authority, handler
        self.spec, self.max_bytes, self.reject_nonfinite = spec, max_bytes, reject_nonfinite
        self.workers = workers
        self.guard = _StreamGuard(per_peer_streams, stream_deadline_s, min_rate_bytes_s,
                                  rate_grace_s)
        self.port = 0
        self._creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=trust, require_client_auth=True
        )
        self._server: grpc.Server | None = None
        self.data: DataServer | None = None
        self._data_port = data_port
        if one_port and data_port is not None:
            raise ConfigError(
                f"one_port takes the data plane onto the peer port; data_port={data_port} "
                "contradicts it: remove data_port (or one_port)")
        self.one_port, self._splice = one_port, splice
        self._router: OnePortRouter | None = None
        self._data_args = dict(tls=tls, authority=authority, handler=handler, spec=spec,
                               max_bytes=max_bytes, reject_nonfinite=reject_nonfinite,
                               per_peer=max(8, per_peer_streams * 2), deadline_s=stream_deadline_s,
                               min_rate=min_rate_bytes_s, grace_s=rate_grace_s,
                               idle_s=rate_grace_s, spill_dir=spill_dir,
                               limits=listener or ListenerLimits())

    def start(self) -> int:
        server = grpc.server(
            ThreadPoolExecutor(self.workers, thread_name_prefix="peer-api"),
            options=server_options(),
        )
        server.add_generic_rpc_handlers((_handlers(_Servicer(self)),))
        if self.one_port:
            return self._start_one_port(server)
        try:
            port = server.add_secure_port(self.bind, self._creds)
        except RuntimeError:
            port = 0
        if not port:
            raise ConfigError(
                f"cannot bind the peer API to {self.bind}: the port is in use or the address is "
                "not local; change peer_listen"
            )
        if self._data_port != -1:
            host = self.bind.rpartition(":")[0].strip("[]") or "0.0.0.0"
            want = self._data_port if self._data_port is not None else (port + 1 if
                                                                         _fixed(self.bind) else 0)
            data = DataServer(host, want, **self._data_args)  # type: ignore[arg-type]
            try:
                data.start()
            except OSError as exc:
                server.stop(0)
                raise ConfigError(
                    f"cannot bind the data plane to {host}:{want} ({exc.strerror or exc}); free "
                    "that port or set data_port"
                ) from None
            self.data = data
        server.start()
        self._server, self.port = server, port
        log.info(
            "peer API listening on %s (port %d), mutual TLS; refused TLS handshakes are logged "
            "by gRPC itself when GRPC_VERBOSITY=INFO", self.bind, port,
        )
        return port

    def _start_one_port(self, server: grpc.Server) -> int:
        """gRPC on a loopback port of its own; the data plane's listener on ``bind``, routing
        each connection by its ALPN (gRPC's relayed there whole: its own mutual TLS, the
        caller's own certificate)."""
        inner = server.add_secure_port("127.0.0.1:0", self._creds)
        if not inner:
            raise ConfigError("cannot bind the peer API to a loopback port (one_port)")
        router = OnePortRouter(("127.0.0.1", inner), self._splice)
        host, _, want = self.bind.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        data = DataServer(host, int(want or 0), router=router,
                          **self._data_args)  # type: ignore[arg-type]
        try:
            port = data.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot bind the peer API to {self.bind} ({exc.strerror or exc}): the port is "
                "in use or the address is not local; change peer_listen") from None
        router.start()
        server.start()
        self.data, self._router, self._server, self.port = data, router, server, port
        log.info("peer API and data plane on one port, %s (port %d), told apart by ALPN; gRPC "
                 "on 127.0.0.1:%d behind it", self.bind, port, inner)
        return port

    def stop(self, grace: float | None = None) -> None:
        if self.data is not None:
            self.data.stop()
            self.data = None
        if self._router is not None:
            self._router.stop()
            self._router = None
        self.guard.close()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> PeerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def _fixed(bind: str) -> bool:
    """True when ``bind`` names a port other than 0."""
    return bind.rpartition(":")[2] not in ("", "0")


class PeerClient:
    """Calls one peer's API, after checking it is the node the contract says it is. Model bytes
    go over the peer's data plane (:mod:`dataplane`) when its Health names one, else over gRPC."""

    def __init__(
        self,
        endpoint: str,
        tls: TlsFiles,
        own_address: str,
        peer_address: str,
        authority: PeerAuthority,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        pin_ttl: float = 60.0,
        chunk_size: int = serde.CHUNK_SIZE,
        stripes: int | None = None,
    ) -> None:
        cert, key, trust = tls.load()
        self.endpoint, self.tls, self.authority = endpoint, tls, authority
        self.own_address, self.peer_address = own_address, peer_address
        self.max_bytes, self.pin_ttl, self.chunk_size = max_bytes, pin_ttl, chunk_size
        self.who = f"peer {peer_address} at {endpoint}"
        creds = grpc.ssl_channel_credentials(trust, key, cert)
        self._channel = grpc.secure_channel(endpoint, creds, options=channel_options())
        ch = self._channel
        self._push = ch.stream_unary(
            f"/{_SERVICE}/PushUpdate", request_serializer=_wire.encode,
            response_deserializer=pb.PushReply.FromString,
        )
        self._pull = ch.unary_stream(
            f"/{_SERVICE}/PullMerged", request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=_wire.decoder(pb.Chunk),
        )
        self._health = ch.unary_unary(
            f"/{_SERVICE}/Health", request_serializer=pb.HealthRequest.SerializeToString,
            response_deserializer=pb.HealthReply.FromString,
        )
        self._md = ((ADDRESS_KEY, own_address),)
        self._pin: tuple[bytes, float] | None = None
        self._lock = threading.Lock()
        # connections per transfer: parallel TLS work and TCP windows, up to one per core
        self.stripes = stripes if stripes is not None else max(1, min(4, os.cpu_count() or 1))
        self._data: DataClient | None = None
        self._data_checked = 0.0
        self._data_asking = threading.Lock()  # one Health ask at a time for the data plane
        # how the last attempt to reach the peer went (None: not tried yet): the node's metrics
        # count its peers reachable from it
        self.reachable: bool | None = None

    def _data_plane(self, timeout: float) -> DataClient | None:
        """The peer's data plane, learnt from its Health (asked again every minute while it
        names none or cannot be reached). Callers that ask while another's Health ask is
        under way wait for its answer (a sharded round's transfers ask at once: before, all but
        the first got None and failed without asking)."""
        if self._data is not None:
            return self._data
        if not self._data_asking.acquire(timeout=max(0.0, timeout)):
            return self._data
        try:
            if self._data is not None or time.monotonic() - self._data_checked < 60.0:
                return self._data
            self._data_checked = time.monotonic()
            try:
                info = self.health(min(timeout, 10.0))
            except SwarmError:
                return None
            port = info.get("data_port")
            if info.get("one_port") is True:  # its data plane answers on its peer port (ALPN)
                port = host_port(self.endpoint)[1]
            if isinstance(port, int) and 0 < port < 65536:
                host = self.endpoint.rpartition(":")[0].strip("[]")
                self._data = DataClient(
                    host, port, self.tls, self.own_address,
                    lambda: self.authority.fingerprint_of(self.peer_address), self.who,
                    stripes=self.stripes, max_bytes=self.max_bytes,
                )
            return self._data
        finally:
            self._data_asking.release()

    def data_plane(self, timeout: float) -> DataClient | None:
        """The peer's data plane (None: it names none, or cannot be reached): the parts of a
        merged model (``manifest``, ``fetch_parts``) travel only there."""
        return self._data_plane(timeout)

    def _no_data_plane(self, exc: SwarmError) -> None:
        log.warning("%s: data plane unreachable (%s); using gRPC", self.who, exc)
        self._data = None
        self._data_checked = time.monotonic()

    # -- the server's identity -------------------------------------------------------------------
    def _check_peer(self, timeout: float) -> None:
        expected = self.authority.fingerprint_of(self.peer_address)
        if expected is None:
            raise PeerRefused(
                f"{self.peer_address} is not an enrolled node on chain (or was revoked): "
                "not talking to it"
            )
        with self._lock:
            pin = self._pin
        if pin is not None and pin[0] == expected and time.monotonic() - pin[1] < self.pin_ttl:
            return
        try:
            got = probe(self.endpoint, self.tls.cert, self.tls.key, self.tls.trust,
                        timeout=min(timeout, 10.0), who=self.who)
        except SwarmError:
            self.reachable = False
            raise
        self.reachable = True
        if got.fingerprint != expected:
            raise PeerRefused(
                f"the server at {self.endpoint} presented certificate {got.subject} (sha256 "
                f"{got.fingerprint.hex()[:16]}...), but the contract holds "
                f"{expected.hex()[:16]}... for {self.peer_address}: another node answers at that "
                "endpoint (stale endpoint or impostor); nothing was sent"
            )
        with self._lock:
            self._pin = (got.fingerprint, time.monotonic())

    def _call(self, what: str, timeout: float, fn: Callable[[], T]) -> T:
        self._check_peer(timeout)
        try:
            return fn()
        except grpc.RpcError as err:
            with self._lock:
                self._pin = None
            if err.code() is grpc.StatusCode.UNAVAILABLE:
                self.reachable = False
            if err.code() is grpc.StatusCode.UNAVAILABLE and swarm_error_name(err) is None:
                self._check_peer(min(timeout, 5.0))  # the precise reason: TLS or identity
            raise error_from_rpc(err, f"{self.who}: {what}") from None

    # -- calls -----------------------------------------------------------------------------------
    def push_update(
        self,
        round: int,
        weight: int,
        payload: serde.Buffer,
        timeout: float,
        *,
        digest: bytes | None = None,
    ) -> None:
        """Stream an update (canonical bytes) for ``round`` to the peer; raises if it refuses."""
        if round < 0 or weight < 0:
            raise ConfigError(f"round and weight must be >= 0, got round={round} weight={weight}")
        digest = digest if digest is not None else serde.digest(payload)
        left = self._budget(f"push of round {round}", timeout)
        data = self._data_plane(left())
        if data is not None:
            try:
                return data.push(round, weight, payload, digest, left())
            except PeerUnavailable as exc:
                if data.resumable(round, digest):  # the link is down mid-push: the next try
                    raise                          # resumes it here, not whole over gRPC
                self._no_data_plane(exc)

        def stream() -> Iterator[pb.Chunk | memoryview]:
            yield pb.Chunk(header=pb.Header(
                round=round, weight=weight, total_bytes=len(payload), digest=digest
            ))
            for chunk in serde.chunks(payload, self.chunk_size):
                TRAFFIC.add(sent=len(chunk))
                yield chunk

        rest = left()
        self._call(f"push of round {round}", rest, lambda: self._push(
            stream(), timeout=rest, metadata=self._md
        ))

    def _budget(self, what: str, timeout: float) -> Callable[[], float]:
        """The time left of one call's ``timeout``, shared by its steps (finding the peer's data
        plane, the fallback to gRPC, the transfer): a peer that froze costs ``timeout`` once,
        not once per step (a push to a frozen leader took 2-3 times its timeout)."""
        until = time.monotonic() + timeout

        def left() -> float:
            rest = until - time.monotonic()
            if rest <= 0:
                raise PeerUnavailable(f"{self.who}: {what} got no answer within {timeout:.1f} s")
            return rest

        return left

    def push_shard(self, round: int, attempt: int, index: int, weight: int,
                   piece: EncodedSlice, timeout: float) -> None:
        """Send slice ``index`` of this node's update to the peer that owns it (a sharded
        round). Slices travel on the data plane only: a peer without one cannot take part in
        a sharded attempt (the next attempt gathers whole updates at its leader)."""
        left = self._budget(f"slice {index} of round {round}", timeout)
        self._shard_plane(left(), round).push_shard(round, attempt, index, weight, piece,
                                                    left())

    def pull_shard_into(self, round: int, attempt: int, index: int, head: bytes,
                        into: memoryview, timeout: float, wait_s: float) -> None:
        """The peer's merged slice ``index`` of a sharded round received into ``into`` (its
        header must be ``head``; RoundError: not merged yet)."""
        left = self._budget(f"merged slice {index} of round {round}", timeout)
        self._shard_plane(left(), round).pull_shard_into(round, attempt, index, head, into,
                                                         left(), min(wait_s, left()))

    def reveal_seeds(self, round: int, timeout: float) -> list[tuple[str, bytes]]:
        """Secure aggregation: the peer's round seeds with the sites that never checked in,
        asked on its data plane (answered only to the round's elected leader)."""
        left = self._budget(f"seed reveals of round {round}", timeout)
        data = self._data_plane(left())
        if data is None:
            raise PeerUnavailable(f"{self.who} names no data plane (or it cannot be reached): "
                                  f"its seed reveals of round {round} cannot be asked for")
        return data.reveal_seeds(round, left())

    def secure_evidence(self, round: int, timeout: float) -> bytes:
        """Secure aggregation: the evidence of committed round ``round`` from the node that
        summed it, asked on its data plane (answered to members of the training)."""
        left = self._budget(f"evidence of round {round}", timeout)
        data = self._data_plane(left())
        if data is None:
            raise PeerUnavailable(f"{self.who} names no data plane (or it cannot be reached): "
                                  f"its evidence of round {round} cannot be asked for")
        return data.secure_evidence(round, left())

    def _shard_plane(self, timeout: float, round: int) -> DataClient:
        data = self._data_plane(timeout)
        if data is None:
            raise PeerUnavailable(f"{self.who} names no data plane (or it cannot be reached): "
                                  f"the slices of round {round} cannot travel to it")
        return data

    def pull_merged(self, round: int, timeout: float) -> bytes:
        """The merged model of ``round``: canonical bytes, digest checked against the header."""
        return self.pull(round, timeout).to_bytes()

    def pull(self, round: int, timeout: float, size_hint: int | None = None) -> serde.Received:
        """The merged model of ``round`` in memory of its own, with the SHA-256 computed as it
        arrived (checked against the stream's header; compare it with the chain's digest)."""
        left = self._budget(f"pull of round {round}", timeout)
        data = self._data_plane(left())
        if data is not None:
            try:
                rest = left()
                return data.pull(round, rest, wait_s=rest * 0.9, size_hint=size_hint)
            except PeerUnavailable as exc:
                self._no_data_plane(exc)
        rest = left()

        def fetch() -> serde.Received:
            call = self._pull(
                pb.PullRequest(round=round, wait_s=rest * 0.9), timeout=rest,
                metadata=self._md,
            )
            try:
                return self._assemble(round, call)
            finally:
                call.cancel()

        return self._call(f"pull of round {round}", rest, fetch)

    def _assemble(self, round: int, call: Iterator[_wire.Piece]) -> serde.Received:
        what = f"merged model of round {round} from {self.who}"
        first = next(call, None)
        header = _wire.header_of(first) if first is not None else None
        if header is None:
            raise PayloadRejected(f"{what}: the stream does not start with a header")
        with serde.Assembler(header.total_bytes, self.max_bytes, what) as assembler:
            for piece in call:
                data = _wire.piece_data(piece)
                if data is None:
                    raise PayloadRejected(f"{what}: a second header in the stream")
                assembler.add(data)
                TRAFFIC.add(received=len(data))
            received = assembler.finish()
        try:
            received.check_digest(header.digest)
        except PayloadRejected as exc:
            raise PayloadRejected(f"{what}: {exc}") from None
        return received

    def health(self, timeout: float = 10.0) -> dict[str, Any]:
        reply = self._call("health", timeout, lambda: self._health(
            pb.HealthRequest(), timeout=timeout, metadata=self._md
        ))
        return dict(json.loads(reply.json))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
