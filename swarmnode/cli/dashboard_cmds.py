"""`swarmnode dashboard`: a read-only page for one training (swarmnode.dashboard)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from swarmnode.cli.common import SiteContract, SiteRpcUrl, command, console, site_defaults
from swarmnode.errors import ChainError, ConfigError

if TYPE_CHECKING:
    from swarmnode.chain.client import SwarmContract

__all__ = ["register"]

DEFAULT_LISTEN = "127.0.0.1:8780"


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN}; port 0: "
                          "any free one)")
    return host, int(port)


@command
def dashboard(
    contract: SiteContract = None,
    rpc_url: SiteRpcUrl = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Show the last N rounds.")] = 20,
    names: Annotated[Path | None, typer.Option(
        "--names", help="CSV with name and address columns (the consortium's sites.csv): "
        "sites by name. Without it, a site is named by its endpoint's host.")] = None,
    listen: Annotated[str, typer.Option(
        "--listen", envvar="SWARMNODE_DASHBOARD_LISTEN",
        help="HOST:PORT to serve the page on (plain HTTP; keep it on loopback or behind "
        "your own proxy).")] = DEFAULT_LISTEN,
    interval: Annotated[float, typer.Option(
        "--interval", min=0.5, help="Seconds between reads of the chain (shared by every "
        "open page).")] = 2.0,
    metrics: Annotated[list[str] | None, typer.Option(
        "--metrics", help="SITE=HOST:PORT: that site's node metrics port (its node.yaml "
        "metrics_listen; the port is in its health.json). Repeatable.")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", envvar="SWARMNODE_DASHBOARD_METRICS_PORT", min=1, max=65535,
        help="Every site's metrics on this port of its peer endpoint's host (sites on one "
        "network, e.g. containers on the consortium network).")] = None,
    scrape_timeout: Annotated[float, typer.Option(
        "--scrape-timeout", min=0.1, help="Seconds to wait for a node's metrics before showing "
        "it unreachable.")] = 1.5,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="A host name the page may be opened under (behind your own proxy, "
        "say). IP addresses and localhost always work; other names are refused, so that a web "
        "page elsewhere cannot read this one by pointing its own name here. Repeatable.")] = None,
) -> None:
    """Serve one read-only page for the training: sites and their states, the current round
    and what it waits for, leaders and digests, each site's loss and metric per round, and
    the nodes' metrics where reachable (in a site's folder, the training and chain its kit
    names)."""
    from swarmnode.chain.overview import read_names
    from swarmnode.dashboard.scrape import parse_target
    from swarmnode.dashboard.server import DashboardServer
    from swarmnode.dashboard.state import DashboardState, read_status

    host, port = _listen(listen)
    targets = [parse_target(t) for t in metrics or []]

    def connect() -> SwarmContract:
        from swarmnode.chain.client import SwarmContract

        w3, address, _ = site_defaults(rpc_url, contract, names)
        return SwarmContract.resolve(w3, address)

    names_file = names if contract and rpc_url else _kit_names(rpc_url, contract, names)
    by_address = read_names(names_file) if names_file is not None else None
    try:  # a bad flag fails now; a chain or training not up yet is read once it is
        first: SwarmContract | None = connect()
    except ChainError as exc:
        first = None
        console.print(f"[yellow]{exc}[/]; serving anyway: the page shows the training once the "
                      "chain answers", highlight=False, soft_wrap=True)
    state = DashboardState(lambda: first or connect(), interval=interval,
                           read=lambda c: read_status(
                               c, rounds=rounds, names=by_address, targets=targets,
                               metrics_port=metrics_port, scrape_timeout=scrape_timeout))
    server = DashboardServer(host, port, state, allow_host or ())
    try:
        bound = server.start()
    except OSError as exc:
        raise ConfigError(f"cannot serve on {listen}: {exc.strerror or exc}; pick another "
                          "--listen HOST:PORT") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"dashboard on http://{shown}:{bound}/ (read-only; Ctrl-C stops it)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


def _kit_names(rpc_url: str | None, contract: str | None,
                   names: Path | None) -> Path | None:
    """The names file a site folder's kit gives (the sentinel's sites.csv), without
    connecting."""
    from swarmnode.site_chain import site_chain

    site = site_chain(Path.cwd())
    return names or (site.names if site is not None else None)


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)

