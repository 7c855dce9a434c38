"""The local API between a trainer and its node: unix socket by default, TCP with mutual TLS."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transport_support import Pki

from swarmnode.errors import (
    ConfigError,
    NodeError,
    PayloadRejected,
    PeerRefused,
    RoundError,
    SpecMismatch,
)
from swarmnode.identity import create_ca, make_bundle
from swarmnode.transport import serde
from swarmnode.transport.local import LocalClient, LocalServer

MiB = 1 << 20


class Node:
    """LocalHandler: echoes, fails on demand, and has a `sync` that blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    def call(self, method: str, args: dict[str, Any], payload: bytes | None):  # type: ignore[no-untyped-def]
        if method == "echo":
            return {"method": method, "args": args, "size": len(payload or b"")}, payload
        if method == "status":
            return {"stage": "round"}, None
        if method == "sync":
            self.waiting.release()
            self.release.wait(30)
            return {"round": 1}, None
        if method == "fail":
            raise {"RoundError": RoundError, "SpecMismatch": SpecMismatch}[args["cls"]](args["msg"])
        if method == "crash":
            raise ZeroDivisionError("division by zero")
        raise NodeError(f"unknown local API method {method!r}")


@pytest.fixture()
def sock(tmp_path: Path) -> str:
    return f"unix://{tmp_path}/run/node.sock"


@pytest.fixture()
def served(sock: str) -> Iterator[tuple[Node, LocalClient]]:
    node = Node()
    with LocalServer(sock, node, max_bytes=64 * MiB), LocalClient(sock) as client:
        client.wait_ready(5)
        yield node, client
        node.release.set()


def test_unix_round_trip(served, tmp_path: Path) -> None:
    _, client = served
    assert client.call("echo", {"a": [1, "x"], "b": None}) == (
        {"method": "echo", "args": {"a": [1, "x"], "b": None}, "size": 0}, None)
    reply, back = client.call("echo", {}, b"\x00\x01" * 10)
    assert reply["size"] == 20 and bytes(back) == b"\x00\x01" * 10
    assert client.call("echo", {}, b"") == ({"method": "echo", "args": {}, "size": 0}, b"")
    path = tmp_path / "run" / "node.sock"
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_big_payload_both_ways(served) -> None:
    _, client = served
    data = os.urandom(40 * MiB)
    reply, back = client.call("echo", {"n": 1}, data, timeout=60)
    assert reply["size"] == len(data) and bytes(back) == data


def test_payload_over_the_limit(served) -> None:
    _, client = served
    with pytest.raises(PayloadRejected, match=r"payload of 'echo'.*over the limit of 67108864"):
        client.call("echo", {}, bytes(65 * MiB), timeout=60)


@pytest.mark.parametrize("cls", [RoundError, SpecMismatch])
def test_error_class_and_message_reach_the_trainer(served, cls: type) -> None:
    _, client = served
    message = f"round 3: the trainer's setting x differs ({cls.__name__}); use the swarm's"
    with pytest.raises(cls) as err:
        client.call("fail", {"cls": cls.__name__, "msg": message})
    assert type(err.value) is cls and str(err.value) == message
    with pytest.raises(NodeError, match="unknown local API method 'nope'"):
        client.call("nope", {})
    with pytest.raises(NodeError, match="failed internally.*ZeroDivisionError"):
        client.call("crash", {})


def test_long_calls_do_not_starve_status(served) -> None:
    node, client = served
    blocked = [threading.Thread(target=client.call, args=("sync", {}), kwargs={"timeout": 30})
               for _ in range(8)]
    for t in blocked:
        t.start()
    try:
        for _ in blocked:
            assert node.waiting.acquire(timeout=10)  # all eight sit inside a round
        assert client.call("status", {}, timeout=5) == ({"stage": "round"}, None)
    finally:
        node.release.set()
        for t in blocked:
            t.join(10)


def test_no_node_service(tmp_path: Path) -> None:
    target = f"unix://{tmp_path}/nobody.sock"
    with LocalClient(target) as client:
        with pytest.raises(NodeError, match=rf"no node service at {target}: start it with "
                                            r"`swarmnode run --config \.\.\.`"):
            client.wait_ready(0.3)
        with pytest.raises(NodeError, match="no node service at"):
            client.call("status", {}, timeout=2)


def test_socket_file_handling(sock: str, tmp_path: Path) -> None:
    path = tmp_path / "run" / "node.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on: a dead node's
    stale.bind(str(path))
    stale.close()
    with LocalServer(sock, Node()) as server, LocalClient(sock) as client:
        assert client.call("status", {}) == ({"stage": "round"}, None)
        with pytest.raises(NodeError, match="already serves the local API"):
            LocalServer(sock, Node()).start()
        assert server.address == sock
    assert not path.exists()  # removed on stop
    path.write_text("not a socket")
    with pytest.raises(NodeError, match="exists and is not a socket"):
        LocalServer(sock, Node()).start()
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        LocalServer(f"unix://{tmp_path}/{'x' * 120}.sock", Node())


def test_a_socket_path_of_107_bytes_serves() -> None:
    """The limit the check states is the one that holds: gRPC's unix:// form would count its
    "//" and refuse paths of 106 and 107 bytes (a node under a long data_dir, as under pytest's
    xdist, failed to start: "address in use or not writable")."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="swarmnode-long-"))
    try:
        path = base / ("x" * (107 - len(str(base)) - 1))
        assert len(str(path)) == 107
        with LocalServer(f"unix://{path}", Node()) as server, \
                LocalClient(f"unix://{path}") as client:
            assert client.call("status", {}) == ({"stage": "round"}, None)
            assert server.address == f"unix://{path}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_tcp_needs_and_uses_mutual_tls(pki: Pki) -> None:
    node_tls, trainer_tls = pki.node("local-node"), pki.node("trainer")
    with pytest.raises(ConfigError, match=r"over TCP \(127.0.0.1:0\) needs mutual TLS"):
        LocalServer("127.0.0.1:0", Node())
    with pytest.raises(ConfigError, match="needs mutual TLS"):
        LocalClient("127.0.0.1:1")
    with pytest.raises(ConfigError, match="is not host:port"):
        LocalServer("localhost", Node(), tls=node_tls)
    with LocalServer("127.0.0.1:0", Node(), tls=node_tls) as server:
        assert server.port > 0
        with LocalClient(server.address, tls=trainer_tls) as client:
            client.wait_ready(5)
            data = os.urandom(3 * MiB + 5)
            reply, back = client.call("echo", {"tcp": True}, data, timeout=30)
            assert reply["args"] == {"tcp": True} and bytes(back) == data
        rogue_ca = create_ca(pki.root / "rogue-ca", "Rogue CA")
        rogue = pki.node("rogue-trainer", ca=rogue_ca, trust=make_bundle(
            [pki.ca[0], rogue_ca[0]], pki.root / "rogue-trust.pem"))
        with LocalClient(server.address, tls=rogue) as client:
            with pytest.raises(PeerRefused, match="closed the TLS handshake"):
                client.call("status", {}, timeout=5)


_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print("refused:", exc)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to other users needs root")
def test_group_socket_lets_only_the_group_call(tmp_path_factory) -> None:
    """As in the containers: the node's socket is 0660 with the trainer's group; the trainer's
    user (another uid, in that group) can call it, a user outside the group cannot."""
    import shutil
    import subprocess
    import sys
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="swarmnode-sock-"))
    os.chmod(base, 0o755)  # traversable by the other users, as a volume's mount point is
    sock = f"unix://{base}/run/node.sock"
    gid = 47011
    try:
        with LocalServer(sock, Node(), mode=0o660, group=gid):
            path = base / "run" / "node.sock"
            st = path.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
            # The connect() is where the kernel checks the socket's permissions, for gRPC too.
            # The system Python: the venv's may live in a folder other users cannot enter.
            python = shutil.which("python3", path="/usr/bin:/usr/local/bin") or sys.executable

            def run(uid: int, g: int) -> str:
                # -I -S and a bare environment: nothing of this process's Python setup (its
                # venv, PYTHONPATH, user site) reaches the interpreter run as another user
                done = subprocess.run([python, "-I", "-S", "-c", _CONNECT, str(path)],
                                      user=uid, group=g, extra_groups=[g],
                                      env={"PATH": "/usr/bin:/bin", "HOME": str(base)},
                                      capture_output=True, text=True, timeout=60, cwd=base)
                out = done.stdout.strip()
                assert out, f"the helper as uid {uid} printed nothing (exit {done.returncode}):" \
                            f" {done.stderr.strip()!r}"
                return out

            assert run(47012, gid) == "connected"
            assert run(47013, 47013).startswith("refused: [Errno 13]")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_world_accessible_socket_is_refused(sock: str) -> None:
    with pytest.raises(ConfigError, match="every user"):
        LocalServer(sock, Node(), mode=0o666)


# -- exchange files (unix sockets): payloads beside the socket, not through it -------------------
def test_payloads_travel_as_exchange_files(served, tmp_path: Path) -> None:
    _, client = served
    xfer = tmp_path / "run" / "xfer"
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "n": torch.tensor([7])}
    reply, back = client.call("echo", {}, serde.Encoded(state), timeout=30)
    assert reply["size"] == serde.Encoded(state).nbytes and bytes(back) == serde.encode(state)
    ups = [p for p in xfer.iterdir() if p.name.startswith("up-")]
    downs = [p for p in xfer.iterdir() if p.name.startswith("down-")]
    assert len(ups) == 1 and ups[0].read_bytes() == serde.encode(state)
    assert len(downs) == 1 and downs[0].read_bytes() == serde.encode(state)
    assert stat.S_IMODE(xfer.stat().st_mode) == 0o700  # owner-only socket: owner-only files
    client.close()
    assert list(xfer.iterdir()) == []


def _raw(client: LocalClient, xfer: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A call that names exchange files as a hostile local caller would."""
    return client._roundtrip("echo", {"__xfer__": xfer}, None, 10)


def test_exchange_files_refuse_links_fifos_and_bad_names(served, tmp_path: Path) -> None:
    _, client = served
    xfer = tmp_path / "run" / "xfer"
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not overwrite")
    (xfer / "planted").symlink_to(secret)
    os.mkfifo(xfer / "fifo")
    (xfer / "short").write_bytes(b"12345")
    with pytest.raises(PayloadRejected, match="symlink"):
        _raw(client, {"up": "planted", "bytes": 16})
    with pytest.raises(PayloadRejected, match="not a regular file"):
        _raw(client, {"up": "fifo", "bytes": 16})  # would block a plain open forever
    with pytest.raises(PayloadRejected, match="holds 5 bytes but 9 were announced"):
        _raw(client, {"up": "short", "bytes": 9})
    with pytest.raises(PayloadRejected, match="invalid exchange file name"):
        _raw(client, {"up": "../secret", "bytes": 16})
    with pytest.raises(PayloadRejected, match="over the limit"):
        _raw(client, {"up": "short", "bytes": 65 * MiB})
    # A reply into a planted link replaces the link; the file it pointed at is untouched.
    (xfer / "up-x").write_bytes(b"abc")
    reply, out = _raw(client, {"up": "up-x", "bytes": 3, "down": "planted"})
    assert out is None and reply["__xfer__"] == {"bytes": 3}
    assert secret.read_bytes() == b"do not overwrite"
    assert not (xfer / "planted").is_symlink() and (xfer / "planted").read_bytes() == b"abc"


def test_payloads_stream_when_the_exchange_folder_is_not_writable(sock: str,
                                                                  tmp_path: Path) -> None:
    node = Node()
    with LocalServer(sock, node, max_bytes=64 * MiB):
        xfer = tmp_path / "run" / "xfer"
        xfer.chmod(0o500)
        try:
            with LocalClient(sock) as client:
                client.wait_ready(5)
                if os.access(xfer, os.W_OK):  # root ignores modes: take the folder away
                    xfer.chmod(0o700)
                    xfer.rmdir()
                reply, back = client.call("echo", {}, b"abc" * 1000, timeout=30)
                assert reply["size"] == 3000 and bytes(back) == b"abc" * 1000
        finally:
            if xfer.exists():
                xfer.chmod(0o700)
