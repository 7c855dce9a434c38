"""Reading a node's Prometheus metrics port (swarmnode.node.metrics) for the dashboard.

A target is what the operator names (``--metrics SITE=HOST:PORT``) or a site's peer endpoint host
on one port for every site (``--metrics-port``). A scrape has a short timeout and a size limit
(the answer comes from another site's machine: read as untrusted text, never evaluated); what it
finds is summed up in a few numbers, or the state ``unreachable`` with the reason.
"""

from __future__ import annotations

import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from swarmnode.errors import ConfigError

__all__ = ["MetricsTarget", "parse_exposition", "parse_target", "scrape", "scrape_all",
           "summarize"]

MAX_BYTES = 1 << 20  # a node's exposition is a few KiB
_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class MetricsTarget:
    """``site``: a site's name (as the page shows it) or its address; ``url``: its /metrics."""

    site: str
    url: str


def _url(where: str, what: str) -> str:
    """``HOST:PORT`` or an http(s) URL as the URL of a metrics port."""
    text = where.strip()
    if not text.startswith(("http://", "https://")):
        text = f"http://{text}"
    parsed = urlparse(text)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise ConfigError(f"{what}: {where!r} is not HOST:PORT (a node's metrics_listen, "
                          "e.g. 10.0.0.5:9464) or an http:// URL")
    return text if parsed.path not in ("", "/") else f"{text.rstrip('/')}/metrics"


def parse_target(text: str) -> MetricsTarget:
    """``SITE=HOST:PORT`` (``--metrics``): the site by its name or address."""
    site, sep, where = text.partition("=")
    if not sep or not site.strip():
        raise ConfigError(f"--metrics {text!r}: write SITE=HOST:PORT, e.g. "
                          "hospital-1=10.0.0.5:9464 (the site's name or address, and its "
                          "node's metrics_listen)")
    return MetricsTarget(site.strip(), _url(where, f"--metrics {text!r}"))


def endpoint_target(site: str, endpoint: str, port: int) -> MetricsTarget:
    """The metrics port ``port`` on the host of a site's peer endpoint (``--metrics-port``)."""
    host = endpoint.rpartition(":")[0].strip("[]") or endpoint
    host = f"[{host}]" if ":" in host else host
    return MetricsTarget(site, f"http://{host}:{port}/metrics")


def _value(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float | None]]:
    """The samples of a text exposition (name, labels, value; NaN and Inf as None). ValueError
    naming the first line that is not one."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            # the line itself is not echoed: the answer may be anything the target serves
            raise ValueError(f"line {number} is not a Prometheus sample: not a node's metrics")
        labels = {k: re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], v)
                  for k, v in _LABEL.findall(m.group(2) or "")}
        samples.append((m.group(1), labels, _value(m.group(3))))
    return samples


def summarize(samples: list[tuple[str, dict[str, str], float | None]]) -> dict[str, Any]:
    """What the page shows of a node's metrics (absent ones as None)."""
    plain: dict[str, float | None] = {}
    out: dict[str, Any] = {"stage": None, "bytes_sent": None, "bytes_received": None}
    for name, labels, value in samples:
        if name == "swarmnode_stage" and value == 1:
            out["stage"] = labels.get("stage")
        elif name == "swarmnode_peer_bytes_total" and labels.get("direction") in ("sent",
                                                                                    "received"):
            out[f"bytes_{labels['direction']}"] = value
        elif not labels:
            plain[name] = value
    requests = plain.get("swarmnode_chain_requests_total")
    seconds = plain.get("swarmnode_chain_request_seconds_total")
    out.update(
        round=plain.get("swarmnode_round"),
        rounds_total=plain.get("swarmnode_rounds_total"),
        finished=plain.get("swarmnode_finished"),
        last_commit_age_seconds=plain.get("swarmnode_last_commit_age_seconds"),
        site_loss=plain.get("swarmnode_site_loss"),
        site_metric=plain.get("swarmnode_site_metric"),
        chain_requests_total=requests,
        chain_errors_total=plain.get("swarmnode_chain_errors_total"),
        chain_latency_seconds=(seconds / requests if requests and seconds is not None
                               else None),
    )
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A metrics port that answers with a redirect is not followed: the target comes from a
    site's endpoint on chain, and a redirect would send the dashboard anywhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# no proxy from the environment, no redirects
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _read(reply: Any, deadline: float) -> bytes:
    """The answer's body, up to MAX_BYTES + 1, by the deadline (a byte a second does not
    hold the page)."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_BYTES:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not arrive in time")
        chunk = reply.read1(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def scrape(url: str, timeout: float) -> dict[str, Any]:
    """``{"state": "ok", "url", ...summary}`` or ``{"state": "unreachable", "url", "error"}``."""
    deadline = time.monotonic() + timeout
    try:
        with _OPENER.open(url, timeout=timeout) as reply:
            body = _read(reply, deadline)
        if len(body) > MAX_BYTES:
            raise ValueError(f"answered more than {MAX_BYTES} bytes: not a node's metrics")
        summary = summarize(parse_exposition(body.decode("utf-8")))
    except urllib.error.HTTPError as exc:  # a redirect too (not followed)
        return {"state": "unreachable", "url": url, "error": f"HTTP {exc.code}"}
    except (OSError, ValueError) as exc:  # refused, timed out, not Prometheus text
        reason = getattr(exc, "reason", None) or exc
        return {"state": "unreachable", "url": url, "error": str(reason)[:200]}
    return {"state": "ok", "url": url, "error": None, **summary}


def scrape_all(targets: Mapping[str, str], timeout: float) -> dict[str, dict[str, Any]]:
    """Every target (key -> URL) at once: an unreachable site costs ``timeout``, not one each."""
    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        futures = {key: pool.submit(scrape, url, timeout) for key, url in targets.items()}
        return {key: f.result() for key, f in futures.items()}
