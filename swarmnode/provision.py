"""Provisioning a consortium: one consortium file, a kit per site, private keys that stay home.

The admin describes the consortium in one YAML file (:class:`ConsortiumFile`: its name, the
chain, the training, the sites with the names and ports other sites dial). Then:

admin   ``swarmnode consortium init consortium.yaml``   the consortium CA, the trust bundle
        (with the CAs of organisations that bring their own), the training spec and, on a dev
        chain, the consortium's own admin account (a fresh key in an encrypted keystore: the
        dev mnemonic's accounts are public, so none of them may be the admin)
site    ``swarmnode site request --name hospital-2``    in the site's own folder: its TLS key and
        a certificate request, its chain account (an encrypted keystore); it sends only
        ``hospital-2.request.json`` (the request and the account's address, no key)
admin   ``swarmnode consortium sign consortium.yaml requests/*.json``   checks each request,
        signs it with the consortium CA (or checks the certificate an organisation's own CA
        signed), and writes each site's kit: its certificate, the trust bundle, its ``.env`` and
        the compose files; the sentinel's kit also holds what its ``deploy`` service needs
        (spec, the sites' addresses and certificates, the admin keystore) to fund the admin from
        a dev account inside the sentinel, deploy the contract as the admin, fund each site's
        account and authorise it. Sites on separate hosts reach the sentinel's chain through its
        gateway (``swarmnode chain gateway``: mutual TLS, standard methods only), never the dev
        chain itself
site    ``swarmnode site install KIT``                  checks the kit against its own key and
        trust bundle and installs it in its folder; then ``docker-compose up -d`` there
admin   ``swarmnode consortium training consortium.yaml --spec next.json``   the consortium's next
        training: deployed on its registry (the sites stay authorised there: no new
        authorisation), and every kit updated to name it; each site installs its kit again and
        runs ``docker-compose up -d``

No private key is ever written outside the folder of the party it belongs to: the CA key stays in
the admin's folder, each site's TLS key and keystore in that site's folder (mode 0600). The one
exception is the dev chain's admin keystore: the sentinel, which runs the dev chain (and so could
rewrite it anyway), signs the admin's transactions in its ``deploy`` service, so its kit carries
that keystore; no other site's does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarmnode import __version__
from swarmnode.errors import ConfigError, IdentityError
from swarmnode.identity import certs as _certs
from swarmnode.identity import create_ca, load_certs, make_bundle

__all__ = [
    "KIT_FORMAT",
    "NODE_UID",
    "REQUEST_FORMAT",
    "ConsortiumFile",
    "Kit",
    "consortium_init",
    "consortium_sign",
    "consortium_training",
    "load_consortium",
    "reauthorize",
    "reauthorize_command",
    "site_install",
    "site_request",
]

REQUEST_FORMAT = "swarmnode-site-request/1"
KIT_FORMAT = "swarmnode-site-kit/1"
NODE_UID = 10001  # the node image's user: it reads the site's key and keystore (secrets)
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
#: The admin's nonces on a fresh dev chain: its registry, then the first training
REGISTRY_NONCE = 0
TRAINING_NONCE = 1
#: In the sentinel's kit: the dev chain's admin keystore and its password (the deploy service's)
ADMIN_KIT_FILES = ("admin-chain/keystore.json", "admin-chain/keystore.password")
#: In a site's folder: the account's nonce lock, shared by the site's node containers
ACCOUNT_LOCK_DIR = "chain/tx-lock"
#: The node's metrics port in a kit (peer API 7441, data plane 7442).
METRICS_PORT = 7443
#: The dev chain as every site reaches it on one host (the sentinel's ``chain`` service on the
#: shared consortium network), and the sentinel's gateway port on separate hosts
ONE_HOST_RPC_URL = "http://chain:8545"
GATEWAY_PORT = 8545


# -- the consortium file ---------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteEntry(_Strict):
    name: str = Field(description="The site's name: its compose project, certificate CN.")
    host: str | None = Field(None, description="The DNS name other sites dial (default: name).")
    peer_port: int = Field(7441, ge=1, le=65535)
    one_port: bool = Field(False, description="The site opens only peer_port: its node serves "
                           "the peer API and the data plane there, told apart by ALPN.")
    organisation_ca: Path | None = Field(
        None, description="The site's organisation's own CA certificate: that CA signs the "
        "site's certificate and joins the trust bundle (relative to the consortium file).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use lower-case letters, digits and '-' (a compose project "
                             "and host name), at most 63 characters")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not _HOST.match(v):
            raise ValueError(f"{v!r} is not a host name")
        return v

    @property
    def dial(self) -> str:
        return self.host or self.name


class ChainEntry(_Strict):
    rpc_url: str = Field("http://chain:8545", description="The chain as the sites' nodes reach it.")
    dev: bool = Field(True, description="The sentinel's dev chain (anvil): the sentinel's deploy "
                      "service deploys the contract, funds and authorises the sites.")
    registry: str | None = Field(None, description="Real networks: the consortium's registry "
                                 "the admin deployed (`swarmnode registry deploy`).")
    contract: str | None = Field(None, description="Real networks: the training the admin "
                                 "deployed on it (`swarmnode training deploy --registry ...`).")
    fund_eth: float = Field(10.0, ge=0, description="Dev chains: ETH sent to each site's account.")

    @field_validator("registry", "contract")
    @classmethod
    def _contract(cls, v: str | None) -> str | None:
        if v is not None and not _ADDRESS.match(v):
            raise ValueError(f"{v!r} is not a contract address (0x and 40 hex digits)")
        return v


class TrainingEntry(_Strict):
    spec: Path | None = Field(None, description="The training spec (`swarmnode spec`).")
    initial: Path | None = Field(None, description="Or the initial weights (safetensors).")
    sync_frequency: int = Field(4, ge=1)
    min_peers: int = Field(2, ge=1)
    merge: str = "mean"
    grace_s: int = Field(10, ge=0)
    deadline_s: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> TrainingEntry:
        if (self.spec is None) == (self.initial is None):
            raise ValueError("give exactly one of training.spec (a spec.json) and "
                             "training.initial (the initial weights, safetensors)")
        return self


class ConsortiumFile(_Strict):
    consortium: str = Field(description="The consortium's name (its CA is '<name>-ca').")
    chain: ChainEntry = Field(default_factory=ChainEntry)
    training: TrainingEntry
    sites: list[SiteEntry]
    sentinel: str | None = Field(None, description="The site whose project runs the dev chain "
                                 "(default: the first site).")
    one_host: bool = Field(False, description="Every site on one Docker engine (to try it out): "
                           "the sites share the sentinel's consortium network and dial each "
                           "other by name; nothing is published. Otherwise each site publishes "
                           "its peer and data ports (and the sentinel its chain).")

    @field_validator("consortium")
    @classmethod
    def _consortium(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use lower-case letters, digits and '-'")
        return v

    @model_validator(mode="after")
    def _sites(self) -> ConsortiumFile:
        if len(self.sites) < 2:
            raise ValueError("a consortium needs at least two sites")
        names = [s.name for s in self.sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")
        dials = [f"{s.dial}:{s.peer_port}" for s in self.sites]
        dup = sorted({d for d in dials if dials.count(d) > 1})
        if dup:
            raise ValueError(f"two sites would be dialled at the same host:port: {', '.join(dup)}")
        if self.sentinel is not None and self.sentinel not in names:
            raise ValueError(f"sentinel {self.sentinel!r} is not one of the sites "
                             f"({', '.join(names)})")
        if self.training.min_peers > len(self.sites):
            raise ValueError(f"training.min_peers={self.training.min_peers} but the consortium "
                             f"has {len(self.sites)} sites")
        if self.chain.dev:
            self._check_chain_url()
        if not self.chain.dev and (self.chain.contract is None or self.chain.registry is None):
            raise ValueError("chain.dev is false: set chain.registry and chain.contract to the "
                             "registry and the training the admin deployed on that network")
        return self

    def _check_chain_url(self) -> None:
        """The dev chain's URL in the kits is one the other sites can reach: on one host the
        sentinel's chain on the shared consortium network, on separate hosts its gateway (the
        sentinel's host, https). Not given: derived from the sentinel."""
        sentinel = self.site(self.sentinel_name)
        given = "rpc_url" in self.chain.model_fields_set
        if self.one_host:
            if given and self.chain.rpc_url.rstrip("/") != ONE_HOST_RPC_URL:
                raise ValueError(
                    f"one_host: true, but chain.rpc_url is {self.chain.rpc_url}: on one host "
                    "the sites reach the sentinel's dev chain on the shared consortium network "
                    f"at {ONE_HOST_RPC_URL}, and nothing answers at that URL there (no gateway "
                    "runs on one host). Remove chain.rpc_url (it defaults to "
                    f"{ONE_HOST_RPC_URL}), or remove one_host for sites on separate hosts")
            self.chain.rpc_url = ONE_HOST_RPC_URL
            return
        if not given:  # separate hosts: the sentinel's gateway, on the host its certificate names
            self.chain.rpc_url = f"https://{sentinel.dial}:{GATEWAY_PORT}"
            return
        url = urlparse(self.chain.rpc_url)
        if url.scheme != "https" or url.hostname not in (sentinel.dial, sentinel.name):
            raise ValueError(
                "sites on separate hosts reach the sentinel's chain through its gateway "
                "(mutual TLS with the consortium's certificates; the dev chain itself is "
                f"never published): set chain.rpc_url to https://{sentinel.dial}:{GATEWAY_PORT} "
                "(https://SENTINEL_HOST:PORT, the host the sentinel's certificate names; or "
                "leave it out: that is the default), or one_host: true to try the consortium "
                "on one machine")

    def site(self, name: str) -> SiteEntry:
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(f"{name!r} is not a site of consortium {self.consortium} "
                          f"({', '.join(s.name for s in self.sites)})")

    @property
    def sentinel_name(self) -> str:
        return self.sentinel or self.sites[0].name

    def cert_names(self, site: SiteEntry) -> list[str]:
        """The DNS names a site's certificate holds: the name other sites dial and its own; on
        one host also ``*.SITE.CONSORTIUM``, the names its trainings' own compose projects are
        dialled under on the shared network (``swarmnode site training``; on separate hosts
        such a project takes other ports of the site's host name instead)."""
        names = {site.dial, site.name}
        if self.one_host:
            names.add(f"*.{site.name}.{self.consortium}")
        return sorted(names)


def load_consortium(path: Path) -> tuple[ConsortiumFile, Path]:
    """The consortium file and the folder its relative paths are relative to."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"consortium file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a YAML mapping (consortium, chain, training, sites)")
    try:
        return ConsortiumFile.model_validate(raw), path.resolve().parent
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                 for e in exc.errors()]
        raise ConfigError(f"{path}: " + "; ".join(lines)) from None


# -- helpers ---------------------------------------------------------------------------------------
def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else base / p


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """A secret: created with mode 0600 (never through an existing file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _give_to_node_user(paths: list[Path]) -> list[Path]:
    """chown the site's secrets to the node image's user (root only); the files it could not."""
    if os.geteuid() != 0:
        return paths
    for p in paths:
        os.chown(p, NODE_UID, -1)
    return []


def _ca_dir(admin: Path) -> Path:
    return admin / "ca"


def _consortium_ca(conf: ConsortiumFile, admin: Path) -> tuple[Path, Path]:
    name = f"{conf.consortium}-ca"
    return _ca_dir(admin) / f"{name}.pem", _ca_dir(admin) / f"{name}.key"


# -- admin: init -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InitResult:
    ca_cert: Path
    trust: Path
    spec: Path
    created_ca: bool
    admin_address: str | None = None  # dev chains: the consortium's own admin account
    admin_keystore: Path | None = None
    created_admin: bool = False


def _admin_files(admin: Path) -> tuple[Path, Path]:
    """The dev chain's admin keystore and its password, in the admin's folder."""
    return admin / "chain" / "admin.keystore.json", admin / "chain" / "admin.keystore.password"


def _make_admin_account(admin: Path) -> tuple[str, Path, bool]:
    """The consortium's admin account on a dev chain: a fresh key (never one of the dev
    mnemonic's public accounts) in an encrypted keystore with a random password, kept if it
    exists. (address, keystore, made now)."""
    from eth_account import Account

    keystore, password = _admin_files(admin)
    if keystore.exists():
        if not password.exists():
            raise ConfigError(f"{keystore} exists without its password file {password}; restore "
                              "it, or remove the keystore to make a new admin account (then sign "
                              "the kits again)")
        return _keystore_address(keystore), keystore, False
    secret = secrets.token_urlsafe(24)
    account = Account.create()
    _write_private(password, secret.encode())
    _write_private(keystore, json.dumps(Account.encrypt(account.key, secret)).encode())
    return account.address, keystore, True


def _keystore_address(keystore: Path) -> str:
    """The address a V3 keystore names (public; no password needed)."""
    from web3 import Web3

    try:
        address = json.loads(keystore.read_text()).get("address", "")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"cannot read the admin keystore {keystore}: {exc}") from None
    if not isinstance(address, str) or not re.fullmatch(r"(0x)?[0-9a-fA-F]{40}", address):
        raise ConfigError(f"the admin keystore {keystore} names no address; make a new one: "
                          "remove it and run `swarmnode consortium init` again")
    return Web3.to_checksum_address("0x" + address.removeprefix("0x"))


def consortium_init(path: Path, admin_dir: Path | None = None) -> InitResult:
    """The consortium CA (kept if it exists), the trust bundle and the training spec."""
    from swarmnode.spec import TrainingSpec
    from swarmnode.transport import serde

    conf, base = load_consortium(path)
    admin = Path(admin_dir) if admin_dir is not None else base / "admin"
    ca_cert, ca_key = _consortium_ca(conf, admin)
    created = False
    if not ca_cert.exists():
        ca_cert, ca_key = create_ca(_ca_dir(admin), f"{conf.consortium}-ca",
                                    org=f"{conf.consortium} consortium")
        created = True
    elif not ca_key.exists():
        raise ConfigError(f"{ca_cert} exists without its key {ca_key}; restore the key or "
                          "remove the certificate to make a new CA")
    cas = [ca_cert]
    for site in conf.sites:
        if site.organisation_ca is not None:
            org = _resolve(base, site.organisation_ca)
            if not org.exists():
                raise ConfigError(f"site {site.name}: organisation CA {org} does not exist")
            cas.append(org)
    out = admin / "consortium"
    out.mkdir(parents=True, exist_ok=True)
    trust = make_bundle(cas, out / "trust.pem")
    t = conf.training
    if t.spec is not None:
        src = _resolve(base, t.spec)
        try:
            spec = TrainingSpec.from_json(src.read_text())
        except FileNotFoundError:
            raise ConfigError(f"training.spec {src} does not exist") from None
        pinned = {"sync_frequency": spec.sync_frequency, "min_peers": spec.min_peers,
                  "merge": spec.merge_method}
        for key in sorted(t.model_fields_set & set(pinned)):
            if getattr(t, key) != pinned[key]:
                raise ConfigError(f"training.{key} is {getattr(t, key)!r} but {src} pins "
                                  f"{pinned[key]!r}; drop the setting or make the spec again "
                                  "(`swarmnode spec`)")
    else:
        src = _resolve(base, t.initial)  # type: ignore[arg-type]
        try:
            payload = src.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"training.initial {src} does not exist; write it with "
                              "safetensors.torch.save_file(model.state_dict(), ...)") from None
        state = serde.decode(payload, expected_digest=None, spec=None, max_bytes=len(payload),
                             reject_nonfinite=True)
        spec = TrainingSpec.from_state(dict(state), sync_frequency=t.sync_frequency,
                                       min_peers=t.min_peers, merge_method=t.merge)
    spec_path = out / "spec.json"
    spec_path.write_text(spec.to_json())
    if not conf.chain.dev:  # a real network: the admin signs with the keystore they have
        return InitResult(ca_cert=ca_cert, trust=trust, spec=spec_path, created_ca=created)
    address, keystore, made = _make_admin_account(admin)
    return InitResult(ca_cert=ca_cert, trust=trust, spec=spec_path, created_ca=created,
                      admin_address=address, admin_keystore=keystore, created_admin=made)


# -- site: request ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestResult:
    request: Path
    key: Path
    keystore: Path
    address: str


def site_request(name: str, site_dir: Path, host: str | None = None,
                 force: bool = False) -> RequestResult:
    """In the site's folder: its TLS key and certificate request, its chain account (keystore
    and a random password), and the one file it sends: ``<name>.request.json``."""
    from eth_account import Account

    if not _NAME.match(name):
        raise ConfigError(f"site name {name!r}: use lower-case letters, digits and '-'")
    site = Path(site_dir)
    key_path = site / "certs" / f"{name}.key"
    keystore = site / "chain" / "keystore.json"
    password = site / "chain" / "keystore.password"
    if not force:
        for p in (key_path, keystore):
            if p.exists():
                raise ConfigError(f"{p} already exists; this site already made its keys (its "
                                  f"request is {name}.request.json); pass --force to replace them "
                                  "(the old ones are then lost)")
    csr_pem = _certs.make_key_and_csr(key_path, name, dns=sorted({host or name, name}))
    secret = secrets.token_urlsafe(24)
    account = Account.create()
    encrypted = Account.encrypt(account.key, secret)
    _write_private(password, secret.encode())
    _write_private(keystore, json.dumps(encrypted).encode())
    request = site / f"{name}.request.json"
    request.write_text(json.dumps({
        "format": REQUEST_FORMAT, "name": name, "address": account.address,
        "csr": csr_pem.decode(), "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }, indent=2) + "\n")
    return RequestResult(request=request, key=key_path, keystore=keystore, address=account.address)


def _read_request(path: Path) -> dict[str, Any]:
    try:
        req = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"request {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"request {path} is not JSON: {exc}") from None
    if not isinstance(req, dict) or req.get("format") != REQUEST_FORMAT:
        raise ConfigError(f"{path} is not a site request ({REQUEST_FORMAT}); the site makes it "
                          "with `swarmnode site request`")
    if "PRIVATE KEY" in json.dumps(req) or "crypto" in req:
        raise ConfigError(f"{path} holds a private key: refused, and that key must be treated as "
                          "exposed; the site makes a new request with `swarmnode site request "
                          "--force`")
    for field in ("name", "address"):
        if not isinstance(req.get(field), str):
            raise ConfigError(f"{path}: missing {field!r}")
    if not _ADDRESS.match(req["address"]):
        raise ConfigError(f"{path}: {req['address']!r} is not a chain address")
    if not isinstance(req.get("csr"), str) and not isinstance(req.get("cert"), str):
        raise ConfigError(f"{path}: holds neither a certificate request ('csr') nor a "
                          "certificate from the site's organisation CA ('cert')")
    return req


# -- admin: sign -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kit:
    site: str
    path: Path
    address: str
    sentinel: bool
    reissued: bool = False  # a new certificate: the registry must authorise its fingerprint


def _admin_address(conf: ConsortiumFile, admin: Path, path: Path) -> str | None:
    """The dev chain's admin account (from its keystore), or None on a real network."""
    if not conf.chain.dev:
        return None
    keystore, password = _admin_files(admin)
    if not (keystore.exists() and password.exists()):
        raise ConfigError(f"no admin account for the dev chain ({keystore}); run `swarmnode "
                          f"consortium init {path}` again (it keeps the CA and makes one)")
    return _keystore_address(keystore)


def _chain_addresses(conf: ConsortiumFile, admin_address: str | None) -> tuple[str, str]:
    """The consortium's registry and its first training."""
    if conf.chain.contract is not None and conf.chain.registry is not None:
        return conf.chain.registry, conf.chain.contract
    from swarmnode.containers.consortium import contract_address_for

    assert admin_address is not None
    # The admin's first transaction deploys the registry, its second the training (`contract
    # deploy` without --registry, in the sentinel's deploy service): the kits name both.
    return (conf.chain.registry or contract_address_for(admin_address, REGISTRY_NONCE),
            conf.chain.contract or contract_address_for(admin_address, TRAINING_NONCE))


def _compose_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "compose", here / "compose"):
        if (candidate / "hospital.yaml").exists():
            return candidate
    raise ConfigError("the compose files (compose/hospital.yaml) are not found next to the "
                      "swarmnode package; run `swarmnode consortium sign` from a checkout")


def consortium_sign(path: Path, requests: list[Path], admin_dir: Path | None = None,
                    reissue: Sequence[str] = ()) -> list[Kit]:
    """Check every site's request, sign it, and write each site's kit (all sites at once: the
    sentinel's kit lists every site). A site's certificate signed before is kept (the chain
    authorised its fingerprint) unless ``reissue`` names the site; a request it no longer fits
    (new key, other names) is refused without it."""
    conf, base = load_consortium(path)
    for name in reissue:
        conf.site(name)  # a site of the consortium
    admin = Path(admin_dir) if admin_dir is not None else base / "admin"
    ca_cert, ca_key = _consortium_ca(conf, admin)
    trust = admin / "consortium" / "trust.pem"
    spec = admin / "consortium" / "spec.json"
    if not (ca_cert.exists() and trust.exists() and spec.exists()):
        raise ConfigError(f"no consortium CA, trust bundle or spec under {admin}; run "
                          f"`swarmnode consortium init {path}` first")
    by_site: dict[str, tuple[dict[str, Any], Path]] = {}
    for r in requests:
        req = _read_request(r)
        site = conf.site(req["name"])
        if site.name in by_site:
            raise ConfigError(f"two requests for site {site.name}: {by_site[site.name][1]} and {r}")
        by_site[site.name] = (req, Path(r))
    missing = [s.name for s in conf.sites if s.name not in by_site]
    if missing:
        raise ConfigError(f"no request yet from {', '.join(missing)}; every site sends its "
                          "`swarmnode site request` file before the kits are made")
    addresses = [req["address"].lower() for req, _ in by_site.values()]
    if len(set(addresses)) != len(addresses):
        raise ConfigError("two sites sent the same chain address; each site makes its own "
                          "account with `swarmnode site request`")
    out = admin / "consortium"
    rows = ["name,address,cert"]
    certs: dict[str, Path] = {}
    reissued: set[str] = set()
    for site in conf.sites:
        req, src = by_site[site.name]
        cert_path = out / f"{site.name}.pem"
        before = cert_path.read_bytes() if cert_path.exists() else None
        if site.organisation_ca is not None:
            certs[site.name] = _check_org_cert(req, src, site, _resolve(base, site.organisation_ca),
                                               cert_path)
            if before is not None and site.name not in reissue:
                try:
                    _keep_cert(before, req, src, site, ca_cert, conf.cert_names(site),
                               org_cert=True)
                except ConfigError:
                    cert_path.write_bytes(before)
                    raise
        else:
            if "csr" not in req:
                raise ConfigError(f"{src}: site {site.name} has no organisation CA in the "
                                  "consortium file, so it sends a certificate request ('csr')")
            if before is None or site.name in reissue or not _keep_cert(before, req, src, site,
                                                                        ca_cert,
                                                                        conf.cert_names(site)):
                pem = _certs.sign_csr(ca_cert, ca_key, req["csr"].encode(), site.name,
                                      dns=conf.cert_names(site))
                cert_path.write_bytes(pem)
            certs[site.name] = cert_path
        if before is not None and cert_path.read_bytes() != before:
            reissued.add(site.name)
        rows.append(f"{site.name},{req['address']},{site.name}.pem")
    (out / "sites.csv").write_text("\n".join(rows) + "\n")
    admin_address = _admin_address(conf, admin, path)
    registry, contract = _chain_addresses(conf, admin_address)
    compose = _compose_dir()
    from swarmnode.spec import TrainingSpec

    min_peers = TrainingSpec.from_json(spec.read_text()).min_peers
    kits = []
    for site in conf.sites:
        req, _ = by_site[site.name]
        sentinel = site.name == conf.sentinel_name and conf.chain.dev
        kit = admin / "kits" / site.name
        if kit.exists():
            shutil.rmtree(kit)
        (kit / "certs").mkdir(parents=True)
        shutil.copy(certs[site.name], kit / "certs" / f"{site.name}.pem")
        shutil.copy(trust, kit / "certs" / "trust.pem")
        shutil.copy(compose / "hospital.yaml", kit / "compose.yaml")
        shutil.copy(compose / "keystore.yaml", kit / "compose.keystore.yaml")
        if sentinel:
            (kit / "consortium").mkdir()
            for f in ["spec.json", "sites.csv", *(f"{s.name}.pem" for s in conf.sites)]:
                shutil.copy(out / f, kit / "consortium" / f)
            # The deploy service signs as the admin; the dev chain's account 0 only funds it.
            shutil.copy(compose / "admin.yaml", kit / "compose.admin.yaml")
            for src, name in zip(_admin_files(admin), ADMIN_KIT_FILES, strict=True):
                _write_private(kit / name, src.read_bytes())
            if not conf.one_host:  # other sites reach the chain through the gateway only
                shutil.copy(compose / "gateway.yaml", kit / "compose.gateway.yaml")
        (kit / ".env").write_text(_env(conf, site, registry, contract, sentinel, min_peers,
                                       admin_address))
        _write_manifest(kit, {
            "format": KIT_FORMAT, "consortium": conf.consortium, "site": site.name,
            "address": req["address"], "registry": registry, "contract": contract,
            "rpc_url": conf.chain.rpc_url, "sentinel": sentinel})
        kits.append(Kit(site=site.name, path=kit, address=req["address"], sentinel=sentinel,
                        reissued=site.name in reissued))
    return kits


def _keep_cert(before: bytes, req: dict[str, Any], src: Path, site: SiteEntry, ca_cert: Path,
               want: list[str], org_cert: bool = False) -> bool:
    """True: the site's certificate signed before still fits its request (its key, its names,
    the consortium CA) and is kept, so the fingerprint the chain authorised stays valid. A
    request it no longer fits is refused: a new certificate needs ``--reissue SITE``."""
    old = x509.load_pem_x509_certificate(before)
    if org_cert:
        new = x509.load_pem_x509_certificate(req["cert"].encode())
        if new.public_bytes(serialization.Encoding.DER) == old.public_bytes(
                serialization.Encoding.DER):
            return True
        why = "brings another certificate than the one signed before"
    else:
        csr = x509.load_pem_x509_csr(req["csr"].encode())
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = sorted(san.get_values_for_type(x509.DNSName))
        if csr.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                old.public_key().public_bytes(serialization.Encoding.DER, spki):
            why = "carries a new key (`swarmnode site request --force`?)"
        elif names != want:
            why = (f"needs the names {', '.join(want)} (its "
                   f"certificate names {', '.join(names)})")
        elif not _issued_by(old, load_certs(ca_cert)[0]):
            why = "holds a certificate of another consortium CA"
        else:
            return True
    raise ConfigError(
        f"{src}: the request of {site.name} {why}; its certificate signed before is kept unless "
        f"re-issued: pass --reissue {site.name} (the chain then authorises the new certificate: "
        "`consortium sign` prints the command, or runs it with --rpc-url)")


def _check_org_cert(req: dict[str, Any], src: Path, site: SiteEntry, org_ca: Path,
                    out: Path) -> Path:
    """A certificate the site's own organisation CA signed: checked, then listed as is."""
    if "cert" not in req:
        raise ConfigError(f"{src}: site {site.name} brings its organisation's CA ({org_ca}), so "
                          "it sends the certificate that CA signed ('cert'), not a request")
    cert = x509.load_pem_x509_certificate(req["cert"].encode())
    ca = load_certs(org_ca, "organisation CA")[0]
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # noqa: BLE001 - any failure: refused
        raise ConfigError(f"{src}: the certificate of {site.name} is not signed by its "
                          f"organisation CA {org_ca}: {exc}") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != site.name:
        raise ConfigError(f"{src}: the certificate's common name is not {site.name!r}")
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def _write_manifest(kit: Path, manifest: dict[str, Any]) -> None:
    """``kit.json``: the kit's settings and the SHA-256 of every file in it."""
    files = sorted(p.relative_to(kit).as_posix() for p in kit.rglob("*")
                   if p.is_file() and p.name != "kit.json")
    manifest = {**manifest, "files": {f: _sha256(kit / f) for f in files}}
    (kit / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _env(conf: ConsortiumFile, site: SiteEntry, registry: str, contract: str, sentinel: bool,
         min_peers: int, admin_address: str | None = None) -> str:
    t = conf.training
    files = "compose.yaml:compose.keystore.yaml"
    if sentinel:
        files += ":compose.admin.yaml" + ("" if conf.one_host else ":compose.gateway.yaml")
    lines = [
        f"# {site.name}'s settings in consortium {conf.consortium}, written by `swarmnode "
        "consortium sign`.",
        "# `docker-compose up -d` in this folder reads them (and the compose files named here).",
        f"COMPOSE_FILE={files}",
        f"COMPOSE_PROJECT_NAME={site.name}",
        f"SITE={site.name}",
        f"SWARMNODE_VERSION={__version__}",
        f"RPC_URL={'http://chain:8545' if sentinel else conf.chain.rpc_url}",
        "# The consortium's registry (sites are authorised there once) and the training this",
        "# site's node takes part in (`swarmnode consortium training` names the next one).",
        f"REGISTRY={registry}",
        f"CONTRACT={contract}",
        "KEY_INDEX=",
        "KEYSTORE_FILE=./chain/keystore.json",
        "KEYSTORE_PASSWORD_FILE=./chain/keystore.password",
        "# The site's node containers (one per training it runs at once) sign with its one",
        "# account and take turns with its nonces through a lock in this folder.",
        f"ACCOUNT_LOCK_DIR=./{ACCOUNT_LOCK_DIR}",
        f"PEER_ENDPOINT={site.dial}:{site.peer_port}",
        f"CERT_FILE=./certs/{site.name}.pem",
        f"KEY_FILE=./certs/{site.name}.key",
        "TRUST_FILE=./certs/trust.pem",
        "# This site's training data and script (train.py): data/ and app/ here. The ml container",
        "# sees them at /data and /app, writes to /workspace/out, and gets every setting of this",
        "# file (add your script's own; HPE's DATA_DIR and SCRATCH_DIR are set to /data and",
        "# /workspace/out inside it).",
        "DATA_DIR=./data",
        "SCRIPT_DIR=./app",
        "# The training's quorum (HPE scripts read MIN_PEERS); MAX_EPOCHS=N for HPE's, if needed.",
        f"MIN_PEERS={min_peers}",
        "# The node's Prometheus metrics (GET /metrics) on this port; published on this host's",
        "# loopback (`docker-compose port node 7443`; METRICS_PUBLISH to change); empty: off.",
        f"METRICS_PORT={METRICS_PORT}",
    ]
    if not conf.one_host and site.one_port:
        lines += [
            "# Other sites dial this host on one port: the peer API and the data plane (models)",
            "# behind it, told apart by the TLS ALPN.",
            "ONE_PORT=true",
            f"PEER_PUBLISH=0.0.0.0:{site.peer_port}",
        ]
    elif not conf.one_host:
        lines += [
            "# Other sites dial this host: the peer API and the data plane (models) published.",
            f"PEER_PUBLISH=0.0.0.0:{site.peer_port}",
            "DATA_PUBLISH=0.0.0.0:7442",
        ]
    if sentinel:
        gateway_port = urlparse(conf.chain.rpc_url).port or 443
        lines += [
            "# The sentinel: its project also runs the dev chain and the deploy service.",
            "COMPOSE_PROFILES=sentinel",
            *([] if conf.one_host else [
                "# Other sites reach the chain through the gateway (mutual TLS, standard "
                "methods only);",
                "# the dev chain itself is published on this host's loopback only.",
                f"GATEWAY_PUBLISH=0.0.0.0:{gateway_port}"]),
            "CONSORTIUM_DIR=./consortium",
            f"GRACE_S={t.grace_s}",
            f"DEADLINE_S={t.deadline_s}",
            f"FUND_ETH={conf.chain.fund_eth:g}",
            "# The consortium's admin account (made by `consortium init`, not a dev account): the",
            "# deploy service funds it from dev account 0 inside this project, then signs with it.",
            f"ADMIN_ADDRESS={admin_address}",
            f"ADMIN_FUND_ETH={conf.chain.fund_eth * len(conf.sites) + 10:g}",
            f"ADMIN_KEYSTORE_FILE=./{ADMIN_KIT_FILES[0]}",
            f"ADMIN_KEYSTORE_PASSWORD_FILE=./{ADMIN_KIT_FILES[1]}",
        ]
    else:
        if conf.one_host:
            lines += ["# One host: the sentinel's consortium network, shared.",
                      "CONSORTIUM_EXTERNAL=true"]
        elif conf.chain.dev:
            lines += ["# The sentinel's chain gateway asks for this site's certificate (mutual "
                      "TLS).",
                      "CHAIN_CERT=/run/secrets/node_cert",
                      "CHAIN_KEY=/run/secrets/node_key",
                      "CHAIN_TRUST=/run/secrets/trust"]
        lines += ["# read by the sentinel's deploy service only (required by the compose file)",
                  "CONSORTIUM_DIR=./consortium"]
    return "\n".join(lines) + "\n"


def reauthorize_command(path: Path, kit: Kit, admin_dir: Path | None = None,
                        rpc_url: str | None = None) -> str:
    """The one command that authorises a re-issued certificate in the consortium's registry, with
    this consortium's values (the admin's keystore on a dev chain; the chain as the admin's
    machine reaches it: on one host the sentinel's chain's published port)."""
    import shlex

    conf, base = load_consortium(path)
    admin = Path(admin_dir) if admin_dir is not None else base / "admin"
    manifest = _kit_manifest(kit.path)
    cert = (admin / "consortium" / f"{kit.site}.pem").resolve()
    args = ["swarmnode", "authorize", kit.address, "--cert", str(cert), "--contract",
            str(manifest.get("registry") or manifest["contract"])]
    if conf.chain.dev:
        keystore, password = _admin_files(admin)
        args += ["--keystore", str(keystore.resolve()), "--password-file",
                 str(password.resolve()), "--fund", f"{conf.chain.fund_eth:g}", "--once"]
    else:
        args += ["--keystore", "ADMIN_KEYSTORE", "--password-file", "ADMIN_PASSWORD_FILE"]
    line = shlex.join(args)
    if rpc_url is not None:
        return f"{line} --rpc-url {shlex.quote(rpc_url)}"
    if conf.chain.dev:  # the dev chain, published on the sentinel's host's loopback
        return f"{line} --rpc-url http://$(docker port {conf.sentinel_name}-chain-1 8545)"
    return f"{line} --rpc-url {shlex.quote(conf.chain.rpc_url)}"


def reauthorize(path: Path, kits: Sequence[Kit], rpc_url: str,
                admin_dir: Path | None = None) -> list[str]:
    """Authorise the re-issued certificates of ``kits`` in the consortium's registry, as its dev
    chain's admin (the keystore ``consortium init`` made); one line per site."""
    from cryptography.hazmat.primitives import hashes

    from swarmnode.chain.accounts import account_for
    from swarmnode.chain.client import SwarmRegistry, connect

    conf, base = load_consortium(path)
    if not conf.chain.dev:
        raise ConfigError("--rpc-url re-authorises on a dev chain, with the admin account "
                          "`consortium init` made; on the consortium's own network run the "
                          "`swarmnode authorize` commands printed without --rpc-url")
    admin = Path(admin_dir) if admin_dir is not None else base / "admin"
    keystore, password = _admin_files(admin)
    w3 = connect(rpc_url)
    account = account_for(w3, keystore=keystore, password_file=password)
    lines = []
    for kit in kits:
        manifest = _kit_manifest(kit.path)
        registry = SwarmRegistry(w3, str(manifest.get("registry") or manifest["contract"]),
                                 account)
        cert = load_certs(admin / "consortium" / f"{kit.site}.pem")[0]
        fp = cert.fingerprint(hashes.SHA256())
        site = registry.site(kit.address)
        if site.fingerprint == fp:
            lines.append(f"{kit.site}: already authorised with certificate {fp.hex()[:16]}…")
            continue
        if not site.authorized and conf.chain.fund_eth > 0:  # a new account: gas to enrol with
            registry.fund(kit.address, int(conf.chain.fund_eth * 10**18))
        done = registry.authorize(kit.address, fp)
        lines.append(f"{kit.site}: authorised {kit.address} with certificate {fp.hex()[:16]}… "
                     f"(block {done.block})")
    return lines


# -- admin: the consortium's next training -----------------------------------------------------
@dataclass(frozen=True)
class TrainingResult:
    training: str
    registry: str
    admin: str
    rpc_url: str
    min_peers: int
    kits: list[Path]


def _kit_manifest(kit: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((kit / "kit.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != KIT_FORMAT:
        raise ConfigError(f"no kit in {kit}: the sites' kits come first (`swarmnode consortium "
                          "sign`), the next training updates them")
    return manifest


def _set_env(text: str, key: str, value: str) -> str:
    """``text`` (a kit's .env) with ``key`` set to ``value`` (the line replaced in place)."""
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
    if at:
        lines[at[0]] = f"{key}={value}"
    else:
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def consortium_training(path: Path, spec_path: Path, *, rpc_url: str | None = None,
                        admin_dir: Path | None = None, keystore: Path | None = None,
                        password_file: Path | None = None, grace_s: int | None = None,
                        deadline_s: int | None = None) -> TrainingResult:
    """The consortium's next training: deployed on its registry by the registry's admin (no site
    is authorised again: they are, in the registry), then every site's kit names it (``.env``
    ``CONTRACT``, ``kit.json``). On a dev chain the admin signs with the keystore
    ``consortium init`` made; on a real network with ``keystore``."""
    from swarmnode.chain.accounts import account_for
    from swarmnode.chain.client import SwarmContract, SwarmRegistry, connect
    from swarmnode.errors import ContractNotFound
    from swarmnode.spec import TrainingSpec

    conf, base = load_consortium(path)
    admin = Path(admin_dir) if admin_dir is not None else base / "admin"
    kits = {site.name: admin / "kits" / site.name for site in conf.sites}
    manifests = {name: _kit_manifest(kit) for name, kit in kits.items()}
    try:
        spec_json = Path(spec_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"training spec {spec_path} does not exist; write it with `swarmnode "
                          "spec INITIAL.safetensors --out SPEC.json`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the training spec {spec_path}: {exc}") from None
    spec = TrainingSpec.from_json(spec_json, str(spec_path))
    if spec.min_peers > len(conf.sites):
        raise ConfigError(f"{spec_path} asks for min_peers={spec.min_peers} but the consortium "
                          f"has {len(conf.sites)} sites")
    admin_address = _admin_address(conf, admin, path)
    registry_address = manifests[conf.sites[0].name].get("registry") or _chain_addresses(
        conf, admin_address)[0]
    url = rpc_url or conf.chain.rpc_url
    w3 = connect(url)
    if keystore is None and conf.chain.dev:
        keystore, password_file = _admin_files(admin)
    if keystore is None:
        raise ConfigError("the registry's admin signs the deployment: pass --keystore and "
                          "--password-file (the account that deployed the registry)")
    if password_file is None:
        raise ConfigError(f"--keystore {keystore} needs --password-file")
    account = account_for(w3, keystore=keystore, password_file=password_file)
    try:
        registry = SwarmRegistry(w3, registry_address, account)
    except ContractNotFound as exc:
        raise ContractNotFound(
            f"the consortium's registry: {exc}. On a dev chain the sentinel's deploy service "
            "deploys it at the sentinel's first `docker-compose up -d`; pass --rpc-url with that "
            "chain as this machine reaches it") from None
    if registry.admin().lower() != account.address.lower():
        raise ConfigError(f"{account.address} is not the admin of the registry "
                          f"{registry.address} ({registry.admin()}); sign with the admin's "
                          "keystore")
    t = conf.training
    training = SwarmContract.deploy(
        w3, account, spec_json, spec.min_peers, t.grace_s if grace_s is None else grace_s,
        t.deadline_s if deadline_s is None else deadline_s, registry=registry)
    for name, kit in kits.items():
        env = kit / ".env"
        text = _set_env(_set_env(env.read_text(), "REGISTRY", registry.address), "CONTRACT",
                        training.address)
        env.write_text(text)
        manifest = {k: v for k, v in manifests[name].items() if k != "files"}
        _write_manifest(kit, {**manifest, "registry": registry.address,
                              "contract": training.address})
    return TrainingResult(training=training.address, registry=registry.address,
                          admin=account.address, rpc_url=url, min_peers=spec.min_peers,
                          kits=list(kits.values()))


# -- site: install ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstallResult:
    site: str
    sentinel: bool
    not_chowned: list[Path]
    kept: tuple[str, ...] = ()  # the site's own .env settings carried over from before
    replaced: tuple[str, ...] = ()  # settings of the kit's the site had changed: the kit's now


_OWN_SETTINGS = "# This site's own settings (kept by `swarmnode site install`; the kit's win)."


def _env_keys(text: str) -> dict[str, str]:
    """``KEY=value`` lines of a .env by key (comments and blank lines left out)."""
    out = {}
    for line in text.splitlines():
        key, eq, _ = line.partition("=")
        if eq and key.strip() and not key.lstrip().startswith("#"):
            out[key.strip()] = line
    return out


def _keep_own_settings(before: str, new_env: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Append to the kit's ``new_env`` the settings of the site's .env as it was ``before``
    that the kit does not set (a script's MAX_EPOCHS, SCRIPT=, tracking variables): installing
    the next kit must not drop them. A setting the kit also sets takes the kit's value. The
    keys kept, and the keys whose value the site had changed (now the kit's)."""
    old = _env_keys(before)
    new_text = new_env.read_text()
    kit = _env_keys(new_text)
    own = {k: line for k, line in old.items() if k not in kit}
    replaced = tuple(k for k, line in old.items() if k in kit and kit[k] != line)
    if own:
        sep = "" if new_text.endswith("\n") else "\n"
        new_env.write_text(new_text + sep + _OWN_SETTINGS + "\n" + "\n".join(own.values())
                           + "\n")
    return tuple(own), replaced


def site_install(kit_dir: Path, site_dir: Path) -> InstallResult:
    """Check the kit (its files' hashes, the certificate against this site's own key and the
    trust bundle) and install it into the site's folder."""
    kit = Path(kit_dir)
    site_dir = Path(site_dir)
    try:
        manifest = json.loads((kit / "kit.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{kit} holds no kit.json: not a kit from `swarmnode consortium "
                          "sign`") from None
    if manifest.get("format") != KIT_FORMAT:
        raise ConfigError(f"{kit}/kit.json is not a site kit ({KIT_FORMAT})")
    name = manifest["site"]
    for rel, digest in manifest["files"].items():
        p = kit / rel
        if not p.is_file() or _sha256(p) != digest:
            raise ConfigError(f"kit file {p} is missing or changed since the kit was made; ask "
                              "the admin for the kit again")
    key = site_dir / "certs" / f"{name}.key"
    if not key.exists():
        raise ConfigError(f"{key} does not exist: this kit is for {name}, and {site_dir} is not "
                          f"that site's folder (run `swarmnode site request --name {name}` there "
                          "first)")
    cert = kit / "certs" / f"{name}.pem"
    _certs.check_cert_matches_key(cert, key)
    trust_certs = load_certs(kit / "certs" / "trust.pem", "trust bundle")
    leaf = load_certs(cert)[0]
    if not any(_issued_by(leaf, ca) for ca in trust_certs):
        raise IdentityError(f"{cert} is not signed by any CA of the kit's trust bundle")
    request = site_dir / f"{name}.request.json"
    if request.exists():
        sent = json.loads(request.read_text())
        if sent.get("address", "").lower() != str(manifest.get("address", "")).lower():
            raise ConfigError(f"the kit lists chain address {manifest.get('address')} for {name} "
                              f"but this site's account is {sent.get('address')}; ask the admin "
                              "to sign this site's request again")
    before = (site_dir / ".env").read_text() if (site_dir / ".env").is_file() else None
    for rel in manifest["files"]:
        dest = site_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kit / rel, dest)
    kept: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    if before is not None and (site_dir / ".env").is_file():
        kept, replaced = _keep_own_settings(before, site_dir / ".env")
    shutil.copy(kit / "kit.json", site_dir / "kit.json")
    for d in ("data", "app"):
        (site_dir / d).mkdir(exist_ok=True)
    secrets_ = [key, site_dir / "chain" / "keystore.json", site_dir / "chain" / "keystore.password",
                *(site_dir / name for name in ADMIN_KIT_FILES), account_lock_dir(site_dir)]
    not_chowned = _give_to_node_user([p for p in secrets_ if p.exists()])
    return InstallResult(site=name, sentinel=bool(manifest.get("sentinel")),
                         not_chowned=not_chowned, kept=kept, replaced=replaced)


def account_lock_dir(site_dir: Path) -> Path:
    """The folder (made here, mode 0700) through which the site's node containers take turns
    with its account's nonces (compose/keystore.yaml mounts it in each)."""
    folder = Path(site_dir) / ACCOUNT_LOCK_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except Exception:  # noqa: BLE001 - not this CA
        return False
