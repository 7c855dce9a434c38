"""Prometheus metrics of a node service: the text exposition format on a port of its own.

Off by default (node.yaml ``metrics_listen``, e.g. ``0.0.0.0:9464``). Plain HTTP, read-only, no
parameters: what it shows (the round and its stage, timings, byte counts, the site's last loss) is
what ``swarmnode status`` shows anyone with chain access, never a parameter or a key; bind it to
an address only the site's monitoring reaches.

Names follow Prometheus conventions (``swarmnode_..._seconds``, ``_bytes_total``). Values are
read from the service when scraped (gauges, counters kept by the transports and the chain
client), except the per-stage round timings, which the service observes into a histogram at the
end of every round.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

from swarmnode.httpd import BoundedHTTPServer

__all__ = ["Histogram", "MetricsServer", "counter", "gauge", "render"]

log = logging.getLogger("swarmnode.node")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# (name, type, help, [(suffix, labels, value)]): a histogram's samples are its _bucket, _sum and
# _count series; the others' suffix is ""
Sample = tuple[str, Mapping[str, str], float]
Family = tuple[str, str, str, list[Sample]]


def gauge(name: str, text: str, value: float, **labels: str) -> Family:
    return (name, "gauge", text, [("", labels, value)])


def counter(name: str, text: str, value: float, **labels: str) -> Family:
    return (name, "counter", text, [("", labels, value)])


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The text exposition format of ``families`` (one family per name: samples of the same
    name are merged under one HELP/TYPE)."""
    merged: dict[str, Family] = {}
    for name, kind, text, samples in families:
        if name in merged:
            merged[name][3].extend(samples)
        else:
            merged[name] = (name, kind, text, list(samples))
    out = []
    for name, kind, text, samples in merged.values():
        help_text = text.replace("\\", "\\\\").replace("\n", "\\n")  # no quotes escaped
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            out.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")
    return "\n".join(out) + "\n"


class Histogram:
    """A Prometheus histogram by one label (a stage), observed from any thread."""

    def __init__(self, name: str, text: str, label: str,
                 buckets: tuple[float, ...] = STAGE_BUCKETS) -> None:
        self.name, self.text, self.label, self.buckets = name, text, label, buckets
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, key: str, value: float) -> None:
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def family(self) -> Family:
        samples: list[Sample] = []
        with self._lock:
            for key in sorted(self._counts):
                counts = self._counts[key]
                for bound, n in zip(self.buckets, counts, strict=False):
                    samples.append(("_bucket", {self.label: key, "le": _number(bound)}, n))
                samples.append(("_bucket", {self.label: key, "le": "+Inf"}, counts[-1]))
                samples.append(("_sum", {self.label: key}, self._sums[key]))
                samples.append(("_count", {self.label: key}, counts[-1]))
        return (self.name, "histogram", self.text, samples)


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free one; :attr:`port` after start)."""

    def __init__(self, host: str, port: int, collect: Callable[[], list[Family]]) -> None:
        self.host, self.port, self.collect = host, port, collect
        self._server: BoundedHTTPServer | None = None

    def start(self) -> int:
        collect = self.collect

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render(collect()).encode()
                except Exception as exc:  # a scrape must not take the node down
                    log.exception("metrics: collecting failed")
                    self.send_error(500, f"collecting metrics failed: {type(exc).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # scrapes every few seconds would drown the node's log

        self._server = BoundedHTTPServer((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics (Prometheus) on http://%s:%d/metrics", self.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
