"""`swarmnode run`: the node service of one site.

It enrols the node if needed, serves the peer API (mTLS, to the other sites) and the local API (to
its own trainer), and runs rounds for the trainer through :class:`RoundDriver`. Threads: gRPC's
worker pools serve both APIs; a trainer's ``sync`` call runs its round on the calling worker.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmnode import merge
from swarmnode.chain.accounts import account_for
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.models import NodeInfo, RoundInfo, RoundStatus
from swarmnode.chain.rpc import ChainTls, chain_tls
from swarmnode.chain.watch import BlockWatcher
from swarmnode.config import NodeConfig
from swarmnode.errors import (
    AggregateRejected,
    ChainTimeout,
    ChainUnavailable,
    ConfigError,
    ContractNotFound,
    ContractReverted,
    IdentityError,
    NodeError,
    NodeUnavailable,
    PayloadRejected,
    PeerRefused,
    RoundError,
    SwarmError,
)
from swarmnode.healthcheck import HEALTH_FILE
from swarmnode.identity import TlsFiles, describe
from swarmnode.node import lifecycle, rules
from swarmnode.node.collector import Collectors
from swarmnode.node.driver import RoundDriver, RoundOutcome
from swarmnode.node.lifecycle import END_POLICIES, Privacy
from swarmnode.node.machine import Timing
from swarmnode.node.metrics import Family, Histogram, MetricsServer, counter, gauge
from swarmnode.node.peers import ChainAuthority, PeerPool
from swarmnode.node.secure import (
    EVIDENCE_DIR,
    SecureAggregation,
    load_or_make_key,
    masked_params,
    masked_spec,
)
from swarmnode.node.sharding import ShardExchange
from swarmnode.node.store import ModelStore, StoredModel
from swarmnode.privacy.guards import MIN_SITES, refuse_until_wired
from swarmnode.spec import TrainingSpec
from swarmnode.transport import compression, serde
from swarmnode.transport.local import LocalServer
from swarmnode.transport.peer import PeerServer
from swarmnode.types import StateDict, Update

__all__ = ["END_POLICIES", "NodeService", "StartupInterrupted"]

log = logging.getLogger("swarmnode.node")
# Stages in which this node itself moves models: what a waiting trainer is told, no chain read.
_OWN_STAGES = {"push": "this node is pushing its update to the round's leader",
               "collect": "this node leads the round: collecting the participants' updates",
               "pull": "this node is fetching the merged model"}

_WAIT_LOG_S = 10.0  # how often a wait says what it is waiting for
_NODES_TTL_S = 60.0  # how long the enrolled nodes read for a waiting trainer's answer are kept
_TRANSIENT = (ChainUnavailable, ChainTimeout)
# Contract events that move a round on for the nodes waiting in it (check-ins are not among
# them: a waiting node needs the election, not each of the N check-ins before it).
SIGNAL_EVENTS = ("RoundClosed", "LeaderElected", "LeaderFailed", "RoundAbandoned", "MergeCommitted",
                 "FinalRound", "TrainingFinished", "NodeFinished", "NodeAbsent")


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system. By default it raises its mmap
    threshold to the size of each freed block (up to 32 MiB), so a model's tensors, freed after a
    round, stay in the heap and the next round's come on top: RSS climbs by models. A fixed 1 MiB
    threshold keeps tensor-sized blocks in their own mappings, returned when freed."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _training(w3: Any, config: NodeConfig, account: Any) -> SwarmContract:
    """The training this node takes part in: ``contract`` (a training, or a registry: its one
    running training), else the one ``registry`` runs (a ContractNotFound while it runs none:
    the start-up waits for the admin to deploy it); with both, the training must be listed in
    that registry."""
    options = {"bump_after_s": config.tx_bump_after_s, "confirmations": config.confirmations}
    named = config.contract or config.registry
    assert named is not None  # NodeConfig: one of them is set
    chain = SwarmContract.resolve(w3, named, account, running_only=True, **options)
    if config.registry and config.contract:
        registry = chain.registry.address
        if registry.lower() != config.registry.lower():
            raise ConfigError(
                f"the training {chain.address} belongs to the registry {registry}, not to "
                f"{config.registry} (the node config's registry); fix contract or registry")
        if chain.address not in chain.registry.trainings():
            raise ConfigError(f"the registry {registry} does not list the training "
                              f"{chain.address}; ask the admin for the consortium's training")
    return chain


class StartupInterrupted(NodeError):
    """The service was asked to stop while it waited for the chain, the contract or its
    authorisation at start-up."""

    exit_code = 0


class _Waiter:
    """Retry ``fn`` while it fails with one of ``errors``, saying every few seconds what is missing,
    until ``timeout`` passes (then the last error, with how long was waited) or ``stop`` is set."""

    def __init__(self, stop: threading.Event, timeout: float, setting: str) -> None:
        self.stop, self.timeout, self.setting = stop, timeout, setting

    def __call__(self, fn, errors: tuple[type[Exception], ...], what: str):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        said = 0.0
        while True:
            try:
                return fn()
            except errors as exc:
                waited = time.monotonic() - started
                if waited >= self.timeout:
                    raise type(exc)(
                        f"{exc} (waited {waited:.0f} s for {what}; raise {self.setting} to wait "
                        "longer)"
                    ) from None
                if waited - said >= _WAIT_LOG_S or said == 0.0:
                    log.warning("waiting for %s: %s", what, exc)
                    said = max(waited, 1e-9)
            if self.stop.wait(min(1.0, max(0.05, self.timeout - waited))):
                raise StartupInterrupted(f"stopped while waiting for {what}")


@dataclass
class _Progress:
    stage: str = "starting"
    round: int = 0
    rounds_done: int = 0
    last_digest: str = ""
    finished: bool = False
    last_commit: float = 0.0  # unix time this node last held a committed round's model
    loss: float | None = None  # the site's last reported loss and metric
    metric: float | None = None
    privacy: Privacy | None = None  # the site's last reported (epsilon, delta); None: not DP


class NodeService:
    """One site's node service. Construction waits (up to ``start_timeout_s``) for the chain to
    answer and the contract to be deployed, since in containers neither is guaranteed to be up
    first; setting ``stop`` ends the wait with :class:`StartupInterrupted`."""

    def __init__(
        self,
        config: NodeConfig,
        stop: threading.Event | None = None,
        *,
        chain: SwarmContract | None = None,
        peers: Callable[[SwarmContract, str, TlsFiles, ChainAuthority], PeerPool] | None = None,
        secure_end_control: bool = False,
    ) -> None:
        """``chain``: a handle of the training that signs as this site, used instead of
        connecting to ``config.rpc_url`` (an in-process chain: :mod:`swarmnode.testing`);
        ``peers``: builds the pool rounds push and pull through (default :class:`PeerPool`,
        the peer API and the data plane). Production passes neither.

        ``secure_end_control``: a control for studies, not a product setting (the in-process
        swarm's ``secure_end_control``): in a training without secure aggregation, this node
        still ends as a secure one does (:meth:`_ends_as_secure`): a finished site runs as
        ``inactive`` (lifecycle.effective_policy) and, once fewer than MIN_SITES sites still
        train, the others finish at their next sync (lifecycle.secure_sums_over), so that a
        plain swarm with this set differs from a secure one only in the masking and its
        encoding; and its leaders commit a round's starting model again when fewer than
        MIN_SITES sites add weight (guards.sums, RoundDriver's ``sum_rule_in_clear``), as a
        secure round does. Ignored under secure aggregation, which applies these rules
        anyway."""
        self.config = config
        _return_freed_memory()
        self._stopped = stop or threading.Event()
        self.tls = TlsFiles(cert=config.cert, key=config.key, trust=config.trust)
        self.tls.load()  # fails early, naming the file, on a missing or mismatched key
        self._start_wait = _Waiter(self._stopped, config.start_timeout_s, "start_timeout_s")
        self._chain_wait = _Waiter(self._stopped, config.round_timeout_s, "round_timeout_s")

        # an https chain (the sentinel's gateway) is dialled with this site's own consortium
        # certificate unless SWARMNODE_CHAIN_* name other files
        chain_files = chain_tls() or ChainTls(cert=config.cert, key=config.key,
                                              trust=config.trust)

        injected = chain

        def attach() -> tuple[SwarmContract, Any]:
            if injected is not None:
                return injected, injected.settings()
            w3 = connect(config.rpc_url, tls=chain_files)
            account = account_for(
                w3,
                key_index=config.key_index,
                keystore=config.keystore,
                password_file=config.keystore_password_file,
            )
            chain = _training(w3, config, account)
            return chain, chain.settings()

        named = " and ".join(f"{k} {v}" for k, v in (("contract", config.contract),
                                                    ("registry", config.registry)) if v)
        self.chain, self.settings = self._start_wait(
            attach, (*_TRANSIENT, ContractNotFound), f"the chain at {config.rpc_url} and {named}",
        )
        self.me = self.chain.account_address
        spec_json = self.chain.spec_json()
        # secure aggregation's seed reveals travel on the data plane (or in process: a pool)
        refuse_until_wired(spec_json,
                           reveals_carried=peers is not None or config.data_port != -1)
        self.spec = TrainingSpec.from_json(spec_json, "the contract's training spec")
        self.param_spec = serde.ParamSpec(
            {name: (p.shape, p.dtype) for name, p in self.spec.params.items()}
        )
        merge.get(self.spec.merge_method)  # unknown rule or options: fail now, not in round 1
        merge.coerce_options(self.spec.merge_method, {
            k: v for k, v in self.spec.merge_options.items() if k != "clip_norm"})
        self.max_bytes = int(config.max_update_mb * 1024 * 1024)
        self.store = ModelStore(config.data_dir, training=self.chain.address)
        # Rounds wait for the next block (or an arriving update), never on fixed sleeps.
        self.watcher = BlockWatcher(
            config.rpc_url, self.chain.latest_block, config.poll_s,
            log_filter=self.chain.log_filter(*SIGNAL_EVENTS),
            websocket=injected is None,  # an injected chain has no URL to subscribe at: polled
        )
        # how updates travel (the spec's compression): the change from the round's start
        self.codec = compression.UpdateCodec(self.spec.compression, self.param_spec.params,
                                             self._round_start)
        self.secure: SecureAggregation | None = None
        self.audits: dict[int, str] = {}  # round -> the automatic check's outcome (ok, failed)
        self.ended_early: str | None = None  # why this site finished before its trainer did
        self._secure_end_control = secure_end_control  # a study's control (see above)
        if self.spec.secure_aggregation:  # pushes are masked updates (one int32/int64 vector)
            self.secure = SecureAggregation(
                self.me, self.chain, load_or_make_key(config.data_dir), self.param_spec.params,
                clip=float(self.spec.merge_options["clip_norm"]),
                weight_cap=int(self.spec.max_weight or 1), min_peers=self.settings.min_peers,
                evidence_dir=Path(config.data_dir) / EVIDENCE_DIR)
            self.codec = compression.UpdateCodec(
                "none", masked_params(self.param_spec.params), self._round_start)
            # a masked push is int32 (narrow ring) or int64 (wide): the round's plan decides
            self.codec.update_spec = masked_spec(self.param_spec.params)
            self.secure.noise = self.spec.distributed_noise  # each site's share (privacy.noise)
        self.collectors = Collectors(self.spec.merge_method, self.spec.merge_options,
                                     on_add=self.watcher.notify, spec=self.param_spec)
        # a round's participants are re-read at most once per block (this watcher's)
        self.authority = ChainAuthority(self.chain, block=lambda: self.watcher.block)
        self.pool = (peers or PeerPool)(self.chain, self.me, self.tls, self.authority)
        deadline = float(self.settings.deadline_s)
        self.timing = Timing(
            grace_s=float(self.settings.grace_s),
            deadline_s=deadline,
            collect_s=deadline * config.collect_fraction,
            min_peers=self.settings.min_peers,
            poll_s=config.poll_s,
        )
        self.driver = RoundDriver(
            self.me, self.chain, self.pool, self.store, self.collectors, self.timing,
            self.param_spec, max_bytes=self.max_bytes, round_timeout_s=config.round_timeout_s,
            watcher=self.watcher, reject_nonfinite=config.reject_nonfinite, stop=self._stopped,
            faults=config.fault_plan, peer_parts=config.peer_served_pulls,
            topology=self.spec.topology, shards=ShardExchange(
                self.param_spec, self.spec.merge_method, self.spec.merge_options, self.me,
                on_add=self.watcher.notify),
            codec=self.codec, secure=self.secure, sum_rule_in_clear=secure_end_control,
        )
        self.progress = _Progress()
        self._late = False  # started after the training finished: it only takes the final model
        self._waiting_cache: tuple[float, dict[str, Any]] | None = None
        self._waiting_nodes: tuple[float, tuple[NodeInfo, ...]] | None = None
        self._finished_at: tuple[int, float, bool] | None = None  # (block, when, finished)
        self._round_lock = threading.Lock()
        self.peer_server: PeerServer | None = None
        self.local_server: LocalServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.stage_seconds = Histogram(
            "swarmnode_round_stage_seconds", "Seconds this node spent per step of a round "
            "(checkin, push, merge, pull...; 'round': the whole round)", "stage")

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.peer_server = PeerServer(
            self.config.peer_listen, self.tls, self.authority, self,
            spec=self.codec.update_spec, max_bytes=self.max_bytes,
            reject_nonfinite=self.config.reject_nonfinite, data_port=self.config.data_port,
            spill_dir=self._update_spill(), listener=self.config.listener_limits,
            one_port=self.config.one_port,
        )
        port = self.peer_server.start()
        self._enroll(port)
        self.local_server = LocalServer(
            self.config.local_target, _LocalApi(self), tls=None, mode=self.config.socket_mode,
            group=self.config.local_api_group, spill_dir=str(self._spill_dir()),
        )
        self.local_server.start()
        metrics_port = None
        if self.config.metrics_listen:
            host, _, mport = self.config.metrics_listen.rpartition(":")
            self.metrics_server = MetricsServer(host.strip("[]") or "0.0.0.0", int(mport),
                                                self.metrics)
            metrics_port = self.metrics_server.start()
        self.progress.stage = "ready"
        self._write_health(port, metrics_port)
        if self._late:  # fetched now, so the model is here (and served) before the trainer asks
            threading.Thread(target=self._take_final, name="final-model", daemon=True).start()
        log.info(
            "node %s (%s) ready: peer API on port %d, local API at %s",
            self.config.name, self.me, port, self.config.local_target,
        )

    def _update_spill(self) -> str | None:
        """Where the data plane receives pushed updates: spill files (_spill_dir), but memory
        under secure aggregation, where the leader adds each masked update to its running sum
        as it arrives and keeps it only for the round's evidence (SecureAggregation.forget:
        (n-1) x 8 bytes per parameter at most, n the sites of the round): receiving into a
        spill file cost some 5x the CPU of anonymous memory in issue 20's profile (0.45 vs 0.09
        CPU-s per 200 MB masked update), on the leader's path."""
        return None if self.secure is not None else str(self._spill_dir())

    def _spill_dir(self) -> Path:
        """Where updates that are held but not being read live: files on the data volume (page
        cache the kernel can reclaim), not the node's resident memory."""
        path = Path(self.config.data_dir) / "spill"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def _write_health(self, port: int, metrics_port: int | None = None) -> None:
        """health.json: read by `python -m swarmnode.healthcheck` (the container healthcheck)."""
        path = self.config.data_dir / HEALTH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "pid": os.getpid(), "address": self.me, "name": self.config.name,
            "peer_port": port, "endpoint": self.config.endpoint, "enrolled": True,
            "metrics_port": metrics_port,
        }))
        tmp.replace(path)

    def stop(self) -> None:
        (self.config.data_dir / HEALTH_FILE).unlink(missing_ok=True)
        self._stopped.set()
        self.watcher.close()
        self.driver.close()
        self.store.close()
        if self.local_server:
            self.local_server.stop()
        if self.peer_server:
            self.peer_server.stop(grace=1.0)
        if self.metrics_server:
            self.metrics_server.stop()
        self.pool.close()

    @property
    def stopping(self) -> threading.Event:
        """Set once stop() begins (or the service's stop event is set from outside)."""
        return self._stopped

    def serve_forever(self) -> None:
        self._stopped.wait()

    def _authorised(self):  # type: ignore[no-untyped-def]
        info = self.chain.node(self.me)
        if info.revoked:
            raise IdentityError(
                f"address {self.me} was revoked on contract {self.chain.address}; ask the swarm "
                f"admin to authorise it again with `swarmnode authorize {self.me} --cert "
                f"{self.config.cert}`"
            )
        if not info.authorized and self.chain.training_finished():
            raise IdentityError(
                f"address {self.me} is not authorised on contract {self.chain.address}, whose "
                "training has finished: its final model is only for the sites of its consortium; "
                f"ask the swarm admin to run `swarmnode authorize {self.me} --cert "
                f"{self.config.cert}`"
            )
        if not info.authorized:
            raise _NotYetAuthorised(
                f"address {self.me} is not authorised on contract {self.chain.address}; ask the "
                f"swarm admin to run `swarmnode authorize {self.me} --cert {self.config.cert}`"
            )
        return info

    def _enroll(self, port: int) -> None:
        # The admin may authorise this node after it starts (compose starts everything at once).
        info = self._start_wait(self._authorised, (*_TRANSIENT, _NotYetAuthorised),
                                f"{self.me} to be authorised")
        ours = describe(self.config.cert).fingerprint
        if info.fingerprint != ours:
            raise IdentityError(
                f"the contract holds certificate fingerprint {info.fingerprint.hex()[:16]}... for "
                f"{self.me}, but {self.config.cert} has {ours.hex()[:16]}...; use the certificate "
                "that was authorised, or ask the admin to authorise this one"
            )
        endpoint = self.config.endpoint
        host, _, cfg_port = endpoint.rpartition(":")
        if cfg_port == "0":
            endpoint = f"{host}:{port}"
        if self._late_start(info):
            return
        if self.secure is not None:  # the key is posted before the site joins the training
            if not self.chain.registry.site(self.me).enrolled:
                self.chain.registry.enroll(endpoint)
            self.secure.publish_key()
        if not info.enrolled:
            self.chain.enroll(endpoint)
            log.info("enrolled %s at %s", self.me, endpoint)
        elif info.endpoint != endpoint:
            self.chain.update_endpoint(endpoint)
            log.info("updated endpoint of %s to %s", self.me, endpoint)
        if self.secure is not None:  # its pair keys are made from the key it joined with
            self.secure.check_joined_key()

    def _late_start(self, info: Any) -> bool:
        """Whether the training finished before this node started: then it neither joins nor
        updates its endpoint (the contract refuses both: TrainingOver); it takes the final model
        from the sites that hold it, verified against the chain's digest, and hands it to its
        trainer (the peers serve it to a site that did not join only then: ChainAuthority)."""
        if not self._read(self.chain.training_finished):
            return False
        self._late = True
        final = lifecycle.final_round(self._read(self.chain.current_round))
        log.info("the training finished with round %d before this node started; taking its "
                 "final model from the sites that hold it%s", final,
                 "" if info.enrolled else " (this site did not take part in the training)")
        return True

    def _take_final(self) -> None:
        """A late node's final model, fetched at start (else at the trainer's first call)."""
        try:
            with self._round_lock:
                self._final_outcome()
        except SwarmError as exc:
            log.warning("the final model could not be fetched yet (%s); the trainer's call "
                        "tries again", exc)

    # -- PeerHandler ------------------------------------------------------------------------------
    def accept_update(
        self, round: int, sender: str, weight: int, state: StateDict, digest: bytes,
        evict: Callable[[], None] | None = None,
    ) -> None:
        info = self._check_push(round, sender, weight)
        if self.secure is not None:  # a masked update: kept once its hash is the check-in's
            self.secure.receive(round, sender, state, digest)
            if evict is not None:
                evict()
            self.watcher.notify()
            log.info("round %d: masked update from %s (weight %d)", round, sender, weight)
            return
        state = self.codec.incoming(round, state, sender)  # a compressed change: the full model
        self.driver.collector(info).add(Update(state, float(weight), sender, evict=evict))
        log.info("round %d: update from %s (weight %d)", round, sender, weight)

    def _round_start(self, round: int, pull: bool) -> serde.Buffer | None:
        """The bytes of the model ``round`` starts from (what compressed updates are changes
        from); pull=False: only a model this node holds (a transport thread asks)."""
        held = self.driver.latest_committed_before(round, pull=pull)
        return None if held is None else held.data

    def reveal_seeds(self, round: int, caller: str) -> list[tuple[str, bytes]]:
        """Secure aggregation: this site's round seeds with the mask-set sites that never
        checked in, for ``caller`` only if it is the round's elected leader (SecureAggregation.
        answer_reveal says what else is refused)."""
        if self.secure is None:
            raise PeerRefused(f"round {round}: this training does not run secure aggregation; "
                              "there is no seed to reveal")
        info = self.chain.round(round)
        reveals = self.secure.answer_reveal(round, caller, info.participants, info.leader,
                                            info.status is RoundStatus.ELECTED)
        log.info("round %d: revealed %d round seeds (sites that never checked in: %s) to the "
                 "leader %s", round, len(reveals), ", ".join(r.missing for r in reveals),
                 caller)
        return [(r.missing, r.seed) for r in reveals]

    def secure_evidence(self, round: int, caller: str) -> bytes:
        """Secure aggregation: the evidence of committed round ``round`` if this node summed
        it (privacy.evidence; masked updates are masked), for a member of the training that
        is not revoked."""
        if self.secure is None:
            raise PeerRefused(f"round {round}: this training does not run secure aggregation; "
                              "there is no evidence to give")
        node = self.authority.node(caller)
        if not node.enrolled or node.revoked:
            raise PeerRefused(f"{caller} is not a member of this training (or was revoked): "
                              f"the evidence of round {round} is for its members")
        info = self.chain.round(round)
        if info.status is not RoundStatus.COMMITTED or info.digest is None:
            raise RoundError(f"round {round} is {info.status.value}: evidence is given for "
                             "committed rounds only")
        data = self.secure.evidence(round)
        if data is None:
            raise RoundError(f"this node keeps no evidence of round {round}: it did not sum "
                             f"it (leader {info.leader}), or the round is older than the "
                             "newest rounds kept")
        if self.secure.evidence_digest(data) != info.digest:
            raise RoundError(f"the sum this node made of round {round} is not the model "
                             "committed (another attempt's leader committed); ask that leader")
        log.info("round %d: gave its secure-aggregation evidence (%d bytes) to %s", round,
                 len(data), caller)
        return data

    def audit_round(self, round: int) -> dict[str, Any]:
        """Secure aggregation: check committed round ``round`` from its leader's evidence
        (node.secaudit); AggregateRejected naming what differed."""
        from swarmnode.node.secaudit import check_round

        if self.secure is None:
            raise ConfigError("this training does not run secure aggregation: there is no "
                              "masked sum to check (`swarmnode audit` checks the chain's log)")
        info = self.chain.round(round)
        if info.status is not RoundStatus.COMMITTED or info.digest is None or not info.leader:
            raise RoundError(f"round {round} is {info.status.value}, not committed: only a "
                             "committed round's sum can be checked")
        start = None
        for r in range(round - 1, 0, -1):  # the model the round started from: its digest
            before = self.chain.round(r)
            if before.status is RoundStatus.COMMITTED and before.digest is not None:
                start = before.digest
                break
        if start == info.digest:
            # fewer than 3 sites added weight: no sum was formed, the starting model went on
            return {"round": round, "leader": info.leader, "digest": info.digest.hex(),
                    "kept_starting_model": True, "ok": True}
        evidence = self.pool.client(info.leader).secure_evidence(
            round, timeout=self.timing.transfer_s)
        # weights and hashes from the check-ins' events (a pruned round's are not in storage)
        weights, hashes = self.secure.checkins(round)
        result = check_round(self.secure, info, weights, hashes, evidence, start,
                             self.param_spec)
        log.info("round %d: checked leader %s's sum: %d masked updates as hashed on chain, "
                 "%d dropouts' reveals, the committed digest is their mean", round,
                 info.leader, len(result.summed), len(result.dropouts))
        return result.to_json()

    def check_push(self, round: int, sender: str, weight: int) -> None:
        """The servers ask this with a push's header, before its payload is read or admitted."""
        self._check_push(round, sender, weight)

    def _check_push(self, round: int, sender: str, weight: int) -> RoundInfo:
        """The round, once this node leads its election, ``sender`` is one of its participants
        with the weight it checked in, and has not sent its update yet; else a SwarmError."""
        info = self.driver.seen.get(round)  # what this node's round loop saw last
        led = info is not None and info.status is RoundStatus.ELECTED and info.leader == self.me
        final = info is not None and info.status not in (RoundStatus.OPEN, RoundStatus.ELECTED)
        if info is None or not (led or final):
            info = self.chain.round(round)  # a committed or abandoned round stays so: no read
        if info.status is not RoundStatus.ELECTED or info.leader != self.me:
            raise RoundError(
                f"round {round}: this node is not the round's leader "
                f"(status {info.status.name.lower()}, leader {info.leader}); push to the leader "
                "the contract elected"
            )
        if sender.lower() not in {p.lower() for p in info.participants}:
            raise PeerRefused(f"round {round}: {sender} is not one of its participants; only "
                              "they push updates")
        rules.check_update_weight(round, sender, weight, self.driver.weight_of(round, sender))
        self.driver.collector(info).check(sender)
        return info

    # -- sharded rounds: the slice of the model this node merges (node.sharding) ------------------
    def check_shard(self, round: int, attempt: int, index: int, sender: str,
                    weight: int) -> serde.ParamSpec:
        """The servers ask this with a slice's header, before its payload is read: the round's
        attempt runs sharded, ``sender`` is one of its contributors with the weight it checked
        in, this node owns slice ``index``, and the sender has not sent it yet. Returns what the
        slice must hold (its size: ``payload_bytes``)."""
        info = self._sharded_info(round, attempt)
        if sender.lower() not in {p.lower() for p in info.participants}:
            raise PeerRefused(f"round {round}: {sender} is not one of its participants; only "
                              "they send slices")
        rules.check_update_weight(round, sender, weight, self.driver.weight_of(round, sender))
        if weight <= 0:
            raise PayloadRejected(f"round {round}: {sender} checked in with weight 0 and "
                                  "sends nothing")
        shards = self.driver.shards
        assert shards is not None
        mine = shards.mine(round, info.participants)
        if index != mine:
            raise PeerRefused(f"round {round}: this node merges slice {mine}, not {index}; send "
                              "each slice to the participant that owns it")
        shards.collector(round, attempt, info.participants,
                         self.driver.contributors(info)).check(sender)
        # the slice whole, or (compression) its coded change from the round's starting model
        return self.codec.slice_spec(shards.layout(round, info.participants), index)

    def accept_shard(self, round: int, attempt: int, index: int, sender: str, weight: int,
                     state: StateDict, evict: Callable[[], None] | None = None) -> None:
        self.check_shard(round, attempt, index, sender, weight)
        info = self._sharded_info(round, attempt)
        shards = self.driver.shards
        assert shards is not None
        collector = shards.collector(round, attempt, info.participants,
                                     self.driver.contributors(info))
        # a coded change: the float32 slice it stands for (the round's starting model's + it)
        state = self.codec.incoming_slice(round, shards.layout(round, info.participants), index,
                                          state, sender)
        shards.add(collector, sender, weight, state, evict)
        log.info("round %d: slice %d from %s (weight %d)", round, index, sender, weight)

    def merged_shard(self, round: int, attempt: int, index: int, timeout: float,
                     to: str | None = None) -> serde.Buffer | None:
        """This node's merged slice ``index`` of (round, attempt), waited for up to
        ``timeout`` (at most 10 s); None while it is not merged. A slice merged here is still
        served once the round moved on (committed): a member slower than the leader assembles
        the model from the slices instead of pulling it whole."""
        shards = self.driver.shards
        try:
            info = self._sharded_info(round, attempt)
        except RoundError:
            held = shards.held(round, attempt, index) if shards is not None else None
            if held is None:
                raise
            now = self.chain.round(round)
            if now.status is not RoundStatus.COMMITTED or now.attempt != attempt:
                raise  # an attempt set aside (re-elected, abandoned): its slices are not served
            return held
        assert shards is not None
        mine = shards.mine(round, info.participants)
        if index != mine:
            raise PeerRefused(f"round {round}: this node merges slice {mine}, not {index}")
        return shards.merged(round, attempt, min(timeout, 10.0))

    def _sharded_info(self, round: int, attempt: int) -> RoundInfo:
        info = self.driver.seen.get(round)
        # what this node last saw may predate the close (still open) while the sender already
        # saw it: read the chain then, or a sender's slice is refused and waits for its retry
        # (the leader's draw does not matter: the owners are fixed at the close)
        if info is None or info.status is not RoundStatus.ELECTED or info.attempt != attempt:
            info = self.chain.round(round)
        if self.driver.shards is None or not (
                info.status is RoundStatus.ELECTED and info.attempt == attempt
                and self.me in info.participants
                and self.driver.sharded_attempt(info)[0]):
            raise RoundError(f"round {round}: attempt {attempt} is not a sharded attempt this "
                             f"node takes part in (status {info.status.name.lower()}, attempt "
                             f"{info.attempt}); slices are refused")
        return info

    def merged(
        self, round: int, timeout: float, to: str | None = None
    ) -> tuple[serde.Buffer, bytes] | None:
        # Members ask right after pushing (before the commit) and after the commit: a node that
        # holds the model answers at once, one that does not holds the puller at most 2 s.
        held = self.store.wait(round, min(timeout, 2.0))
        if held is None:
            return None
        if to is not None:
            self.driver.note_served(round, to)
        return held.data, held.digest

    def part_source(self, round: int, timeout: float, to: str | None = None) -> Any:
        """What this node serves of ``round``'s merged model in parts (transport.parts): the
        model it is receiving, or the one it holds; None if neither within ``timeout``."""
        return self.driver.part_source(round, timeout)

    def metrics(self) -> list[Family]:
        """What the metrics port shows (node.metrics), read now."""
        from swarmnode.transport.dataplane import TRAFFIC

        p = self.progress
        stage = self.stage
        requests, seconds, errors = self.chain.rpc_stats
        reachable, unreachable = self.pool.reachability()
        out = [
            gauge("swarmnode_round", "The round this node takes part in (0: none yet)", p.round),
            counter("swarmnode_rounds_total", "Rounds this node has completed", p.rounds_done),
            gauge("swarmnode_finished", "1 once the training finished for this node",
                  1 if p.finished else 0),
            self.stage_seconds.family(),
            counter("swarmnode_peer_bytes_total", "Model bytes this node moved to and from "
                    "peers (data plane and gRPC: pushes, pulls, parts, slices; as server and "
                    "client)", TRAFFIC.sent,
                    direction="sent"),
            counter("swarmnode_peer_bytes_total", "", TRAFFIC.received, direction="received"),
            counter("swarmnode_chain_requests_total", "JSON-RPC requests to the chain",
                    requests),
            counter("swarmnode_chain_request_seconds_total", "Seconds spent waiting for the "
                    "chain's answers (divide by the requests for the mean latency)", seconds),
            counter("swarmnode_chain_errors_total", "JSON-RPC requests that failed (the chain "
                    "unreachable, a timeout, an error answer)", errors),
            gauge("swarmnode_pending_transactions", "Transactions this node sent that are not "
                  "yet mined and confirmed", self.chain.pending_transactions),
            gauge("swarmnode_peers", "Peers by how this node's last attempt to reach each went "
                  "(not yet tried: in neither)", reachable, state="reachable"),
            gauge("swarmnode_peers", "", unreachable, state="unreachable"),
        ]
        names = ["starting", "ready", "idle", "checkin", "election", "push", "collect",
                 "commit", "pull", "done"]
        for name in names + ([stage] if stage not in names else []):
            out.append(gauge("swarmnode_stage", "1 for the stage this node is in",
                             1 if stage == name else 0, stage=name))
        if p.last_commit:
            out.append(gauge("swarmnode_last_commit_age_seconds", "Seconds since this node "
                             "last took a committed round's merged model",
                             max(0.0, time.time() - p.last_commit)))
        if p.loss is not None:
            out.append(gauge("swarmnode_site_loss", "The loss this site's trainer reported "
                             "with its last sync", p.loss))
        if p.metric is not None:
            out.append(gauge("swarmnode_site_metric", "The metric this site's trainer "
                             "reported with its last sync", p.metric))
        if p.privacy is not None:  # absent: the site does not train with differential privacy
            out.append(gauge("swarmnode_site_epsilon", "The privacy this site's trainer spent "
                             "so far (DP-SGD epsilon at the delta labelled), reported with its "
                             "last sync or final metrics", p.privacy.epsilon,
                             delta=f"{p.privacy.delta:g}"))
        return out

    def health(self) -> dict[str, Any]:
        p = self.progress
        return {
            "address": self.me, "name": self.config.name, "stage": self.stage, "round": p.round,
            "rounds_done": p.rounds_done, "finished": p.finished,
            "rpc_calls": self.chain.rpc_calls, "rpc_by_method": self.chain.rpc_calls_by_method,
        }

    @property
    def stage(self) -> str:
        """The node's stage: during a round, the round's own (checkin, election, push, collect,
        commit, pull, done)."""
        m = self.driver.machine
        if self.progress.stage in ("round", "finished-waiting") and m is not None:
            return m.stage.value
        return self.progress.stage

    @property
    def round(self) -> int:
        return self.progress.round

    def waiting(self) -> dict[str, Any]:
        """What the current round waits for, for a trainer whose sync waits. While this node
        moves models itself (push, collect, pull) that is the answer; otherwise it is read from
        the chain (a few views, at most every 3 s whoever asks)."""
        from swarmnode.chain.overview import waiting_now

        stage = self.stage
        if stage in _OWN_STAGES:
            return {"stage": stage, "round": self.round, "line": _OWN_STAGES[stage]}
        cached = self._waiting_cache
        if cached is not None and time.monotonic() - cached[0] < 3.0:
            return cached[1]
        try:
            # the enrolled nodes only name the sites: one view per node, read at most once a
            # minute (a wait reported every round of a swarm would read them every round)
            listed = self._waiting_nodes
            if listed is None or time.monotonic() - listed[0] >= _NODES_TTL_S:
                listed = self._waiting_nodes = (time.monotonic(), tuple(self.chain.nodes()))
            found, now = waiting_now(self.chain, nodes=listed[1])
        except SwarmError as exc:  # the chain is down: say so, the trainer logs it
            return {"error": str(exc)}
        answer = ({"stage": "not started"} if found is None
                  else {**found.to_json(now), "line": found.describe(now)})
        self._waiting_cache = (time.monotonic(), answer)
        return answer

    def training_finished(self) -> bool:
        """Whether the training is over, read at most once per block (and per second): a sync
        asks when it begins and its reply says it when it ends, often in one block."""
        block, now = self.watcher.block, time.monotonic()
        held = self._finished_at
        if held is not None and block >= 0 and held[0] == block and now - held[1] < 1.0:
            return held[2]
        done = bool(self._read(self.chain.training_finished))
        self._finished_at = (block, now, done)
        return done

    # -- what the trainer asks for ----------------------------------------------------------------
    def _read(self, fn):  # type: ignore[no-untyped-def]
        """A chain read outside a round: a chain outage is waited out (up to round_timeout_s,
        saying so in the log), never passed to the trainer as a failure."""
        return self._chain_wait(fn, _TRANSIENT, "the chain to answer again")

    def note_privacy(self, round: int, loss: float | None, metric: float | None,
                     privacy: Privacy | None) -> None:
        """A DP site's epsilon, reported with its loss and metric: kept for the metrics port
        and logged with them (on chain it rides with the metrics: eligible_metrics)."""
        if privacy is None:
            return
        self.progress.privacy = privacy
        log.info("round %d: the trainer reports loss %s, metric %s, epsilon %.4g at delta %g",
                 round, loss, metric, privacy.epsilon, privacy.delta)

    def report_final_metrics(self, loss: float | None, metric: float | None,
                             privacy: Privacy | None = None) -> bool:
        """The trainer's evaluation of the final model, recorded on chain for the final round
        (no check-in follows it to carry them: `swarmnode report` shows that round), with a DP
        site's ``privacy`` spent (epsilon at its delta, :class:`Privacy`). False when
        there is nothing to send or the chain refuses it (the training not finished, this node
        not in it): logged, never a failure of the trainer, whose model is final either way."""
        if loss is None and metric is None:
            return False
        if self._late and self._read(lambda: self.chain.node(self.me)).last_checkin_round != \
                lifecycle.final_round(self._read(self.chain.current_round)):
            log.info("the final model's loss %s and metric %s are not recorded on chain: this "
                     "node did not take part in the final round", loss, metric)
            return False
        try:
            self._read(lambda: self.chain.report_final_metrics(loss or 0.0, metric or 0.0,
                                                               privacy))
        except SwarmError as exc:
            log.warning("the final model's loss and metric were not recorded: %s", exc)
            return False
        log.info("the final model's loss %s and metric %s recorded on chain", loss, metric)
        return True

    def hello(self, trainer_spec: TrainingSpec) -> tuple[dict[str, Any], bytes | None]:
        self.spec.require_same(trainer_spec, who=f"the trainer of node {self.config.name}")
        with self._round_lock:
            latest = self.latest_merged()
        info = {
            "address": self.me, "name": self.config.name,
            "current_round": self._read(self.chain.current_round),
            "latest_round": latest.round if latest else 0,
            "digest": latest.digest.hex() if latest else "",
            "training_finished": self._read(self.chain.training_finished),
        }
        return info, latest.data if latest else None

    def latest_merged(self) -> StoredModel | None:
        """The newest committed merged model, fetched from its members if this node lacks it."""
        return self.driver.latest_committed_before(self._read(self.chain.current_round))

    def sync(
        self, payload: serde.Buffer, weight: int, loss: float | None, metric: float | None,
        privacy: Privacy | None = None,
    ) -> RoundOutcome:
        if self._ends_as_secure() and self._secure_sums_over():
            return self.finish(payload, weight, "inactive")
        state = self._decode_own(payload)
        # the digest a push announces, hashed while the round checks in (off its critical path)
        self.driver.prehash(payload)
        with self._round_lock:
            if self.training_finished():  # the callback loads it, should_stop
                log.info("the swarm's training is over; handing the final model to the trainer")
                return self._final_outcome()
            r = self._read(self.chain.current_round)
            self.progress.stage, self.progress.round = "round", r
            try:
                outcome = self.driver.run_round(r, state, payload, weight)
            except RoundError:
                # the final round was committed between the reads above and the check-in (which
                # the contract then refuses: TrainingOver): the trainer takes the final model
                if not self._read(self.chain.training_finished):
                    raise
                log.info("the swarm's training ended as this sync began; handing the final "
                         "model to the trainer")
                return self._final_outcome()
            if lifecycle.missed_checkin(outcome.contributed, outcome.abandoned, weight):
                # Round r was elected before we checked in: rather than drop the trainer's work,
                # contribute it to the next round (which opens now), unless training is over.
                self._after_round(outcome, None, None)
                if self._read(self.chain.training_finished):
                    return outcome
                log.info("round %d: missed; contributing to round %d instead", r, r + 1)
                outcome = self.driver.run_round(self._read(self.chain.current_round), state,
                                                payload, weight)
            self._after_round(outcome, loss, metric, privacy)
            self.note_privacy(outcome.round, loss, metric, privacy)
            self.driver.forget_own()
            return outcome

    def _ends_as_secure(self) -> bool:
        """Whether this node follows secure aggregation's end rules (lifecycle.effective_policy,
        lifecycle.secure_sums_over): under secure aggregation, or in the clear as a study's
        control (``secure_end_control``)."""
        return self.secure is not None or self._secure_end_control

    def _secure_sums_over(self) -> bool:
        """Secure aggregation: whether no later round can be summed (lifecycle.secure_sums_over):
        then this site finishes rather than sync (logged once, with why). The control in the
        clear (``secure_end_control``) has no mask set: the training's members stand for it
        (every member would be in a round's mask set once it joined with a usable key)."""
        if self._read(self.chain.training_finished):
            return False
        still = self._read(self.chain.active_count)
        if still >= MIN_SITES:  # the usual case: one read
            return False
        still += self._read(self.chain.absent_count)  # absent ones may come back
        r = self._read(self.chain.current_round)
        if self.secure is not None:
            room = len(self.secure.roster(r) or ())
        else:  # the control in the clear
            room = len(self._read(self.chain.node_list))
        if not lifecycle.secure_sums_over(room, still):
            return False
        control = "" if self.secure is not None else (
            " (a control in the clear: this plain training ends as a secure one would)")
        self.ended_early = (
            f"round {r}: only {still} site(s) still train; secure aggregation sums no round with "
            f"fewer than {MIN_SITES} sites adding weight (the sum would give an update away), so "
            "every further round would keep its starting model and throw this site's training "
            "away: this site finishes now and its trainer takes the final model (the last "
            f"summed one){control}")
        log.warning("%s", self.ended_early)
        return True

    def finish(self, payload: serde.Buffer, weight: int, policy: str) -> RoundOutcome:
        """The trainer is done: take part per ``policy`` until the final round, return its model."""
        asked, policy = policy, lifecycle.effective_policy(policy, self._ends_as_secure())
        if policy != asked:
            log.warning("the trainer asked for end-of-training policy %s; with secure "
                        "aggregation a finished site runs as inactive (it adds weight 0): one "
                        "that kept adding a predictable contribution would let the sites still "
                        "training learn each other's updates from the sums%s", asked,
                        "" if self.secure is not None else
                        " (here a control in the clear: secure_end_control)")
        own = self._decode_own(payload)
        serde.evict(payload)  # checked; read again when it is pushed or folded
        with self._round_lock:
            me = self._read(lambda: self.chain.node(self.me))
            if not me.finished and not self._read(self.chain.training_finished):
                metrics = self.driver.pending_metrics  # the last round's, if not sent yet
                done = self._read(lambda: self.chain.finish(metrics=metrics))
                self.driver.metrics_sent(metrics)
                log.info("trainer finished; policy %s until the final round", policy)
                if "RoundClosed" in done.events:  # it closed the open round: draw its leader
                    self._draw_quietly(self._read(self.chain.current_round))
            self.progress.stage = "finished-waiting"
            state, data = own, payload
            while not self._read(self.chain.training_finished):
                r = self._read(self.chain.current_round)
                final = self._read(self.chain.final_round)
                step = lifecycle.end_step(policy, r, final, weight)
                if step.take_part:
                    if step.model == "latest":
                        latest = self.store.latest()
                        if latest is not None:
                            data = latest.data
                            state = serde.view_state(data, spec=self.param_spec,
                                                     reject_nonfinite=False)
                    self.progress.round = r
                    outcome = self.driver.run_round(r, state, data, step.weight, drive=step.drive)
                    self._after_round(outcome, None, None)
                    if lifecycle.adopts_merged(policy) and outcome.data is not None:
                        data = outcome.data
                        state = serde.view_state(data, spec=self.param_spec,
                                                 reject_nonfinite=False)
                else:
                    try:
                        self.chain.wait_for(
                            lambda r=r: True if (self.chain.current_round() != r
                                                 or self.chain.final_round() == r) else None,
                            timeout=self._idle_check_s, what=f"round {r} to end",
                            poll=max(self.config.poll_s, 0.1),
                        )
                    except (ChainTimeout, ChainUnavailable):  # others still train: keep waiting
                        log.info("waiting for the final round: %d node(s) still training",
                                 self._read(self.chain.active_count))
                        self._set_silent_aside()
            return self._final_outcome()

    def _final_outcome(self) -> RoundOutcome:
        """The final round's merged model (pulled if this node lacks it), verified on chain."""
        final_round = lifecycle.final_round(self._read(self.chain.current_round))
        info = self._read(lambda: self.chain.round(final_round))
        held = self.store.get(final_round)
        if not lifecycle.holds_final(info.digest, held.digest if held else None):
            self.driver.run_round(final_round, {}, b"", 0, contribute=False)
            held = self.store.get(final_round)
        if held is None or not lifecycle.holds_final(info.digest, held.digest):
            raise NodeError(f"could not obtain the final model of round {final_round}; check "
                            "the node's log for failed pulls")
        self.store.flush()  # the final model is on disk (for `swarmnode audit --model`) first
        self.progress.stage, self.progress.finished = "done", True
        self.progress.last_digest = held.digest.hex()
        log.info("training finished: final model of round %d, digest %s", final_round,
                 held.digest.hex()[:12])
        return RoundOutcome(final_round, info.leader, held.digest, held.data, False, True, 0.0)

    def _decode_own(self, payload: serde.Buffer) -> StateDict:
        """The trainer's parameters, viewing ``payload`` (read under max_update_mb)."""
        return serde.view_state(payload, spec=self.param_spec,
                                reject_nonfinite=self.config.reject_nonfinite)

    def _after_round(self, outcome: RoundOutcome, loss: float | None, metric: float | None,
                     privacy: Privacy | None = None) -> None:
        self.progress.rounds_done += 1
        self.progress.stage = "idle"
        if outcome.digest:
            self.progress.last_digest = outcome.digest.hex()
            self.progress.last_commit = time.time()
        if loss is not None:
            self.progress.loss, self.progress.metric = loss, metric
        for step, seconds in outcome.stages.items():
            self.stage_seconds.observe(step, seconds)
        self.stage_seconds.observe("round", outcome.seconds)
        # metrics of committed rounds it took part in (with a DP site's privacy spent): carried
        # by the next check-in or finish
        self.driver.note_metrics(lifecycle.eligible_metrics(
            outcome.round, bool(outcome.digest), outcome.contributed, loss, metric, privacy))
        every = self.config.secure_audit_every
        if (self.secure is not None and every and outcome.digest and outcome.contributed
                and outcome.round % every == 0 and outcome.leader
                and outcome.leader.lower() != self.me.lower()):
            threading.Thread(target=self._audit_later, args=(outcome.round,), daemon=True,
                             name=f"secure-audit-{outcome.round}").start()

    def _audit_later(self, round: int, tries: int = 10) -> None:
        """The automatic check of a committed secure round (config ``secure_audit_every``):
        the leader writes its evidence just after the commit, so a round it does not hold yet
        is asked for again; the outcome is logged and kept in :attr:`audits`."""
        for attempt in range(tries):
            try:
                result = self.audit_round(round)
            except AggregateRejected as exc:
                log.error("round %d: the leader's sum does NOT check out: %s", round, exc)
                self._note_audit(round, f"failed: {exc}")
                return
            except SwarmError as exc:
                if attempt + 1 < tries and not self._stopped.wait(min(2.0 ** attempt, 10.0)):
                    continue
                log.warning("round %d: could not check the leader's sum: %s", round, exc)
                self._note_audit(round, f"unchecked: {exc}")
                return
            self._note_audit(round, "ok" if result.get("ok") else str(result))
            return

    def _note_audit(self, round: int, outcome: str) -> None:
        self.audits[round] = outcome
        for old in sorted(self.audits)[:-64]:  # the newest 64 rounds' outcomes
            self.audits.pop(old, None)

    @property
    def _idle_check_s(self) -> float:
        """How often a finished node waiting for the final round looks for dead sites."""
        return min(60.0, max(5.0, float(self.chain.settings().deadline_s)))

    def _set_silent_aside(self) -> None:
        """Mark sites absent that the contract lets go (silent for several deadlines): when the
        only site still 'training' is a dead one, nobody else would, and the final round would
        wait for it forever."""
        try:
            silent = self.chain.absent_candidates()
        except (ChainTimeout, ChainUnavailable):
            return
        for node in silent:
            log.warning("node %s has been silent for several round deadlines; marking it absent",
                        node)
            try:
                result = self.chain.mark_absent(node)
            except ContractReverted as exc:
                log.debug("mark %s absent: %s", node, exc.reason or exc)
                continue
            if "RoundClosed" in result.events:
                self._draw_quietly(self.chain.current_round())

    def _draw_quietly(self, round: int) -> None:
        try:
            self.chain.draw(round)
        except ContractReverted as exc:  # another node drew it first
            log.debug("draw round %d: %s", round, exc.reason or exc)


class _NotYetAuthorised(IdentityError):
    pass


class _LocalApi:
    """LocalHandler: the methods a trainer's SwarmCallback calls on its node service."""

    def __init__(self, node: NodeService) -> None:
        self.node = node

    def call(self, method: str, args: dict[str, Any], payload: serde.Buffer | None):  # type: ignore[no-untyped-def]
        """One call; while the service stops, any call (new, or one its shutdown broke) answers
        NodeUnavailable, which the trainer's callback waits out and retries after the restart."""
        stopping = self.node.stopping
        if stopping.is_set():
            raise NodeUnavailable(f"the node service is stopping; {method!r} waits for it to "
                                  "come back")
        try:
            return self._call(method, args, payload)
        except NodeUnavailable:
            raise
        except Exception as exc:  # a chain, store or hasher closed under the call: not its fault
            if not stopping.is_set():
                raise
            raise NodeUnavailable(
                f"the node service stopped during {method!r} ({exc!r}); the trainer waits for "
                "it to come back"
            ) from exc

    def _call(self, method: str, args: dict[str, Any], payload: serde.Buffer | None):  # type: ignore[no-untyped-def]
        if method == "hello":
            spec = TrainingSpec.from_json(str(args.get("spec", "")), "the trainer's settings")
            return self.node.hello(spec)
        if method == "audit_round":  # secure aggregation: check a committed round's sum
            rnd = args.get("round")
            if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
                raise ConfigError(f"audit_round: round must be a positive integer, not {rnd!r}")
            return self.node.audit_round(rnd), None
        if method == "status":
            status = self.node.health()
            if args.get("waiting"):
                status["waiting"] = self.node.waiting()
            return status, None
        if method in ("sync", "finish"):
            if payload is None:
                raise PayloadRejected(f"{method}: the trainer sent no parameters")
            weight = int(args.get("weight", 0))
            if weight < 0:
                raise ConfigError(f"{method}: weight must be >= 0, got {weight}")
            cap = self.node.settings.max_weight
            if lifecycle.capped_weight(weight, cap) != weight:
                log.warning("the trainer's weight %d is over the swarm's max_weight %d; it "
                            "counts as %d", weight, cap, cap)
                weight = lifecycle.capped_weight(weight, cap)
            t0 = time.monotonic()
            if method == "sync":
                outcome = self.node.sync(payload, weight, args.get("loss"), args.get("metric"),
                                         Privacy.from_args(args, method))
            else:
                outcome = self.node.finish(payload, weight, str(args.get("policy", "inactive")))
            reply = {
                "round": outcome.round, "leader": outcome.leader,
                "digest": outcome.digest.hex() if outcome.digest else "",
                "abandoned": outcome.abandoned, "contributed": outcome.contributed,
                "seconds": time.monotonic() - t0,
                "stages": {k: round(v, 6) for k, v in outcome.stages.items()},
                "training_finished": self.node.training_finished(),
            }
            if self.node.ended_early is not None:
                reply["ended_early"] = self.node.ended_early
            if outcome.data is None and not outcome.abandoned:
                raise NodeError(
                    f"round {outcome.round} committed {reply['digest'][:12]}, but this node holds "
                    "no verified copy of it; check the node's log for failed pulls"
                )
            return reply, outcome.data if outcome.data is not None else payload
        if method == "final_metrics":
            loss, metric = args.get("loss"), args.get("metric")
            privacy = Privacy.from_args(args, method)
            recorded = self.node.report_final_metrics(
                None if loss is None else float(loss), None if metric is None else float(metric),
                privacy)
            self.node.note_privacy(self.node.round, loss, metric, privacy)
            return {"recorded": recorded}, None
        raise NodeError(f"unknown local API method {method!r} (hello, sync, finish, "
                        "final_metrics, status)")
