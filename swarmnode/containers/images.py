"""Build the images of a site (``node``, ``ml``, ``chain``) from ``docker/``, offline and cached.

1. the base image: Debian bookworm minbase + Python 3.11 (``tools/base-image.sh``), since no
   image registry is assumed; with one, pass ``base="python:3.11-slim"``;
2. the wheelhouse (``build/wheels``): every third-party wheel the images install, pinned by
   ``requirements.lock``, made once on the host (the CPU torch wheel included), so image builds
   need no package index; rebuilt only when the lock or ``pyproject.toml`` changes;
3. the swarmnode wheel (``build/dist``);
4. ``docker build`` per image, skipped when the image's ``org.swarmnode.inputs`` label already
   holds the hash of everything that goes into it (Dockerfile, wheelhouse, sources, base image).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from swarmnode import __version__
from swarmnode.errors import ConfigError, NodeError

__all__ = ["IMAGES", "BuiltImage", "build_images", "repo_root"]

log = logging.getLogger("swarmnode.containers")

IMAGES = ("chain", "node", "ml")
BASE_IMAGE = "swarmnode/base:bookworm"
LABEL = "org.swarmnode.inputs"
_SOURCE_SUFFIXES = (".py", ".json", ".proto", ".sol")


@dataclass(frozen=True)
class BuiltImage:
    name: str  # chain, node, ml
    tag: str
    size: int  # bytes
    built: bool  # False: the existing image was already current


def repo_root() -> Path:
    """The checkout this package runs from (it holds docker/ and compose/)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "docker" / "node" / "Dockerfile").exists():
        raise ConfigError(
            f"the container files (docker/, compose/) are not beside this installation ({root}); "
            "run from a checkout of the swarmnode repository"
        )
    return root


def tag_of(name: str) -> str:
    return f"swarmnode/{name}:{__version__}"


def _run(cmd: list[str], what: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        raise NodeError(f"{what} failed (exit {done.returncode}):\n  " + "\n  ".join(tail))
    return done.stdout


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _requirements(root: Path) -> dict[str, list[str]]:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    core = list(project["dependencies"])
    return {"ml": core, "node": core + list(project["optional-dependencies"]["node"])}


def ensure_wheelhouse(root: Path) -> Path:
    """build/wheels with every third-party wheel the images install (pinned by the lock)."""
    wheels = root / "build" / "wheels"
    reqs = _requirements(root)
    slim = root / "docker" / "slim.py"
    stamp = _digest([(root / "requirements.lock").read_bytes(),
                     (root / "pyproject.toml").read_bytes(), slim.read_bytes()])
    if (wheels / ".stamp").exists() and (wheels / ".stamp").read_text() == stamp:
        return wheels
    log.info("preparing the wheelhouse %s (pinned by requirements.lock)", wheels)
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    wanted = sorted(set(reqs["node"]) | set(reqs["ml"]))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w",
          str(wheels), "-c", str(root / "requirements.lock"), *wanted],
         "pip wheel (the images' wheelhouse)", root)
    shutil.copy(root / "requirements.lock", wheels / "constraints.txt")
    shutil.copy(slim, wheels / "slim.py")
    for name, specs in reqs.items():
        (wheels / f"{name}.txt").write_text("\n".join(specs) + "\n")
    (wheels / ".stamp").write_text(stamp)
    return wheels


def _sources(root: Path) -> list[Path]:
    files = [p for p in (root / "swarmnode").rglob("*")
             if p.suffix in _SOURCE_SUFFIXES and "__pycache__" not in p.parts]
    return sorted(files) + [root / "pyproject.toml", root / "README.md"]


def build_swarmnode_wheel(root: Path) -> Path:
    dist = root / "build" / "dist"
    if dist.exists():
        shutil.rmtree(dist)
    dist.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-w", str(dist), str(root)], "pip wheel swarmnode", root)
    shutil.rmtree(root / "build" / "lib", ignore_errors=True)  # setuptools' leftovers
    shutil.rmtree(root / "build" / f"bdist.linux-{os.uname().machine}", ignore_errors=True)
    return dist


def _inputs(root: Path, name: str, base_id: str, wheels: Path | None) -> str:
    parts = [name.encode(), base_id.encode(), (root / "docker" / name / "Dockerfile").read_bytes()]
    if name == "chain":
        parts += [(root / "docker/chain/healthcheck.py").read_bytes(),
                  (root / "docker/chain/logfilter.py").read_bytes(),
                  (root / "package-lock.json").read_bytes()]
    else:
        parts.append((root / "docker" / "swarmnode.sh").read_bytes())
        assert wheels is not None
        parts.append((wheels / ".stamp").read_bytes())
        parts += [str(p.relative_to(root)).encode() + b"\0" + p.read_bytes()
                  for p in _sources(root)]
    return _digest(parts)


def _label(tag: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", tag, "--format",
                           f'{{{{index .Config.Labels "{LABEL}"}}}}'],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _image_id(tag: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", tag, "--format", "{{.Id}}"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _size(tag: str) -> int:
    out = subprocess.run(["docker", "image", "inspect", tag, "--format", "{{.Size}}"],
                         capture_output=True, text=True).stdout.strip()
    return int(out or 0)


def build_images(names: Iterable[str] = IMAGES, base: str | None = None) -> list[BuiltImage]:
    """Build (or find current) the named images; returns each with its tag and size."""
    root = repo_root()
    base = base or BASE_IMAGE
    if base == BASE_IMAGE:
        _run(["bash", str(root / "tools" / "base-image.sh"), base], "building the base image",
             root)
    base_id = _run(["docker", "image", "inspect", base, "--format", "{{.Id}}"],
                   f"finding the base image {base}", root).strip()
    names = list(names)
    anvil = root / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
    if "chain" in names and not anvil.exists():
        raise ConfigError(f"{anvil} is missing; run `npm ci` (or `make setup`) first")
    wheels = ensure_wheelhouse(root) if set(names) - {"chain"} else None
    wheel_built = False
    out = []
    for name in names:
        tag = tag_of(name)
        inputs = _inputs(root, name, base_id, wheels)
        if _label(tag) == inputs:
            out.append(BuiltImage(name, tag, _size(tag), built=False))
            continue
        if name != "chain" and not wheel_built:
            build_swarmnode_wheel(root)
            wheel_built = True
        log.info("building %s", tag)
        previous = _image_id(tag)
        env = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder: no registry needed
        _run(["docker", "build", "-q", "-f", f"docker/{name}/Dockerfile", "--build-arg",
              f"BASE={base}", "--build-arg", f"INPUTS={inputs}", "-t", tag, "."],
             f"docker build of {tag}", root, env)
        if previous and previous != _image_id(tag):
            # the image this one replaces, and its untagged build steps: each rebuild would
            # otherwise leave about a gigabyte behind (vfs keeps every layer in full)
            subprocess.run(["docker", "image", "rm", previous], capture_output=True, text=True)
        out.append(BuiltImage(name, tag, _size(tag), built=True))
    return out


def main() -> None:
    """``python -m swarmnode.containers.images [NAME...]`` (what `make images` runs)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from swarmnode.containers.engine import ensure_engine

    ensure_engine()
    for img in build_images(sys.argv[1:] or IMAGES):
        state = "built" if img.built else "current"
        print(f"{img.tag:<24} {img.size / 1e6:8.0f} MB  {state}")


if __name__ == "__main__":
    main()
