"""The ``swarmnode`` console script: the CLI, or one clear line when the node extra is missing.

The training side (``SwarmCallback``, the integrations) installs without the CLI's dependencies
(``pip install swarmnode``); the CLI and the node service need ``pip install 'swarmnode[node]'``.
"""

from __future__ import annotations

import sys

_NODE_EXTRA = ("typer", "rich", "web3", "eth_account", "yaml", "pydantic")


def main() -> None:
    try:
        from swarmnode.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in _NODE_EXTRA:
            sys.stderr.write(
                f"error: the swarmnode command needs the node extra ({exc.name} is not "
                "installed); install it with: pip install 'swarmnode[node]'\n"
            )
            raise SystemExit(10) from None
        raise
    cli_main()
