"""Fixtures of the container tests: a real Docker engine (installed and started when none runs,
stopped again only if these tests started it) and the three images, built offline and cached."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmnode.containers.engine import Engine, ensure_engine
from swarmnode.containers.images import IMAGES, BuiltImage, build_images, repo_root

RESULTS = repo_root() / "results" / "containers.json"


def record(key: str, value: object) -> None:
    """Add ``key`` to results/containers.json (timings and sizes of the container tests) when
    asked to (``SWARMNODE_RECORD_RESULTS=1``): a test run does not rewrite tracked files.
    Printed either way (``pytest -s`` shows it)."""
    print(f"containers result {key}: {json.dumps(value, sort_keys=True)}")
    if os.environ.get("SWARMNODE_RECORD_RESULTS") != "1":
        return
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    started = ensure_engine()
    yield started
    started.stop()


@pytest.fixture(scope="session")
def images(engine: Engine) -> list[BuiltImage]:
    t0 = time.monotonic()
    built = build_images(IMAGES)
    seconds = time.monotonic() - t0
    record("images", {
        "seconds": round(seconds, 1),
        "rebuilt": [b.name for b in built if b.built],
        "sizes_mb": {b.name: round(b.size / 1e6) for b in built},
    })
    return built


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "consortium"
