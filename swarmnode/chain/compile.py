"""Compile ``contracts/SwarmLearning.sol`` and load the committed artifact.

The compiler is npm ``solc`` (solcjs 0.8.37) driven through ``tools/solc.js``, a small Node front
end that py-solc-x can use as its ``solc_binary``. ``python -m swarmnode.chain.compile --write``
(``make artifact``) regenerates ``contracts/SwarmLearning.json`` and the copy packaged with
``swarmnode.chain``; a test recompiles and fails when the committed artifact drifts from the source.
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
    "CONTRACT_NAME",
    "EVM_VERSION",
    "PACKAGED_ARTIFACT",
    "SOURCE_PATH",
    "SolcError",
    "compile",
    "load_artifact",
    "main",
    "solc_binary",
]

CONTRACT_NAME = "SwarmLearning"
EVM_VERSION = "prague"
REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_PATH = REPO_ROOT / "contracts" / f"{CONTRACT_NAME}.sol"
ARTIFACT_PATH = REPO_ROOT / "contracts" / f"{CONTRACT_NAME}.json"
PACKAGED_ARTIFACT = Path(__file__).resolve().parent / f"{CONTRACT_NAME}.json"
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


def _standard_input(source: str) -> dict[str, Any]:
    return {
        "language": "Solidity",
        "sources": {f"{CONTRACT_NAME}.sol": {"content": source}},
        "settings": {
            "optimizer": {"enabled": True, "runs": 200},
            "viaIR": True,
            "evmVersion": EVM_VERSION,
            "metadata": {"bytecodeHash": "none"},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
        },
    }


def compile(source: str | None = None) -> dict[str, Any]:  # noqa: A001 - the natural name here
    """Compile the contract source (default: ``contracts/SwarmLearning.sol``) to an artifact.

    Returns ``{abi, bytecode, compiler, evmVersion, sourceSha256}``.
    """
    import solcx
    from solcx.exceptions import SolcError as SolcxError

    if source is None:
        source = SOURCE_PATH.read_text(encoding="utf-8")
    binary = solc_binary()
    try:
        out = solcx.compile_standard(_standard_input(source), solc_binary=binary)
        version = str(solcx.wrapper.get_version_str_from_solc_binary(binary))
    except SolcxError as exc:
        detail = exc.message if exc.return_code == 0 else (exc.stderr_data or exc.message)
        raise SolcError(f"solc refused {CONTRACT_NAME}.sol:\n{detail}") from None
    except OSError as exc:
        raise SolcError(f"could not run {binary}: {exc}; is it executable?") from None
    contract = out["contracts"][f"{CONTRACT_NAME}.sol"][CONTRACT_NAME]
    return {
        "contractName": CONTRACT_NAME,
        "abi": contract["abi"],
        "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
        "compiler": f"solc {version} (npm solcjs, via-IR, optimizer 200 runs)",
        "evmVersion": EVM_VERSION,
        "sourceSha256": hashlib.sha256(source.encode("utf-8")).hexdigest(),
    }


def dumps(artifact: dict[str, Any]) -> str:
    """The artifact as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def load_artifact() -> dict[str, Any]:
    """The committed compiled artifact (from the source tree, else the packaged copy)."""
    if ARTIFACT_PATH.is_file():
        text = ARTIFACT_PATH.read_text(encoding="utf-8")
    else:
        try:
            text = resources.files("swarmnode.chain").joinpath(PACKAGED_ARTIFACT.name).read_text(
                encoding="utf-8"
            )
        except FileNotFoundError:
            raise ConfigError(
                f"the compiled contract {ARTIFACT_PATH.name} is missing; run `make artifact`"
            ) from None
    try:
        artifact = json.loads(text)
        artifact["abi"], artifact["bytecode"]  # noqa: B018 - presence check
    except (ValueError, KeyError):
        raise ConfigError(
            f"the compiled contract {ARTIFACT_PATH} is not a valid artifact; run `make artifact`"
        ) from None
    return artifact


def main(argv: list[str] | None = None) -> int:
    """``python -m swarmnode.chain.compile [--write]``: compile, and optionally write artifacts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the committed artifacts")
    args = parser.parse_args(argv)
    try:
        artifact = compile()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    text = dumps(artifact)
    if args.write:
        for path in (ARTIFACT_PATH, PACKAGED_ARTIFACT):
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    size = (len(artifact["bytecode"]) - 2) // 2
    print(f"{CONTRACT_NAME}: {size} bytes of init code, {artifact['compiler']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
