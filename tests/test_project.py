"""Project-wide promises: lint clean, the error tree's exit codes, no pickle on untrusted bytes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from swarmnode import errors

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "swarmnode", "tests",
                          "benchmarks", "examples"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_error_has_help_and_its_own_exit_code() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.SwarmError)]
    assert len(classes) >= 15
    codes = {}
    for cls in classes:
        assert cls.help and "help" in vars(cls), f"{cls.__name__} has no help text of its own"
        assert cls.exit_code not in codes, f"{cls.__name__} reuses {codes.get(cls.exit_code)}"
        codes[cls.exit_code] = cls.__name__
        assert errors.error_class(cls.__name__) is cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the tree"
    assert errors.error_class("NoSuchError") is errors.SwarmError
    assert errors.__all__ == sorted(errors.__all__)


def test_no_pickle_or_unsafe_torch_load_in_the_package() -> None:
    bad = []
    for path in (ROOT / "swarmnode").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pickle\.loads?\(|torch\.load\((?!.*weights_only=True)", line):
                bad.append(f"{path.relative_to(ROOT)}:{n}")
    assert not bad, bad


def test_the_training_side_loads_no_chain_or_cli_code() -> None:
    """`pip install swarmnode` (no extra) is the training side: the callback, the adapters and
    the local API client must import without web3, solc, the contract code or the CLI's
    packages, which only the node extra installs."""
    code = (
        "import sys, swarmnode.callback, swarmnode.healthcheck\n"
        "own = {'web3', 'eth_account', 'eth_tester', 'solcx', 'typer', 'rich', 'yaml', "
        "'pydantic', 'docker'}\n"
        "bad = {m for m in sys.modules if m.split('.')[0] in own}\n"
        # the adapters load their framework (which brings its own yaml or rich), nothing of ours
        "import swarmnode.integrations.hf, swarmnode.integrations.lightning\n"
        "bad |= {m for m in sys.modules if m.split('.')[0] in {'web3', 'solcx', 'typer', "
        "'docker'} or m.startswith(('swarmnode.chain', 'swarmnode.cli', 'swarmnode.node'))}\n"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the training side imports {out.stdout.strip()}"


def test_the_training_side_dependencies_are_only_those_it_imports() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert names == {"torch", "numpy", "safetensors", "grpcio", "protobuf", "cryptography"}
    lock = {line.split("==")[0].lower() for line in (ROOT / "requirements.lock").read_text()
            .splitlines() if "==" in line}
    for extra, deps in project["optional-dependencies"].items():
        for dep in deps:
            name = re.split(r"[<>=\[ ]", dep)[0].lower()
            assert name == "swarmnode" or name in lock, f"{extra}: {name} is not pinned in the lock"
