"""Node service settings: one loader, precedence file < environment < command-line flag.

The file is YAML (or JSON); environment variables are ``SWARMNODE_<FIELD>`` (upper case, e.g.
``SWARMNODE_RPC_URL``); flags are passed as a dict of overrides. Unknown keys are refused with the
list of known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarmnode.errors import ConfigError
from swarmnode.node.faults import NO_FAULTS, Faults

if TYPE_CHECKING:
    from swarmnode.transport.listener import ListenerLimits

__all__ = ["DEFAULT_PEER_PORT", "FaultSettings", "NodeConfig", "load_config"]

ENV_PREFIX = "SWARMNODE_"
DEFAULT_PEER_PORT = 7441  # the peer API's own port (not geth's 30303)
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]", "*")
_FILE_ONLY = ("faults",)  # never from the environment or a flag


class FaultSettings(BaseModel):
    """Test-only: faults the failure tests inject into a real node process (formats in
    :mod:`swarmnode.node.faults`). Only from the config file; a production node has none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stall_commit: str = Field(
        "", description="ROUND:ATTEMPT[:SECONDS],...: as that round's leader at that attempt, "
        "hang before committing.")
    exit: str = Field(
        "", description="POINT:ROUND[+]: the process exits (137) at before-checkin, "
        "before-push, after-push or after-commit of that round (+: or the first later one that "
        "gets there).")

    @model_validator(mode="after")
    def _parses(self) -> FaultSettings:
        self.build()  # ValueError: named in the config error
        return self

    def build(self) -> Faults:
        return Faults.parse(self.stall_commit, self.exit)


class NodeConfig(BaseModel):
    """Everything `swarmnode run` needs. Paths are relative to the config file's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Human-readable node name (logs, demo tables).")
    rpc_url: str = Field("http://127.0.0.1:8545", description="Chain JSON-RPC URL.")
    contract: str | None = Field(
        None, description="Address of the training's contract (SwarmTraining); or the "
        "consortium's registry, for the one training it runs.")
    registry: str | None = Field(
        None, description="The consortium's registry (SwarmRegistry): alone, the node joins "
        "the one training it runs; with contract, the training must be one of its own.")
    key_index: int | None = Field(None, description="Dev-chain account index (dev chains only).")
    keystore: Path | None = Field(None, description="Encrypted keystore file (real networks).")
    keystore_password_file: Path | None = None
    peer_listen: str = Field(
        f"0.0.0.0:{DEFAULT_PEER_PORT}", description="host:port the peer API binds."
    )
    peer_endpoint: str | None = Field(
        None,
        description="host:port other sites use to reach this node (enrolled on chain); required "
        "when peer_listen binds every interface.",
    )
    data_port: int | None = Field(
        None,
        ge=-1,
        le=65535,
        description="Port of the bulk data plane (models between sites, mutual TLS, same host as "
        "peer_listen); other sites learn it from the peer API. Default: the peer port + 1 (any "
        "free port when the peer port is 0); -1: none (models then travel over gRPC, slower). "
        "Reachable at this number: publish it 1:1.",
    )
    one_port: bool = Field(
        False,
        description="Serve the peer API and the data plane on the one port of peer_listen, told "
        "apart by the TLS ClientHello's ALPN (for a site that can open only one port); gRPC "
        "then listens on loopback behind it and carries control; leave data_port unset.",
    )
    data_handshake_timeout_s: float = Field(
        10.0, gt=0, le=300,
        description="A connection to the data plane must finish its TLS handshake and send its "
        "request within this many seconds of being accepted, or it is dropped; until then it "
        "holds no worker.")
    data_pending_per_address: int = Field(
        64, ge=1, le=65536,
        description="Data plane connections one IP address may have in their TLS handshake at "
        "once; more from that address are closed at once.")
    data_pending_total: int = Field(
        256, ge=1, le=65536,
        description="Data plane connections in their TLS handshake at once, in all; when full, "
        "the oldest of the address with the most is dropped.")
    local_api: str | None = Field(
        None,
        description="Local API: unix:///path.sock (default data_dir/node.sock) or host:port.",
    )
    local_api_mode: str = Field(
        "0600",
        pattern=r"^0?[0-7]{3}$",
        description="Permissions of the local API socket (octal); 0660 lets the socket's group "
        "(the trainer container's user) call it. Never world-accessible.",
    )
    local_api_group: str | None = Field(
        None, description="Group (name or gid) that owns the local API socket."
    )
    start_timeout_s: float = Field(
        600.0, gt=0,
        description="At start-up, wait this long for the chain, the contract and this node's "
        "authorisation before giving up.",
    )
    cert: Path = Field(description="This node's certificate (PEM).")
    key: Path = Field(description="This node's private key (PEM).")
    trust: Path = Field(description="Trust bundle: the CA certificates of every organisation.")
    data_dir: Path = Field(Path("swarm-data"), description="Merged models and node state.")
    max_update_mb: float = Field(2048.0, gt=0, description="Largest accepted parameter payload.")
    peer_served_pulls: bool = Field(
        True, description="Fetch each round's merged model in verified parts: this node's "
        "share from the leader, the rest from the other members as they receive theirs (the "
        "leader's link carries about one model instead of one per member); false: the whole "
        "model from the leader. Every node serves parts whatever this says; it only decides "
        "how this node fetches.")
    reject_nonfinite: bool = Field(True, description="Refuse updates holding NaN or Inf.")
    secure_audit_every: int = Field(
        0, ge=0, description="Secure aggregation: after every k-th committed round this site "
        "added to (and did not lead), fetch the leader's evidence and check its sum against the "
        "chain (node.secaudit; `swarmnode audit --round N` does it on demand); a mismatch is "
        "logged as an error. 0: never (each check moves every summed masked update).")
    metrics_listen: str | None = Field(
        None, description="HOST:PORT for Prometheus metrics (GET /metrics, plain HTTP, "
        "read-only: the round, stage timings, bytes moved, chain latency, the site's last "
        "loss); off when unset. Bind it where only the site's monitoring reaches.")
    collect_fraction: float = Field(
        0.5, gt=0, lt=1, description="Leader waits this share of the round deadline for stragglers."
    )
    round_timeout_s: float = Field(3600.0, gt=0, description="Give up a round after this long.")
    poll_s: float = Field(0.05, gt=0, description="Chain polling interval.")
    tx_bump_after_s: float = Field(
        30.0, gt=0,
        description="Replace a transaction still pending after this long with one paying a "
        "higher fee (same nonce); never queue another behind it.",
    )
    confirmations: int = Field(
        0, ge=0, le=64,
        description="Blocks on top of a transaction's block before the node counts it as done "
        "(0 on anvil and PoA chains with instant finality).",
    )
    faults: FaultSettings | None = Field(
        None, description="Test-only: faults injected by the failure tests (config file only).")
    log_level: str = "INFO"
    log_format: Literal["plain", "json"] = Field(
        "plain", description="Log lines: plain text or one JSON object per line, each with the "
        "site, round and stage.")

    @model_validator(mode="after")
    def _account(self) -> NodeConfig:
        if self.key_index is None and self.keystore is None:
            raise ValueError("set key_index (dev chain) or keystore (real network)")
        return self

    @model_validator(mode="after")
    def _training(self) -> NodeConfig:
        if not self.contract and not self.registry:
            raise ValueError("set contract (the training's address) or registry (the "
                             "consortium's registry, for the one training it runs)")
        return self

    @model_validator(mode="after")
    def _pending(self) -> NodeConfig:
        if self.data_pending_per_address > self.data_pending_total:
            raise ValueError(
                f"data_pending_per_address {self.data_pending_per_address} is more than "
                f"data_pending_total {self.data_pending_total}: one address could take every "
                "pending slot; lower data_pending_per_address or raise data_pending_total")
        return self

    @model_validator(mode="after")
    def _one_port(self) -> NodeConfig:
        if self.one_port and self.data_port is not None:
            raise ValueError(
                f"one_port serves the data plane on the peer port, yet data_port is "
                f"{self.data_port}; remove data_port (or one_port)")
        return self

    @model_validator(mode="after")
    def _socket_mode(self) -> NodeConfig:
        if int(self.local_api_mode, 8) & 0o007:
            raise ValueError(
                f"local_api_mode {self.local_api_mode} gives every user on the machine access "
                "to the local API; use 0600 (owner) or 0660 (owner and local_api_group)"
            )
        return self

    @model_validator(mode="after")
    def _reachable_endpoint(self) -> NodeConfig:
        if self.peer_endpoint is None:
            host = self.peer_listen.rpartition(":")[0]
            if host in _WILDCARD_HOSTS:
                raise ValueError(
                    f"peer_listen {self.peer_listen} binds every interface, so it is not an "
                    "address other sites can reach; set peer_endpoint (SWARMNODE_PEER_ENDPOINT) "
                    f"to the host:port they dial, e.g. hospital-a.example.org:{DEFAULT_PEER_PORT}"
                )
        elif self.peer_endpoint.rpartition(":")[0] in _WILDCARD_HOSTS:
            raise ValueError(
                f"peer_endpoint {self.peer_endpoint} is not an address other sites can reach; "
                "use the DNS name or IP they dial"
            )
        return self

    @property
    def fault_plan(self) -> Faults:
        """The faults this node injects (none unless the test-only ``faults:`` section says);
        an exit fault that already fired on this data folder is not injected again."""
        return self.faults.build().once_in(self.data_dir) if self.faults is not None \
            else NO_FAULTS

    @property
    def endpoint(self) -> str:
        return self.peer_endpoint or self.peer_listen

    @property
    def listener_limits(self) -> ListenerLimits:
        """The data plane's limits on connections still in their TLS handshake
        (:class:`swarmnode.transport.listener.ListenerLimits`)."""
        from swarmnode.transport.listener import ListenerLimits

        return ListenerLimits(self.data_handshake_timeout_s, self.data_pending_per_address,
                              self.data_pending_total)

    @property
    def socket_mode(self) -> int:
        return int(self.local_api_mode, 8)

    @property
    def local_target(self) -> str:
        return self.local_api or f"unix://{(self.data_dir / 'node.sock').resolve()}"


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    fields = NodeConfig.model_fields
    out: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields and name not in _FILE_ONLY and value != "":  # "": not set
                out[name] = value
    return out


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Read the config file, then apply SWARMNODE_* environment variables, then flags."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        raw.update(loaded)
        base = Path(path).resolve().parent
    raw.update(_env_overrides(os.environ if env is None else env))
    raw.update({k: v for k, v in (overrides or {}).items()
                if v is not None and k not in _FILE_ONLY})
    unknown = sorted(set(raw) - set(NodeConfig.model_fields))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, NodeConfig.model_fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown setting {name!r}{hint} in {path or 'settings'}; "
            f"known settings: {', '.join(sorted(NodeConfig.model_fields))}"
        )
    try:
        cfg = NodeConfig(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "missing":
            raise ConfigError(
                f"setting {loc} is required: set it in the config file, as "
                f"{ENV_PREFIX}{loc.upper()} in the environment, or with --{loc.replace('_', '-')}"
            ) from None
        raise ConfigError(f"setting {loc} in {path or 'settings'}: {err['msg']}") from None
    # Resolve relative paths against the config file's folder.
    updates = {
        name: (base / value)
        for name in ("cert", "key", "trust", "data_dir", "keystore", "keystore_password_file")
        if isinstance(value := getattr(cfg, name), Path) and not value.is_absolute()
    }
    return cfg.model_copy(update=updates)
