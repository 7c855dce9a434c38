"""`swarmnode consortium` (the admin) and `swarmnode site` (each site): a consortium from one file,
each site's keys made where they stay (see :mod:`swarmnode.provision`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swarmnode.cli.common import command, console

__all__ = ["register"]

consortium_app = typer.Typer(
    help="The admin's side: a consortium CA, the training spec and every site's kit, from one "
    "consortium file.",
    no_args_is_help=True,
)
site_app = typer.Typer(
    help="A site's side: its keys and certificate request (made here, never sent), then the "
    "kit the admin sends back.",
    no_args_is_help=True,
)

ConsortiumPath = Annotated[Path, typer.Argument(help="The consortium file (YAML).")]
AdminDir = Annotated[Path | None, typer.Option(
    "--admin-dir", help="The admin's folder (CA key, kits); default: admin/ next to the file.")]


@consortium_app.command("init")
@command
def init(path: ConsortiumPath, admin_dir: AdminDir = None) -> None:
    """Make the consortium CA (kept if it exists), the trust bundle, the training spec and, on a
    dev chain, the consortium's admin account (a fresh key, kept if it exists)."""
    from swarmnode.provision import consortium_init

    done = consortium_init(path, admin_dir)
    console.print(f"consortium CA   {done.ca_cert}{' (new)' if done.created_ca else ''}; its key "
                  "stays next to it (mode 0600)")
    console.print(f"trust bundle    {done.trust}")
    console.print(f"training spec   {done.spec}")
    if done.admin_address is not None:
        new = " (new)" if done.created_admin else ""
        console.print(f"chain admin     {done.admin_address}{new}: a fresh key, not a dev "
                      f"account; keystore {done.admin_keystore} and its "
                      "password next to it (mode 0600); the sentinel's kit carries it for the "
                      "deploy service")
    console.print("next: each site runs `swarmnode site request --name SITE` in its own folder "
                  "and sends you SITE.request.json; then `swarmnode consortium sign "
                  f"{path} REQUEST...`")


@consortium_app.command("sign")
@command
def sign(
    path: ConsortiumPath,
    requests: Annotated[list[Path], typer.Argument(help="Every site's SITE.request.json.")],
    admin_dir: AdminDir = None,
    reissue: Annotated[list[str] | None, typer.Option(
        "--reissue", help="Sign this site a new certificate (again for several sites); without "
        "it a site's certificate signed before is kept, so the fingerprint the chain authorised "
        "stays valid.")] = None,
    rpc_url: Annotated[str | None, typer.Option(
        "--rpc-url", help="The dev chain as this machine reaches it: authorise the re-issued "
        "certificates there now (else the command that does is printed).")] = None,
) -> None:
    """Check and sign every site's request; write each site's kit (send SITE's kit to SITE)."""
    from swarmnode.provision import consortium_sign, reauthorize, reauthorize_command

    kits = consortium_sign(path, requests, admin_dir, reissue=reissue or ())
    for kit in kits:
        role = " (sentinel: runs the dev chain and deploys the contract)" if kit.sentinel else ""
        new = " NEW CERTIFICATE" if kit.reissued else ""
        console.print(f"kit for {kit.site:<16} {kit.path}  account {kit.address}{role}{new}",
                      highlight=False, soft_wrap=True)
    reissued = [k for k in kits if k.reissued]
    if reissued and rpc_url is not None:
        for line in reauthorize(path, reissued, rpc_url, admin_dir):
            console.print(line, highlight=False, soft_wrap=True)
    elif reissued:
        console.print("the chain still authorises the old certificates of "
                      f"{', '.join(k.site for k in reissued)}: their nodes are refused until it "
                      "authorises the new ones. The sentinel's deploy service does at its next "
                      "`docker-compose up -d` (after `swarmnode site install` of its new kit); "
                      "or run now, where the sentinel's chain runs:", highlight=False,
                      soft_wrap=True)
        for kit in reissued:
            print(reauthorize_command(path, kit, admin_dir), flush=True)
    console.print("next: send each site its kit folder (certificates and settings, no private "
                  "key); the site runs `swarmnode site install KIT` and `docker-compose up -d`")


@consortium_app.command("training")
@command
def training(
    path: ConsortiumPath,
    spec: Annotated[Path, typer.Option("--spec", help="The next training's spec (`swarmnode "
                                       "spec`).")],
    rpc_url: Annotated[str | None, typer.Option(
        "--rpc-url", envvar="SWARMNODE_RPC_URL", help="The chain as this machine reaches it "
        "(default: the consortium file's chain.rpc_url).")] = None,
    admin_dir: AdminDir = None,
    keystore: Annotated[Path | None, typer.Option(
        "--keystore", help="Real networks: the registry admin's keystore (a dev chain: the one "
        "`consortium init` made).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        "--password-file", help="That keystore's password file.")] = None,
    grace: Annotated[int | None, typer.Option(
        "--grace", min=0, help="Seconds after the first check-in before a quorum may elect "
        "(default: the consortium file's training.grace_s).")] = None,
    deadline: Annotated[int | None, typer.Option(
        "--deadline", min=1, help="Seconds a leader has to commit (default: the consortium "
        "file's training.deadline_s).")] = None,
) -> None:
    """The consortium's next training: deployed on its registry (the sites are authorised
    there already), every site's kit updated to name it."""
    from swarmnode.provision import consortium_training

    done = consortium_training(path, spec, rpc_url=rpc_url, admin_dir=admin_dir,
                              keystore=keystore, password_file=password_file, grace_s=grace,
                              deadline_s=deadline)
    console.print(f"training {done.training} deployed by {done.admin} on the registry "
                  f"{done.registry} (min peers {done.min_peers}); no site authorised again",
                  highlight=False, soft_wrap=True)
    for kit in done.kits:
        console.print(f"kit updated     {kit}", highlight=False, soft_wrap=True)
    console.print("next: send each site its kit folder again; the site runs `swarmnode site "
                  "install KIT`, puts the training's train.py in app/, then `docker-compose up "
                  "-d`", highlight=False, soft_wrap=True)


@site_app.command("request")
@command
def request(
    name: Annotated[str, typer.Option("--name", help="This site's name in the consortium file.")],
    site_dir: Annotated[Path, typer.Option("--dir", help="This site's folder.")] = Path("."),
    host: Annotated[str | None, typer.Option(
        "--host", help="The DNS name other sites dial (default: the name).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace this site's existing keys (the old ones are lost).")] = False,
) -> None:
    """Make this site's TLS key, certificate request and chain account, here."""
    from swarmnode.provision import site_request

    done = site_request(name, site_dir, host=host, force=force)
    console.print(f"TLS key         {done.key} (mode 0600, stays here)")
    console.print(f"chain account   {done.address}; keystore {done.keystore} (mode 0600, "
                  "stays here)")
    console.print(f"send the admin  {done.request} (the request and the address; no key)")


@site_app.command("install")
@command
def install(
    kit: Annotated[Path, typer.Argument(help="The kit folder the admin sent.")],
    site_dir: Annotated[Path, typer.Option("--dir", help="This site's folder.")] = Path("."),
) -> None:
    """Check the admin's kit against this site's key and install it; then docker-compose up."""
    from swarmnode.provision import site_install

    done = site_install(kit, site_dir)
    console.print(f"installed the kit of {done.site} in {site_dir}"
                  f"{' (the sentinel)' if done.sentinel else ''}")
    for p in done.not_chowned:
        console.print(f"[yellow]run `sudo chown 10001 {p}`: the node container's user reads it[/]")
    if done.kept:
        console.print(f"kept this site's own settings in {site_dir / '.env'}: "
                      f"{', '.join(done.kept)}")
    if done.replaced:
        console.print(f"[yellow]the kit sets {', '.join(done.replaced)} in {site_dir / '.env'}: "
                      "this site's own values of them were replaced[/]")
    order = ("first: its project runs the chain the others wait for" if done.sentinel
             else "once the sentinel's is up")
    console.print(f"next: your training script as {site_dir / 'app' / 'train.py'} (or "
                  f"SCRIPT=NAME.py in {site_dir / '.env'}, with your script's own settings), "
                  f"its data in {site_dir / 'data'} (the script reads it at /data), `make "
                  f"images` in the swarmnode checkout (once per host), then `docker-compose up "
                  f"-d` in {site_dir} ({order})")


@site_app.command("training")
@command
def training_beside(
    kit: Annotated[Path, typer.Argument(help="The kit the admin sent for that training.")],
    project: Annotated[str, typer.Option(
        "--project", help="A short name for the training's compose project (SITE-NAME), "
        "written in SITE_DIR/NAME.")],
    site_dir: Annotated[Path, typer.Option("--dir", help="This site's folder.")] = Path("."),
    peer_port: Annotated[int | None, typer.Option(
        "--peer-port", help="Separate hosts: the port other sites dial for this training "
        "(published; the data plane takes the next one).")] = None,
) -> None:
    """Run the kit's training beside the one this site's folder runs: its own compose project,
    the same certificate and chain account (no new authorisation)."""
    from swarmnode.site_training import site_training

    done = site_training(kit, site_dir, project, peer_port)
    console.print(f"training {done.contract} for {done.site} as compose project {done.project} "
                  f"in {done.folder}; other sites dial it at {done.endpoint}", highlight=False,
                  soft_wrap=True)
    for p in done.not_chowned:
        console.print(f"[yellow]run `sudo chown 10001 {p}`: the node containers' user writes "
                      "the account's nonce lock there[/]")
    console.print(f"next: the training's train.py in {done.folder / 'app'}, then `docker-compose "
                  f"up -d` in {done.folder} (the site's own project keeps running)",
                  highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(consortium_app, name="consortium")
    app.add_typer(site_app, name="site")
