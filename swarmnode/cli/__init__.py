"""The ``swarmnode`` command line.

Each command body parses its flags, calls one library function, and turns a :class:`SwarmError`
into one clear line on stderr and the error's exit code (see :mod:`swarmnode.errors`). Command
groups live one per module in this package; this module only assembles them. Nothing in the
library imports ``swarmnode.cli``.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="swarmnode",
    help="Swarm learning without a central server: chain-coordinated rounds, mTLS exchange.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module registers its commands on `app` when imported (register(app)).
_COMMAND_MODULES = ["chain_cmds", "certs_cmds", "node_cmds", "provision_cmds", "dashboard_cmds"]


def _load() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # a command group not built yet in this checkout
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(app)


_load()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="swarmnode")
