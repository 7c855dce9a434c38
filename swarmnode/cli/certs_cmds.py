"""`swarmnode certs`: CAs, node certificates, trust bundles, and what a certificate holds."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from swarmnode.cli.common import Format, OutputFormat, command, console, print_json

__all__ = ["register"]

certs_app = typer.Typer(
    help="X.509 identities: a consortium or organisation CA, node certificates, trust bundles.",
    no_args_is_help=True,
)

Force = Annotated[
    bool, typer.Option("--force", help="Overwrite existing files (the old key is lost).")
]


def _written(what: str, cert: Path, key: Path) -> None:
    from swarmnode.identity import describe

    info = describe(cert)
    console.print(f"{what} [bold]{info.subject}[/]")
    console.print(f"  certificate  {cert}")
    console.print(f"  key          {key} (mode 0600)")
    console.print(f"  sha256       {info.fingerprint.hex()}")
    console.print(f"  valid until  {info.not_after:%Y-%m-%d %H:%M} UTC")


@certs_app.command("ca")
@command
def ca(
    out: Annotated[Path, typer.Option("--out", help="Directory for <name>.pem and <name>.key.")],
    name: Annotated[str, typer.Option("--name", help="The CA's common name.")],
    org: Annotated[str | None, typer.Option("--org", help="Organisation name.")] = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 3650,
    force: Force = False,
) -> None:
    """Create a CA (EC P-256) for a consortium or one organisation."""
    from swarmnode.identity import create_ca

    cert, key = create_ca(out, name, org=org, days=days, force=force)
    _written("CA", cert, key)


@certs_app.command("issue")
@command
def issue(
    name: Annotated[str, typer.Argument(help="The node's name (certificate common name).")],
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The issuing CA's certificate.")],
    ca_key: Annotated[Path, typer.Option("--ca-key", help="The issuing CA's key.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for <name>.pem and <name>.key.")],
    dns: Annotated[
        list[str] | None,
        typer.Option("--dns", help="A DNS name other sites use to reach the node (repeatable)."),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="An IP address other sites use to reach the node (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 825,
    force: Force = False,
) -> None:
    """Issue a node certificate (serverAuth + clientAuth) signed by a CA."""
    from swarmnode.identity import issue_node_cert

    cert, key = issue_node_cert(
        ca_cert, ca_key, out, name, dns=dns or [], ips=ip or [], days=days, force=force
    )
    _written("node certificate", cert, key)
    console.print("  next: the swarm admin authorises it with "
                  f"`swarmnode authorize ADDRESS --cert {cert}`")


@certs_app.command("show")
@command
def show(
    cert: Annotated[Path, typer.Argument(help="A certificate or bundle (PEM).")],
    fmt: Format = OutputFormat.table,
) -> None:
    """Subject, issuer, SANs, validity and SHA-256 fingerprint of each certificate in a file."""
    from swarmnode.identity import describe_all

    infos = describe_all(cert)
    if fmt is OutputFormat.json:
        print_json(infos[0].to_json() if len(infos) == 1 else [i.to_json() for i in infos])
        return
    now = dt.datetime.now(dt.UTC)
    for info in infos:
        table = Table(show_header=False, title=str(cert), title_justify="left", box=None)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        left = (info.not_after - now).days
        state = "expired" if now > info.not_after else (
            "not yet valid" if now < info.not_before else f"{left} days left"
        )
        table.add_row("subject", info.subject)
        table.add_row("issuer", info.issuer)
        table.add_row("CA", "yes" if info.is_ca else "no")
        table.add_row("DNS", ", ".join(info.dns) or "-")
        table.add_row("IP", ", ".join(info.ips) or "-")
        table.add_row("not before", f"{info.not_before:%Y-%m-%d %H:%M} UTC")
        table.add_row("not after", f"{info.not_after:%Y-%m-%d %H:%M} UTC ({state})")
        table.add_row("sha256", info.fingerprint.hex())
        console.print(table)


@certs_app.command("bundle")
@command
def bundle(
    ca_certs: Annotated[list[Path], typer.Argument(help="CA certificates to trust together.")],
    out: Annotated[Path, typer.Option("--out", help="The trust bundle to write (PEM).")],
) -> None:
    """Write a trust bundle: the CAs of every organisation in the swarm."""
    from swarmnode.identity import describe_all, make_bundle

    path = make_bundle(ca_certs, out)
    infos = describe_all(path)
    console.print(f"trust bundle {path}: {len(infos)} CA(s)")
    for info in infos:
        console.print(f"  {info.subject}  sha256 {info.fingerprint.hex()[:16]}...")


def register(app: typer.Typer) -> None:
    """Add the ``certs`` command group to the ``swarmnode`` app."""
    app.add_typer(certs_app, name="certs")
