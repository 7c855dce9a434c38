"""The committed contract artifact matches a fresh compile of the Solidity source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmnode.chain import compile as solc
from swarmnode.errors import ConfigError


@pytest.fixture(scope="module")
def fresh() -> dict:
    return solc.compile()


@pytest.mark.parametrize("path", [solc.ARTIFACT_PATH, solc.PACKAGED_ARTIFACT],
                         ids=["contracts", "package"])
def test_committed_artifact_matches_the_source(fresh: dict, path: Path) -> None:
    committed = json.loads(path.read_text(encoding="utf-8"))
    drift = [key for key in ("abi", "bytecode", "sourceSha256", "evmVersion", "compiler")
             if committed.get(key) != fresh[key]]
    assert not drift, (
        f"{path} is out of date with contracts/SwarmLearning.sol ({', '.join(drift)} differ); "
        "run `make artifact` and commit the result"
    )
    assert path.read_text(encoding="utf-8") == solc.dumps(fresh), "run `make artifact`"


def test_artifact_shape_and_pinned_compiler(fresh: dict) -> None:
    assert fresh["evmVersion"] == "prague"
    assert "0.8.37" in fresh["compiler"]
    names = {e["name"] for e in fresh["abi"] if e["type"] == "function"}
    assert {"checkin", "elect", "commitMerge", "reelect", "finish", "reportMetrics",
            "roundInfo", "nodeInfo", "participants", "checkinWeight"} <= names
    assert solc.load_artifact()["bytecode"] == fresh["bytecode"]


def test_compile_reports_solidity_errors() -> None:
    with pytest.raises(solc.SolcError, match="solc refused SwarmLearning.sol"):
        solc.compile("pragma solidity ^0.8.24; contract SwarmLearning { function f( }")


def test_missing_solc_package_is_actionable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SWARMNODE_SOLC_JS", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="SWARMNODE_SOLC_JS=.*does not exist"):
        solc.compile()
