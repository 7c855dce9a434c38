"""The node service's log lines: site, round and stage on every line, plain or JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from swarmnode.errors import ConfigError
from swarmnode.logs import setup_logging


@pytest.fixture()
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _capture(fmt: str) -> tuple[io.StringIO, object]:
    context = setup_logging("INFO", fmt, "hospital-9")
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    return stream, context


@pytest.mark.usefixtures("root_logging")
def test_json_lines_carry_site_round_and_stage() -> None:
    stream, context = _capture("json")
    log = logging.getLogger("swarmnode.node")
    log.info("enrolled")  # before the node has a round
    context.progress = SimpleNamespace(round=12, stage="push")  # type: ignore[attr-defined]
    log.warning("round %d: pushed to %s", 12, "hospital-1")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["site"] == "hospital-9" and first["round"] is None and first["msg"] == "enrolled"
    assert second == {**second, "site": "hospital-9", "round": 12, "stage": "push",
                      "level": "WARNING", "logger": "swarmnode.node",
                      "msg": "round 12: pushed to hospital-1"}
    assert second["ts"].endswith("Z")


@pytest.mark.usefixtures("root_logging")
def test_plain_lines_carry_site_round_and_stage() -> None:
    stream, context = _capture("plain")
    context.progress = SimpleNamespace(round=3, stage="pull")  # type: ignore[attr-defined]
    logging.getLogger("swarmnode.node").info("round 3: pulled")
    assert " hospital-9 round=3 stage=pull INFO round 3: pulled" in stream.getvalue()


def test_an_unknown_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="plain, json"):
        setup_logging("INFO", "xml", "x")
