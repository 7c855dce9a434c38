"""An in-process swarm: N real node services on the real contracts, in one Python process.

What is real: the contracts (SwarmRegistry + SwarmTraining, deployed on eth-tester's in-process
EVM), each site's :class:`~swarmnode.node.service.NodeService` with its round machine, driver,
collector, merge and store, and its chain client (transactions signed by the site's own account).
What is not: the network. :class:`MemoryPeerPool` replaces the gRPC/data-plane
:class:`~swarmnode.node.peers.PeerPool` (``NodeService(peers=...)``); it still hands the receiving
node bytes, never Python objects, and runs the receiving side's checks in the order its servers
do: the caller's certificate against the fingerprint its chain holds for the claimed address
(:func:`~swarmnode.transport.dataplane.bind_address`), round participation, the size limit, the
digest, the spec and NaN/Inf (:class:`serde.Assembler`, :meth:`serde.Received.decode`), then the
node's own :meth:`NodeService.accept_update` / :meth:`NodeService.merged`. The caller checks the
peer's certificate against the chain the way :class:`PeerClient` does before it sends anything.

eth-tester mines a block per transaction and stamps the next block when the previous one is
mined, so chain time stands still between transactions. :class:`_Clock` mines an empty block
whenever the pending block's time has fallen a second behind the host's, so grace periods and
deadlines pass as they do on anvil. The provider is not thread-safe: every request (and the
clock's mining) goes through one lock.

Faults (``faults={site: {"stall_commit": ..., "exit": ...}}``, the ``faults:`` section of a
node.yaml, see :mod:`swarmnode.node.faults`) reach each site's round driver as they do in a node
process; an ``exit`` fault ends that site alone (:class:`SiteDied`: its trainer stops, nobody
reaches it any more) instead of the process. ``chain_ahead_s`` runs the chain's clock that far
ahead of the host's; ``run(step, begin=...)`` holds a site's trainer until ``begin(site)``
returns (a site that starts late).

Use::

    with InProcessSwarm(3, spec, min_peers=3) as swarm:
        sites = swarm.run(step)        # step(site, k, model) -> (state, weight) or None: done
                                       # (or (state, weight, report): what the sync says, below)
        swarm.final_digest()           # what every site's final model hashes to
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from web3 import EthereumTesterProvider, Web3

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract
from swarmnode.config import FaultSettings, NodeConfig
from swarmnode.errors import (
    ConfigError,
    PayloadRejected,
    PeerRefused,
    PeerUnavailable,
    RoundError,
)
from swarmnode.identity import (
    TlsFiles,
    create_ca,
    describe,
    fingerprint,
    issue_node_cert,
    make_bundle,
)
from swarmnode.node.driver import RoundOutcome
from swarmnode.node.lifecycle import Privacy
from swarmnode.node.peers import ChainAuthority
from swarmnode.node.service import NodeService
from swarmnode.spec import TrainingSpec
from swarmnode.transport import serde
from swarmnode.transport.dataplane import bind_address
from swarmnode.transport.shards import EncodedSlice

__all__ = ["InProcessSwarm", "MemoryNetwork", "MemoryPeerClient", "MemoryPeerPool", "Site",
           "SiteDied"]

log = logging.getLogger("swarmnode.testing")

_FUNDS = 1000 * 10**18
MAX_SITES = 8  # dev accounts 1..8 (0 is the admin)


# -- the chain ------------------------------------------------------------------------------------
class _LockedTesterProvider(EthereumTesterProvider):
    """eth-tester with one lock around every request: N node services call it from their threads.

    Two shortcuts for the EVM in Python, neither visible to the node services: an ``eth_call``
    is answered from a cache while the chain's head block is the one it ran on (a read on a
    mined block gives the same answer every time; the N sites read the same rounds after each
    block), and gas is estimated by :func:`_estimate_gas` (two executions instead of the
    binary search's dozen)."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__()
        self.lock = lock
        self._calls: dict[str, Any] = {}
        self._calls_at: bytes | None = None  # the head block the cached answers ran on
        self.ethereum_tester.backend.chain.gas_estimator = _estimate_gas

    def make_request(self, method: Any, params: Any) -> Any:
        with self.lock:
            if method != "eth_call":
                return self._request(method, params)
            head = self.ethereum_tester.backend.chain.get_canonical_head().hash
            if head != self._calls_at:
                self._calls, self._calls_at = {}, head
            key = repr(params)
            if key not in self._calls:
                response = self._request(method, params)
                if "error" in response:  # a revert: asked again, it is run again
                    return response
                self._calls[key] = response
            return dict(self._calls[key])


    def _request(self, method: Any, params: Any) -> Any:
        """web3's eth-tester provider reads every revert's data as Error(string); a custom
        error whose first argument is a small number and whose second is large (NotLeader(round,
        leader, sender)) makes that an OverflowError, not the DecodingError it handles, and the
        revert escaped as an OverflowError. Raised here as web3 raises an undecodable revert
        (its raw data shown), which swarmnode.chain.rpc decodes."""
        from eth_tester.exceptions import TransactionFailed

        try:
            return super().make_request(method, params)
        except OverflowError as exc:
            failed = exc.__context__
            if not isinstance(failed, TransactionFailed) or not failed.args:
                raise
            raw = failed.args[0]
            raw = raw.args[0] if isinstance(raw, Exception) and raw.args else raw
            raise TransactionFailed(f"execution reverted: {raw}") from None


def _estimate_gas(state: Any, transaction: Any) -> int:
    """py-evm's default estimate (a binary search down to 21000 gas: a dozen executions of the
    transaction) in two: run it with the block's gas limit (a revert is raised as py-evm's is),
    then check that what it used, plus 1/63 for the gas a call keeps back and the same 21000
    tolerance, is enough; if not, the binary search decides."""
    from eth.estimators.gas import binary_gas_search_intrinsic_tolerance
    from eth.vm.spoof import SpoofTransaction

    def run(gas: int, price: int | None = None) -> Any:
        snapshot = state.snapshot()
        try:
            extra = {} if price is None else {"gas_price": price}
            return state.apply_transaction(SpoofTransaction(transaction, gas=gas, **extra))
        finally:
            state.revert(snapshot)

    computation = run(state.gas_limit, 0)
    if computation.is_error:
        raise computation.error
    guess = min(state.gas_limit,
                transaction.intrinsic_gas + computation.get_gas_used() * 64 // 63 + 21000)
    if not run(guess).is_error:
        return int(guess)
    return int(binary_gas_search_intrinsic_tolerance(state, transaction))


class _Clock:
    """Mines an empty block whenever the pending block's timestamp is a second behind the host's
    clock (plus ``ahead_s``), or no block came for a host second: on eth-tester no time passes
    between transactions otherwise. (Each block is a second later than the one before, so busy
    rounds run the chain's clock ahead of the host's; without the second rule it would then stand
    still, grace periods and deadlines with it, until the host caught up.)"""

    def __init__(self, w3: Web3, lock: threading.RLock, period_s: float = 0.25,
                 ahead_s: float = 0.0) -> None:
        self.tester = w3.provider.ethereum_tester  # type: ignore[attr-defined]
        self.lock, self.period_s, self.ahead_s = lock, period_s, ahead_s
        if ahead_s:
            with lock:
                self.tester.time_travel(int(time.time() + ahead_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inproc-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        head, moved = -1, time.monotonic()  # the latest block, and when it changed
        while not self._stop.wait(self.period_s):
            with self.lock:
                latest = int(self.tester.get_block_by_number("latest")["number"])
                if latest != head:
                    head, moved = latest, time.monotonic()
                pending = int(self.tester.get_block_by_number("pending")["timestamp"])
                if (time.time() + self.ahead_s >= pending + 1
                        or time.monotonic() - moved >= 1.0):
                    self.tester.mine_blocks(1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- the in-memory transport ----------------------------------------------------------------------
class MemoryNetwork:
    """Who answers at which chain address: each site's node service and the certificate it
    presents (what a TLS connection would show the other side)."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[NodeService, bytes]] = {}
        self._lock = threading.Lock()
        self.pushes = 0
        self.pulls = 0
        self.push_bytes = 0  # the payload bytes of the pushes that arrived

    def attach(self, address: str, node: NodeService, certificate: bytes) -> None:
        with self._lock:
            self._nodes[address.lower()] = (node, certificate)

    def detach(self, address: str) -> None:
        """The site is gone (its process died): calls to it fail as an unreachable peer's do."""
        with self._lock:
            self._nodes.pop(address.lower(), None)

    def node(self, address: str, who: str) -> tuple[NodeService, bytes]:
        with self._lock:
            found = self._nodes.get(address.lower())
        if found is None:
            raise PeerUnavailable(f"{who}: nobody answers (the site is not running)")
        return found

    def certificate(self, address: str) -> bytes:
        return self.node(address, f"peer {address}")[1]


class MemoryPeerClient:
    """:class:`~swarmnode.transport.peer.PeerClient`'s push and pull, over memory."""

    def __init__(self, network: MemoryNetwork, own_address: str, peer_address: str,
                 authority: ChainAuthority) -> None:
        self.network, self.authority = network, authority
        self.own_address, self.peer_address = own_address, peer_address
        self.who = f"peer {peer_address} (in-process)"

    def _reach(self) -> tuple[NodeService, bytes]:
        """The peer, once the certificate it presents is the one our chain holds for it; and
        the certificate we present to it."""
        peer, cert = self.network.node(self.peer_address, self.who)
        expected = self.authority.fingerprint_of(self.peer_address)
        if expected is None:
            raise PeerRefused(f"{self.peer_address} is not an enrolled node on chain (or was "
                              "revoked): not talking to it")
        if fingerprint(cert) != expected:
            raise PeerRefused(f"{self.who} presented a certificate the contract does not hold for "
                              "it; nothing was sent")
        _, own_cert = self.network.node(self.own_address, f"this node {self.own_address}")
        return peer, own_cert

    def push_update(self, round: int, weight: int, payload: serde.Buffer, timeout: float, *,
                    digest: bytes | None = None) -> None:
        if round < 0 or weight < 0:
            raise ConfigError(f"round and weight must be >= 0, got round={round} weight={weight}")
        digest = digest if digest is not None else serde.digest(payload)
        peer, own_cert = self._reach()
        # -- the receiving node, as its servers run it
        sender = bind_address(peer.authority, self.own_address, own_cert)
        if not peer.authority.is_participant(round, sender):
            raise PeerRefused(f"{sender} is not a participant of round {round}")
        what = f"update for round {round} from {sender}"
        data = memoryview(payload).cast("B")
        with serde.Assembler(len(data), peer.max_bytes, what) as assembler:
            for chunk in serde.chunks(data):  # copied, as the wire would
                assembler.add(chunk)
            received = assembler.finish()
        state = received.decode(expected_digest=digest, spec=peer.codec.update_spec,
                                reject_nonfinite=peer.config.reject_nonfinite)
        peer.accept_update(round, sender, weight, state, received.digest)
        with self.network._lock:
            self.network.pushes += 1
            self.network.push_bytes += len(data)

    def pull(self, round: int, timeout: float, size_hint: int | None = None) -> serde.Received:
        peer, own_cert = self._reach()
        caller = bind_address(peer.authority, self.own_address, own_cert)
        if not peer.authority.is_participant(round, caller):
            raise PeerRefused(f"{caller} is not a participant of round {round}")
        held = peer.merged(round, max(0.0, timeout * 0.9), caller)
        if held is None:
            raise RoundError(f"this node does not hold the merged model of round {round} (yet); "
                             "pull it from another member of the round")
        data, digest = held if isinstance(held, tuple) else (held, serde.digest(held))
        what = f"merged model of round {round} from {self.who}"
        view = memoryview(data).cast("B")
        with serde.Assembler(len(view), peer.max_bytes, what) as assembler:
            for chunk in serde.chunks(view):
                assembler.add(chunk)
            received = assembler.finish()
        received.check_digest(digest)  # the stream's header, as PeerClient checks it
        self.network.pulls += 1
        return received

    def reveal_seeds(self, round: int, timeout: float) -> list[tuple[str, bytes]]:
        """Secure aggregation: the peer's round seeds with the sites that never checked in,
        asked as this node (the peer answers only the round's elected leader)."""
        peer, own_cert = self._reach()
        caller = bind_address(peer.authority, self.own_address, own_cert)
        return [(str(missing), bytes(seed)) for missing, seed in peer.reveal_seeds(round, caller)]

    def secure_evidence(self, round: int, timeout: float) -> bytes:
        """Secure aggregation: the evidence of a committed round the peer summed."""
        peer, own_cert = self._reach()
        caller = bind_address(peer.authority, self.own_address, own_cert)
        return bytes(peer.secure_evidence(round, caller))  # copied, as the wire would

    # -- sharded rounds: slices to their owners, merged slices back --------------------------------
    def push_shard(self, round: int, attempt: int, index: int, weight: int,
                   piece: EncodedSlice, timeout: float) -> None:
        peer, own_cert = self._reach()
        sender = bind_address(peer.authority, self.own_address, own_cert)
        spec = peer.check_shard(round, attempt, index, sender, weight)  # on the header
        size = piece.nbytes
        if size not in spec.payload_sizes():
            raise PayloadRejected(f"slice {index} of round {round} from {sender}: "
                                  f"{piece.nbytes} bytes, the slice takes "
                                  f"{spec.payload_sizes()}")
        what = f"slice {index} of round {round} from {sender}"
        with serde.Assembler(size, size, what) as assembler:
            assembler.add(piece.head)
            for chunk in serde.chunks(piece.body):  # copied, as the wire would
                assembler.add(chunk)
            received = assembler.finish()
        state = received.decode(expected_digest=piece.digest, spec=spec,
                                reject_nonfinite=peer.config.reject_nonfinite)
        peer.accept_shard(round, attempt, index, sender, weight, state)
        self.network.pushes += 1
        self.network.push_bytes += size

    def pull_shard_into(self, round: int, attempt: int, index: int, head: bytes,
                        into: memoryview, timeout: float, wait_s: float) -> None:
        peer, own_cert = self._reach()
        caller = bind_address(peer.authority, self.own_address, own_cert)
        if not peer.authority.is_participant(round, caller):
            raise PeerRefused(f"{caller} is not a participant of round {round}")
        held = peer.merged_shard(round, attempt, index, wait_s, caller)
        if held is None:
            raise RoundError(f"round {round}: slice {index} is not merged (yet)")
        view = memoryview(held).cast("B")
        what = f"merged slice {index} of round {round} from {self.who}"
        if len(view) != len(head) + len(into) or view[:len(head)] != head:
            raise PayloadRejected(f"{what}: not the slice of the training spec")
        into[:] = view[len(head):]  # copied, as the wire would
        self.network.pulls += 1

    def close(self) -> None:
        pass


class MemoryPeerPool:
    """:class:`~swarmnode.node.peers.PeerPool` over a :class:`MemoryNetwork`; pass
    ``NodeService(peers=MemoryPeerPool.factory(network))``."""

    def __init__(self, network: MemoryNetwork, me: str, authority: ChainAuthority) -> None:
        self.network, self.me, self.authority = network, me, authority

    @classmethod
    def factory(cls, network: MemoryNetwork) -> Callable[..., MemoryPeerPool]:
        def make(chain: SwarmContract, me: str, tls: TlsFiles,
                 authority: ChainAuthority) -> MemoryPeerPool:
            return cls(network, me, authority)

        return make

    def client(self, address: str) -> MemoryPeerClient:
        info = self.authority.node(address)
        if not info.enrolled or info.revoked:
            raise PeerUnavailable(f"node {address} is not enrolled or was revoked on chain")
        return MemoryPeerClient(self.network, self.me, address, self.authority)

    def drop(self, address: str) -> None:
        self.authority.forget(address)

    def reachability(self) -> tuple[int, int]:
        """In process there is no connection to fail: no peer counts as reached or not."""
        return (0, 0)

    def close(self) -> None:
        pass


# -- the swarm ------------------------------------------------------------------------------------
# What a site's trainer does at its k-th sync (k = 0, 1, ...), given the model it holds (the
# swarm's latest merged model, or None before the first round): (state, weight) to sync, or None
# when the trainer is done (it then finishes with the swarm's end policy).
#: step(site, k, model) -> (state, weight), or (state, weight, report) where ``report`` is what
#: the trainer's sync says besides its parameters, as the local API's arguments: ``loss``,
#: ``metric``, a DP site's ``epsilon`` and ``delta``; None: the trainer is done
Step = Callable[["Site", int, "dict[str, torch.Tensor] | None"],
                "tuple[Mapping[str, torch.Tensor], int] | "
                "tuple[Mapping[str, torch.Tensor], int, Mapping[str, Any]] | None"]


@dataclass
class Sent:
    """One sync: the canonical safetensors bytes the trainer handed its node, and the outcome."""

    payload: bytes
    weight: int
    outcome: RoundOutcome


class SiteDied(BaseException):
    """An ``exit`` fault fired in an in-process site: it ends that site's trainer (through every
    ``except Exception`` on the way, as the process's exit would) and the harness takes the site
    off the network."""

    def __init__(self, round: int) -> None:
        super().__init__(f"test fault: the site dies in round {round}")
        self.round = round


@dataclass
class Site:
    index: int  # 0-based
    name: str
    address: str
    service: NodeService
    syncs: list[Sent] = field(default_factory=list)
    final: RoundOutcome | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    hello: dict[str, Any] = field(default_factory=dict)  # the node's answer to the trainer's hello
    died: int | None = None  # the round an exit fault ended it in
    stopped_by: BaseException | None = None  # an error run(expected=...) accepted

    @property
    def final_digest(self) -> bytes | None:
        return self.final.digest if self.final is not None else None


class InProcessSwarm:
    """``n`` sites on a fresh registry and training, each a real NodeService."""

    def __init__(
        self,
        n: int,
        spec: TrainingSpec | str,
        min_peers: int | None = None,
        *,
        grace_s: int = 30,
        deadline_s: int = 60,
        policy: str = "inactive",
        workdir: str | Path | None = None,
        poll_s: float = 0.05,
        round_timeout_s: float = 300.0,
        faults: Mapping[int, Mapping[str, str]] | None = None,
        chain_ahead_s: float = 0.0,
        node_options: Mapping[str, Any] | None = None,
        secure_end_control: bool = False,
    ) -> None:
        """``grace_s``/``deadline_s``: the contract's, in chain seconds (which follow the host's
        clock here, a second per block at least); generous defaults keep a loaded machine from
        turning a slow site into a missed round. ``faults``: by site index, its node.yaml
        ``faults:`` section. ``chain_ahead_s``: the chain's clock runs that far ahead.
        ``node_options``: more node.yaml settings, for every site. ``secure_end_control``: a
        control for studies (``NodeService(secure_end_control=True)``, no product setting): a
        plain training's nodes end as secure aggregation's do (once fewer than three sites
        still train, the others finish at their next sync; a round with fewer than three sites
        adding weight keeps its starting model), so a plain swarm differs from a secure one in
        the masking and its encoding."""
        if not 1 <= n <= MAX_SITES:
            raise ConfigError(f"an in-process swarm has 1..{MAX_SITES} sites, not {n}")
        self.spec = TrainingSpec.from_json(spec, "the swarm's spec") if isinstance(spec, str) \
            else spec
        self.spec_json = spec if isinstance(spec, str) else spec.to_json()
        self.policy = policy
        self._tmp = tempfile.TemporaryDirectory(prefix="inproc-swarm-") if workdir is None \
            else None
        self.workdir = Path(self._tmp.name if self._tmp is not None else workdir)  # type: ignore[arg-type]
        self.lock = threading.RLock()
        self.w3 = Web3(_LockedTesterProvider(self.lock))
        # as swarmnode.chain.rpc.connect sets up a node's Web3: no chain-id or ENS lookups
        # around each request
        for name in ("validation", "ens_name_to_address"):
            self.w3.middleware_onion.remove(name)
        funder = self.w3.eth.accounts[0]
        # the sender eth-tester gives a read without one, named once instead of looked up
        # (eth_accounts, twice) before every read
        self.w3.eth.default_account = funder
        for i in range(n + 1):
            self.w3.eth.send_transaction({"from": funder, "to": dev_account(i).address,
                                          "value": _FUNDS})
        self.admin = SwarmContract.deploy(
            self.w3, dev_account(0), self.spec_json,
            min_peers if min_peers is not None else self.spec.min_peers, grace_s, deadline_s)
        self.clock = _Clock(self.w3, self.lock, ahead_s=chain_ahead_s)
        self.network = MemoryNetwork()
        self.node_options = dict(node_options or {})
        self.secure_end_control = secure_end_control
        self.stop = threading.Event()
        self._ended = threading.Event()  # set whenever a trainer's thread ends
        self._expected: Callable[[Site, BaseException], bool] | None = None  # run()'s
        ca_cert, ca_key = create_ca(self.workdir / "ca", "ca", org="inproc")
        trust = make_bundle([ca_cert], self.workdir / "trust.pem")
        self.sites: list[Site] = []
        try:
            for i in range(n):
                self.sites.append(self._site(i, trust, ca_cert, ca_key, poll_s,
                                             round_timeout_s, (faults or {}).get(i)))
        except BaseException:
            self.close()
            raise

    def _site(self, i: int, trust: Path, ca_cert: Path, ca_key: Path, poll_s: float,
              round_timeout_s: float, faults: Mapping[str, str] | None = None) -> Site:
        name = f"site-{i + 1}"
        cert, key = issue_node_cert(ca_cert, ca_key, self.workdir / name, name,
                                    dns=[f"{name}.inproc"], ips=[])
        account = dev_account(i + 1)
        self.admin.authorize(account.address, describe(cert).fingerprint)
        config = NodeConfig(
            name=name, rpc_url="in-process", contract=self.admin.address, key_index=i + 1,
            peer_listen="127.0.0.1:0", peer_endpoint=f"{name}.inproc:7441", cert=cert, key=key,
            trust=trust, data_dir=self.workdir / name / "data", poll_s=poll_s,
            round_timeout_s=round_timeout_s, start_timeout_s=30.0,
            faults=FaultSettings(**faults) if faults is not None else None,
            **self.node_options,
        )
        # a stop event of its own: a site that dies stops alone (_halt stops them all)
        service = NodeService(config, threading.Event(), chain=self.admin.with_account(account),
                              peers=MemoryPeerPool.factory(self.network),
                              secure_end_control=self.secure_end_control)
        service.driver.die = _raise_died  # type: ignore[method-assign]
        self.network.attach(service.me, service, Path(cert).read_bytes())
        service._enroll(7441)  # what start() does once its servers listen (none here)
        return Site(i, name, service.me, service)

    # -- running ----------------------------------------------------------------------------------
    def run(self, step: Step, timeout: float = 120.0,
            begin: Callable[[Site], None] | None = None,
            expected: Callable[[Site, BaseException], bool] | None = None) -> list[Site]:
        """Each site's trainer in a thread of its own: ``begin(site)`` (if given; it may wait),
        the trainer's hello (the latest merged model, if any), then ``step`` until it returns
        None, then ``finish`` with the swarm's policy. Returns once every site holds the final
        model, died of an exit fault or stopped with an error ``expected(site, error)`` accepts
        (kept in ``site.stopped_by``: a revoked site's refusal, say); raises the first other
        site's error, or TimeoutError naming the sites still running."""
        self._expected = expected
        threads = [threading.Thread(target=self._train, args=(site, step, begin),
                                    name=f"trainer-{site.name}", daemon=True)
                   for site in self.sites]
        for t in threads:
            t.start()
        until = time.monotonic() + timeout
        while time.monotonic() < until and not all(s.done.is_set() for s in self.sites):
            if any(s.error is not None for s in self.sites):
                self._halt()  # one site failed: the others' rounds would only wait for it
                break
            self._ended.wait(0.5)  # a trainer's thread ended (or look again)
            self._ended.clear()
        late = [s for s in self.sites if not s.done.is_set()]
        failed = [s for s in self.sites if s.error is not None]
        if failed:
            raise failed[0].error  # type: ignore[misc]
        if late:
            self._halt()  # ends the waiting rounds
            where = ", ".join(f"{s.name} at {s.service.stage} of round {s.service.round}"
                              for s in late)
            raise TimeoutError(f"sites still running after {timeout:g} s: {where}")
        return self.sites

    def _train(self, site: Site, step: Step, begin: Callable[[Site], None] | None) -> None:
        try:
            if begin is not None:
                begin(site)
            site.hello, held = site.service.hello(self.spec)
            model = decode(held) if held is not None else None
            last: tuple[bytes, int] | None = None
            k = 0
            while (got := step(site, k, model)) is not None:
                state, weight = got[0], got[1]
                report = dict(got[2]) if len(got) > 2 else {}  # type: ignore[misc]
                payload = serde.encode({n: t.detach().contiguous() for n, t in state.items()})
                outcome = site.service.sync(payload, weight, report.get("loss"),
                                            report.get("metric"),
                                            Privacy.from_args(report, "sync"))
                site.syncs.append(Sent(payload, weight, outcome))
                last = (payload, weight)
                if outcome.data is not None:
                    model = decode(outcome.data)
                k += 1
                if site.service._read(site.service.chain.training_finished):
                    break
            payload, weight = last if last is not None else (b"", 0)
            if last is None:
                raise ConfigError(f"{site.name}: the trainer synced nothing")
            site.final = site.service.finish(payload, weight, self.policy)
        except SiteDied as died:
            site.died = died.round
            self.network.detach(site.address)  # nobody reaches it any more
            site.service.stop()
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            expected = self._expected
            if isinstance(exc, Exception) and expected is not None and expected(site, exc):
                log.warning("%s: the trainer stopped, as expected: %s", site.name, exc)
                site.stopped_by = exc
            else:
                log.exception("%s: the trainer's thread failed", site.name)
                site.error = exc
        finally:
            site.done.set()
            self._ended.set()

    # -- reading the outcome ----------------------------------------------------------------------
    def final_round(self) -> int | None:
        """The training's final round (None while it is not fixed)."""
        return self.admin.final_round()

    def final_digest(self) -> bytes | None:
        """The final round's digest on chain (None before the training finished)."""
        final = self.final_round()
        return self.admin.round(final).digest if final else None

    def _halt(self) -> None:
        """Every site's rounds end now (their services are stopping)."""
        self.stop.set()
        for site in self.sites:
            site.service.stopping.set()

    def close(self) -> None:
        self._halt()
        for site in self.sites:
            try:
                site.service.stop()
            except Exception:  # noqa: BLE001 - stopping the others matters more
                log.exception("%s: stopping failed", site.name)
        if hasattr(self, "clock"):
            self.clock.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> InProcessSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_died(round: int) -> None:
    raise SiteDied(round)


def decode(data: serde.Buffer) -> dict[str, torch.Tensor]:
    """A merged model's canonical bytes as tensors of their own (copied out of ``data``)."""
    return {k: v.clone() for k, v in serde.view_state(data, spec=None,
                                                      reject_nonfinite=False).items()}
