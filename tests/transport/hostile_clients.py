"""A process that holds connections to a data port, the way an outsider would (run as a script).

    python hostile_clients.py MODE HOST PORT COUNT SOURCES [CERT KEY TRUST]

MODE: ``tcp`` (no certificate: connects, sends the first bytes of a TLS record, then nothing),
``hello`` (a real ClientHello with CERT from a CA the node does not trust, then nothing: the
handshake never finishes), ``unenrolled`` (a complete handshake with CERT from the node's CA
whose address is not enrolled, then no request). COUNT connections are spread over SOURCES
loopback addresses (127.0.0.2, 127.0.0.3, ...); each one that the node drops is opened again
after 0.2 s. Prints ``ready`` once COUNT are open at once, then holds them until stdin closes,
and prints ``opened N dropped M`` at exit. ``hello`` without CERT sends a ClientHello with no
certificate to follow. ``HOSTILE_ALPN=h2,swarmnode-data/1`` in the environment: connection i
offers the i-th of those protocols (round robin) in its ClientHello (a one-port node routes by
it); unset: no ALPN.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import sys
import threading


def main() -> None:
    mode, host, port, count, sources = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
        int(sys.argv[4]), int(sys.argv[5])
    contexts: list[ssl.SSLContext | None] = [None]
    if mode in ("hello", "unenrolled"):
        contexts = []
        for alpn in os.environ.get("HOSTILE_ALPN", "").split(",") if os.environ.get(
                "HOSTILE_ALPN") else [""]:
            made = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            made.check_hostname = False
            made.verify_mode = ssl.CERT_NONE  # an attacker does not care who answers
            if len(sys.argv) > 7:
                made.load_cert_chain(sys.argv[6], sys.argv[7])
            if alpn:
                made.set_alpn_protocols([alpn])
            contexts.append(made)
    stop = threading.Event()
    lock = threading.Lock()
    state = {"open": 0, "opened": 0, "dropped": 0}
    ready = threading.Event()

    def hold(i: int) -> None:
        source = f"127.0.0.{2 + i % sources}"
        ctx = contexts[i % len(contexts)]
        while not stop.is_set():
            try:
                raw = socket.create_connection((host, port), timeout=30,
                                               source_address=(source, 0))
            except OSError:
                stop.wait(0.2)  # ends at once when the holding is over
                continue
            sock: socket.socket = raw
            try:
                if mode == "tcp":
                    raw.sendall(b"\x16\x03\x01")  # a handshake record's first bytes, no more
                elif mode == "hello":
                    assert ctx is not None
                    raw.setblocking(False)
                    sock = ctx.wrap_socket(raw, do_handshake_on_connect=False)
                    try:
                        sock.do_handshake()  # sends the ClientHello, then we never go on
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
                else:
                    assert ctx is not None
                    sock = ctx.wrap_socket(raw)  # the node's CA: the handshake completes
                    sock.setblocking(False)
                with lock:
                    state["open"] += 1
                    state["opened"] += 1
                    if state["open"] >= count:
                        ready.set()
                try:
                    while not stop.is_set():  # hold until the node drops it
                        if select.select([sock], [], [], 0.5)[0]:
                            if not socket.socket.recv(sock, 65536):
                                break
                except OSError:
                    pass
                with lock:
                    state["open"] -= 1
                    state["dropped"] += 0 if stop.is_set() else 1
            except (OSError, ssl.SSLError):
                pass
            finally:
                sock.close()  # wrap_socket took raw's descriptor over
            stop.wait(0.2)

    threads = [threading.Thread(target=hold, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    if ready.wait(60):
        print("ready", flush=True)
    else:
        print(f"only {state['open']} of {count} connections open", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    print(f"opened {state['opened']} dropped {state['dropped']}", flush=True)


if __name__ == "__main__":
    main()
