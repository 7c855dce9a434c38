"""Transport benchmark: a ~100 MB update pushed between two node processes over loopback, by
swarmnode's data plane and by gRPC, against raw TCP and raw TLS sockets in the same run.

    python benchmarks/transport.py [--reps 7] [--mb 100] [--out results/transport.json] [--sweep]

The receivers run in a child process each (as another node would), so sender and receiver do not
share a GIL. Measured, on warm connections, several repetitions (median reported):

* ``peer_push``: ``PeerClient.push_update`` of the canonical bytes of a state dict of float32
  tensors to a real ``PeerServer``, as nodes do: over its data plane (mutual TLS sockets,
  identity pinned per connection, up to 4 stripes received straight into one buffer, SHA-256
  hashed in order as the stripes arrive, checked against the announced digest, then the training
  spec and NaN/Inf checks, then the handler, which does nothing); received, as a node does, into
  a spill file on disk (page cache) rather than anonymous memory; the sender's digest is computed
  once beforehand, as the node service does while the round checks in;
* ``peer_push_with_digest``: the same, the sender also computing the SHA-256;
* ``grpc_mtls``: the same push with the data plane switched off (models over gRPC: chunked
  stream, running SHA-256, header parse; no spec or NaN/Inf checks);
* ``raw_tcp``: the same bytes through a plain TCP socket into a preallocated buffer, 1-byte ack;
* ``raw_tls``: the same through Python ``ssl`` sockets (what TLS alone costs).

``--breakdown`` adds bare gRPC streams of prebuilt 1 MiB messages (plaintext, mutual TLS, mutual
TLS + copying into place, + SHA-256), to show what limits gRPC. Writes JSON (GB/s = 1e9 bytes/s)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import torch  # noqa: E402

from swarmnode.identity import TlsFiles, create_ca, issue_node_cert, make_bundle  # noqa: E402
from swarmnode.transport import serde  # noqa: E402
from swarmnode.transport.peer import PeerClient, PeerServer  # noqa: E402

SENDER, RECEIVER = "0xSENDER", "0xRECEIVER"
N_TENSORS = 25
ACK = b"k"


# -- the receiving side (child processes) ---------------------------------------------------------
class _Authority:
    def __init__(self, fps: dict[str, bytes]) -> None:
        self.fps = fps

    def fingerprint_of(self, address: str) -> bytes | None:
        return self.fps.get(address)

    def is_participant(self, round: int, address: str) -> bool:
        return address in self.fps


class _NullHandler:
    def accept_update(self, round, sender, weight, state, digest, evict=None) -> None:  # type: ignore[no-untyped-def]
        pass

    def merged(self, round: int, timeout: float, to: str | None = None) -> bytes | None:
        return None

    def health(self) -> dict[str, object]:
        return {"ok": True}


def _tls(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / name / f"{name}.pem", pki / name / f"{name}.key", pki / "trust.pem")


def _authority(pki: Path) -> _Authority:
    return _Authority({SENDER: _tls(pki, "sender").fingerprint(),
                       RECEIVER: _tls(pki, "receiver").fingerprint()})


def serve_peer(pki: Path, max_bytes: int, mode: str = "data", mb: int = 100) -> None:
    """A receiving node. ``mode``: ``data`` (the data plane, as a node serves), ``grpc`` (no
    data plane: models over gRPC), ``inline`` (gRPC, hashing on the receiving thread). The data
    plane runs the node's checks: the training spec and NaN/Inf, as well as the digest."""
    if mode == "inline":  # a variant for the sweep: hash on the receiving thread
        serde._BACKGROUND_HASH = 1 << 62  # noqa: SLF001
    spec = serde.ParamSpec.from_state(_state(mb)) if mode == "data" else None
    spill = pki / "spill"  # as a node does: updates are received into files on its data volume
    spill.mkdir(exist_ok=True)
    server = PeerServer("127.0.0.1:0", _tls(pki, "receiver"), _authority(pki), _NullHandler(),
                        spec=spec, max_bytes=max_bytes, reject_nonfinite=mode == "data",
                        data_port=None if mode == "data" else -1,
                        spill_dir=str(spill) if mode == "data" else None)
    print(server.start(), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


STAGES = {"plain": "gRPC, no TLS, receiver drops messages",
          "mtls": "gRPC mTLS, receiver drops messages",
          "mtls_copy": "gRPC mTLS, receiver copies into place",
          "mtls_copy_sha": "gRPC mTLS, receiver copies and hashes (Assembler)"}


def serve_stage(pki: Path, stage: str, size: int) -> None:
    """A bare gRPC stream sink doing only part of what PeerServer does."""

    def sink(messages, context):  # type: ignore[no-untyped-def]
        if stage in ("plain", "mtls"):
            for _ in messages:
                pass
        elif stage == "mtls_copy":  # what Assembler does, minus the hashing
            view, pos = memoryview(mmap.mmap(-1, size)), 0
            for m in messages:
                view[pos : pos + len(m)] = m
                pos += len(m)
        else:
            with serde.Assembler(size, size) as asm:
                for m in messages:
                    asm.add(m)
                asm.finish()
        return b""

    handler = grpc.method_handlers_generic_handler("bench.Sink", {
        "Push": grpc.stream_unary_rpc_method_handler(sink)})
    server = grpc.server(ThreadPoolExecutor(4), handlers=[handler],
                         options=[("grpc.max_receive_message_length", 16 << 20)])
    if stage == "plain":
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        tls = _tls(pki, "receiver")
        cert, key, trust = tls.load()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=trust, require_client_auth=True))
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def bench_stage(pki: Path, payload: bytes, reps: int, stage: str) -> list[float]:
    proc, port = _child("--serve-stage", str(pki), stage, str(len(payload)))
    options = [("grpc.max_send_message_length", 16 << 20)]
    if stage == "plain":
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    else:
        cert, key, trust = _tls(pki, "sender").load()
        channel = grpc.secure_channel(f"127.0.0.1:{port}",
                                      grpc.ssl_channel_credentials(trust, key, cert), options)
    messages = [bytes(piece) for piece in serde.chunks(payload)]  # prebuilt: no sender work
    push = channel.stream_unary("/bench.Sink/Push")
    try:
        return _timed(lambda: push(iter(messages), timeout=120), reps)
    finally:
        channel.close()
        _stop(proc)


def serve_raw(pki: Path | None) -> None:
    """Receive length-prefixed blobs into a preallocated buffer, ack each; TLS if ``pki``."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    if pki is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / "receiver" / "receiver.pem", pki / "receiver" / "receiver.key")
        ctx.load_verify_locations(pki / "trust.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
        conn = ctx.wrap_socket(conn, server_side=True)
    buf = bytearray()
    while True:
        head = _recv_exact(conn, 8)
        if head is None:
            return
        size = int.from_bytes(head, "little")
        if len(buf) < size:
            buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = conn.recv_into(view[got:size])
            if not n:
                return
            got += n
        conn.sendall(ACK)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            return None
        data += more
    return data


# -- the sending side -----------------------------------------------------------------------------
def _child(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _summary(seconds: list[float], size: int) -> dict[str, object]:
    med = statistics.median(seconds)
    return {"seconds": [round(s, 4) for s in seconds], "median_s": round(med, 4),
            "gbps_median": round(size / med / 1e9, 3),
            "gbps_best": round(size / min(seconds) / 1e9, 3)}


def _timed(fn, reps: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up: connection, TLS session, page faults of the buffers
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _state(mb: int) -> dict[str, torch.Tensor]:
    per = mb * (1 << 20) // 4 // N_TENSORS
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i:02d}.weight": torch.randn(per, generator=gen) for i in range(N_TENSORS)}


def bench_grpc(pki: Path, payload: bytes, reps: int, chunk: int, with_digest: bool,
               inline_hash: bool = False, mode: str = "grpc", mb: int = 100) -> list[float]:
    proc, port = _child("--serve-peer", str(pki), str(len(payload) + (1 << 20)),
                        "inline" if inline_hash else mode, str(mb))
    digest = serde.digest(payload)
    try:
        with PeerClient(f"127.0.0.1:{port}", _tls(pki, "sender"), SENDER, RECEIVER,
                        _authority(pki), chunk_size=chunk) as client:
            def push() -> None:
                client.push_update(1, 1, payload, timeout=120,
                                   digest=None if with_digest else digest)
            return _timed(push, reps)
    finally:
        _stop(proc)


def bench_raw(pki: Path, payload: bytes, reps: int, tls: bool) -> list[float]:
    proc, port = _child("--serve-raw", str(pki) if tls else "-")
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_cert_chain(pki / "sender" / "sender.pem", pki / "sender" / "sender.key")
            ctx.load_verify_locations(pki / "trust.pem")
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        head = len(payload).to_bytes(8, "little")
        with sock:
            def send() -> None:
                sock.sendall(head)
                sock.sendall(payload)
                assert sock.recv(1) == ACK
            return _timed(send, reps)
    finally:
        _stop(proc)


def costs(payload: bytes, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """What the checks outside the measured push cost, on this machine."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    serde.encode(state)
    out["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    serde.digest(payload)
    out["sha256_s"] = time.perf_counter() - t0
    spec = serde.ParamSpec.from_state(state)
    asm = serde.Assembler(len(payload), len(payload))
    for piece in serde.chunks(payload):
        asm.add(piece)
    received = asm.finish()
    t0 = time.perf_counter()
    received.decode(expected_digest=None, spec=spec, reject_nonfinite=True)
    out["spec_and_nonfinite_checks_s"] = time.perf_counter() - t0
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mb", type=int, default=100, help="payload size in MiB of float32")
    ap.add_argument("--out", type=Path, default=Path("results/transport.json"))
    ap.add_argument("--sweep", action="store_true", help="also try other chunk sizes")
    ap.add_argument("--breakdown", action="store_true", help="also time bare gRPC stages")
    ap.add_argument("--serve-peer", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--serve-stage", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--serve-raw", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_peer:
        return serve_peer(Path(args.serve_peer[0]), int(args.serve_peer[1]),
                          args.serve_peer[2], int(args.serve_peer[3]))
    if args.serve_stage:
        pki_dir, stage, size = args.serve_stage
        return serve_stage(Path(pki_dir), stage, int(size))
    if args.serve_raw:
        return serve_raw(None if args.serve_raw == "-" else Path(args.serve_raw))

    n_tensors = N_TENSORS
    state = _state(args.mb)
    payload = serde.encode(state)
    with tempfile.TemporaryDirectory(prefix="swarmnode-bench-") as tmp:
        pki = Path(tmp)
        ca = create_ca(pki / "ca", "Bench CA")
        make_bundle([ca[0]], pki / "trust.pem")
        for name in ("sender", "receiver"):
            issue_node_cert(*ca, pki / name, name, dns=["localhost"], ips=["127.0.0.1"])
        runs = {
            "peer_push": bench_grpc(pki, payload, args.reps, serde.CHUNK_SIZE, False,
                                    mode="data", mb=args.mb),
            "peer_push_with_digest": bench_grpc(pki, payload, args.reps, serde.CHUNK_SIZE, True,
                                                mode="data", mb=args.mb),
            "grpc_mtls": bench_grpc(pki, payload, args.reps, serde.CHUNK_SIZE, False),
            "raw_tcp": bench_raw(pki, payload, args.reps, tls=False),
            "raw_tls": bench_raw(pki, payload, args.reps, tls=True),
        }
        sweep = {}
        if args.breakdown:
            for stage in STAGES:
                sweep[f"stage_{stage}"] = _summary(bench_stage(pki, payload, args.reps, stage),
                                                   len(payload))
        if args.sweep:
            for chunk in (256 << 10, 4 << 20):
                sweep[f"grpc_mtls_chunk_{chunk >> 10}KiB"] = _summary(
                    bench_grpc(pki, payload, args.reps, chunk, False), len(payload))
            sweep["grpc_mtls_sha_inline"] = _summary(
                bench_grpc(pki, payload, args.reps, serde.CHUNK_SIZE, False, inline_hash=True),
                len(payload))
    result: dict[str, object] = {name: _summary(s, len(payload)) for name, s in runs.items()}
    grpc_gbps = result["peer_push"]["gbps_median"]  # type: ignore[index]
    raw_gbps = result["raw_tcp"]["gbps_median"]  # type: ignore[index]
    ratio = raw_gbps / grpc_gbps
    result.update(sweep)
    result.update({
        "payload_bytes": len(payload),
        "tensors": n_tensors,
        "repetitions": args.reps,
        "chunk_bytes": serde.CHUNK_SIZE,
        "ratio_raw_tcp_over_peer_push": round(ratio, 3),
        "ratio_raw_tls_over_peer_push": round(
            result["raw_tls"]["gbps_median"] / grpc_gbps, 3),  # type: ignore[index]
        "target": {"min_gbps": 1.0, "max_ratio": 1.5,
                   "met": grpc_gbps >= 1.0 and ratio <= 1.5},
        "costs": costs(payload, state),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"payload {len(payload) / 1e6:.1f} MB, {args.reps} repetitions, median (best) GB/s:")
    for name in [*runs, *sweep]:
        r = result[name]
        print(f"  {name:<28} {r['gbps_median']:7.3f} ({r['gbps_best']:.3f})")  # type: ignore[index]
    print(f"  raw TCP / peer push ratio      {ratio:7.2f}  (target >= 1 GB/s and <= 1.5x: "
          f"{'met' if result['target']['met'] else 'missed'})")  # type: ignore[index]
    print(f"  costs outside the push: {result['costs']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
