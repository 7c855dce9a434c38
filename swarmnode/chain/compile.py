"""Compile the contracts (``contracts/SwarmRegistry.sol``, ``contracts/SwarmTraining.sol``) and
load the committed artifacts.

The compiler is npm ``solc`` (solcjs 0.8.37) driven through ``tools/solc.js``, a small Node front
end that py-solc-x can use as its ``solc_binary``. ``python -m swarmnode.chain.compile --write``
(``make artifact``) regenerates ``contracts/<Name>.json`` for each contract and the copies packaged
with ``swarmnode.chain``; a test recompiles and fails when a committed artifact drifts from the
sources.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from swarmnode.errors import ConfigError

__all__ = [
    "ARTIFACT_PATH",
    "CONTRACT_NAMES",
    "EVM_VERSION",
    "SOURCES",
    "SolcError",
    "compile",
    "load_artifact",
    "main",
    "solc_binary",
]

CONTRACT_NAMES = ("SwarmRegistry", "SwarmTraining")
EVM_VERSION = "prague"
REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = REPO_ROOT / "contracts"
# every source file the contracts are built from (interfaces included)
SOURCES = ("ISwarmRegistry.sol", "SwarmRegistry.sol", "SwarmTraining.sol")
SOLC_JS = REPO_ROOT / "tools" / "solc.js"


class SolcError(ConfigError):
    """The Solidity compiler is missing or refused the source."""


def solc_binary() -> Path:
    """The ``tools/solc.js`` front end, after checking that node and the solc package exist."""
    if shutil.which("node") is None:
        raise SolcError("`node` is not on PATH; install Node.js 20+ to compile the contract")
    if not SOLC_JS.is_file():
        raise SolcError(
            f"{SOLC_JS} is missing; compiling needs a source checkout of swarmnode "
            "(an installed package only loads the committed artifact)"
        )
    override = os.environ.get("SWARMNODE_SOLC_JS")
    if override:
        if not Path(override).exists():
            raise SolcError(
                f"SWARMNODE_SOLC_JS={override} does not exist; point it at an npm solc package"
            )
    elif not (REPO_ROOT / "node_modules" / "solc" / "package.json").is_file():
        raise SolcError(
            f"npm solc is not installed under {REPO_ROOT / 'node_modules'}; run `make setup` "
            "(npm ci) or set SWARMNODE_SOLC_JS to a solc package directory"
        )
    return SOLC_JS


def ARTIFACT_PATH(name: str) -> Path:  # noqa: N802 - a path per contract
    """Where the committed artifact of contract ``name`` lives in a source checkout."""
    return CONTRACTS_DIR / f"{name}.json"


def _packaged(name: str) -> Path:
    return Path(__file__).resolve().parent / f"{name}.json"


def _read_sources() -> dict[str, str]:
    return {f: (CONTRACTS_DIR / f).read_text(encoding="utf-8") for f in SOURCES}


def _sources_sha(sources: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name].encode("utf-8") + b"\0")
    return h.hexdigest()


def _standard_input(sources: dict[str, str]) -> dict[str, Any]:
    return {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sources.items()},
        "settings": {
            "optimizer": {"enabled": True, "runs": 200},
            "viaIR": True,
            "evmVersion": EVM_VERSION,
            "metadata": {"bytecodeHash": "none"},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object",
                                             "evm.deployedBytecode.object"]}},
        },
    }


def compile(sources: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:  # noqa: A001
    """Compile the contracts (default: the files of ``SOURCES`` under ``contracts/``).

    Returns ``{name: {contractName, abi, bytecode, runtimeBytes, compiler, evmVersion,
    sourceSha256}}`` for each of ``CONTRACT_NAMES``; ``runtimeBytes`` is the deployed code's size
    (EIP-170 allows 24,576).
    """
    import solcx
    from solcx.exceptions import SolcError as SolcxError

    if sources is None:
        sources = _read_sources()
    binary = solc_binary()
    try:
        out = solcx.compile_standard(_standard_input(sources), solc_binary=binary)
        version = str(solcx.wrapper.get_version_str_from_solc_binary(binary))
    except SolcxError as exc:
        detail = exc.message if exc.return_code == 0 else (exc.stderr_data or exc.message)
        raise SolcError(f"solc refused the contracts:\n{detail}") from None
    except OSError as exc:
        raise SolcError(f"could not run {binary}: {exc}; is it executable?") from None
    sha = _sources_sha(sources)
    artifacts = {}
    for name in CONTRACT_NAMES:
        contract = out["contracts"][f"{name}.sol"][name]
        runtime = contract["evm"]["deployedBytecode"]["object"]
        artifacts[name] = {
            "contractName": name,
            "abi": contract["abi"],
            "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
            "runtimeBytes": len(runtime) // 2,
            "compiler": f"solc {version} (npm solcjs, via-IR, optimizer 200 runs)",
            "evmVersion": EVM_VERSION,
            "sourceSha256": sha,
        }
    return artifacts


def dumps(artifact: dict[str, Any]) -> str:
    """The artifact as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def load_artifact(name: str = "SwarmTraining") -> dict[str, Any]:
    """The committed compiled artifact of contract ``name`` (from the source tree, else the
    packaged copy)."""
    if name not in CONTRACT_NAMES:
        raise ConfigError(f"no contract called {name!r}; the contracts are {CONTRACT_NAMES}")
    path = ARTIFACT_PATH(name)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        try:
            text = resources.files("swarmnode.chain").joinpath(f"{name}.json").read_text(
                encoding="utf-8"
            )
        except FileNotFoundError:
            raise ConfigError(
                f"the compiled contract {name}.json is missing; run `make artifact`"
            ) from None
    try:
        artifact = json.loads(text)
        artifact["abi"], artifact["bytecode"]  # noqa: B018 - presence check
    except (ValueError, KeyError):
        raise ConfigError(
            f"the compiled contract {path} is not a valid artifact; run `make artifact`"
        ) from None
    return artifact


def main(argv: list[str] | None = None) -> int:
    """``python -m swarmnode.chain.compile [--write]``: compile, and optionally write artifacts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the committed artifacts")
    args = parser.parse_args(argv)
    try:
        artifacts = compile()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for name, artifact in artifacts.items():
        text = dumps(artifact)
        if args.write:
            for path in (ARTIFACT_PATH(name), _packaged(name)):
                path.write_text(text, encoding="utf-8")
                print(f"wrote {path}")
        print(f"{name}: {artifact['runtimeBytes']} bytes of runtime code (EIP-170: 24,576), "
              f"{artifact['compiler']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
