"""A small read-only HTTP server that a hostile client cannot tie up: the node's metrics port and
the dashboard serve through it.

``ThreadingHTTPServer`` alone gives every connection a thread of its own for as long as the
client likes (a request line sent a byte a minute holds one forever) and takes any number of
them. Here a connection has ``timeout`` seconds between reads (the handler's socket timeout),
at most ``max_connections`` are served at once (more are closed at once, before a byte is read:
threads and memory stay bounded, and one that holds a slot without sending loses it within
``idle_timeout_s``), and an IPv6 host (``::1``) binds an IPv6 socket.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["BoundedHTTPServer", "IDLE_TIMEOUT_S", "MAX_CONNECTIONS"]

IDLE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256


class BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 max_connections: int = MAX_CONNECTIONS,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        # the handler's socket timeout: a client silent this long is dropped
        handler = type(handler.__name__, (handler,), {"timeout": idle_timeout_s})
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed before a byte is read
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
