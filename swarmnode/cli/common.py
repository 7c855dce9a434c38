"""Shared pieces of the CLI: the error boundary, output formats, the common options."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from swarmnode.errors import SwarmError

console = Console()
err_console = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


RpcUrl = Annotated[
    str,
    typer.Option("--rpc-url", envvar="SWARMNODE_RPC_URL", help="Chain JSON-RPC URL."),
]
ContractAddress = Annotated[
    str,
    typer.Option(
        "--contract", envvar="SWARMNODE_CONTRACT", help="The training's contract address, or "
        "the consortium's registry address for the one training it runs."
    ),
]
Format = Annotated[
    OutputFormat, typer.Option("--format", help="Output as a rich table or as JSON.")
]
DEFAULT_RPC_URL = "http://127.0.0.1:8545"
# status, audit, report: run in a site's folder, they take both from its kit (swarmnode.site_chain)
SiteRpcUrl = Annotated[str | None, typer.Option(
    "--rpc-url", envvar="SWARMNODE_RPC_URL", help="Chain JSON-RPC URL (default: the one the "
    f"site folder's kit names, as this host reaches it; else {DEFAULT_RPC_URL}).")]
SiteContract = Annotated[str | None, typer.Option(
    "--contract", envvar="SWARMNODE_CONTRACT", help="The training's contract address, or the "
    "consortium's registry address for the one training it runs (default: the site folder's "
    "kit's training).")]


def site_defaults(rpc_url: str | None, contract: str | None,
                  names: Path | None = None) -> tuple[Any, str, Path | None]:
    """The chain (a connected Web3), the training and the site names for status, audit and
    report: the options given, else what the kit in the current folder names (a site's folder:
    its .env's RPC_URL as this host reaches it, CONTRACT, and the sentinel's sites.csv)."""
    from swarmnode.chain.rpc import connect
    from swarmnode.errors import ConfigError
    from swarmnode.site_chain import site_chain

    tls = None
    if rpc_url is None or contract is None:
        site = site_chain(Path.cwd())
        if site is not None:
            if rpc_url is None:
                rpc_url, tls = site.rpc_url, site.tls
            contract = contract or site.contract
            names = names or site.names
    if contract is None:
        raise ConfigError("no training given: pass --contract ADDRESS (or set "
                          "SWARMNODE_CONTRACT), or run this in a site's folder (its kit names it)")
    return connect(rpc_url or DEFAULT_RPC_URL, tls=tls), contract, names


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn a SwarmError into one red line on stderr and its exit code; no traceback."""
    try:
        yield
    except SwarmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run the command body inside :func:`errors_to_exit`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with errors_to_exit():
            return fn(*args, **kwargs)

    return wrapper
