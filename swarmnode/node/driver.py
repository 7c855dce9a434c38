"""Runs one round for this node: feeds chain observations to the RoundMachine and performs the
actions it decides, one handler per action (:attr:`RoundDriver.handlers`). The decisions live in
:mod:`~swarmnode.node.machine`, :mod:`~swarmnode.node.rules` and
:mod:`~swarmnode.node.lifecycle`; this module holds the I/O (chain, peers, store, threads)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from swarmnode.chain.client import SwarmContract
from swarmnode.chain.models import RoundInfo, RoundStatus
from swarmnode.chain.watch import BlockWatcher
from swarmnode.errors import (
    AggregateRejected,
    ChainError,
    ChainTimeout,
    ChainUnavailable,
    ContractReverted,
    DuplicateUpdate,
    NodeUnavailable,
    NonFiniteValues,
    PayloadRejected,
    RoundAbandoned,
    RoundError,
    RoundTimeout,
    SwarmError,
    TransportError,
)
from swarmnode.node import rules, sharding
from swarmnode.node.collector import Collector, Collectors
from swarmnode.node.faults import NO_FAULTS, Faults
from swarmnode.node.lifecycle import Metrics, pending_after, pending_after_sent
from swarmnode.node.machine import (
    Action,
    CheckIn,
    Done,
    Draw,
    Elect,
    MarkAbsent,
    Merge,
    Observation,
    Pull,
    Push,
    Reduce,
    Reelect,
    Reveals,
    RoundMachine,
    Scatter,
    SecureView,
    Stage,
    Timing,
    Wait,
    absent_check_due,
)
from swarmnode.node.peers import PeerPool
from swarmnode.node.secure import SecureAggregation
from swarmnode.node.store import ModelStore, StoredModel
from swarmnode.privacy import guards
from swarmnode.privacy.dropout import SeedReveal
from swarmnode.transport import compression, parts, serde
from swarmnode.types import StateDict, Update

__all__ = ["Round", "RoundDriver", "RoundOutcome"]

log = logging.getLogger("swarmnode.node")


T = TypeVar("T")


def ask_all(peers: Sequence[str], ask: Callable[[str], T], timeout: float,
            what: str) -> list[tuple[str, T]]:
    """``ask(peer)`` for every peer at once, each in a thread of its own; the answers in within
    ``timeout`` seconds, in ``peers``' order. A peer that failed (a SwarmError) or did not
    answer in time is logged and left out; a late answer is dropped."""
    done: dict[str, T] = {}
    lock = threading.Condition()
    pending = set(peers)

    def one(peer: str) -> None:
        try:
            got = ask(peer)
        except SwarmError as exc:
            log.warning("%s from %s: %s", what, peer, exc)
            got = None
        with lock:
            pending.discard(peer)
            if got is not None:
                done[peer] = got
            lock.notify_all()

    for peer in peers:
        threading.Thread(target=one, args=(peer,), name=f"ask-{peer[:10]}",
                         daemon=True).start()
    with lock:
        lock.wait_for(lambda: not pending, timeout=timeout)
        late = sorted(pending)
        out = [(p, done[p]) for p in peers if p in done]
    if late:
        log.warning("%s: no answer from %s within %.1f s", what, ", ".join(late), timeout)
    return out


_EVENT_WAIT_S = 0.5  # with a block watcher, the longest a round sleeps between looks
_SIGNAL_FALLBACK_S = 2.0  # with event signals, the longest a waiting round goes without a look
_STALL_S = 3.0  # a chain read slower than this was a stall (the chain or the host froze)
_SIGNAL_STAGES = (Stage.ELECTION, Stage.COMMIT, Stage.COLLECT)

# what a handler returns when the round is over for this node: (leader, digest, data)
_Over = tuple[str | None, bytes | None, serde.Buffer | None]


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    leader: str | None
    digest: bytes | None
    data: serde.Buffer | None  # the merged model's canonical bytes (None if abandoned)
    abandoned: bool
    contributed: bool
    seconds: float
    # seconds this node spent per step of the round: each action (checkin, elect, push, merge,
    # commit_tx, pull, ...) and each wait by what it waits for (wait_election, wait_collect,
    # wait_commit, ...); what `benchmarks/round.py` reports
    stages: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Round:
    """One run of :meth:`RoundDriver.run_round`: its machine and what the round has done. A nested
    fetch of an older model (the base of a weight-0 round, a clip reference) runs in a Round of
    its own, so it cannot overwrite the running round's fields."""

    machine: RoundMachine
    state: StateDict
    payload: serde.Buffer
    weight: int
    started: float
    stages: dict[str, float] = field(default_factory=dict)
    action: str = "observe"  # what the current step's time is reported as
    seeded: set[int] = field(default_factory=set)  # leader: attempts its own update is in
    # leader: attempt -> (digest, members) of what it merged (the bytes: the store)
    merged: dict[int, tuple[bytes, tuple[str, ...]]] = field(default_factory=dict)
    pull_errors: list[str] = field(default_factory=list)  # the last failed pull's, by source
    scattered: set[int] = field(default_factory=set)  # sharded: slices of our update delivered
    marks: tuple[int, int] = (0, 0)  # the watcher's (block, signal) marks before this step's read

    @property
    def number(self) -> int:
        return self.machine.round


class RoundDriver:
    def __init__(
        self,
        me: str,
        chain: SwarmContract,
        pool: PeerPool,
        store: ModelStore,
        collectors: Collectors,
        timing: Timing,
        spec: serde.ParamSpec | None,
        *,
        max_bytes: int,
        round_timeout_s: float,
        watcher: BlockWatcher | None = None,
        reject_nonfinite: bool = True,
        stop: threading.Event | None = None,
        faults: Faults = NO_FAULTS,
        peer_parts: bool = False,
        topology: str = "leader",
        shards: sharding.ShardExchange | None = None,
        codec: compression.UpdateCodec | None = None,
        secure: SecureAggregation | None = None,
        sum_rule_in_clear: bool = False,
    ) -> None:
        """``watcher``: waits end at the next block (or update) instead of after a fixed
        interval; without one the round polls every ``timing.poll_s``. ``faults``: what the
        failure tests inject (none in production). ``peer_parts``: members fetch the merged
        model in verified parts, their share from the leader and the rest from each other
        (:mod:`swarmnode.transport.parts`), instead of each the whole model from the leader.
        ``codec``: how updates travel (the spec's ``compression``; default: whole).
        ``secure``: the training runs secure aggregation (masked updates, seed reveals).
        ``sum_rule_in_clear``: a control for studies, not a product setting (NodeService's
        ``secure_end_control``): a plain round in which fewer sites add weight than a secure
        sum needs (guards.sums) commits its starting model again, as a secure round does."""
        self.me = me
        self.secure = secure
        self.sum_rule_in_clear = sum_rule_in_clear and secure is None
        self.peer_parts = peer_parts
        # topology 'sharded': the first attempt of a round merges in slices (node.sharding)
        self.topology = topology
        self.shards = shards
        self.codec = codec or compression.UpdateCodec("none", spec.params if spec else {})
        self.watcher = watcher
        self.reject_nonfinite = reject_nonfinite
        self.stop = stop or threading.Event()  # set: the service is stopping; rounds end now
        self.chain = chain
        self.pool = pool
        self.store = store
        store.on_written = self._written
        self.collectors = collectors
        self.timing = timing
        self.spec = spec
        self.max_bytes = max_bytes
        self.round_timeout_s = round_timeout_s
        self.faults = faults
        self._weights: dict[tuple[int, str], int] = {}
        self.current: Round | None = None  # the round the trainer's call runs (its stage: logs)
        self._depth = 0  # run_round calls in progress (more than one: a nested fetch)
        self.seen: dict[int, RoundInfo] = {}  # the last observation of recent rounds
        self._absent_checked = -float("inf")  # chain time of the last look for absent sites
        self._chain_ok_since = -float("inf")  # the last chain stall seen (monotonic clock)
        # the metrics the next check-in (or finish) carries: see lifecycle.pending_after
        self.pending_metrics: Metrics | None = None
        # Members fetch the merged model as soon as the leader has it (before the commit), and
        # the leader commits once a member holds a copy (or after replicate_s): the pull overlaps
        # the commit, and a leader that dies right after committing is not the only holder.
        self._prefetched: dict[int, serde.Received] = {}
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="digest")
        self._own: tuple[object, Future[bytes]] | None = None
        self._fetching: dict[int, threading.Thread] = {}
        # sharded: round -> the model assembled from its slices, once checked free of NaN/Inf
        # (on the gather's thread, while the round waits for its commit)
        self._finite: dict[int, Any] = {}
        self._model_bytes = spec.nbytes if spec is not None else None
        self._served: dict[int, set[str]] = {}
        # models this node serves in parts: one it is still receiving, or a whole one it holds
        self._partial: dict[int, parts.PartBuffer] = {}
        self._full: dict[int, tuple[bytes, parts.FullSource]] = {}
        self._replica = threading.Condition()
        self.handlers: dict[type, Callable[[Round, Any, RoundInfo, float], _Over | None]] = {
            Wait: self._wait, CheckIn: self._checkin, Elect: self._elect,
            MarkAbsent: self._mark_absent, Draw: self._draw, Push: self._push,
            Scatter: self._scatter, Reduce: self._reduce,
            Merge: self._merge, Reelect: self._reelect,
            Pull: self._pull, Done: self._done, Reveals: self._reveals,
        }

    @property
    def machine(self) -> RoundMachine | None:
        """The running round's machine (a nested fetch's is not it)."""
        return self.current.machine if self.current is not None else None

    @property
    def replicate_s(self) -> float:
        return self.timing.replicate_s

    def note_metrics(self, metrics: Metrics | None) -> None:
        """Metrics eligible for the chain (lifecycle.eligible_metrics): the next check-in or
        finish carries them."""
        self.pending_metrics = pending_after(self.pending_metrics, metrics)

    def metrics_sent(self, sent: Metrics | None) -> None:
        self.pending_metrics = pending_after_sent(self.pending_metrics, sent)

    def prehash(self, payload: serde.Buffer) -> None:
        """Start hashing this node's update now (a helper thread), for the push that follows.
        Not with topology sharded: its slices are not hashed (node.sharding), and only an
        attempt after a re-election pushes the whole update (hashed then): a pass over the
        model each round that nothing would read. Nor with secure aggregation: it pushes its
        masked vector, whose digest is its check-in's hash (node.secure), never this payload
        (at 25M parameters that pass cost each member 0.06 CPU-s a round for nothing)."""
        if self.topology == "sharded" or self.secure is not None:
            self._own = None
            return

        def digest() -> bytes:
            try:
                return serde.digest(payload)
            finally:  # hashed and checked: the push or the fold reads it again
                serde.evict(payload)

        try:
            self._own = (payload, self._hasher.submit(digest))
        except RuntimeError:  # closed (the service is stopping): the push hashes it itself
            self._own = None

    def _own_digest(self, payload: serde.Buffer) -> bytes:
        own = self._own
        if own is not None and own[0] is payload:
            return own[1].result()
        return serde.digest(payload)

    def forget_own(self) -> None:
        """The trainer's update is no longer needed (its sync returned): let its memory go."""
        self._own = None

    def close(self) -> None:
        self._hasher.shutdown(wait=False, cancel_futures=True)

    # -- observation helpers ----------------------------------------------------------------------
    def weight_of(self, round: int, node: str) -> int:
        """``node``'s check-in weight in ``round`` on chain; -1: it did not check in."""
        key = (round, node)
        if key not in self._weights:
            w = self.chain.checkin_weight(round, node)
            if w is None:
                return -1
            self._weights[key] = w
        return self._weights[key]

    def _weights_of(self, info: RoundInfo) -> dict[str, int]:
        return {p: self.weight_of(info.round, p) for p in info.participants}

    def collector(self, info: RoundInfo) -> Collector:
        """The leader's collector of an elected round, told the round's contributors, whose order
        it folds their updates in."""
        collector = self.collectors.get(info.round, info.attempt)
        collector.expect(rules.contributors(info.participants, self._weights_of(info)))
        return collector

    def _collected(self, info: RoundInfo) -> frozenset[str]:
        return rules.collected(info.participants, self.collector(info).senders,
                               self._weights_of(info))

    # -- the loop ---------------------------------------------------------------------------------
    def run_round(
        self,
        round: int,
        state: StateDict,
        payload: serde.Buffer,
        weight: int,
        *,
        contribute: bool = True,
        drive: bool = True,
    ) -> RoundOutcome:
        """Take part in ``round`` with ``state`` (canonical bytes ``payload``) and ``weight``.

        Returns once this node holds the round's merged model, verified against the chain's digest,
        or the round was abandoned. ``contribute=False``: only take the merged model.
        """
        machine = RoundMachine(self.me, round, weight, self.timing, contribute=contribute,
                               drive=drive, metrics=self.pending_metrics if contribute else None,
                               secure=self.secure is not None)
        rnd = Round(machine, state, payload, weight, started=time.monotonic())
        if self._depth == 0:  # a nested fetch runs in its own Round, not as the current one
            self.current = rnd
        self._depth += 1
        try:
            return self._run(rnd)
        finally:
            self._depth -= 1

    def _run(self, rnd: Round) -> RoundOutcome:
        round, machine, stages = rnd.number, rnd.machine, rnd.stages
        self._weights = {k: v for k, v in self._weights.items() if k[0] >= round - 1}
        while True:
            if self.stop.is_set():
                raise NodeUnavailable(
                    f"the node service is stopping (round {round}, stage {machine.stage.value}); "
                    "the trainer waits for it to come back"
                )
            if time.monotonic() - rnd.started > self.round_timeout_s:
                raise RoundTimeout(
                    f"round {round} did not complete within {self.round_timeout_s:.0f} s "
                    f"(stage {machine.stage.value}); check the other nodes' logs and "
                    "`swarmnode status`"
                )
            t0 = time.monotonic()
            rnd.action = "observe"
            try:
                outcome = self._step(rnd)
            except (ChainUnavailable, ChainTimeout) as exc:  # transient: the round goes on
                log.warning("round %d: chain not answering (%s); retrying", round, exc)
                self._chain_ok_since = time.monotonic()  # a stall: see Observation.chain_up_s
                time.sleep(self.timing.retry_s)
                continue
            finally:
                stages[rnd.action] = stages.get(rnd.action, 0.0) + time.monotonic() - t0
            if outcome is not None:
                if "merge" in stages:  # the leader's merge and commit are reported apart
                    stages["merge"] -= stages.get("commit_tx", 0.0)
                # a prefetch that finished after the pull: its copy is not needed any more
                self._prefetched = {r: d for r, d in self._prefetched.items() if r > round}
                self._finite = {r: d for r, d in self._finite.items() if r > round}
                self.collectors.forget(round)  # attempts that never merged: their memory goes
                if self.secure is not None:  # the masked updates it received: their memory too
                    self.secure.forget(round)
                if self.secure is not None and self._depth == 1:  # the next round's masks
                    self.secure.prepare_ahead()  # made while the trainer trains for it
                return RoundOutcome(
                    round=round, leader=outcome[0], digest=outcome[1], data=outcome[2],
                    abandoned=outcome[1] is None,
                    contributed=machine.checked_in and not machine.late,
                    seconds=time.monotonic() - rnd.started, stages=dict(stages),
                )

    def _step(self, rnd: Round) -> _Over | None:
        """Observe, decide, act once; (leader, digest, data) when the round is over for us."""
        machine, round = rnd.machine, rnd.number
        if self.watcher is not None:  # before the read: a wait wakes on anything after it
            rnd.marks = (self.watcher.mark(), self.watcher.signal_mark())
        asked = time.monotonic()
        info = self.chain.round(round)
        answered = time.monotonic()
        if answered - asked > _STALL_S:  # answered, but after a stall
            log.warning("round %d: the chain took %.1f s to answer", round, answered - asked)
            self._chain_ok_since = answered
        self.seen[round] = info
        if len(self.seen) > 4:
            del self.seen[min(self.seen)]
        collected: frozenset[str] = frozenset()
        sharded, shard_in = self.sharded_attempt(info)
        secure = None
        if self.secure is not None:
            led = info.status is RoundStatus.ELECTED and info.leader == self.me
            if led:
                collected = self.secure.senders(round)
            if info.status in (RoundStatus.OPEN, RoundStatus.ELECTED):
                # once elected, who adds weight: weight-0 sites do not count towards a sum
                adding = (frozenset(p.lower() for p in info.participants
                                    if self.weight_of(round, p) > 0)
                          if info.status is RoundStatus.ELECTED else None)
                secure = SecureView(self.secure.roster(round),
                                    self.secure.revealed(round) if led else frozenset(), adding)
        elif info.status is RoundStatus.ELECTED and info.leader == self.me and not sharded:
            if info.attempt not in rnd.seeded and self.me in info.participants:
                self._seed_own(rnd, info)
                rnd.seeded.add(info.attempt)
            collected = self._collected(info)
        # chain time (the contract's clock for grace and deadlines), not this host's clock
        now = self.watcher.now() if self.watcher is not None else time.time()
        absent: tuple[str, ...] = ()
        if absent_check_due(self.me, info, now, self.timing, self._absent_checked):
            self._absent_checked = now
            absent = tuple(self.chain.absent_candidates())
        action: Action = machine.decide(Observation(now, info, collected, absent,
                                                    time.monotonic() - self._chain_ok_since,
                                                    sharded, shard_in, secure))
        # what this step's time is reported as: the action, or what a wait waits for
        rnd.action = (f"wait_{machine.stage.value}" if isinstance(action, Wait)
                      else type(action).__name__.lower())
        return self.handlers[type(action)](rnd, action, info, now)

    def contributors(self, info: RoundInfo) -> tuple[str, ...]:
        """The round's participants that add weight (rules.contributors, chain weights)."""
        return rules.contributors(info.participants, self._weights_of(info))

    def sharded_attempt(self, info: RoundInfo) -> tuple[bool, frozenset[str]]:
        """Whether this attempt of an elected round merges in slices (rules.runs_sharded), and
        the participants whose slice of this node's share is in."""
        if (self.shards is None or info.status is not RoundStatus.ELECTED
                or self.me not in info.participants):
            return False, frozenset()
        weights = self._weights_of(info)
        if not rules.runs_sharded(self.topology, info.attempt, info.participants,
                                  rules.contributors(info.participants, weights)):
            return False, frozenset()
        return True, rules.collected(info.participants,
                                     self.shards.senders(info.round, info.attempt), weights)

    def _next_deadline(self, info: RoundInfo, now: float) -> float:
        """Seconds until the next moment the round's decisions change by time alone (the grace
        period's end, the collect window, the leader's deadline), at most _SIGNAL_FALLBACK_S;
        past them, retry_s (elections and re-elections are retried that often)."""
        t = self.timing
        ahead: list[float] = []
        if info.status is RoundStatus.OPEN and info.first_checkin_at:
            ahead.append(info.first_checkin_at + t.grace_s - now)
        elif info.status is RoundStatus.ELECTED and info.leader is None:
            ahead.append(info.elected_at + t.draw_wait_s - now)
        elif info.status is RoundStatus.ELECTED:
            ahead += [info.elected_at + t.collect_s - now, info.elected_at + t.deadline_s - now]
        future = [a for a in ahead if a > 0]
        if future:
            return min(_SIGNAL_FALLBACK_S, min(future) + 0.02)
        return t.retry_s if ahead or info.status is RoundStatus.OPEN else _SIGNAL_FALLBACK_S

    # -- action handlers --------------------------------------------------------------------------
    def _wait(self, rnd: Round, action: Wait, info: RoundInfo, now: float) -> None:
        w = self.watcher
        mark, smark = rnd.marks
        if w is None:
            time.sleep(action.seconds)
        elif w.signals_live and rnd.machine.stage in _SIGNAL_STAGES:
            # waiting for others (an election, a commit, updates): wake on their events or
            # when one of the round's own deadlines comes, not on every block
            w.wait_signal(smark, self._next_deadline(info, now))
        else:  # what a round waits for comes with a block (or an update): wake then
            w.wait(mark, max(action.seconds, _EVENT_WAIT_S))

    def _quiet(self, fn, what: str, machine: RoundMachine | None = None) -> None:  # type: ignore[no-untyped-def]
        """Calls that race with other nodes (elect, reelect): a revert just means 'not now'.
        A call that closed the round makes this node the one to draw its leader next."""
        try:
            result = fn()
        except ContractReverted as exc:
            log.debug("%s: %s", what, exc.reason or exc)
            return
        if machine is not None and "RoundClosed" in result.events:
            machine.on_closed()

    def _elect(self, rnd: Round, action: Elect, info: RoundInfo, now: float) -> None:
        self._quiet(lambda: self.chain.elect(action.round), f"elect round {action.round}",
                    rnd.machine)

    def _mark_absent(self, rnd: Round, action: MarkAbsent, info: RoundInfo, now: float) -> None:
        for node in action.nodes:
            log.warning("round %d: node %s missed the last rounds; marking it absent",
                        action.round, node)
            self._quiet(lambda n=node: self.chain.mark_absent(n), f"mark {node} absent",
                        rnd.machine)

    def _reelect(self, rnd: Round, action: Reelect, info: RoundInfo, now: float) -> None:
        log.warning("round %d: leader %s missed the deadline; asking the contract to re-elect",
                    action.round, action.leader)
        self.pool.drop(action.leader)
        self._quiet(lambda: self.chain.reelect(action.round), f"reelect round {action.round}",
                    rnd.machine)

    def _draw(self, rnd: Round, action: Draw, info: RoundInfo, now: float) -> None:
        self._quiet(lambda: self.chain.draw(action.round), f"draw round {action.round}")
        rnd.machine.on_drawn()

    def _done(self, rnd: Round, action: Done, info: RoundInfo, now: float) -> _Over:
        if action.abandoned:
            if action.why == "abandoned":
                log.warning("round %d: abandoned on chain (every leader failed)", action.round)
            elif action.why == "unservable":
                log.error("round %d: no participant can serve the committed merged model "
                          "(digest %s) for %.0f s: %s; this site keeps its own parameters for "
                          "this round", action.round, (info.digest or b"").hex()[:12],
                          self.timing.deadline_s, "; ".join(rnd.pull_errors))
            return info.leader, None, None
        stored = self.store.get(action.round)
        return info.leader, info.digest, None if stored is None else stored.data

    def _checkin(self, rnd: Round, action: CheckIn, info: RoundInfo, now: float) -> None:
        machine = rnd.machine
        self._die_at("before-checkin", action.round)
        masked = self._masked_hash(rnd, action) if action.masked else None
        try:
            result = self.chain.checkin(action.round, action.weight, metrics=action.metrics,
                                        masked_hash=masked)
        except ContractReverted as exc:
            info = self.chain.round(action.round)
            if self.me in info.participants:  # an earlier try landed: its reply was lost
                machine.on_checked_in()
                self.metrics_sent(action.metrics)
            elif info.status is not RoundStatus.OPEN:
                log.info("round %d: elected before our check-in; taking the merged model",
                         action.round)
                machine.on_checkin_too_late()
            else:
                raise RoundError(f"round {action.round}: check-in refused: {exc}") from None
            return
        machine.on_checked_in()
        self.metrics_sent(action.metrics)
        if masked is not None and self.secure is not None:  # its hash's event is in that block
            self.secure.note_checkin(action.round, result.block,
                                     masked if "MaskedUpdate" in result.events else None)
        if "RoundClosed" in result.events:
            machine.on_closed()
        log.info("round %d: checked in with weight %d", action.round, action.weight)

    def _start_state(self, round: int) -> StateDict | None:
        """The model ``round`` starts from (the latest committed before it), None if none."""
        held = self.latest_committed_before(round)
        if held is None:
            return None
        return serde.view_state(held.data, spec=self.spec, reject_nonfinite=False)

    def _masked_hash(self, rnd: Round, action: CheckIn) -> bytes:
        """Secure aggregation: this node's masked update for the round (made once), its hash
        for the check-in."""
        assert self.secure is not None
        roster = self.secure.roster(action.round)
        if roster is None:
            raise RoundError(f"round {action.round}: the mask set is not fixed; no check-in")
        _, digest = self.secure.masked(action.round, rnd.state, action.weight,
                                       self._start_state(action.round), roster)
        return digest

    def _push_masked(self, rnd: Round, action: Push) -> bool:
        """Secure aggregation: push the masked update this node checked in with (its hash on
        chain); False: it does not hold that update (restarted after its check-in), so it
        pushes nothing and the round is abandoned."""
        assert self.secure is not None
        held = self.secure.held(action.round)
        onchain = self.secure.own_hash(action.round)  # from its check-in's block, kept once read
        if held is None or onchain is None or held[1] != onchain:
            log.error("round %d: this node checked in with a masked update it no longer holds "
                      "(restarted after its check-in?); it pushes nothing: the round is "
                      "abandoned, the next goes on", action.round)
            return False
        pushed = self.secure.held_payload(action.round)  # the held vector's own bytes
        if pushed is None:
            return False
        payload, digest = pushed
        self.pool.client(action.leader).push_update(
            action.round, rnd.weight, payload, timeout=action.timeout_s, digest=digest)
        return True

    def _reveals(self, rnd: Round, action: Reveals, info: RoundInfo, now: float) -> None:
        """Secure-aggregation leader: the survivors' seeds with the sites that never checked
        in (this node's own computed here), asked of all survivors at once and waited for no
        longer than the machine's transfer timeout (tied to the round's deadline): a silent
        survivor costs that once, not once per survivor."""
        assert self.secure is not None
        roster = self.secure.roster(action.round) or ()
        dropouts = {p.lower() for p in roster} - {p.lower() for p in info.participants}
        timeout = action.timeout_s or self.timing.transfer_s

        def ask(survivor: str) -> list[SeedReveal]:
            if survivor.lower() == self.me.lower():
                return self.secure.reveal(action.round, roster, info.participants)  # type: ignore[union-attr]
            pairs = self.pool.client(survivor).reveal_seeds(action.round, timeout=timeout)
            got = [SeedReveal(survivor.lower(), m.lower(), action.round, 0, seed)
                   for m, seed in pairs]
            if {r.missing for r in got} != dropouts or len(got) != len(dropouts):
                raise PayloadRejected(
                    f"{survivor} revealed seeds for {sorted(r.missing for r in got)}, "
                    f"not for the sites that never checked in ({sorted(dropouts)})")
            return got

        for survivor, got in ask_all(action.survivors, ask, timeout,
                                     f"round {action.round}: seed reveals"):
            self.secure.add_reveals(action.round, survivor, got)
        log.info("round %d: seed reveals in from %d of %d survivors", action.round,
                 len(self.secure.revealed(action.round)), len(action.survivors))

    def _commit_start_again(self, rnd: Round, action: Merge, info: RoundInfo) -> bool:
        """Too few sites add weight to sum (guards.sums): the round's starting model is
        committed again; False: there is none (the round is re-elected at its deadline)."""
        round = action.round
        held = self.latest_committed_before(round)
        if held is None:
            log.error("round %d: too few sites checked in to sum their updates, and no model "
                      "was committed before; the round is re-elected at its deadline", round)
            rnd.machine.on_vetoed(action.attempt)
            return False
        log.warning("round %d: only %d sites checked in: too few to sum their updates; "
                    "committing the round's starting model again", round,
                    len(info.participants))
        rnd.merged[action.attempt] = (held.digest, action.members)
        self.store.put(round, held.digest, held.data)
        return True

    def _merge_secure(self, rnd: Round, action: Merge, info: RoundInfo) -> bool:
        """Secure-aggregation leader: the sum of the masked updates, masks removed, decoded,
        bound-checked, added to the round's starting model and stored; False: this attempt
        cannot be committed (the members re-elect at the deadline)."""
        assert self.secure is not None
        round = action.round
        if action.keep:  # too few sites to sum: the starting model is committed again
            return self._commit_start_again(rnd, action, info)
        try:
            base = self._start_state(round)
            roster = self.secure.roster(round) or ()
            plan = self.secure.plan_for(base, roster)
            # summed, decoded into the model and bound-checked (one pass over the sum)
            result, merged = self.secure.merge(round, roster, self._weights_of(info), plan,
                                               base, rnd.state)
            data, digest = serde.Encoded(merged).to_buffer()
            serde.view_state(data, spec=self.spec, reject_nonfinite=True)
            start = self.latest_committed_before(round) if base is not None else None
            self.secure.keep_evidence(  # for members' checks (node.secaudit)
                round, digest, data if start is None else start.data, first=start is None)
        except (RoundAbandoned, AggregateRejected, NonFiniteValues) as exc:
            log.error("round %d: the masked updates cannot be merged: %s; the round is "
                      "re-elected at its deadline", round, exc)
            rnd.machine.on_vetoed(action.attempt)
            return False
        inside = set(result.contributors)
        members = tuple(p for p in info.participants if p.lower() in inside)
        log.info("round %d: summed %d masked updates (%d dropouts' masks removed); the leader "
                 "holds only the sum", round, len(members), len(result.dropouts))
        rnd.merged[action.attempt] = (digest, members)
        self.store.put(round, digest, data)
        return True

    def _seed_own(self, rnd: Round, info: RoundInfo) -> None:
        log.info("round %d: elected leader (attempt %d)", info.round, info.attempt)
        payload = rnd.payload
        own = self.codec.own(info.round, rnd.state, payload)  # as if it had sent it
        try:
            with serde.READING:  # not while an arriving update is checked: one at a time
                self.collector(info).add(Update(own, float(rnd.weight), self.me,
                                                evict=lambda: serde.evict(payload)))
        except (PayloadRejected, RoundError):  # already in, or already sealed
            pass

    def _die_at(self, point: str, round: int) -> None:
        if self.faults.exits(point, round):
            log.warning("round %d: test fault: the process dies %s", round, point)
            self.die(round)

    @staticmethod
    def die(round: int) -> None:
        """What the ``exit`` fault does: the process exits at once, no clean-up. An in-process
        swarm (:mod:`swarmnode.testing.inproc`) replaces it on its driver with an exception that
        ends that site alone."""
        logging.shutdown()
        os._exit(137)

    def _push(self, rnd: Round, action: Push, info: RoundInfo, now: float) -> None:
        self._die_at("before-push", action.round)
        if self.secure is not None:
            try:
                if not self._push_masked(rnd, action):
                    rnd.machine.on_pushed(action.attempt)  # nothing to push: wait for the end
                    return
            except DuplicateUpdate:
                pass
            except SwarmError as exc:
                log.warning("round %d: masked push to leader %s failed: %s", action.round,
                            action.leader, exc)
                return
            rnd.machine.on_pushed(action.attempt)
            self._die_at("after-push", action.round)
            log.info("round %d: masked update sent to leader %s", action.round, action.leader)
            if action.prefetch:
                self._start_prefetch(action.round, action.leader)
            return
        payload = self.codec.outgoing(action.round, rnd.state, rnd.payload)
        try:
            self.pool.client(action.leader).push_update(
                action.round, rnd.weight, payload, timeout=action.timeout_s,
                digest=self._own_digest(payload),
            )
        except DuplicateUpdate:  # our earlier push arrived; only its reply was lost
            pass
        except SwarmError as exc:  # the leader is down, not yet aware, or already merged
            log.warning("round %d: push to leader %s failed: %s", action.round, action.leader, exc)
            return
        finally:
            serde.evict(payload)  # sent (or to be sent again): not needed in memory now
        rnd.machine.on_pushed(action.attempt)
        self._die_at("after-push", action.round)
        log.info("round %d: update sent to leader %s", action.round, action.leader)
        if action.prefetch:
            self._start_prefetch(action.round, action.leader)

    # -- sharded rounds (node.sharding) -----------------------------------------------------------
    def _scatter(self, rnd: Round, action: Scatter, info: RoundInfo, now: float) -> None:
        assert self.shards is not None
        self._die_at("before-push", action.round)
        failed = sharding.scatter(
            self.shards, self.pool, action.round, action.attempt, info.participants,
            rules.contributors(info.participants, self._weights_of(info)), rnd.payload,
            rnd.weight, action.timeout_s, rnd.scattered, codec=self.codec, state=rnd.state)
        if failed:
            log.warning("round %d: slices not delivered yet: %s", action.round,
                        "; ".join(failed.values()))
            return
        serde.evict(rnd.payload)
        rnd.machine.on_scattered(action.attempt)
        self._die_at("after-push", action.round)
        log.info("round %d: update sent in %d slices", action.round, len(info.participants))

    def _reduce(self, rnd: Round, action: Reduce, info: RoundInfo, now: float) -> None:
        assert self.shards is not None
        try:
            self.shards.reduce(action.round, action.attempt, info.participants,
                               rules.contributors(info.participants, self._weights_of(info)))
        except SwarmError as exc:  # a slice no rule can merge: this attempt cannot complete
            log.error("round %d: cannot merge this node's slice: %s; the round is re-elected "
                      "at its deadline", action.round, exc)
            self.shards.fail(action.round, action.attempt, str(exc))
        rnd.machine.on_reduced(action.attempt)
        # assemble the merged model now: a member's is checked at the commit, the leader's Merge
        # takes it (_assemble); the leader may not be drawn yet, so every participant does it
        fetch = threading.Thread(
            target=self._gather, args=(action.round, action.attempt, info),
            name=f"gather-{action.round}", daemon=True)
        self._fetching = {r: t for r, t in self._fetching.items() if t.is_alive()}
        self._fetching[action.round] = fetch
        fetch.start()

    def _gather(self, round: int, attempt: int, info: RoundInfo) -> None:
        assert self.shards is not None
        t0 = time.monotonic()
        try:
            data, digest = sharding.gather(self.shards, self.pool, round, attempt,
                                           info.participants, self.timing.deadline_s, self.stop)
        except SwarmError as exc:  # a member's pull after the commit asks the leader for it
            # whole; a leader's Merge gathers again (_assemble)
            log.warning("round %d: could not assemble the merged model from its slices: %s",
                        round, exc)
            return
        try:  # checked here, off the round's path: after the commit only its digest is
            serde.view_state(data, spec=self.spec, reject_nonfinite=True)
            finite = True
        except SwarmError:  # NaN/Inf: checked again where it is used, and refused there
            finite = False
        if self.store.get(round) is None:
            if finite:
                self._finite = {r: d for r, d in self._finite.items() if r >= round - 1}
                self._finite[round] = data
            self._prefetched = {r: d for r, d in self._prefetched.items() if r >= round - 1}
            self._prefetched[round] = serde.Received(data, digest)
        log.info("round %d: merged model assembled from %d slices in %.2f s", round,
                 len(info.participants), time.monotonic() - t0)

    def _start_prefetch(self, round: int, leader: str) -> None:
        fetch = threading.Thread(target=self._prefetch, args=(round, leader),
                                 name=f"prefetch-{round}", daemon=True)
        self._fetching = {r: t for r, t in self._fetching.items() if t.is_alive()}
        self._fetching[round] = fetch
        fetch.start()

    def _prefetch(self, round: int, leader: str) -> None:
        """Fetch round ``round``'s merged model from its leader as soon as it has merged (long
        polls), before the commit, while rules.prefetch_goes_on says so; it is verified against
        the chain's digest when it is used."""
        started = time.monotonic()

        def goes_on() -> bool:
            seen = self.seen.get(round)
            return rules.prefetch_goes_on(
                held=self.store.get(round) is not None, fetched=round in self._prefetched,
                leader_now=None if seen is None else (seen.leader or ""), leader=leader,
                elapsed_s=time.monotonic() - started, deadline_s=self.timing.deadline_s)

        members = self._part_members(round, leader)
        if members is not None and self._prefetch_parts(round, leader, members, goes_on):
            return
        while goes_on():
            asked = time.monotonic()
            try:
                data = self.pool.client(leader).pull(round, timeout=self.timing.transfer_s,
                                                     size_hint=self._model_bytes)
            except RoundError:  # not merged yet: ask again (the leader holds each ask up to 2 s)
                if time.monotonic() - asked < 0.5:
                    time.sleep(0.2)
                continue
            except SwarmError as exc:
                log.debug("round %d: prefetch from %s failed: %s", round, leader, exc)
                return
            if self.store.get(round) is not None:  # pulled meanwhile: a model's worth to drop
                return
            self._prefetched = {r: d for r, d in self._prefetched.items() if r >= round - 1}
            self._prefetched[round] = data
            return

    # -- the merged model in parts (transport.parts) ----------------------------------------------
    def _part_members(self, round: int, leader: str) -> list[str] | None:
        """The round's members other than its leader, in fold order (by address), when this
        node fetches in parts and others share the work; None: fetch the whole model."""
        seen = self.seen.get(round)
        if not self.peer_parts or seen is None or self._model_bytes is None:
            return None
        members = sorted((p for p in seen.participants if p != leader), key=str.lower)
        if self.me not in members or len(members) < 2:
            return None
        return members

    def _prefetch_parts(self, round: int, leader: str, members: list[str],
                        goes_on: Callable[[], bool]) -> bool:
        """Fetch round ``round``'s merged model in parts: the manifest from the leader once it
        has merged, this node's share of the parts from the leader and each other part from the
        member it belongs to (which serves it as it arrives), every part verified on arrival
        (transport.parts). False: the leader's data plane cannot serve parts (fetch the whole
        model instead). The assembled model is checked against the chain's digest when it is
        used, like any prefetched one."""
        transfer = self.timing.transfer_s
        part_size = parts.part_size_for(self._model_bytes or 0, len(members))
        manifest = None
        while goes_on():
            plane = self._data_plane(leader)
            if plane is None:
                return False
            asked = time.monotonic()
            try:
                manifest = plane.manifest(round, part_size, timeout=transfer, wait_s=2.0)
                break
            except RoundError:  # not merged yet: ask again (held up to 2 s each time)
                if time.monotonic() - asked < 0.5:
                    time.sleep(0.2)
            except SwarmError as exc:
                log.debug("round %d: manifest from %s failed: %s", round, leader, exc)
                return False
        if manifest is None:
            return True  # nothing to fetch any more (held, or the leader changed)
        buf = parts.PartBuffer(manifest, serde.buffer(manifest.total, populate=True))
        self._partial = {r: b for r, b in self._partial.items() if r >= round - 1}
        self._partial[round] = buf
        t0 = time.monotonic()
        try:
            # resumable: a link that breaks and returns within the transfer time costs only
            # the parts in flight when it broke
            if not parts.fetch_resumable(
                    buf, parts.plan(manifest.count, members, self.me, leader),
                    lambda source, wanted: self._fetch_parts(round, source, wanted, buf, leader),
                    deadline_s=transfer, pause_s=self.timing.retry_s * 2, goes_on=goes_on,
                    stop=self.stop):
                log.warning("round %d: parts of the merged model still missing; it is pulled "
                            "whole after the commit", round)
                return True
            data = buf.buf
            received = serde.Received(data, serde.digest(data))
            if self.store.get(round) is None:
                self._prefetched = {r: d for r, d in self._prefetched.items() if r >= round - 1}
                self._prefetched[round] = received
            log.info("round %d: merged model fetched in %d parts (%d from the leader) in "
                     "%.2f s", round, manifest.count,
                     -(-manifest.count // len(members)), time.monotonic() - t0)
            return True
        finally:
            if not buf.complete:
                buf.fail("given up")

    def _fetch_parts(self, round: int, source: str, wanted: list[int], buf: parts.PartBuffer,
                     leader: str) -> None:
        # a member waits for parts its peer is still receiving; the leader holds them all
        wait = 2.0 if source == leader else min(25.0, self.timing.transfer_s)
        try:
            plane = self._data_plane(source)
            if plane is None:
                return
            plane.fetch_parts(round, buf, wanted, timeout=self.timing.transfer_s, wait_s=wait)
        except SwarmError as exc:  # what arrived verified is kept; the rest goes elsewhere
            log.info("round %d: parts from %s: %s", round, source, exc)

    def _data_plane(self, peer: str) -> Any:
        """``peer``'s data plane client, which moves parts (None: it has none, or the transport
        has no data plane, as the in-process one)."""
        plane = getattr(self.pool.client(peer), "data_plane", None)
        return plane(self.timing.transfer_s) if plane is not None else None

    def part_source(self, round: int, wait_s: float) -> Any:
        """What this node can serve of round ``round``'s merged model in parts: the buffer it
        is receiving it into, or the whole model it holds (waited for up to ``wait_s``, at most
        5 s); None if neither."""
        end = time.monotonic() + min(wait_s, 5.0)
        while True:
            partial = self._partial.get(round)
            if partial is not None:
                return partial
            held = self.store.get(round)
            if held is not None:
                return self._full_source(round, held)
            if time.monotonic() >= end or self.stop.is_set():
                return None
            time.sleep(0.05)

    def _full_source(self, round: int, held: StoredModel) -> parts.FullSource:
        cached = self._full.get(round)
        if cached is not None and cached[0] == held.digest:
            return cached[1]
        source = parts.FullSource(held.data, on_served=lambda to: self.note_served(round, to))
        self._full = {r: v for r, v in self._full.items() if r >= round - 1}
        self._full[round] = (held.digest, source)
        return source

    def _written(self, round: int) -> None:
        """The store wrote ``round``'s model to disk: serve it from the file from now on, so the
        memory it was received or merged in (a model's worth) goes now, not rounds later."""
        self._partial = {r: b for r, b in self._partial.items() if r != round}
        cached = self._full.get(round)
        held = self.store.get(round)
        if cached is not None and held is not None and cached[0] == held.digest:
            cached[1].rebase(held.data)

    def note_served(self, round: int, to: str) -> None:
        """The peer API handed ``round``'s merged model to ``to`` (a member now holds a copy)."""
        with self._replica:
            self._served.setdefault(round, set()).add(to.lower())  # as _merge's pushed
            self._served = {r: v for r, v in self._served.items() if r >= round - 2}
            self._replica.notify_all()

    def _await_replica(self, round: int, pushed: set[str]) -> None:
        """Leader, before committing: wait until rules.replica_held says the swarm no longer
        depends on this node alone."""
        started = time.monotonic()

        def held() -> bool:
            return rules.replica_held(pushed, self._served.get(round, set()),
                                      time.monotonic() - started, self.replicate_s)

        with self._replica:
            self._replica.wait_for(held, timeout=self.replicate_s)
        if pushed and not pushed & self._served.get(round, set()):
            log.info("round %d: no member fetched the merged model within %.1f s; committing",
                     round, self.replicate_s)

    def _merge(self, rnd: Round, action: Merge, info: RoundInfo, now: float) -> None:
        machine, stages = rnd.machine, rnd.stages
        stall = self.faults.stall(action.round, action.attempt)
        if stall is not None:
            log.warning("round %d: test fault: hanging before the commit", action.round)
            self.stop.wait(stall.seconds)  # a stopping service ends the hang
        if action.sharded and action.attempt not in rnd.merged:
            if not self._assemble(rnd, action, info, now):
                return
        if self.secure is not None and action.attempt not in rnd.merged:
            if not self._merge_secure(rnd, action, info):
                return
        if self.sum_rule_in_clear and action.attempt not in rnd.merged:
            adding = sum(1 for w in self._weights_of(info).values() if w > 0)
            if adding and not guards.sums(adding):  # as a secure round (a study's control)
                if not self._commit_start_again(rnd, action, info):
                    return
        if action.attempt not in rnd.merged:
            collector = self.collectors.get(action.round, action.attempt)
            merged, senders, total = collector.seal(self._reference(collector, action.round))
            source = rules.commit_source(total, None)
            base = None
            if source is rules.Source.BASE:  # nobody added weight: the model stays as it was
                base = self._base_model(action.round)
                source = rules.commit_source(total, base is not None)
            if base is not None and source is rules.Source.BASE:
                data, digest = base.data, base.digest
            else:
                done = collector.encoded()  # the mean, already in place as canonical bytes
                data, digest = done if done is not None else serde.Encoded(
                    merged if merged is not None else collector.result()).to_buffer()
                del merged, done
                try:  # never commit what members must refuse
                    serde.view_state(data, spec=self.spec, reject_nonfinite=True)
                    finite, why = True, None
                except NonFiniteValues as exc:
                    finite, why = False, exc
                if not rules.may_commit(source, finite):
                    log.error("round %d: the merge of %s holds NaN/Inf (%s); not committing it",
                              action.round, ", ".join(sorted(senders)), why)
                    collector.release()
                    machine.on_vetoed(action.attempt)
                    return
            collector.release()  # the bytes are all that is kept
            members = rules.commit_members(
                info.participants, senders, self._weights_of(info),
                lambda p: self.pool.authority.node(p).revoked)
            rnd.merged[action.attempt] = (digest, members)
            self.store.put(action.round, digest, data)
            del data
        digest, members = rnd.merged[action.attempt]
        # addresses lowercased: the secure path keeps them so, peers name themselves checksummed
        pushed = {a.lower() for a in (
            self.secure.senders(action.round) if self.secure is not None
            else self.collectors.get(action.round, action.attempt).senders)} - {self.me.lower()}
        if not action.sharded:  # sharded: every member assembles the model from the owners
            self._await_replica(action.round, set(pushed))
        t1 = time.monotonic()
        try:
            self.chain.commit_merge(action.round, digest, list(members))
        except ContractReverted as exc:
            log.warning("round %d: commit refused: %s", action.round, exc)
            name = getattr(exc.reason, "name", None)
            revoked = exc.reason.args.get("member") if name == "MemberRevoked" else None
            if name == "TooFewMembers":
                # the same members would be refused again and again: leave the round to the
                # re-election at its deadline (or, every leader failing, to its abandonment)
                log.error("round %d: the contract refuses a commit with members %s (updates "
                          "from %s); leaving the round to the re-election", action.round,
                          list(members) or "none", sorted(pushed) or "none")
                rnd.merged.pop(action.attempt, None)
                machine.on_vetoed(action.attempt)
            elif revoked is not None:
                # a member revoked after this merge: the merge holds its update, so it is never
                # committed (the same refusal again and again); the members re-elect at the
                # deadline and that attempt's leader merges without it
                self.pool.authority.forget(str(revoked))
                rnd.merged.pop(action.attempt, None)
                machine.on_vetoed(action.attempt)
            return
        finally:  # the leader's merge and its commit transaction, apart from collecting
            stages["commit_tx"] = stages.get("commit_tx", 0.0) + time.monotonic() - t1
        machine.on_merged(action.attempt, digest)
        log.info("round %d: merged %d updates, committed %s", action.round, len(members),
                 digest.hex()[:12])
        self._die_at("after-commit", action.round)

    def _assemble(self, rnd: Round, action: Merge, info: RoundInfo, now: float) -> bool:
        """Sharded leader: the merged model from the owners' merged slices, checked like any
        merge (the NaN veto) and stored; False: it cannot be had, so this attempt is not
        committed (the members re-elect at the deadline; that attempt gathers whole updates)."""
        assert self.shards is not None
        left = max(1.0, info.elected_at + self.timing.deadline_s - now)
        fetch = self._fetching.pop(action.round, None)
        if fetch is not None:  # begun at this node's Reduce (_gather), maybe before the draw
            t0 = time.monotonic()
            fetch.join(left)
            left = max(1.0, left - (time.monotonic() - t0))
        early = self._prefetched.pop(action.round, None)
        checked = early is not None and self._finite.pop(action.round, None) is early.data
        try:
            if early is not None:
                data, digest = early.data, early.digest
            else:  # none begun, or it failed: gather now
                data, digest = sharding.gather(self.shards, self.pool, action.round,
                                               action.attempt, info.participants, left,
                                               self.stop)
            if not checked:
                serde.view_state(data, spec=self.spec, reject_nonfinite=True)
        except SwarmError as exc:
            log.error("round %d: the merged model cannot be assembled from its slices: %s; "
                      "the round is re-elected at its deadline", action.round, exc)
            rnd.machine.on_vetoed(action.attempt)
            return False
        weights = self._weights_of(info)
        members = rules.commit_members(
            info.participants, rules.contributors(info.participants, weights), weights,
            lambda p: self.pool.authority.node(p).revoked)
        rnd.merged[action.attempt] = (digest, members)
        self.store.put(action.round, digest, data)
        return True

    def _reference(self, collector: Collector, round: int) -> StateDict | None:
        """For clip_norm: the model this round started from (the latest merged one). The first
        round has none: its updates are merged unclipped (they all start from one model)."""
        if collector.clip_norm is None:
            return None
        base = self._base_model(round)
        if base is None:
            log.warning("round %d: no earlier merged model to clip against; merging unclipped",
                        round)
            return None
        return serde.view_state(base.data, spec=self.spec, reject_nonfinite=False)

    def _base_model(self, round: int) -> StoredModel | None:
        """The model a round with no positive weight re-commits; None: merge equally instead."""
        try:
            return self.latest_committed_before(round)
        except (ChainError, TransportError, RoundError) as exc:
            log.warning("round %d: cannot fetch the previous merged model: %s", round, exc)
            return None

    def _pull(self, rnd: Round, action: Pull, info: RoundInfo, now: float) -> None:
        machine = rnd.machine
        if self.secure is not None and self.secure.noise is not None:
            self._account(action.round, info)  # distributed noise: the round's epsilon, logged
        held = self.store.get(action.round)
        if held is not None and held.digest == action.digest:
            machine.on_pulled(action.digest)
            return
        fetch = self._fetching.pop(action.round, None)
        if fetch is not None:  # a prefetch is under way: let it finish rather than pull twice
            fetch.join(self.timing.transfer_s)
        early = self._prefetched.pop(action.round, None)
        if early is not None:
            checked = self._finite.pop(action.round, None) is early.data
            try:
                self._verify(early, action.digest, checked)
            except NonFiniteValues:  # poison: the pull below says so and refuses it
                pass
            except SwarmError as exc:  # not what was committed: pull it as usual
                log.warning("round %d: the model fetched before the commit is not the "
                            "committed one: %s", action.round, exc)
            else:
                self.store.put(action.round, action.digest, early.data)
                machine.on_pulled(action.digest)
                return
        errors = []
        for source in action.sources:
            try:
                got = self.pool.client(source).pull(action.round, timeout=self.timing.transfer_s,
                                                    size_hint=self._model_bytes)
                self._verify(got, action.digest)
            except NonFiniteValues as exc:  # what the chain committed is poison: no source helps
                log.error("round %d: the committed merged model (digest %s, leader %s) is "
                          "refused: %s; this site keeps its own parameters", action.round,
                          action.digest.hex()[:12], action.sources[0] if action.sources else "?",
                          exc)
                machine.on_refused(action.digest)
                return
            except SwarmError as exc:
                errors.append(f"{source}: {exc}")
                continue
            self.store.put(action.round, action.digest, got.data)
            machine.on_pulled(action.digest)
            return
        rnd.pull_errors = errors
        machine.on_pull_failed(now)  # the machine retries, then gives up after a deadline
        log.warning("round %d: could not pull the merged model yet: %s", action.round,
                    "; ".join(errors))

    def _account(self, round: int, info: RoundInfo) -> None:
        """A member's log of the round's epsilon (SecureAggregation.account, once a round)."""
        assert self.secure is not None
        if self.secure.accounted(round):
            return
        try:
            covered = self.latest_committed_before(round, pull=False) is not None
        except RoundError:  # committed before, not held here: the round had a starting model
            covered = True
        self.secure.account(round, self._weights_of(info), covered)

    def _verify(self, got: serde.Received, digest: bytes, checked: bool = False) -> None:
        """A pulled model is the committed one: its digest (hashed as it arrived) is the chain's,
        its header matches the training spec (parsed, not copied), and it holds no NaN/Inf (a
        leader's poison is refused like a member's). ``checked``: the header and the values
        were checked already (a sharded round's assembly, while it waited for the commit)."""
        got.check_digest(digest)
        if not checked:
            serde.view_state(got.data, spec=self.spec, reject_nonfinite=self.reject_nonfinite)

    def latest_committed_before(self, round: int, pull: bool = True) -> StoredModel | None:
        """The newest committed merged model before ``round`` (None if no round committed yet),
        pulled from that round's members if this node does not hold it (``pull=False``: a
        RoundError instead)."""
        for r in range(round - 1, 0, -1):
            info = self.chain.round(r)
            if info.status is not RoundStatus.COMMITTED or info.digest is None:
                continue
            for held in (self.store.get(r), self.store.latest()):
                if held is not None and held.round == r and held.digest == info.digest:
                    return held
            if not pull:
                raise RoundError(f"this node does not hold round {r}'s merged model (yet)")
            outcome = self.run_round(r, {}, b"", 0, contribute=False)
            return self.store.get(outcome.round)
        return None
