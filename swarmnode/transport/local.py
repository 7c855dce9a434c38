"""The local API: a training script <-> its own node service.

gRPC over a unix socket by default (``unix:///path/node.sock``; the socket is made mode 0600, in a
directory created with mode 0700, so only the node's user can call it; with ``mode=0o660`` and a
``group`` the trainer's user in that group can call it too, as in the containers, where the socket
lives on a volume that only the ``ml`` and ``node`` containers mount), or over TCP
(``host:port``) with mutual TLS. TCP without TLS is refused. Over TCP, any client certificate that
chains to the ``trust`` file is accepted, so give the local API a trust file that holds only the
CA issuing the trainer's certificate, not the swarm's bundle.

One generic call, so the node can add methods without changing local.proto: the request is a JSON
header (method, arguments) plus optional payload bytes; the reply a JSON result plus optional
bytes. Over a unix socket, payloads (whole models) do not go through the socket: the trainer
writes its parameters straight from the tensors into its own file in ``xfer/`` beside the socket
(rewritten in place every round, so its pages stay warm) and names it in the call; the node reads
it once into memory of its own (a trainer cannot change or truncate bytes the node works on) and
writes its reply payload into the trainer's reply file, which the trainer maps. That replaces a
socket round trip through gRPC's copies with one copy per direction (see ``xfer`` below). Over TCP,
or when ``xfer/`` is not writable, payloads stream as ~1 MiB chunks both ways with the same size
limits as the peer API. A
:class:`SwarmError` raised by the handler reaches the client as the same class with the same
message (class name in the trailing metadata). Calls may block for minutes (a whole round), so
the server has enough worker threads that a ``status`` call is never starved by ``sync`` calls.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import secrets
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from swarmnode.errors import (
    ConfigError,
    NodeError,
    NodeUnavailable,
    PayloadRejected,
    PeerRefused,
    SwarmError,
    error_class,
)
from swarmnode.identity import TlsFiles
from swarmnode.transport import _wire, serde
from swarmnode.transport._rpc import (
    abort,
    channel_options,
    dumps,
    error_from_rpc,
    host_port,
    loads,
    server_options,
    swarm_error_name,
)
from swarmnode.transport.proto import local_pb2 as pb
from swarmnode.transport.tlscheck import probe

__all__ = ["DEFAULT_MAX_BYTES", "LocalClient", "LocalHandler", "LocalServer"]

log = logging.getLogger("swarmnode.transport.local")

DEFAULT_MAX_BYTES = 4 << 30
_SERVICE = pb.DESCRIPTOR.services_by_name["Local"].full_name  # swarmnode.local.v1.Local
_METHOD = f"/{_SERVICE}/Call"
_UNIX_PATH_MAX = 107
_XFER = "__xfer__"  # reserved key in the JSON of a call and its reply: the exchange files
_XFER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class LocalHandler(Protocol):
    def call(
        self, method: str, args: dict[str, Any], payload: serde.Buffer | None
    ) -> tuple[dict[str, Any], serde.Buffer | None]:
        """Run ``method``; may block for minutes; raise a SwarmError to fail the call. The
        payload is the handler's to keep (memory of its own, not shared with the caller)."""
        ...


@dataclass(frozen=True)
class _Target:
    grpc: str  # what gRPC binds or dials
    path: Path | None  # the socket file, for unix targets


def _parse(target: str, tls: TlsFiles | None) -> _Target:
    if target.startswith("unix:"):
        rest = target.removeprefix("unix:")
        raw = rest[2:] if rest.startswith("//") else rest
        if not raw:
            raise ConfigError(f"local API target {target!r} names no socket path")
        path = Path(raw).absolute()
        if len(str(path).encode()) > _UNIX_PATH_MAX:
            raise ConfigError(
                f"local API socket path {path} is longer than {_UNIX_PATH_MAX} bytes (a unix "
                "socket limit); choose a shorter local_api or data_dir"
            )
        # gRPC's unix:// form counts the "//" against the 107-byte socket path limit; its
        # unix:/abs/path form does not, so paths of up to 107 bytes work as the check says
        return _Target(f"unix:{path}", path)
    host_port(target, "local API target")
    if tls is None:
        raise ConfigError(
            f"the local API over TCP ({target}) needs mutual TLS: pass tls (cert, key, trust), or "
            "use a unix socket target such as unix:///run/swarm/node.sock"
        )
    return _Target(target, None)


def _gid(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    import grp

    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise ConfigError(
            f"local_api_group {group!r} is not a group on this machine; create it or give a gid"
        ) from None


def _prepare_socket(path: Path, target: str, mode: int = 0o600, gid: int | None = None) -> None:
    """Make the socket's directory (0700 if new, 0750 when the group may call) and clear a stale
    socket file."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o750 if mode & 0o070 else 0o700, parents=True, exist_ok=True)
        if gid is not None:
            os.chown(path.parent, -1, gid)
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise NodeError(f"{path} exists and is not a socket; remove it or choose another local_api")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a leftover of a node that died
        return
    finally:
        probe.close()
    raise NodeError(
        f"another process already serves the local API at {target}: is a node service already "
        "running? Stop it or choose another local_api"
    )


def _xfer_dir(path: Path) -> Path:
    """Where a socket's exchange files live: ``xfer/`` beside the socket."""
    return path.parent / "xfer"


def _open_regular(path: Path, flags: int, what: str, mode: int = 0o600) -> int:
    """Open ``path`` without following a symlink or blocking on a FIFO; PayloadRejected unless it
    is a regular file."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PayloadRejected(f"{what}: {path.name} is a symlink; refused") from None
        raise PayloadRejected(f"{what}: cannot open {path.name}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PayloadRejected(f"{what}: {path.name} is not a regular file; refused")
    return fd


def _xfer_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _XFER_NAME.fullmatch(value):
        raise PayloadRejected(f"{what}: invalid exchange file name {value!r}")
    return value


class _Servicer:
    def __init__(self, owner: LocalServer) -> None:
        self.o = owner

    def _read(
        self, frames: Iterator[_wire.Piece]
    ) -> tuple[str, dict[str, Any], serde.Buffer | None, str | None]:
        """(method, arguments, payload, the caller's reply file name or None)."""
        first = next(frames, None)
        h = _wire.header_of(first) if first is not None else None
        if h is None or not h.method:
            raise PayloadRejected("local API call without a header naming the method")
        args = loads(h.json, f"arguments of {h.method!r}")
        xfer = args.pop(_XFER, None) if isinstance(args, dict) else None
        if xfer is not None:
            return self._read_xfer(h, args, xfer, frames)
        return (*self._read_stream(h, args, frames), None)

    def _read_xfer(
        self, h: Any, args: dict[str, Any], xfer: Any, frames: Iterator[_wire.Piece]
    ) -> tuple[str, dict[str, Any], serde.Buffer | None, str | None]:
        what = f"payload of {h.method!r}"
        folder = self.o.xfer
        if folder is None or not isinstance(xfer, dict):
            raise PayloadRejected(f"{h.method}: exchange files are only offered over a unix socket")
        for piece in frames:
            if _wire.piece_data(piece) is not None:
                raise PayloadRejected(f"{h.method}: payload bytes beside an exchange file")
        reply = _xfer_name(xfer["down"], what) if "down" in xfer else None
        if "up" not in xfer:
            return h.method, args, None, reply
        name = _xfer_name(xfer["up"], what)
        nbytes = xfer.get("bytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise PayloadRejected(f"{what}: invalid byte count {nbytes!r}")
        fd = _open_regular(folder / name, os.O_RDONLY, what)
        try:
            payload = serde.read_file(fd, nbytes, self.o.max_bytes, what, spill=self.o.spill_dir)
        finally:
            os.close(fd)
        return h.method, args, payload, reply

    def _write_reply(self, name: str, out: serde.Buffer, method: str) -> None:
        """Write ``out`` into the caller's reply file, created by this server: a file that is not
        ours (a link planted by someone else) is replaced, never written through."""
        assert self.o.xfer is not None
        path = self.o.xfer / name
        mode = 0o660 if self.o.mode & 0o070 else 0o600
        try:
            fd: int | None = None
            try:
                fd = os.open(path, os.O_WRONLY | _OPEN_FLAGS)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                    os.close(fd)
                    fd = None
            except OSError:  # missing, a symlink (ELOOP), a FIFO without reader (ENXIO), ...
                fd = None
            if fd is None:
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, mode)
            try:
                os.fchmod(fd, mode)
                view = memoryview(out).cast("B")
                pos = 0
                while pos < len(view):
                    pos += os.pwrite(fd, view[pos:], pos)
                os.ftruncate(fd, pos)
                view.release()
                serde.evict(out)  # a stored model's file: handed over, not kept resident
            finally:
                os.close(fd)
        except OSError as exc:
            raise NodeError(f"cannot write the reply of {method!r} to {path}: {exc}") from None

    def _read_stream(
        self, h: Any, args: dict[str, Any], frames: Iterator[_wire.Piece]
    ) -> tuple[str, dict[str, Any], serde.Buffer | None]:
        if not h.has_payload:
            for piece in frames:
                if _wire.piece_data(piece) is not None:
                    raise PayloadRejected(f"{h.method}: payload bytes although has_payload=false")
            return h.method, args, None
        what = f"payload of {h.method!r}"
        with serde.Assembler(h.total_bytes, self.o.max_bytes, what) as assembler:
            for piece in frames:
                data = _wire.piece_data(piece)
                if data is None:
                    raise PayloadRejected(f"{h.method}: a second header in the stream")
                assembler.add(data)
            return h.method, args, assembler.finish().data

    def Call(self, frames: Iterator[_wire.Piece], context: grpc.ServicerContext):
        method = "?"
        try:
            method, args, payload, reply_file = self._read(frames)
            result, out = self.o.handler.call(method, args, payload)
            if reply_file is not None and out is not None:
                self._write_reply(reply_file, out, method)
                result = {**result, _XFER: {"bytes": len(out)}}
                out = None
            header = pb.Header(
                json=dumps(result, f"the result of {method!r}"), has_payload=out is not None,
                total_bytes=len(out) if out is not None else 0,
            )
        except SwarmError as exc:
            log.info("local API %s failed: %s: %s", method, type(exc).__name__, exc)
            abort(context, exc)
        except grpc.RpcError:  # the trainer went away
            log.info("local API %s: the caller cancelled", method)
            raise
        except Exception as exc:
            log.exception("local API %s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"node error in {method}: {exc!r}")
        yield pb.Frame(header=header)
        if out is not None:
            yield from serde.chunks(out)


class LocalServer:
    """Serves the local API on a unix socket (or TCP with mutual TLS)."""

    def __init__(
        self,
        target: str,
        handler: LocalHandler,
        tls: TlsFiles | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        workers: int = 32,
        mode: int = 0o600,
        group: str | int | None = None,
        spill_dir: str | None = None,
    ) -> None:
        """``spill_dir``: payloads handed over in exchange files are copied into files there
        (:func:`serde.spill_buffer`) rather than anonymous memory."""
        if mode & 0o007:
            raise ConfigError(f"local API socket mode {mode:o} would let every user call it")
        self.target = _parse(target, tls)
        self.mode, self.gid = mode, _gid(group)
        self.xfer = _xfer_dir(self.target.path) if self.target.path is not None else None
        self.handler, self.tls, self.max_bytes, self.workers = handler, tls, max_bytes, workers
        self.spill_dir = spill_dir
        self._creds = None
        if tls is not None and self.target.path is None:
            cert, key, trust = tls.load()
            self._creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=trust, require_client_auth=True
            )
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """The target a client dials (the real port when bound to port 0)."""
        if self.target.path is not None:
            return f"unix://{self.target.path}"
        host, _ = host_port(self.target.grpc)
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Start serving; returns the TCP port (0 for a unix socket)."""
        server = grpc.server(
            ThreadPoolExecutor(self.workers, thread_name_prefix="local-api"),
            options=server_options(),
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {
            "Call": grpc.stream_stream_rpc_method_handler(
                _Servicer(self).Call, request_deserializer=_wire.decoder(pb.Frame),
                response_serializer=_wire.encode,
            ),
        }),))
        path = self.target.path
        if path is not None:
            _prepare_socket(path, self.target.grpc, self.mode, self.gid)
            self._prepare_xfer()
        try:
            if self._creds is not None:
                port = server.add_secure_port(self.target.grpc, self._creds)
            else:
                port = server.add_insecure_port(self.target.grpc)
        except RuntimeError:
            port = 0
        if not port:
            raise ConfigError(
                f"cannot serve the local API at {self.target.grpc}: address in use or not "
                "writable; change local_api"
            )
        if path is not None:
            if self.gid is not None:
                os.chown(path, -1, self.gid)
            os.chmod(path, self.mode)
            port = 0
        server.start()
        self._server, self.port = server, port
        log.info("local API listening at %s", self.address)
        return port

    def _prepare_xfer(self) -> None:
        """``xfer/``: the exchange files of this server's callers. Writable by the group that may
        call (setgid, so files keep that group). Files already there are left alone: they may
        belong to a trainer that outlives this service (a restart); each client removes its own
        files when it closes."""
        folder = self.xfer
        assert folder is not None
        group = bool(self.mode & 0o070)
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            st = folder.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise NodeError(f"{folder} is not a directory of this user; remove it")
            if self.gid is not None:
                os.chown(folder, -1, self.gid)
            os.chmod(folder, 0o2770 if group else 0o700)
        except OSError as exc:
            log.warning("local API: cannot prepare %s (%s); payloads will stream over the "
                        "socket", folder, exc)
            self.xfer = None

    def stop(self, grace: float | None = None) -> None:
        if self._server is None:
            return
        self._server.stop(grace).wait()
        self._server = None
        if self.target.path is not None:
            self.target.path.unlink(missing_ok=True)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


class LocalClient:
    """The training script's side of the local API."""

    def __init__(
        self, target: str, tls: TlsFiles | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.target = target
        parsed = _parse(target, tls)
        self.max_bytes, self._tls, self._parsed = max_bytes, tls, parsed
        options = channel_options() + [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if parsed.path is None:
            assert tls is not None
            cert, key, trust = tls.load()
            creds = grpc.ssl_channel_credentials(trust, key, cert)
            self._channel = grpc.secure_channel(parsed.grpc, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(parsed.grpc, options=options)
        self._call = self._channel.stream_stream(
            _METHOD, request_serializer=_wire.encode, response_deserializer=_wire.decoder(pb.Frame)
        )
        # Exchange files (unix sockets only): ours to write, the node's reply file to read.
        self._xfer = _xfer_dir(parsed.path) if parsed.path is not None else None
        token = secrets.token_hex(8)
        self._up_name, self._down_name = f"up-{token}", f"down-{token}"
        self._up_fd: int | None = None
        self._xfer_lock = threading.Lock()  # one exchange at a time: the files are per client

    def _up_file(self) -> int | None:
        """Our upload file, created on first use; None (stream instead) if xfer/ is not
        writable for us."""
        if self._up_fd is not None and self._xfer is not None:
            try:  # still ours under that name (a node's restart or an operator may remove it)
                here = os.stat(self._xfer / self._up_name, follow_symlinks=False)
                mine = os.fstat(self._up_fd)
                if (here.st_ino, here.st_dev) != (mine.st_ino, mine.st_dev):
                    raise FileNotFoundError
            except OSError:
                os.close(self._up_fd)
                self._up_fd = None
                (self._xfer / self._up_name).unlink(missing_ok=True)
        if self._up_fd is None and self._xfer is not None:
            try:
                self._up_fd = os.open(self._xfer / self._up_name,
                                      os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o660)
                os.fchmod(self._up_fd, 0o660)
            except OSError as exc:
                log.info("local API: cannot write exchange files in %s (%s); payloads stream "
                         "over the socket", self._xfer, exc)
                self._xfer = None
        return self._up_fd

    def _not_running(self) -> SwarmError:
        """NodeError, or over TCP the TLS-level reason if the service refused our certificate."""
        tls = self._tls
        if tls is not None and self._parsed.path is None:
            try:
                probe(self._parsed.grpc, tls.cert, tls.key, tls.trust, timeout=5.0,
                      who=f"the node service at {self.target}")
            except PeerRefused as exc:
                return exc
            except SwarmError:
                pass
        return NodeUnavailable(
            f"no node service at {self.target}: start it with `swarmnode run --config ...`"
        )

    def wait_ready(self, timeout: float) -> None:
        """Block until the node service answers, or raise NodeError after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise self._not_running() from None

    def call(
        self,
        method: str,
        args: dict[str, Any],
        payload: serde.Buffer | serde.Encoded | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], serde.Buffer | None]:
        """Run ``method`` on the node; its SwarmError is raised here as the same class. A
        :class:`serde.Encoded` payload is written straight from its tensors. A reply payload
        that came as an exchange file is a private mapping of it: use it before the next call."""
        # One exchange at a time uses the files; a call made meanwhile (another thread) streams.
        if self._xfer is not None and self._xfer_lock.acquire(blocking=False):
            try:
                fd = self._up_file()
                if fd is not None:
                    return self._call_xfer(method, args, payload, timeout, fd)
            finally:
                self._xfer_lock.release()
        data = payload.to_bytes() if isinstance(payload, serde.Encoded) else payload
        return self._roundtrip(method, args, data, timeout)

    def _call_xfer(
        self, method: str, args: dict[str, Any], payload: serde.Buffer | serde.Encoded | None,
        timeout: float | None, fd: int,
    ) -> tuple[dict[str, Any], serde.Buffer | None]:
        xfer: dict[str, Any] = {"down": self._down_name}
        if payload is not None:
            if isinstance(payload, serde.Encoded):
                payload.write_to(fd)
                xfer["bytes"] = payload.nbytes
            else:
                view = memoryview(payload).cast("B")
                pos = 0
                while pos < len(view):
                    pos += os.pwrite(fd, view[pos:], pos)
                os.ftruncate(fd, pos)
                xfer["bytes"] = pos
            xfer["up"] = self._up_name
        result, out = self._roundtrip(method, {**args, _XFER: xfer}, None, timeout)
        sent = result.pop(_XFER, None)
        if sent is None:
            return result, out
        assert self._xfer is not None
        path = self._xfer / self._down_name
        what = f"the node's reply to {method!r}"
        nbytes = sent.get("bytes") if isinstance(sent, dict) else None
        if not isinstance(nbytes, int) or not 0 <= nbytes <= self.max_bytes:
            raise NodeError(f"{what}: invalid or oversized reply size {nbytes!r}")
        down = _open_regular(path, os.O_RDONLY, what)
        try:
            if os.fstat(down).st_size != nbytes:
                raise NodeError(f"{what}: the reply file does not hold the {nbytes} bytes named")
            if nbytes == 0:
                return result, bytearray()
            # Mapped, not copied: the node rewrites this file only during our next exchange
            # (a SpillMap: its pages may be dropped once read, see serde.load_into).
            return result, serde.SpillMap(down, nbytes, flags=mmap.MAP_PRIVATE,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(down)

    def _roundtrip(
        self, method: str, args: dict[str, Any], payload: serde.Buffer | None,
        timeout: float | None,
    ) -> tuple[dict[str, Any], serde.Buffer | None]:
        header = pb.Header(
            method=method, json=dumps(args, f"the arguments of {method!r}"),
            has_payload=payload is not None, total_bytes=len(payload) if payload is not None else 0,
        )

        def frames() -> Iterator[Any]:
            yield pb.Frame(header=header)
            if payload is not None:
                yield from serde.chunks(payload)

        replies = self._call(frames(), timeout=timeout)
        try:
            return self._read(method, replies)
        except grpc.RpcError as err:
            raise self._error(method, err, timeout) from None
        finally:
            replies.cancel()

    def _read(
        self, method: str, replies: Iterator[_wire.Piece]
    ) -> tuple[dict, serde.Buffer | None]:
        first = next(replies, None)
        h = _wire.header_of(first) if first is not None else None
        if h is None:
            raise NodeError(f"the node's reply to {method!r} has no header")
        result = loads(h.json, f"the node's reply to {method!r}")
        if not h.has_payload:
            return result, None
        with serde.Assembler(h.total_bytes, self.max_bytes, f"reply to {method!r}") as assembler:
            for piece in replies:
                data = _wire.piece_data(piece)
                if data is None:
                    raise NodeError(f"the node's reply to {method!r} has a second header")
                assembler.add(data)
            return result, assembler.finish().data

    def _error(self, method: str, err: grpc.RpcError, timeout: float | None) -> SwarmError:
        name = swarm_error_name(err)
        if name is not None:
            return error_class(name)(err.details() or name)  # type: ignore[attr-defined]
        code = err.code()  # type: ignore[attr-defined]
        if code is grpc.StatusCode.UNAVAILABLE:
            return self._not_running()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return NodeError(
                f"the node service at {self.target} did not answer {method!r} within {timeout} s"
            )
        return error_from_rpc(err, f"local API {method!r}")

    def close(self) -> None:
        self._channel.close()
        with self._xfer_lock:
            if self._up_fd is not None:
                os.close(self._up_fd)
                self._up_fd = None
            if self._xfer is not None:
                for name in (self._up_name, self._down_name):
                    (self._xfer / name).unlink(missing_ok=True)

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
