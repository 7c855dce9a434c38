"""The dashboard's HTTP server (standard library only): the page, its script and style, and
``/api/status``. Read-only: GET and HEAD only, no parameters, nothing it serves changes
anything; every other method is answered 405.

The page is static; it takes its data from ``/api/status`` and puts every string into the
document as text (never as markup). The JSON escapes ``<``, ``>`` and ``&`` as well, and every
answer forbids sniffing, framing and any script, style or connection from elsewhere.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any

from swarmnode.dashboard.page import PAGE_CSS, PAGE_HTML, PAGE_JS
from swarmnode.dashboard.state import DashboardState
from swarmnode.httpd import BoundedHTTPServer

__all__ = ["DashboardServer", "to_json"]

log = logging.getLogger("swarmnode.dashboard")

_SECURITY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STATIC = {
    "/": ("text/html; charset=utf-8", PAGE_HTML),
    "/dashboard.js": ("text/javascript; charset=utf-8", PAGE_JS),
    "/dashboard.css": ("text/css; charset=utf-8", PAGE_CSS),
}


def to_json(data: Any) -> bytes:
    """Strict JSON (no NaN), with ``<``, ``>`` and ``&`` escaped: a string from the chain or a
    peer stays a string wherever the bytes end up."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"), sort_keys=True)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .encode())


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """A request's Host names this server: an IP address (a name bound to it by someone else's
    DNS cannot be one), ``localhost``, or a name the operator allowed. A browser lured to a page
    whose name later resolves here sends that name, and is refused."""
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", *allowed):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class DashboardServer:
    """Serves ``state`` on ``host:port`` (port 0: any free one; :attr:`port` once started)."""

    def __init__(self, host: str, port: int, state: DashboardState,
                 allowed_hosts: Iterable[str] = ()) -> None:
        self.host, self.port, self.state = host, port, state
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self._server: BoundedHTTPServer | None = None

    def start(self) -> int:
        state = self.state
        allowed = self.allowed_hosts

        class Handler(BaseHTTPRequestHandler):
            server_version = "swarmnode-dashboard"
            sys_version = ""

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                if code == 405:
                    self.send_header("Allow", "GET, HEAD")
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in _SECURITY.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if not host_allowed(self.headers.get("Host"), allowed):
                    # DNS rebinding: a page from elsewhere that renamed itself to this address
                    self._send(421, "application/json", to_json(
                        {"error": "this dashboard answers to an IP address or localhost (or a "
                                  "name given with --allow-host)"}))
                elif path in _STATIC:
                    ctype, text = _STATIC[path]
                    self._send(200, ctype, text.encode())
                elif path == "/api/status":
                    try:
                        code, data = 200, state.current()
                    except LookupError as exc:  # the chain never answered yet
                        code, data = 503, {"error": str(exc)}
                    self._send(code, "application/json", to_json(data))
                else:
                    self._send(404, "application/json", to_json(
                        {"error": f"no such page: {path[:100]} (the dashboard serves / and "
                                  "/api/status)"}))

            do_HEAD = do_GET  # noqa: N815

            def _read_only(self) -> None:
                self._send(405, "application/json", to_json(
                    {"error": f"{self.command} is not served: the dashboard is read-only"}))

            do_POST = do_PUT = do_DELETE = do_PATCH = _read_only  # noqa: N815
            do_OPTIONS = do_CONNECT = do_TRACE = _read_only  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("dashboard: %s %s", self.address_string(), format % args)

        self._server = BoundedHTTPServer((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="dashboard",
                         daemon=True).start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
