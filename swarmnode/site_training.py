"""A site's training beside the one its folder runs: its own compose project.

A site runs the training its kit names with ``docker-compose up -d`` in its folder. To take part in
another training of the consortium at the same time (``swarmnode consortium training`` deployed
it on the registry; the admin sent the kits again), it gives that training a compose project of
its own in a subfolder::

    swarmnode site training KIT --dir site --project b     # then: docker-compose up -d in site/b

``site/b/`` holds the project's ``.env`` and compose files and ``app/`` (that training's
``train.py``); the certificate, key, keystore and data stay where they are (``../``). The project's
node container is another node of the same site: the same certificate and chain account, so the
registry's one authorisation (and one revocation) counts for both trainings, and no new
authorisation, funding or certificate is needed. What differs:

* the project name (``SITE-NAME``): its own containers and volumes (merged models, socket, output);
* the endpoint other sites dial, enrolled in that training only: on one host
  ``NAME.SITE.CONSORTIUM:7441`` on the shared consortium network (the site's certificate names
  ``*.SITE.CONSORTIUM`` on one host); on separate hosts the site's own host name with other
  ports (``--peer-port P`` published, the data plane on ``P + 1``), to open to the other sites;
* no chain and no deploy service: the site's own project runs them (the sentinel).

Both node containers sign with the site's one account: they take turns with its nonces through a
lock in the site's ``chain/tx-lock/``, which ``compose.keystore.yaml`` mounts in each.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmnode.errors import ConfigError
from swarmnode.provision import (
    ACCOUNT_LOCK_DIR,
    KIT_FORMAT,
    _give_to_node_user,
    _sha256,
    account_lock_dir,
)

__all__ = ["ProjectResult", "site_training"]

_PROJECT = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
#: The site folder's own entries: a project may not take their names
_RESERVED = {"app", "certs", "chain", "consortium", "data", "kit", "admin-chain"}


@dataclass(frozen=True)
class ProjectResult:
    site: str
    project: str  # the compose project's name
    folder: Path
    contract: str
    endpoint: str
    not_chowned: list[Path]


def _env_of(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line and not line.startswith("#"))


def _checked_kit(kit: Path, site_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The kit's manifest and settings: a kit for this site, unchanged since the admin made it,
    with the certificate and trust bundle the site installed (checked against its key then)."""
    try:
        manifest = json.loads((kit / "kit.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != KIT_FORMAT:
        raise ConfigError(f"{kit} holds no site kit (kit.json from `swarmnode consortium sign`)")
    for rel, digest in manifest["files"].items():
        p = kit / rel
        if not p.is_file() or _sha256(p) != digest:
            raise ConfigError(f"kit file {p} is missing or changed since the kit was made; ask "
                              "the admin for the kit again")
    name = manifest["site"]
    installed = _env_of(site_dir / ".env")
    if installed.get("SITE") != name:
        raise ConfigError(f"{site_dir} holds no installed kit of {name}: a training beside "
                          f"another runs in the folder of a site that installed its kit first "
                          f"(`swarmnode site install KIT --dir {site_dir}`)")
    for rel in (f"certs/{name}.pem", "certs/trust.pem"):
        if (kit / rel).read_bytes() != (site_dir / rel).read_bytes():
            raise ConfigError(f"the kit's {rel} is not the one {site_dir} installed: install the "
                              f"kit first (`swarmnode site install KIT --dir {site_dir}`, which "
                              "checks it against the site's key); the training beside it then "
                              "uses the same certificate")
    return manifest, _env_of(kit / ".env")


def site_training(kit_dir: Path, site_dir: Path, project: str,
                  peer_port: int | None = None) -> ProjectResult:
    """Write ``site_dir/project/``: the kit's training as its own compose project beside the
    training the site's folder runs (see the module's docstring)."""
    kit, site_dir = Path(kit_dir), Path(site_dir)
    if not _PROJECT.match(project) or project in _RESERVED:
        raise ConfigError(f"project {project!r}: use lower-case letters, digits and '-' (at most "
                          f"24), not one of the site folder's own ({', '.join(sorted(_RESERVED))})")
    manifest, env = _checked_kit(kit, site_dir)
    name, contract = manifest["site"], env["CONTRACT"]
    folder = site_dir / project
    for other in [site_dir, *(p.parent for p in site_dir.glob("*/.env") if p.parent != folder)]:
        if _env_of(other / ".env").get("CONTRACT", "").lower() == contract.lower():
            raise ConfigError(f"{other} already runs training {contract}; a site takes part in a "
                              "training once (the training beside it is another one: `swarmnode "
                              "consortium training` deploys it and the admin sends the kits again)")
    one_host = "PEER_PUBLISH" not in env
    if one_host:
        if peer_port is not None:
            raise ConfigError("--peer-port is for sites on separate hosts; on one host the "
                              "training's node is dialled under its own name, on the same port")
        alias = f"{project}.{name}.{manifest['consortium']}"
        endpoint = f"{alias}:7441"
        reach = [f"PEER_ALIAS={alias}", f"PEER_ENDPOINT={endpoint}"]
    else:
        host, _, own = env["PEER_ENDPOINT"].rpartition(":")
        taken = {int(own), int(own) + 1}
        if peer_port is None or not 1 <= peer_port < 65535 or {peer_port, peer_port + 1} & taken:
            raise ConfigError(
                f"a training beside another at {host} needs ports of its own: pass --peer-port P "
                f"(not {own} or {int(own) + 1}, the site's own project's; e.g. "
                f"{int(own) + 2}); the data plane takes P + 1; open both to the other sites")
        endpoint = f"{host}:{peer_port}"
        reach = [f"PEER_ALIAS={name}-{project}", f"PEER_ENDPOINT={endpoint}",
                 f"PEER_PUBLISH=0.0.0.0:{peer_port}", f"DATA_PORT={peer_port + 1}",
                 f"DATA_PUBLISH=0.0.0.0:{peer_port + 1}"]
    carried = [f"{k}={env[k]}" for k in ("SWARMNODE_VERSION", "RPC_URL", "REGISTRY", "CONTRACT",
                                         "KEY_INDEX", "CHAIN_CERT", "CHAIN_KEY", "CHAIN_TRUST",
                                         "METRICS_PORT")
               if k in env]
    lines = [
        f"# {name}'s training {contract}, beside the one {site_dir.name}/ runs: its own compose",
        "# project, written by `swarmnode site training`; `docker-compose up -d` here starts it.",
        "COMPOSE_FILE=compose.yaml:compose.keystore.yaml",
        f"COMPOSE_PROJECT_NAME={name}-{project}",
        f"SITE={name}",
        *carried,
        "# The site's certificate, key, account and data (one site, one authorisation).",
        "KEYSTORE_FILE=../chain/keystore.json",
        "KEYSTORE_PASSWORD_FILE=../chain/keystore.password",
        f"ACCOUNT_LOCK_DIR=../{ACCOUNT_LOCK_DIR}",
        f"CERT_FILE=../certs/{name}.pem",
        f"KEY_FILE=../certs/{name}.key",
        "TRUST_FILE=../certs/trust.pem",
        "DATA_DIR=../data",
        "# This training's script: app/ here.",
        "SCRIPT_DIR=./app",
        "# What the other sites dial in this training (enrolled in it only).",
        *reach,
        "# The consortium network the site's own project made (and the chain on it).",
        "CONSORTIUM_EXTERNAL=true",
        "# read by the sentinel's deploy service only (required by the compose file)",
        "CONSORTIUM_DIR=../consortium",
    ]
    folder.mkdir(exist_ok=True)
    (folder / "app").mkdir(exist_ok=True)
    for src, dest in (("compose.yaml", "compose.yaml"),
                      ("compose.keystore.yaml", "compose.keystore.yaml")):
        shutil.copy(kit / src, folder / dest)
    (folder / ".env").write_text("\n".join(lines) + "\n")
    not_chowned = _give_to_node_user([account_lock_dir(site_dir)])
    return ProjectResult(site=name, project=f"{name}-{project}", folder=folder,
                         contract=contract, endpoint=endpoint, not_chowned=not_chowned)
