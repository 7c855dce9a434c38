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
                          "benchmarks"], cwd=ROOT, capture_output=True, text=True)
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
