"""The committed contract artifacts match a fresh compile of the Solidity sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmnode.chain import compile as solc
from swarmnode.errors import ConfigError

MAX_RUNTIME = 20_480  # each contract's runtime: EIP-170's 24,576 less 4 KiB of room


@pytest.fixture(scope="module")
def fresh() -> dict[str, dict]:
    return solc.compile()


@pytest.mark.parametrize("name", solc.CONTRACT_NAMES)
@pytest.mark.parametrize("where", ["contracts", "package"])
def test_committed_artifact_matches_the_source(fresh: dict, name: str, where: str) -> None:
    path = solc.ARTIFACT_PATH(name) if where == "contracts" else solc._packaged(name)
    committed = json.loads(path.read_text(encoding="utf-8"))
    drift = [key for key in ("abi", "bytecode", "runtimeBytes", "sourceSha256", "evmVersion",
                             "compiler") if committed.get(key) != fresh[name][key]]
    assert not drift, (
        f"{path} is out of date with contracts/ ({', '.join(drift)} differ); "
        "run `make artifact` and commit the result"
    )
    assert path.read_text(encoding="utf-8") == solc.dumps(fresh[name]), "run `make artifact`"


def test_artifact_shape_and_pinned_compiler(fresh: dict) -> None:
    assert set(fresh) == set(solc.CONTRACT_NAMES) == {"SwarmRegistry", "SwarmTraining"}
    for name, artifact in fresh.items():
        assert artifact["contractName"] == name
        assert artifact["evmVersion"] == "prague"
        assert "0.8.37" in artifact["compiler"]
        assert solc.load_artifact(name)["bytecode"] == artifact["bytecode"]
        assert 0 < artifact["runtimeBytes"] <= MAX_RUNTIME, (name, artifact["runtimeBytes"])
    training = {e["name"] for e in fresh["SwarmTraining"]["abi"] if e["type"] == "function"}
    assert {"join", "checkin", "elect", "commitMerge", "reelect", "draw", "finish",
            "reportFinalMetrics", "markAbsent", "absentCandidates", "waitingFor",
            "electionDue", "reelectDue", "roundInfo", "nodeInfo", "participants",
            "checkinWeight", "registry"} <= training
    assert "reportMetrics" not in training  # metrics ride on checkin and finish
    assert not {"authorize", "revoke", "enroll"} & training  # the registry's
    registry = {e["name"] for e in fresh["SwarmRegistry"]["abi"] if e["type"] == "function"}
    assert {"admin", "authorize", "revoke", "enroll", "updateEndpoint", "setPublicKey",
            "siteFlags", "siteInfo", "siteList", "addTraining", "trainings"} <= registry
    # reverts are custom errors, not strings built on chain
    for artifact in fresh.values():
        assert any(e["type"] == "error" for e in artifact["abi"])


def test_load_artifact_refuses_an_unknown_contract() -> None:
    with pytest.raises(ConfigError, match="no contract called 'SwarmLearning'"):
        solc.load_artifact("SwarmLearning")


def test_compile_reports_solidity_errors() -> None:
    sources = {"ISwarmRegistry.sol": "pragma solidity ^0.8.24; interface I {}",
               "SwarmRegistry.sol": "pragma solidity ^0.8.24; contract SwarmRegistry {}",
               "SwarmTraining.sol":
                   "pragma solidity ^0.8.24; contract SwarmTraining { function f( }"}
    with pytest.raises(solc.SolcError, match="solc refused the contracts"):
        solc.compile(sources)


def test_missing_solc_package_is_actionable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SWARMNODE_SOLC_JS", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="SWARMNODE_SOLC_JS=.*does not exist"):
        solc.compile()
