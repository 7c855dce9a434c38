"""The chain and the training a site's folder names, as this host reaches them: what `status`,
`audit` and `report` use when run in a site folder without ``--rpc-url`` / ``--contract``.

A kit (``swarmnode site install``) leaves ``kit.json`` and ``.env`` in the site's folder; the
``.env`` is what its containers run with (``consortium training`` updates it): ``RPC_URL``,
``CONTRACT`` (the training), ``REGISTRY``. The URL is the chain as the site's *node container*
reaches it, so from the host:

- ``https://SENTINEL_HOST:PORT`` (the sentinel's gateway, sites on separate hosts) as it is, with
  the site's own certificate, key and trust bundle from ``certs/`` (the gateway asks for them);
- ``http://chain:8545`` (the sentinel's dev chain on the consortium network: the sentinel's own
  folder, or any site of a ``one_host`` consortium) is the chain container's port published on
  this host's loopback, found through the Docker engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from swarmnode.chain.rpc import ChainTls
from swarmnode.errors import ConfigError

__all__ = ["SiteChain", "site_chain"]

IN_NETWORK_HOST = "chain"  # the sentinel's chain service on the consortium network


@dataclass(frozen=True)
class SiteChain:
    folder: Path
    rpc_url: str
    contract: str  # the training (else the registry, for its one running training)
    tls: ChainTls | None  # the gateway's client certificate (https only)
    names: Path | None  # consortium/sites.csv where the folder has it (the sentinel's)


def read_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a compose ``.env`` (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().strip("'\"")
    return out


def site_chain(folder: Path = Path(".")) -> SiteChain | None:
    """What the site folder's kit names (None: no kit here)."""
    folder = Path(folder)
    if not (folder / "kit.json").is_file() or not (folder / ".env").is_file():
        return None
    env = read_env(folder / ".env")
    contract = env.get("CONTRACT") or env.get("REGISTRY")
    url = env.get("RPC_URL")
    if not contract or not url:
        raise ConfigError(f"{folder / '.env'} names no CONTRACT or RPC_URL: install the kit "
                          "again (`swarmnode site install KIT`), or pass --contract and --rpc-url")
    parsed = urlparse(url)
    tls = None
    if parsed.hostname == IN_NETWORK_HOST:
        url = _published_chain(env, url, folder)
    elif parsed.scheme == "https":
        site = env.get("SITE", "")
        certs = folder / "certs"
        tls = ChainTls(cert=certs / f"{site}.pem", key=certs / f"{site}.key",
                       trust=certs / "trust.pem")
    names = folder / "consortium" / "sites.csv"
    return SiteChain(folder=folder, rpc_url=url, contract=contract, tls=tls,
                     names=names if names.is_file() else None)


def _published_chain(env: dict[str, str], url: str, folder: Path) -> str:
    """The URL of the consortium's chain container on this host (its published port)."""
    network = env.get("CONSORTIUM_NETWORK") or "swarmnode-consortium"
    where = (f"{folder}/.env names {url}, the sentinel's chain on the consortium network "
             f"({network})")
    try:
        import docker

        client = docker.from_env()
        found = client.containers.list(filters={
            "label": "com.docker.compose.service=chain", "network": network})
    except Exception as exc:  # noqa: BLE001 - no engine, no SDK, no permission: said below
        raise ConfigError(f"{where}, and the Docker engine does not answer here ({exc}); run "
                          "this on the sentinel's host, or pass --rpc-url") from None
    for container in found:
        ports = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get("8545/tcp")
        if ports:
            host = ports[0].get("HostIp") or "127.0.0.1"
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            return f"http://{host}:{ports[0]['HostPort']}"
    raise ConfigError(f"{where}, and no running chain container on this host publishes it: "
                      "start the sentinel (`docker-compose up -d` in its folder) or run this on "
                      "the sentinel's host, or pass --rpc-url")
