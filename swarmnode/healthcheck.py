"""The node service's health, for a container healthcheck: ``python -m swarmnode.healthcheck``.

Healthy means: the node service wrote ``DATA_DIR/health.json`` once it was enrolled on chain and
serving (it removes the file when it stops), the process that wrote it is alive, and its peer API
accepts TCP connections. Standard library only, so a check every few seconds costs milliseconds.
The data dir comes from the first argument or ``SWARMNODE_DATA_DIR``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

HEALTH_FILE = "health.json"


def check(data_dir: Path) -> str | None:
    """None when healthy, else what is wrong."""
    path = data_dir / HEALTH_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path} does not exist: the node service has not enrolled and started serving yet"
    except (OSError, ValueError) as exc:
        return f"cannot read {path}: {exc}"
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return f"the node service (pid {info['pid']}) that wrote {path} is gone"
    except PermissionError:
        pass  # alive, run by another user
    try:
        with socket.create_connection(("127.0.0.1", int(info["peer_port"])), timeout=3):
            pass
    except OSError as exc:
        return f"the peer API on port {info['peer_port']} does not accept connections: {exc}"
    return None


def main() -> None:
    data_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "SWARMNODE_DATA_DIR", "swarm-data"))
    problem = check(data_dir)
    if problem:
        print(f"unhealthy: {problem}")
        sys.exit(1)
    print("healthy")


if __name__ == "__main__":
    main()
