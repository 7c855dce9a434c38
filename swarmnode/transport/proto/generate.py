"""Regenerate ``*_pb2.py`` / ``*_pb2_grpc.py`` from the ``.proto`` files beside this module.

``python -m swarmnode.transport.proto.generate`` rewrites them in place; a test regenerates into a
temporary directory and compares. The files are compiled relative to the package root (so their
descriptor names, ``swarmnode/transport/proto/peer.proto``, cannot clash with another package's
``peer.proto``) and their imports are made package-relative, so they work wherever the package is
installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

__all__ = ["PROTOS", "generate"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the directory that holds the `swarmnode` package
PROTOS = ("peer.proto", "local.proto")
_PACKAGE = "swarmnode.transport.proto"


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto into ``out_dir``; returns the files written."""
    from grpc_tools import protoc  # a build-time tool: imported only here

    out_dir = Path(out_dir)
    tmp = out_dir / "_protoc"
    tmp.mkdir(parents=True, exist_ok=True)
    rel = [str((HERE / name).relative_to(ROOT)) for name in PROTOS]
    args = ["protoc", f"-I{ROOT}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", *rel]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(rel)}")
    written = []
    for src in sorted((tmp / _PACKAGE.replace(".", "/")).glob("*_pb2*.py")):
        text = re.sub(
            rf"^from {re.escape(_PACKAGE)} import (\w+_pb2) as",
            r"from . import \1 as",
            src.read_text(),
            flags=re.M,
        )
        dest = out_dir / src.name
        dest.write_text(text)
        written.append(dest)
    for path in sorted(tmp.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    tmp.rmdir()
    return written


if __name__ == "__main__":
    for path in generate(HERE):
        sys.stdout.write(f"wrote {path}\n")
