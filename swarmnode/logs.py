"""The node service's log lines: one per event, each with the site, the round and the stage.

``plain`` (default)::

    2026-11-28 16:02:11,482 hospital-2 round=12 stage=push INFO round 12: pushed to hospital-1

``json`` (``--log-format json`` / ``SWARMNODE_LOG_FORMAT=json``), one object per line::

    {"ts": "2026-11-28T16:02:11.482Z", "level": "INFO", "site": "hospital-2", "round": 12,
     "stage": "push", "logger": "swarmnode.node", "msg": "round 12: pushed to hospital-1"}

The round and stage are the node's own progress when the line is written (``-`` before the first
round). To follow one round across a site's containers: ``docker-compose logs --no-log-prefix
node | grep ' round=12 '`` or, with JSON, ``... | jq -c 'select(.round == 12)'``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, Protocol

__all__ = ["FORMATS", "setup_logging"]

FORMATS = ("plain", "json")


class _Progress(Protocol):
    round: int
    stage: str


class _Context(logging.Filter):
    """Adds ``site``, ``round`` and ``stage`` to every record (from the node's progress)."""

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site
        self.progress: _Progress | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        p = self.progress
        record.site = self.site
        record.round = getattr(p, "round", 0) or "-"
        record.stage = getattr(p, "stage", "") or "-"
        return True


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "site": getattr(record, "site", None),
            "round": getattr(record, "round", None),
            "stage": getattr(record, "stage", None),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if out["round"] == "-":
            out["round"] = None
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str, site: str) -> _Context:
    """Configure the root logger; returns the context whose ``progress`` the node sets."""
    if fmt not in FORMATS:
        from swarmnode.errors import ConfigError

        raise ConfigError(f"log format {fmt!r}: choose one of {', '.join(FORMATS)}")
    context = _Context(site)
    handler = logging.StreamHandler()
    handler.addFilter(context)
    if fmt == "json":
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(site)s round=%(round)s stage=%(stage)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return context
