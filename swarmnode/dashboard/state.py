"""What the dashboard shows, read from the chain and the nodes' metrics ports: one JSON object.

Its keys are those of ``swarmnode status --format json`` (:meth:`Overview.to_json`, the same
function, so the same numbers), plus:

- ``site_rounds``: each site's loss and metric per round (:func:`swarmnode.chain.report.collect`,
  what ``swarmnode report`` writes);
- ``silent``: the sites the contract would let anyone mark absent now (its own rule:
  ``absentCandidates``, missed rounds and silent past the round deadline, or silent for several
  deadlines);
- ``colours``: a colour per site, the report plot's (the same in every run); ``chart``: the
  report's log-axis ratio;
- ``waiting_text``: what the current round waits for, the line a waiting node logs;
- ``metrics``: by site address, what its node's metrics port shows, or ``unreachable`` and why;
  ``metrics_unmatched``: ``--metrics`` sites that are no site of this training (yet);
- ``dashboard``: when it was read, the refresh interval, and ``error`` (the chain unreachable:
  the last good read is kept and its age shown).

Reads are shared: however many pages poll, the chain is read at most once per interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarmnode.chain.client import SwarmContract
from swarmnode.dashboard.scrape import MetricsTarget, endpoint_target, scrape_all
from swarmnode.errors import SwarmError

__all__ = ["DashboardState", "read_status"]

log = logging.getLogger("swarmnode.dashboard")


def read_status(contract: SwarmContract, *, rounds: int = 20, names: dict[str, str] | None = None,
                targets: Sequence[MetricsTarget] = (), metrics_port: int | None = None,
                scrape_timeout: float = 1.5) -> dict[str, Any]:
    """One read of everything the page shows (see the module's docstring)."""
    from swarmnode.chain.overview import overview
    from swarmnode.chain.report import LOG_RATIO, collect, site_colours

    view = overview(contract, last_rounds=rounds, names=names)
    data = view.to_json()
    data["site_rounds"] = [
        {"round": r.round, "site": r.site, "address": r.address, "loss": r.loss,
         "metric": r.metric}
        for r in collect(contract, names)
    ]
    data["colours"] = site_colours([*view.names.values(),
                                    *(r["site"] for r in data["site_rounds"])])
    data["chart"] = {"log_ratio": LOG_RATIO}  # the report's rule: a log loss axis past it
    data["silent"] = [] if view.training_finished else list(contract.absent_candidates())
    data["waiting_text"] = None if view.waiting is None else view.waiting.describe(view.now)
    urls: dict[str, str] = {}
    if metrics_port is not None:
        for n in view.nodes:
            urls[n.address] = endpoint_target(n.address, n.endpoint, metrics_port).url
    by_key = {a.lower(): a for a in view.names} | {
        name.lower(): a for a, name in view.names.items()}
    unmatched = []
    for t in targets:
        address = by_key.get(t.site.lower())
        if address is None:
            unmatched.append(t.site)
        else:
            urls[address] = t.url
    data["metrics"] = scrape_all(urls, scrape_timeout)
    data["metrics_unmatched"] = unmatched
    return data


@dataclass
class DashboardState:
    """The latest read, refreshed when older than ``interval`` s; ``connect`` gives the training
    (called again after a failure: the chain or the contract may come up after the dashboard)."""

    connect: Callable[[], SwarmContract]
    interval: float = 2.0
    read: Callable[[SwarmContract], dict[str, Any]] = read_status
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _contract: SwarmContract | None = None
    _last: dict[str, Any] | None = None
    _read_at: float = 0.0
    _error: str | None = None

    def current(self) -> dict[str, Any]:
        """The latest read (``dashboard.error`` says why it is not fresh), or a LookupError with
        the reason when nothing was ever read."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.interval or self._last is None:
                self._refresh()
            if self._last is None:
                raise LookupError(self._error or "nothing read yet")
            meta = {"read_at": self._last["dashboard"]["read_at"], "interval_s": self.interval,
                    "error": self._error}
            return {**self._last, "dashboard": meta}

    def _refresh(self) -> None:
        self._read_at = time.monotonic()
        try:
            if self._contract is None:
                self._contract = self.connect()
            data = self.read(self._contract)
        except (SwarmError, OSError) as exc:  # the chain down, the training not deployed yet
            self._error = f"cannot read the chain: {exc}"
            log.warning("dashboard: %s", self._error)
            return
        except Exception as exc:  # a page must not take the dashboard down
            self._error = f"reading the chain failed: {type(exc).__name__}: {exc}"
            log.exception("dashboard: reading the chain failed")
            return
        data["dashboard"] = {"read_at": int(time.time())}
        self._last, self._error = data, None
