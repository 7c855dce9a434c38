"""Chain commands: `chain up`, `contract deploy`, `authorize`, `revoke`, `enroll`, `status`,
`report`."""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from swarmnode.cli.common import (
    DEFAULT_RPC_URL,
    ContractAddress,
    Format,
    OutputFormat,
    RpcUrl,
    SiteContract,
    SiteRpcUrl,
    command,
    console,
    err_console,
    print_json,
    site_defaults,
)
from swarmnode.errors import ConfigError, IdentityError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from swarmnode.chain.client import SwarmContract, SwarmRegistry
    from swarmnode.chain.overview import Overview

__all__ = ["register"]

KeyIndex = Annotated[
    int | None,
    typer.Option("--key-index", help="Dev-mnemonic account (dev chains only; 0 is the admin)."),
]
Keystore = Annotated[
    Path | None, typer.Option("--keystore", help="Ethereum V3 keystore file of the signer.")
]
PasswordFile = Annotated[
    Path | None, typer.Option("--password-file", help="File holding the keystore's password.")
]

chain_app = typer.Typer(help="Run a local dev chain.", no_args_is_help=True)
contract_app = typer.Typer(help="Deploy a training (the same as `swarmnode training`).",
                           no_args_is_help=True)
registry_app = typer.Typer(help="The consortium's SwarmRegistry: deployed once, outlives "
                           "trainings.", no_args_is_help=True)
training_app = typer.Typer(help="Trainings (SwarmTraining) on the consortium's registry.",
                           no_args_is_help=True)
RegistryAddress = Annotated[str | None, typer.Option(
    "--registry", envvar="SWARMNODE_REGISTRY", help="The consortium's SwarmRegistry (from "
    "`swarmnode registry deploy`); none: a new registry just for this training.")]


# ---------------------------------------------------------------------------------- helpers


def _signer(rpc_url: str, key_index: int | None, keystore: Path | None,
            password_file: Path | None, default_index: int | None) -> tuple[Any, LocalAccount]:
    from swarmnode.chain.accounts import account_for
    from swarmnode.chain.client import connect

    w3 = connect(rpc_url)
    if key_index is None and keystore is None:
        key_index = default_index
    if keystore is not None and password_file is None:
        raise ConfigError(f"--keystore {keystore} needs --password-file")
    return w3, account_for(w3, key_index=key_index, keystore=keystore, password_file=password_file)


def _contract(rpc_url: str, address: str, account: LocalAccount | None = None,
              w3: Any = None) -> SwarmContract:
    from swarmnode.chain.client import SwarmContract, connect

    # a registry's address names its one running training (status, audit, report, authorize)
    return SwarmContract.resolve(w3 if w3 is not None else connect(rpc_url), address, account)


def _registry(address: str, account: LocalAccount, w3: Any) -> SwarmRegistry:
    """The consortium's registry: at ``address``, or the one of the training at ``address``
    (authorising and revoking are the registry's, whatever trainings run on it)."""
    from swarmnode.chain.client import SwarmContract, SwarmRegistry
    from swarmnode.errors import ContractNotFound

    try:
        return SwarmRegistry(w3, address, account)
    except ContractNotFound as not_registry:
        try:
            return SwarmContract(w3, address, account).registry
        except ContractNotFound:
            raise not_registry from None


def _fingerprint(cert: Path | None, hex_value: str | None) -> bytes:
    if (cert is None) == (hex_value is None):
        raise ConfigError("pass exactly one of --cert node.pem or --fingerprint HEX")
    if hex_value is not None:
        text = hex_value.strip().lower().removeprefix("0x").replace(":", "")
        try:
            value = bytes.fromhex(text)
        except ValueError:
            value = b""
        if len(value) != 32:
            raise ConfigError(
                f"--fingerprint {hex_value!r} is not 64 hex digits (the certificate's SHA-256)"
            )
        return value
    assert cert is not None
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        data = cert.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate {cert}: {exc.strerror or exc}") from None
    try:
        parsed = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise IdentityError(
            f"{cert} is not a PEM certificate; pass the node's certificate (node.pem)"
        ) from None
    return parsed.fingerprint(hashes.SHA256())


def _tx_line(what: str, result: Any) -> None:
    console.print(
        f"{what} (tx {result.tx_hash[:12]}…, block {result.block}, gas {result.gas_used})",
        highlight=False,
        soft_wrap=True,
    )


def _short(value: bytes | str | None, n: int = 10) -> str:
    if value is None:
        return "-"
    text = value.hex() if isinstance(value, bytes) else value
    return text if len(text) <= n + 2 else text[: n + 2] + "…"


# ---------------------------------------------------------------------------------- commands


@chain_app.command("up")
@command
def chain_up(
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free).")] = 8545,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    state_file: Annotated[
        Path | None, typer.Option("--state-file", help="Keep the chain in this file across runs.")
    ] = None,
    block_time: Annotated[
        float,
        typer.Option("--block-time", help="An empty block every S seconds, so that grace periods "
                     "and round deadlines pass without traffic (transactions are mined at once; "
                     "0: automine only)."),
    ] = 1.0,
) -> None:
    """Run a local anvil dev chain in the foreground until Ctrl-C or SIGTERM."""
    from swarmnode.chain.accounts import dev_account
    from swarmnode.chain.launcher import DevChain
    from swarmnode.errors import ChainUnavailable

    stop = threading.Event()
    chain = DevChain(port=port, host=host, state_file=state_file, block_time=block_time or None)
    chain.start()
    try:
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        watcher = threading.Thread(target=lambda: (chain.wait(), stop.set()), daemon=True)
        watcher.start()
        table = Table(title="dev accounts (public mnemonic: dev chains only)")
        table.add_column("--key-index", justify="right")
        table.add_column("address")
        table.add_column("role")
        for i in range(10):
            table.add_row(str(i), dev_account(i).address, "admin" if i == 0 else "node")
        console.print(table)
        mode = f"automine + a block every {block_time:g} s" if block_time else "automine"
        kept = f", state in {state_file}" if state_file else ""
        console.print(f"dev chain listening on {chain.url} (chain id {chain.chain_id}, {mode}"
                      f"{kept})", highlight=False, soft_wrap=True)
        console.print(f"export SWARMNODE_RPC_URL={chain.url}", highlight=False, soft_wrap=True)
        console.file.flush()
        stop.wait()
        if not chain.running:
            tail = " | ".join(x for x in chain.output().splitlines()[-3:] if x.strip())
            raise ChainUnavailable(f"anvil exited unexpectedly: {tail or '(no output)'}")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    finally:
        chain.stop()
    saved = f"; state saved in {state_file}" if state_file else ""
    err_console.print(f"dev chain stopped{saved}", highlight=False, soft_wrap=True)


@chain_app.command("gateway")
@command
def chain_gateway(
    cert: Annotated[Path, typer.Option(
        "--cert", envvar="SWARMNODE_CERT", help="The gateway's certificate: the sentinel's node "
        "certificate (it names the host the sites dial).")],
    key: Annotated[Path, typer.Option("--key", envvar="SWARMNODE_KEY",
                                      help="That certificate's key.")],
    trust: Annotated[Path, typer.Option(
        "--trust", envvar="SWARMNODE_TRUST", help="The consortium's trust bundle: a client "
        "certificate must chain to one of its CAs.")],
    upstream: Annotated[str, typer.Option(
        "--upstream", help="The chain's own JSON-RPC URL, reachable only here "
        "(e.g. http://chain:8545).")] = DEFAULT_RPC_URL,
    listen: Annotated[str, typer.Option(
        "--listen", help="host:port the gateway listens on (other sites dial it).")] = (
        "0.0.0.0:8545"),
    max_body_kb: Annotated[int, typer.Option(
        "--max-body-kb", min=1, help="Largest request body accepted.")] = 4096,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", min=1, help="Open connections at once (more are closed).")] = 64,
    handshake_timeout: Annotated[float, typer.Option(
        "--handshake-timeout", min=0.1, help="Seconds a client has for the whole TLS "
        "handshake.")] = 5.0,
) -> None:
    """Serve the chain to other sites: mutual TLS, standard eth_*/net_*/web3_* methods only.

    A dev consortium on separate hosts publishes this instead of the dev chain: anvil_*,
    evm_*, hardhat_*, debug_*, eth_sendTransaction and every other method not on the gateway's
    allow-list are refused with a JSON-RPC error naming the method.
    """
    from swarmnode.chain.gateway import ALLOWED_METHODS, ChainGateway, GatewayLimits
    from swarmnode.identity.tls import TlsFiles

    limits = GatewayLimits(max_body_bytes=max_body_kb * 1024, max_connections=max_connections,
                           handshake_timeout_s=handshake_timeout)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ChainGateway(upstream, listen, TlsFiles(cert=cert, key=key, trust=trust),
                          limits) as gateway:
            allowed = ", ".join(sorted(ALLOWED_METHODS))
            console.print(f"chain gateway on {listen} (port {gateway.port}) -> {upstream}: "
                          f"mutual TLS against {trust}; passes {allowed}",
                          highlight=False, soft_wrap=True)
            console.file.flush()
            gateway.wait(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    err_console.print("chain gateway stopped", highlight=False, soft_wrap=True)


@chain_app.command("check")
@command
def chain_check(
    contract: ContractAddress,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    wait: Annotated[float, typer.Option(
        "--wait", min=0, help="Seconds to wait for the chain to answer and the contract to be "
        "there (a sentinel starting, its deploy service deploying) before failing.")] = 50.0,
) -> None:
    """Check that the chain answers and the training (or registry) is deployed there; fail with
    the reason after --wait seconds (a site's node would only wait, saying so in its log)."""
    from swarmnode.chain.client import SwarmContract
    from swarmnode.chain.rpc import connect
    from swarmnode.errors import ChainUnavailable, ContractNotFound

    deadline = time.monotonic() + wait
    while True:
        try:
            chain = SwarmContract.resolve(connect(rpc_url), contract)
            break
        except (ChainUnavailable, ContractNotFound) as exc:
            if time.monotonic() >= deadline:
                what = ("check RPC_URL in the site's .env, that the sentinel runs and that this "
                        "host reaches it" if isinstance(exc, ChainUnavailable) else
                        "check CONTRACT in the site's .env (the kit's), and that the sentinel's "
                        "deploy service deployed it on this chain")
                raise type(exc)(f"{exc} (waited {wait:.0f} s; {what})") from None
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    console.print(f"the chain at {rpc_url} answers; training {chain.address} is deployed there",
                  highlight=False, soft_wrap=True)


@chain_app.command("fund")
@command
def chain_fund(
    address: Annotated[str, typer.Argument(help="The account to send ETH to.")],
    eth: Annotated[float, typer.Option("--eth", min=0, help="How many ETH to send.")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_index: KeyIndex = None,
    keystore: Keystore = None,
    password_file: PasswordFile = None,
    at_least: Annotated[bool, typer.Option(
        "--at-least", help="Send only what brings the balance up to --eth (a re-run sends "
        "nothing).")] = False,
) -> None:
    """Send ETH to an account (a dev chain funds the consortium's fresh admin from a dev
    account, inside the sentinel only)."""
    from web3 import Web3

    from swarmnode.chain.rpc import rpc_guard
    from swarmnode.chain.tx import TxSender
    from swarmnode.errors import ContractReverted

    if not Web3.is_address(address):
        raise ConfigError(f"{address!r} is not a chain address (0x and 40 hex digits)")
    target = Web3.to_checksum_address(address)
    w3, payer = _signer(rpc_url, key_index, keystore, password_file, default_index=0)
    wei = int(eth * 10**18)
    if at_least:
        with rpc_guard(w3, f"reading the balance of {target}"):
            wei = max(0, wei - int(w3.eth.get_balance(target)))
    if wei == 0:
        console.print(f"{target} already holds {eth:g} ETH or more; nothing sent",
                      highlight=False, soft_wrap=True)
        return
    what = f"sending {wei / 10**18:g} ETH to {target}"
    receipt = TxSender(w3, payer).send(
        {"to": target, "value": wei}, what, lambda r: ContractReverted(f"{what} failed: {r}"),
        gas=21_000)
    console.print(f"sent {wei / 10**18:g} ETH from {payer.address} to {target} (block "
                  f"{int(receipt['blockNumber'])})", highlight=False, soft_wrap=True)


@registry_app.command("deploy")
@command
def registry_deploy(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_index: KeyIndex = None,
    keystore: Keystore = None,
    password_file: PasswordFile = None,
    fmt: Format = OutputFormat.table,
) -> None:
    """Deploy the consortium's SwarmRegistry (the admin, once); prints its address.

    Sites are authorised in it once; every training deployed on it (`swarmnode training
    deploy --registry ...`) sees them, and a revocation in it takes effect in all of them."""
    from swarmnode.chain.client import SwarmRegistry

    w3, admin = _signer(rpc_url, key_index, keystore, password_file, default_index=0)
    registry = SwarmRegistry.deploy(w3, admin)
    if fmt is OutputFormat.json:
        print_json({"registry": registry.address, "admin": admin.address, "rpc_url": rpc_url})
    else:
        err_console.print(f"SwarmRegistry deployed by {admin.address}; export "
                          f"SWARMNODE_REGISTRY={registry.address}", highlight=False,
                          soft_wrap=True)
        console.print(registry.address, highlight=False, soft_wrap=True)


@training_app.command("deploy")
@contract_app.command("deploy")
@command
def contract_deploy(
    spec: Annotated[Path, typer.Option("--spec", help="Training spec JSON file to pin.")],
    min_peers: Annotated[int, typer.Option("--min-peers", min=1, help="Quorum per round.")],
    grace: Annotated[int, typer.Option("--grace", min=0, help="Seconds after the first "
                                       "check-in before a quorum may elect.")],
    deadline: Annotated[int, typer.Option("--deadline", min=1, help="Seconds a leader has "
                                          "to commit before re-election.")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_index: KeyIndex = None,
    keystore: Keystore = None,
    password_file: PasswordFile = None,
    fmt: Format = OutputFormat.table,
    record: Annotated[Path | None, typer.Option(
        "--record", help="Write the deployment here (JSON); when it already names a contract "
        "on this chain, deploy nothing and print that one (a re-run is a no-op).")] = None,
    registry: RegistryAddress = None,
) -> None:
    """Deploy a training (SwarmTraining) on the consortium's registry; prints its address.

    The signer must be the registry's admin; the training is listed in the registry, and every
    site authorised there may join it without a new authorisation."""
    import os

    from swarmnode.chain.client import SwarmContract
    from swarmnode.errors import ContractNotFound

    try:
        spec_json = spec.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the training spec {spec}: {exc}") from None
    try:
        json.loads(spec_json)
    except ValueError as exc:
        raise ConfigError(f"training spec {spec} is not valid JSON: {exc}") from None
    w3, admin = _signer(rpc_url, key_index, keystore, password_file, default_index=0)
    contract = None
    if record is not None and record.exists():
        try:
            previous = json.loads(record.read_text())["address"]
            contract = SwarmContract(w3, previous, admin)
            err_console.print(f"{record} names the contract {previous}, deployed on this chain; "
                              "nothing to deploy", highlight=False, soft_wrap=True)
        except (OSError, ValueError, KeyError, TypeError, ContractNotFound):
            contract = None  # not on this chain (a new dev chain): deploy afresh
    if contract is None:
        contract = SwarmContract.deploy(w3, admin, spec_json, min_peers, grace, deadline,
                                        registry=registry)
        if record is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"address": contract.address, "rpc_url": rpc_url,
                                          "registry": contract.registry.address}))
    expected = os.environ.get("SWARMNODE_CONTRACT")
    if expected and expected.lower() in {t.lower() for t in contract.registry.trainings()}:
        expected = None  # a later training on the same registry (`swarmnode consortium training`)
    if expected and expected.lower() != contract.address.lower():
        err_console.print(f"warning: SWARMNODE_CONTRACT is {expected}, but the contract is at "
                          f"{contract.address}: set CONTRACT={contract.address} in every site's "
                          ".env", highlight=False, soft_wrap=True)
    if fmt is OutputFormat.json:
        settings = contract.settings()
        print_json({"address": contract.address, "registry": contract.registry.address,
                    "admin": settings.admin,
                    "spec_hash": settings.spec_hash.hex(), "min_peers": min_peers,
                    "grace_s": grace, "deadline_s": deadline, "rpc_url": rpc_url})
    else:
        err_console.print(f"SwarmTraining deployed by {admin.address} on the registry "
                          f"{contract.registry.address}; export "
                          f"SWARMNODE_CONTRACT={contract.address}", highlight=False,
                          soft_wrap=True)
        console.print(contract.address, highlight=False, soft_wrap=True)


@command
def authorize(
    address: Annotated[str, typer.Argument(help="The node's chain address.")],
    contract: ContractAddress,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="The node's certificate (PEM).")
    ] = None,
    fingerprint: Annotated[
        str | None, typer.Option("--fingerprint", help="SHA-256 of the certificate's DER (hex).")
    ] = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_index: KeyIndex = None,
    keystore: Keystore = None,
    password_file: PasswordFile = None,
    fund: Annotated[float, typer.Option(
        "--fund", min=0, help="First send this many ETH from the admin's account to the node "
        "(dev chains: a site that made its own account has nothing to pay gas with).")] = 0.0,
    once: Annotated[bool, typer.Option(
        "--once", help="Send nothing for a site already authorised with this certificate, or "
        "revoked (a revocation stands): a re-run (the sentinel's deploy service, a next "
        "training) changes nothing.")] = False,
) -> None:
    """Authorise a node address with its certificate (admin; again to rotate the certificate)."""
    fp = _fingerprint(cert, fingerprint)
    w3, admin = _signer(rpc_url, key_index, keystore, password_file, default_index=0)
    chain = _registry(contract, admin, w3)
    if once:
        site = chain.site(address)
        if site.revoked:
            console.print(f"{address} is revoked in the registry {chain.address}: "
                          "left so; nothing sent", highlight=False, soft_wrap=True)
            return
        if site.authorized and site.fingerprint == fp:
            console.print(f"{address} is already authorised with certificate "
                          f"{fp.hex()[:16]}…; nothing sent", highlight=False, soft_wrap=True)
            return
    if fund > 0:  # before authorising: an authorised node enrols at once and needs the gas
        _tx_line(f"sent {fund:g} ETH to {address}", chain.fund(address, int(fund * 10**18)))
    result = chain.authorize(address, fp)
    _tx_line(f"authorized {address} with certificate {fp.hex()[:16]}…", result)


@command
def revoke(
    address: Annotated[str, typer.Argument(help="The node's chain address.")],
    contract: ContractAddress,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_index: KeyIndex = None,
    keystore: Keystore = None,
    password_file: PasswordFile = None,
) -> None:
    """Revoke a node in the consortium's registry (admin; --contract: the registry or any of its
    trainings): it can take no further part in any of its trainings."""
    w3, admin = _signer(rpc_url, key_index, keystore, password_file, default_index=0)
    result = _registry(contract, admin, w3).revoke(address)
    _tx_line(f"revoked {address} in the registry (every training it lists)", result)


@command
def enroll(
    endpoint: Annotated[str, typer.Option("--endpoint", help="This node's peer API host:port.")],
    contract: ContractAddress,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_index: KeyIndex = None,
    keystore: Keystore = None,
    password_file: PasswordFile = None,
) -> None:
    """Enrol this node (an authorised address) with its peer endpoint."""
    if key_index is None and keystore is None:
        raise ConfigError("enroll signs as the node: pass --key-index N (dev chain) or --keystore")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--endpoint {endpoint!r} is not host:port (e.g. 10.0.0.5:7100)")
    w3, node = _signer(rpc_url, key_index, keystore, password_file, default_index=None)
    result = _contract(rpc_url, contract, node, w3).enroll(endpoint)
    _tx_line(f"enrolled {node.address} at {endpoint}", result)


@command
def status(
    contract: SiteContract = None,
    rpc_url: SiteRpcUrl = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Show the last N rounds.")] = 20,
    fmt: Format = OutputFormat.table,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Refresh until Ctrl-C (JSON: one object per line per refresh).")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1,
                                            help="Seconds between refreshes.")] = 2.0,
    count: Annotated[int, typer.Option(
        "--count", min=0, help="With --watch: stop after N refreshes (0: never).")] = 0,
    names: Annotated[Path | None, typer.Option(
        "--names", help="CSV with name and address columns (the consortium's sites.csv): "
        "sites by name. Without it, a site is named by its endpoint's host.")] = None,
) -> None:
    """The training on chain: settings, sites, rounds, and what the current round waits for
    (in a site's folder, the training and chain its kit names)."""
    from swarmnode.chain.overview import overview, read_names

    w3, contract, names = site_defaults(rpc_url, contract, names)
    by_address = read_names(names) if names is not None else None
    chain = _contract("", contract, w3=w3)
    shown = 0
    while True:
        view = overview(chain, last_rounds=rounds, names=by_address)
        if fmt is OutputFormat.json and watch:
            print(json.dumps(view.to_json(), separators=(",", ":")), flush=True)
        elif fmt is OutputFormat.json:
            print_json(view.to_json())
        else:
            if watch:
                console.clear()
            _print_overview(view)
        shown += 1
        if not watch or (count and shown >= count) or (view.training_finished and shown > 1):
            return
        time.sleep(interval)


NODE_CONFIG_NAMES = ("node.yaml", "node.yml")


def _from_data_dir(data_dir: Path) -> tuple[str | None, str | None]:
    """The chain RPC URL and training in the node config (``node.yaml``) of a node's data dir:
    in that folder, or in its parent (``swarmnode demo`` keeps ``<site>/node.yaml`` next to
    ``<site>/data``); the training is its ``contract``, else its ``registry`` (the one training
    it runs). None for what the config does not set."""
    import yaml

    if not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir} is not a folder")
    candidates = [d / n for d in (data_dir, data_dir.resolve().parent) for n in NODE_CONFIG_NAMES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(
            f"no node config ({' or '.join(NODE_CONFIG_NAMES)}) in {data_dir} or its parent; "
            "pass --contract and --rpc-url instead"
        )
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the node config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"node config {path} must hold a mapping of settings")
    rpc_url, contract = loaded.get("rpc_url"), loaded.get("contract") or loaded.get("registry")
    return (str(rpc_url) if rpc_url else None, str(contract) if contract else None)


@command
def report(
    contract: Annotated[str | None, typer.Option(
        "--contract", envvar="SWARMNODE_CONTRACT",
        help="Address of the SwarmLearning contract (else the one in --data-dir's node config, "
        "else, in a site's folder, its kit's training).",
    )] = None,
    rpc_url: Annotated[str | None, typer.Option(
        "--rpc-url", envvar="SWARMNODE_RPC_URL",
        help=f"Chain JSON-RPC URL (else --data-dir's node config, else the one a site folder's "
        f"kit names, as this host reaches it, else {DEFAULT_RPC_URL}).",
    )] = None,
    names: Annotated[Path | None, typer.Option(
        "--names", help="CSV with name and address columns (the consortium's sites.csv): "
        "sites by name. Without it, a site is named by its endpoint's host.")] = None,
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for report.csv and report.png (created if needed).")] = Path(
        "swarm-report"),
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="A node's data dir: take the chain and contract from its node config "
        "(node.yaml there or in its parent) when --rpc-url / --contract are not given.")] = None,
    metric_name: Annotated[str, typer.Option(
        "--metric-name", help="What the sites' metric is (the plot's label; the chain records "
        "only its values), e.g. accuracy, F1Score (HPE's metricFunction).")] = "metric",
) -> None:
    """The swarm's convergence: validation loss and metric per round and site (a DP site's
    epsilon at its delta too), as report.csv and report.png."""
    from swarmnode.chain.overview import read_names
    from swarmnode.chain.report import collect, summarize
    from swarmnode.chain.report import report as write_report

    if data_dir is not None and (contract is None or rpc_url is None):
        dir_rpc, dir_contract = _from_data_dir(data_dir)
        contract = contract or dir_contract
        rpc_url = rpc_url or dir_rpc
    if contract is None and data_dir is not None:
        raise ConfigError(f"no contract given and the node config of {data_dir} names none: "
                          "pass --contract ADDR (or set SWARMNODE_CONTRACT)")
    w3, contract, names = site_defaults(rpc_url, contract, names)  # a site folder's kit
    by_address = read_names(names) if names is not None else None
    chain = _contract("", contract, w3=w3)
    rows = collect(chain, by_address)
    csv_path, png_path = write_report(chain, out, names=by_address, rows=rows,
                                      metric_name=metric_name)
    console.print(f"{csv_path}\n{png_path}", highlight=False, markup=False, soft_wrap=True)
    table = Table(title=f"{len({r.round for r in rows})} round(s) with metrics")
    for col in ("site", "rounds", "first round", "loss", "metric", "last round", "loss",
                "metric", "epsilon (δ)"):
        table.add_column(col)
    for s in summarize(rows):
        table.add_row(s.site, str(s.rounds), str(s.first.round), f"{s.first.loss:.4f}",
                      f"{s.first.metric:.4f}", str(s.last.round), f"{s.last.loss:.4f}",
                      f"{s.last.metric:.4f}", s.last.privacy)
    console.print(table)
    _print_privacy(chain, out)


def _print_privacy(chain: SwarmContract, out: Path) -> None:
    """Distributed noise (privacy.ledger): the swarm's epsilon per round and in total, computed
    from the chain's record alone, printed and written to privacy.json."""
    from swarmnode.privacy.ledger import from_chain

    summary = from_chain(chain)
    if summary is None:
        return
    path = out / "privacy.json"
    path.write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
    table = Table(title=f"distributed noise: the swarm's epsilon at delta {summary.delta:g} "
                        "(against any one participant; outsider: a reader who took no part)")
    for col in ("round", "noise shares", "epsilon", "outsider"):
        table.add_column(col)
    for r in summary.rounds:
        shown = (("-", "-") if not r.summed else ("not covered", "not covered")
                 if not r.covered else (f"{r.epsilon:.4g}", f"{r.outsider:.4g}"))
        table.add_row(str(r.round), f"{r.shares} of {r.expected}", *shown)
    console.print(table)
    console.print(f"{summary.line()}\n{path}", highlight=False, markup=False, soft_wrap=True)


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S") if ts else "-"


def _print_overview(view: Overview) -> None:
    s = view.settings
    final = view.final_round if view.final_round is not None else "not fixed"
    state = "finished" if view.training_finished else f"round {view.current_round}"
    console.print(
        f"[bold]contract[/] {view.contract} on {view.chain}\n"
        f"spec {s.spec_hash.hex()[:16]}…  min peers {s.min_peers}  grace {s.grace_s} s  "
        f"deadline {s.deadline_s} s  admin {s.admin}\n"
        f"training: {state}, final round {final}, {view.active_count} active node(s)",
        highlight=False,
        soft_wrap=True,
    )
    w = view.waiting
    if w is not None and w.stage != "finished":
        since = f" for {view.now - w.since} s" if w.since else ""
        what = {"check-in": f"check-ins from {', '.join(w.waiting_for) or 'nobody (grace)'}",
                "draw": "the leader draw (the next block)",
                "merge": f"the merge and commit of leader {w.leader}"
                         f" (deadline {_when(w.deadline or 0)})"}[w.stage]
        joined = f"; checked in: {', '.join(w.checked_in)}" if w.checked_in else ""
        console.print(f"round {w.round} waits{since} for {what}{joined}", highlight=False,
                      soft_wrap=True)
    nodes = Table(title="sites")
    for col in ("site", "address", "endpoint", "certificate", "state", "last seen (UTC)",
                "epsilon (δ)"):
        nodes.add_column(col)
    for n in view.nodes:
        dp = view.privacy.get(n.address)
        nodes.add_row(view.names.get(n.address, n.address), n.address, n.endpoint,
                      _short(n.fingerprint, 12), n.state, _when(n.last_seen),
                      f"{dp.label} r{dp.round}" if dp else "-")
    console.print(nodes)
    rounds = Table(title="rounds")
    for col in ("round", "status", "leader", "attempt", "participants", "digest", "loss",
                "metric", "epsilon"):
        rounds.add_column(col)
    for r in view.rounds:
        i = r.info
        label = f"{i.round}{' (final)' if i.is_final else ''}"
        rounds.add_row(
            label, i.status.name.lower(), view.name(i.leader) or "-", str(i.attempt or "-"),
            str(len(i.participants)), _short(i.digest),
            f"{r.mean_loss:.4f}" if r.mean_loss is not None else "-",
            f"{r.mean_metric:.4f}" if r.mean_metric is not None else "-",
            ", ".join(f"{view.name(a)} {p.epsilon:.4g}" for a, p in r.privacy.items()) or "-",
        )
    console.print(rounds)


def register(app: typer.Typer) -> None:
    """Add the chain commands to the ``swarmnode`` app."""
    app.add_typer(chain_app, name="chain")
    app.add_typer(contract_app, name="contract")
    app.add_typer(registry_app, name="registry")
    app.add_typer(training_app, name="training")
    app.command("authorize")(authorize)
    app.command("revoke")(revoke)
    app.command("enroll")(enroll)
    app.command("status")(status)
    app.command("report")(report)
