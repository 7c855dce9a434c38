"""The chain as other sites see it: a JSON-RPC gateway in front of the sentinel's dev chain.

A dev chain (anvil) answers far more than the standard Ethereum JSON-RPC: ``anvil_*`` / ``evm_*``
/ ``hardhat_*`` methods rewrite its state (snapshots and reverts, balances, impersonation, the
clock), ``debug_*`` traces, and ``eth_sendTransaction`` signs with its unlocked, publicly known dev
accounts. :class:`ChainGateway` is what a dev consortium on separate hosts publishes instead of
the chain: HTTPS with mutual TLS (a client must present a certificate that chains to the
consortium's trust bundle, as on the peer API), and only the methods in :data:`ALLOWED_METHODS`
reach the chain. That list is an allow-list: the standard read calls a node, the CLI and web3 make,
and ``eth_sendRawTransaction`` (transactions the site signed itself). Anything else, in a single
request or in any entry of a batch, is answered by the gateway with a JSON-RPC error naming the
method.

The server is built for an open port: connections are accepted and their TLS handshakes run by
the shared :class:`~swarmnode.transport.listener.TlsListener` (the data plane's), within a total
deadline and before any worker is taken (an outsider without a certificate cannot hold one);
handshakes in progress are bounded per address and in all, connections are bounded (over the
bound a connection is closed at once), request bodies and batches are bounded, and the gateway
re-serialises every request it forwards, so the chain sees exactly what was checked (no JSON
parser differences such as a second ``"method"`` key).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from swarmnode.errors import ConfigError
from swarmnode.identity.tls import TlsFiles
from swarmnode.transport.listener import ListenerLimits, TlsListener

__all__ = ["ALLOWED_METHODS", "ChainGateway", "GatewayLimits", "refusal"]

log = logging.getLogger("swarmnode.chain.gateway")

#: The only methods the gateway passes to the chain. Reads a node, the CLI (status, audit,
#: report) and web3 make, fee queries for legacy and EIP-1559 transactions, and
#: ``eth_sendRawTransaction``: a site signs its transactions itself. Not here, so refused:
#: ``eth_sendTransaction`` / ``eth_sign*`` (the chain would sign with its unlocked dev
#: accounts), ``eth_accounts``, filters and subscriptions (state kept on the chain per caller),
#: and every ``anvil_*``, ``evm_*``, ``hardhat_*``, ``debug_*``, ``personal_*``, ``admin_*``,
#: ``miner_*``, ``txpool_*``, ``ots_*`` method.
ALLOWED_METHODS = frozenset({
    "eth_chainId",
    "eth_blockNumber",
    "eth_syncing",
    "eth_call",
    "eth_estimateGas",
    "eth_gasPrice",
    "eth_maxPriorityFeePerGas",
    "eth_feeHistory",
    "eth_blobBaseFee",
    "eth_getBalance",
    "eth_getCode",
    "eth_getStorageAt",
    "eth_getTransactionCount",
    "eth_getBlockByNumber",
    "eth_getBlockByHash",
    "eth_getTransactionByHash",
    "eth_getTransactionReceipt",
    "eth_getLogs",
    "eth_sendRawTransaction",
    "net_version",
    "net_listening",
    "web3_clientVersion",
})

METHOD_NOT_AVAILABLE = -32601
INVALID_REQUEST = -32600
PARSE_ERROR = -32700
INTERNAL_ERROR = -32603


@dataclass(frozen=True)
class GatewayLimits:
    """What one client, or all of them together, may take of the gateway."""

    max_body_bytes: int = 4 * 1024 * 1024  # a request (a contract deployment is ~30 KB)
    max_batch: int = 100  # entries in one batch request
    max_connections: int = 64  # connections served at once (once their handshake is done)
    max_handshakes: int = 16  # TLS handshakes in progress, in all (the oldest of the busiest
    # address is dropped for a new one when full)
    max_handshakes_per_address: int = 8  # from one IP address (at most max_handshakes)
    handshake_timeout_s: float = 5.0  # the whole handshake, not each read
    idle_timeout_s: float = 60.0  # a keep-alive connection with nothing sent
    upstream_timeout_s: float = 60.0  # the chain's answer
    max_response_bytes: int = 256 * 1024 * 1024  # the chain's answer (eth_getLogs can be big)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_batch", "max_connections", "max_handshakes",
                     "max_handshakes_per_address"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"gateway limit {name}={getattr(self, name)} must be 1 or more")
        for name in ("handshake_timeout_s", "idle_timeout_s", "upstream_timeout_s"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError(f"gateway limit {name}={getattr(self, name)} must be positive")


def refusal(method: object, request_id: object = None) -> dict[str, Any]:
    """The JSON-RPC error the gateway answers for a method it does not pass."""
    return _error(
        request_id, METHOD_NOT_AVAILABLE,
        f"method {method!r} is not available through the swarmnode chain gateway: it passes only "
        "the standard eth_*/net_*/web3_* calls a node needs (reads, fee queries and "
        "eth_sendRawTransaction with transactions the caller signed); dev-chain admin methods "
        "stay inside the sentinel",
    )


def _error(request_id: object, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _allowed(entry: object) -> dict[str, Any] | None:
    """None when ``entry`` may go to the chain, else the error to answer for it."""
    if not isinstance(entry, dict):
        return _error(None, INVALID_REQUEST, "each JSON-RPC request must be an object with "
                      "'jsonrpc', 'method', 'params' and 'id'")
    method = entry.get("method")
    request_id = entry.get("id")
    if not isinstance(method, str):
        return _error(request_id, INVALID_REQUEST, "the request has no 'method' string")
    if method not in ALLOWED_METHODS:
        return refusal(method, request_id)
    return None


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {listen!r} is not host:port (e.g. 0.0.0.0:8545)")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Upstream:
    """One keep-alive HTTP connection to the chain per worker thread."""

    def __init__(self, url: str, timeout: float, max_response: int) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"--upstream {url!r} is not the chain's http(s) JSON-RPC URL "
                              "(e.g. http://chain:8545)")
        self.url = url
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port or (443 if self._https else 80)
        self._path = parsed.path or "/"
        self._timeout = timeout
        self._max = max_response
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def close_thread(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def post(self, body: bytes) -> bytes:
        """The chain's answer to ``body``; OSError when it does not answer."""
        for attempt in (1, 2):  # a kept-alive connection the chain closed: once more, fresh
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=body,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read(self._max + 1)
                if len(data) > self._max:
                    self.close_thread()
                    raise OSError(f"the chain's answer is larger than {self._max} bytes")
                if resp.status != 200:
                    raise OSError(f"the chain answered HTTP {resp.status}: {data[:200]!r}")
                return data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest, http.client.ResponseNotReady):
                self.close_thread()
                if attempt == 2:
                    raise
            except (OSError, http.client.HTTPException):
                self.close_thread()
                raise
        raise AssertionError("unreachable")  # pragma: no cover


class ChainGateway:
    """The gateway: ``with ChainGateway(upstream, "0.0.0.0:8545", tls) as gw: ... gw.url``.

    ``tls``: the gateway's own certificate and key (the sentinel's node certificate, which names
    the host the sites dial) and the trust bundle that client certificates must chain to.
    """

    def __init__(self, upstream: str, listen: str, tls: TlsFiles,
                 limits: GatewayLimits | None = None) -> None:
        self.limits = limits or GatewayLimits()
        self.upstream = _Upstream(upstream, self.limits.upstream_timeout_s,
                                  self.limits.max_response_bytes)
        self._bind = _parse_listen(listen)
        tls.load()  # names the file that is missing, mismatched or expired
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        ctx.load_verify_locations(cafile=str(tls.trust))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._ctx = ctx
        self._listener: TlsListener | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[ssl.SSLSocket] = set()
        self._counts = {"forwarded": 0, "refused": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Requests forwarded and refused; connections refused or dropped before TLS."""
        seen = dict(self._listener.stats) if self._listener is not None else {}
        return {**self._counts,
                "rejected_connections": sum(seen.get(k, 0) for k in (
                    "refused_per_address", "evicted", "refused_busy")),
                "failed_handshakes": seen.get("failed_handshakes", 0) + seen.get("timed_out", 0)}

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> ChainGateway:
        host, port = self._bind
        limits = ListenerLimits(self.limits.handshake_timeout_s,
                                min(self.limits.max_handshakes_per_address,
                                    self.limits.max_handshakes),
                                self.limits.max_handshakes)
        listener = TlsListener(host, port, self._ctx, self._serve, limits,
                               workers=self.limits.max_connections, name="chain-gateway")
        try:
            listener.start()
        except OSError as exc:
            raise ConfigError(f"the chain gateway cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}; pick another --listen") from None
        self._listener = listener
        log.info("chain gateway on %s:%d -> %s (mutual TLS; %d methods allowed)", host,
                 self.port, self.upstream.url, len(ALLOWED_METHODS))
        return self

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() the gateway first"
        return int(self._listener.port)

    @property
    def url(self) -> str:
        """The URL a client on this host dials (its certificate must name 127.0.0.1 or
        localhost)."""
        return f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.stop()
        with self._lock:
            for conn in list(self._open):
                try:
                    socket.socket.shutdown(conn, socket.SHUT_RDWR)  # wakes its worker
                except OSError:
                    pass

    def wait(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (the CLI)."""
        while not stop.wait(1.0) and not self._stop.is_set():
            pass

    def __enter__(self) -> ChainGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ------------------------------------------------------------------------------
    def _serve(self, tls: ssl.SSLSocket, where: str, first: bytes) -> None:
        """One connection whose TLS handshake the listener completed (it holds a worker only
        from now on)."""
        with self._lock:
            self._open.add(tls)
        try:
            tls.settimeout(self.limits.idle_timeout_s)
            peer = tls.getpeercert() or {}
            who = next((v for rdn in peer.get("subject", ()) for k, v in rdn
                        if k == "commonName"), where)
            _Handler(tls, (who, where), self)
        except (OSError, ssl.SSLError) as exc:
            log.info("chain gateway: connection from %s ended: %s", where, exc)
        finally:
            self.upstream.close_thread()
            with self._lock:
                self._open.discard(tls)

    # -- JSON-RPC ---------------------------------------------------------------------------------
    def answer(self, body: bytes, who: str) -> bytes:
        """The answer to one HTTP request body: forwarded when every method in it is allowed,
        refused entries answered here."""
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return _dump(_error(None, PARSE_ERROR, f"the request body is not JSON: {exc}"))
        if isinstance(payload, list):
            return self._batch(payload, who)
        refused = _allowed(payload)
        if refused is not None:
            self._refused(payload, who)
            return _dump(refused)
        self._counts["forwarded"] += 1
        try:
            return self.upstream.post(_dump(payload))
        except (OSError, http.client.HTTPException) as exc:
            return _dump(self._chain_down(payload.get("id"), exc))

    def _batch(self, batch: list[Any], who: str) -> bytes:
        if not batch:
            return _dump(_error(None, INVALID_REQUEST, "an empty batch"))
        if len(batch) > self.limits.max_batch:
            return _dump(_error(None, INVALID_REQUEST,
                                f"a batch of {len(batch)} requests; the gateway takes at most "
                                f"{self.limits.max_batch} in one"))
        answers: list[dict[str, Any] | None] = [None] * len(batch)
        forward: list[dict[str, Any]] = []
        slots: list[int] = []
        for i, entry in enumerate(batch):
            refused = _allowed(entry)
            if refused is not None:
                self._refused(entry, who)
                answers[i] = refused
                continue
            # The gateway's own ids: answers map back whatever ids (or none) the caller used.
            forward.append({**entry, "id": len(forward)})
            slots.append(i)
        if forward:
            self._counts["forwarded"] += len(forward)
            try:
                replies = json.loads(self.upstream.post(_dump(forward)))
                if not isinstance(replies, list):
                    raise ValueError("the chain did not answer the batch with a list")
            except (OSError, ValueError, http.client.HTTPException) as exc:
                replies = [self._chain_down(i, exc) for i in range(len(forward))]
            for reply in replies:
                k = reply.get("id") if isinstance(reply, dict) else None
                if isinstance(k, int) and 0 <= k < len(slots):
                    answers[slots[k]] = {**reply, "id": batch[slots[k]].get("id")}
            for i in slots:
                if answers[i] is None:
                    answers[i] = self._chain_down(batch[i].get("id"),
                                                  OSError("no answer for this entry"))
        # Notifications (no "id") get no answer, as JSON-RPC has it.
        out = [a for a, entry in zip(answers, batch, strict=True)
               if not (isinstance(entry, dict) and "id" not in entry)]
        return _dump(out) if out else b""

    def _refused(self, entry: object, who: str) -> None:
        self._counts["refused"] += 1
        method = entry.get("method") if isinstance(entry, dict) else None
        log.warning("chain gateway: refused %r from %s", method, who)

    def _chain_down(self, request_id: object, exc: BaseException) -> dict[str, Any]:
        log.warning("chain gateway: the chain at %s did not answer: %s", self.upstream.url, exc)
        return _error(request_id, INTERNAL_ERROR,
                      f"the chain behind the gateway did not answer ({exc}); the sentinel's "
                      "chain may be restarting: try again")


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive on one mutual-TLS connection; POST of JSON-RPC only."""

    protocol_version = "HTTP/1.1"
    server_version = "swarmnode-chain-gateway"
    sys_version = ""
    server: ChainGateway  # type: ignore[assignment]

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("chain gateway %s: " + format, self.client_address[1], *args)

    def _reply(self, status: int, body: bytes, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _refuse_http(self, status: int, message: str) -> None:
        self._reply(status, _dump(_error(None, INVALID_REQUEST, message)), close=True)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        limits = self.server.limits
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._refuse_http(411, "send the JSON-RPC request with a Content-Length, not chunked")
            return
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self._refuse_http(411, "a JSON-RPC request needs a Content-Length header")
            return
        if length > limits.max_body_bytes:
            log.warning("chain gateway: refused a %d-byte request from %s (limit %d)", length,
                        self.client_address[0], limits.max_body_bytes)
            self._refuse_http(413, f"the request body is {length} bytes; the gateway takes at "
                              f"most {limits.max_body_bytes} bytes in one request")
            self._drain(min(length, 16 * limits.max_body_bytes))
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            return
        self._reply(200, self.server.answer(body, str(self.client_address[0])))

    def _drain(self, n: int, within_s: float = 5.0) -> None:
        """Read (and drop) up to ``n`` bytes of a refused body for at most ``within_s``, so that
        a client still sending it gets to read the refusal instead of a reset connection."""
        deadline = time.monotonic() + within_s
        try:
            while n > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    def _not_post(self) -> None:
        self._refuse_http(405, "the chain gateway takes JSON-RPC requests by POST only "
                          "(no websocket subscriptions: a node polls for new blocks)")

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_post  # noqa: N815


def gateway_files(cert: Path, key: Path, trust: Path) -> TlsFiles:
    """The gateway's TLS files (the sentinel's node certificate and key, the trust bundle)."""
    return TlsFiles(cert=Path(cert), key=Path(key), trust=Path(trust))
