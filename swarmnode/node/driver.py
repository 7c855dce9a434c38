"""Runs one round for this node: feeds chain observations to the RoundMachine and does its I/O."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from swarmnode.chain.client import RoundInfo, RoundStatus, SwarmContract
from swarmnode.chain.watch import BlockWatcher
from swarmnode.errors import (
    ChainError,
    ChainTimeout,
    ChainUnavailable,
    ContractReverted,
    DuplicateUpdate,
    NodeUnavailable,
    NonFiniteValues,
    PayloadRejected,
    RoundError,
    RoundTimeout,
    SwarmError,
    TransportError,
)
from swarmnode.node.collector import Collector, Collectors
from swarmnode.node.machine import (
    CheckIn,
    Done,
    Draw,
    Elect,
    MarkAbsent,
    Merge,
    Observation,
    Pull,
    Push,
    Reelect,
    RoundMachine,
    Stage,
    Timing,
    Wait,
)
from swarmnode.node.peers import PeerPool
from swarmnode.node.store import ModelStore, StoredModel
from swarmnode.transport import serde
from swarmnode.types import StateDict, Update

__all__ = ["RoundDriver", "RoundOutcome"]

log = logging.getLogger("swarmnode.node")


_EVENT_WAIT_S = 0.5  # with a block watcher, the longest a round sleeps between looks
_ABSENT_CHECK_S = 2.0  # how often an open round's participant looks for absent nodes
_SIGNAL_FALLBACK_S = 2.0  # with event signals, the longest a waiting round goes without a look
_MIN_TRANSFER_S = 5.0  # the shortest time a push is given, whatever the deadline says
_STALL_S = 3.0  # a chain read slower than this was a stall (the chain or the host froze)
_SIGNAL_STAGES = (Stage.ELECTION, Stage.COMMIT, Stage.COLLECT)


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
        transfer_timeout_s: float = 120.0,
        watcher: BlockWatcher | None = None,
        reject_nonfinite: bool = True,
        stop: threading.Event | None = None,
    ) -> None:
        """``watcher``: waits end at the next block (or update) instead of after a fixed
        interval; without one the round polls every ``timing.poll_s``."""
        self.me = me
        self.watcher = watcher
        self.reject_nonfinite = reject_nonfinite
        self.stop = stop or threading.Event()  # set: the service is stopping; rounds end now
        self.chain = chain
        self.pool = pool
        self.store = store
        self.collectors = collectors
        self.timing = timing
        self.spec = spec
        self.max_bytes = max_bytes
        self.round_timeout_s = round_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._weights: dict[tuple[int, str], int] = {}
        self.machine: RoundMachine | None = None  # the round in progress (its stage: logs)
        self.seen: dict[int, RoundInfo] = {}  # the last observation of recent rounds
        self._absent_checked = 0.0
        self._chain_ok_since = -float("inf")  # the last chain stall seen (monotonic clock)
        # (round, attempt) -> (digest, members) of what this node merged (the bytes: the store)
        self._merged: dict[tuple[int, int], tuple[bytes, list[str]]] = {}
        self._stages: dict[str, float] = {}
        self._action = "observe"
        # Members fetch the merged model as soon as the leader has it (before the commit), and
        # the leader commits once a member holds a copy (or after replicate_s): the pull overlaps
        # the commit, and a leader that dies right after committing is not the only holder.
        self._prefetched: dict[int, serde.Received] = {}
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="digest")
        self._own: tuple[object, Future[bytes]] | None = None
        self._fetching: dict[int, threading.Thread] = {}
        self._model_bytes = spec.nbytes if spec is not None else None
        self._served: dict[int, set[str]] = {}
        self._replica = threading.Condition()
        self.replicate_s = min(5.0, timing.deadline_s * 0.25)
        # Fault injection for the failure tests: "ROUND:ATTEMPT[:SECONDS]" makes this node, as
        # that round's leader at that attempt, hang before it commits (HPE's "stuck at
        # Merging..."), for good or for SECONDS; several separated by commas.
        self._stalls: dict[tuple[int, int], float | None] = {}
        for fault in os.environ.get("SWARMNODE_TEST_STALL_COMMIT", "").split(","):
            parts = [int(x) for x in fault.split(":") if x]
            if parts:
                self._stalls[(parts[0], parts[1])] = float(parts[2]) if len(parts) > 2 else None
        # ... "POINT:ROUND" makes the process die (exit 137, no clean-up) at that point of that
        # round ("POINT:ROUND+": of that round or the first later one that gets there):
        # before-push, after-push (a member), after-commit (the leader).
        point, _, at = os.environ.get("SWARMNODE_TEST_EXIT", "").partition(":")
        self._exit_at = (point, int(at.rstrip("+")), at.endswith("+")) if at else None
        self._unpullable_since: dict[int, float] = {}

    def prehash(self, payload: serde.Buffer) -> None:
        """Start hashing this node's update now (a helper thread), for the push that follows."""
        def digest() -> bytes:
            try:
                return serde.digest(payload)
            finally:  # hashed and checked: the push or the fold reads it again
                serde.evict(payload)

        self._own = (payload, self._hasher.submit(digest))

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
        key = (round, node)
        if key not in self._weights:
            w = self.chain.checkin_weight(round, node)
            if w is None:
                return -1
            self._weights[key] = w
        return self._weights[key]

    def collector(self, info: RoundInfo) -> Collector:
        """The leader's collector of an elected round, told the round's contributors (the
        participants with a weight), whose order it folds their updates in."""
        collector = self.collectors.get(info.round, info.attempt)
        collector.expect(p for p in info.participants if self.weight_of(info.round, p) > 0)
        return collector

    def _collected(self, info: RoundInfo) -> frozenset[str]:
        got = set(self.collector(info).senders)
        got.update(p for p in info.participants if self.weight_of(info.round, p) == 0)
        return frozenset(got)

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
                               drive=drive)
        self.machine = machine
        self._weights = {k: v for k, v in self._weights.items() if k[0] >= round - 1}
        # what earlier rounds left behind (a model's worth each): the store keeps what is served
        self._merged = {k: v for k, v in self._merged.items() if k[0] >= round}
        started = time.monotonic()
        seeded: set[int] = set()
        self._stages = stages = {}
        while True:
            if self.stop.is_set():
                raise NodeUnavailable(
                    f"the node service is stopping (round {round}, stage {machine.stage.value}); "
                    "the trainer waits for it to come back"
                )
            if time.monotonic() - started > self.round_timeout_s:
                raise RoundTimeout(
                    f"round {round} did not complete within {self.round_timeout_s:.0f} s "
                    f"(stage {machine.stage.value}); check the other nodes' logs and "
                    "`swarmnode status`"
                )
            t0 = time.monotonic()
            self._action = "observe"
            try:
                outcome = self._step(machine, state, payload, weight, seeded)
            except (ChainUnavailable, ChainTimeout) as exc:  # transient: the round goes on
                log.warning("round %d: chain not answering (%s); retrying", round, exc)
                self._chain_ok_since = time.monotonic()  # a stall: see Observation.chain_up_s
                time.sleep(self.timing.retry_s)
                continue
            finally:
                stages[self._action] = stages.get(self._action, 0.0) + time.monotonic() - t0
            if outcome is not None:
                if "merge" in stages:  # the leader's merge and commit are reported apart
                    stages["merge"] -= stages.get("commit_tx", 0.0)
                # a prefetch that finished after the pull: its copy is not needed any more
                self._prefetched = {r: d for r, d in self._prefetched.items() if r > round}
                return RoundOutcome(
                    round=round, leader=outcome[0], digest=outcome[1], data=outcome[2],
                    abandoned=outcome[1] is None,
                    contributed=machine.checked_in and not machine.late,
                    seconds=time.monotonic() - started, stages=dict(stages),
                )

    def _step(
        self, machine: RoundMachine, state: StateDict, payload: serde.Buffer, weight: int,
        seeded: set[int],
    ) -> tuple[str | None, bytes | None, serde.Buffer | None] | None:
        """Observe, decide, act once; (leader, digest, data) when the round is over for us."""
        round = machine.round
        mark = self.watcher.mark() if self.watcher is not None else 0  # before the read
        smark = self.watcher.signal_mark() if self.watcher is not None else 0
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
        if info.status is RoundStatus.ELECTED and info.leader == self.me:
            if info.attempt not in seeded and self.me in info.participants:
                self._seed_own(info, state, payload, weight)
                seeded.add(info.attempt)
            collected = self._collected(info)
        # chain time (the contract's clock for grace and deadlines), not this host's clock
        now = self.watcher.now() if self.watcher is not None else time.time()
        absent: tuple[str, ...] = ()
        if (info.status is RoundStatus.OPEN and self.me in info.participants
                and info.first_checkin_at and now >= info.first_checkin_at + self.timing.grace_s
                and now >= self._absent_checked + _ABSENT_CHECK_S):
            # reads every node: at most every few seconds, not on every block
            self._absent_checked = now
            absent = tuple(self.chain.absent_candidates())
        action = machine.decide(Observation(now, info, collected, absent,
                                            time.monotonic() - self._chain_ok_since))
        # what this step's time is reported as: the action, or what a wait waits for
        self._action = (f"wait_{machine.stage.value}" if isinstance(action, Wait)
                        else type(action).__name__.lower())
        if isinstance(action, Wait):
            if self.watcher is None:
                time.sleep(action.seconds)
            elif self.watcher.signals_live and machine.stage in _SIGNAL_STAGES:
                # waiting for others (an election, a commit, updates): wake on their events or
                # when one of the round's own deadlines comes, not on every block
                self.watcher.wait_signal(smark, self._next_deadline(info, now))
            else:  # what a round waits for comes with a block (or an update): wake then
                self.watcher.wait(mark, max(action.seconds, _EVENT_WAIT_S))
        elif isinstance(action, CheckIn):
            self._checkin(machine, action)
        elif isinstance(action, Elect):
            self._quiet(lambda: self.chain.elect(round), f"elect round {round}", machine)
        elif isinstance(action, MarkAbsent):
            for node in action.nodes:
                log.warning("round %d: node %s missed the last rounds; marking it absent",
                            round, node)
                self._quiet(lambda n=node: self.chain.mark_absent(n), f"mark {node} absent",
                            machine)
        elif isinstance(action, Push):
            # a push is moot once the leader's deadline passed (the member re-elects then): a
            # leader that froze mid-transfer holds this node no longer than that
            left = info.elected_at + self.timing.deadline_s - now
            timeout = min(self.transfer_timeout_s, max(_MIN_TRANSFER_S, left + 2.0))
            self._push(machine, action, payload, weight, timeout)
        elif isinstance(action, Merge):
            self._merge(machine, action, info)
        elif isinstance(action, Reelect):
            log.warning(
                "round %d: leader %s missed the deadline; asking the contract to re-elect",
                round, action.leader,
            )
            self.pool.drop(action.leader)
            self._quiet(lambda: self.chain.reelect(round), f"reelect round {round}", machine)
        elif isinstance(action, Draw):
            self._quiet(lambda: self.chain.draw(round), f"draw round {round}")
            machine.on_drawn()
        elif isinstance(action, Pull):
            self._pull(machine, action)
        elif isinstance(action, Done):
            if action.abandoned:
                if machine.refused_digest is None:
                    log.warning("round %d: abandoned on chain (every leader failed)", round)
                return info.leader, None, None
            stored = self.store.get(round)
            return info.leader, info.digest, None if stored is None else stored.data
        return None

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

    # -- actions ----------------------------------------------------------------------------------
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

    def _checkin(self, machine: RoundMachine, action: CheckIn) -> None:
        try:
            result = self.chain.checkin(action.round, action.weight)
        except ContractReverted as exc:
            info = self.chain.round(action.round)
            if self.me in info.participants:
                machine.on_checked_in()
            elif info.status is not RoundStatus.OPEN:
                log.info("round %d: elected before our check-in; taking the merged model",
                         action.round)
                machine.on_checkin_too_late()
            else:
                raise RoundError(f"round {action.round}: check-in refused: {exc}") from None
            return
        machine.on_checked_in()
        if "RoundClosed" in result.events:
            machine.on_closed()
        log.info("round %d: checked in with weight %d", action.round, action.weight)

    def _seed_own(self, info: RoundInfo, state: StateDict, payload: serde.Buffer,
                  weight: int) -> None:
        log.info("round %d: elected leader (attempt %d)", info.round, info.attempt)
        try:
            with serde.READING:  # not while an arriving update is checked: one at a time
                self.collector(info).add(Update(state, float(weight), self.me,
                                                evict=lambda: serde.evict(payload)))
        except (PayloadRejected, RoundError):  # already in, or already sealed
            pass

    def _die_at(self, point: str, round: int) -> None:
        if self._exit_at is None or self._exit_at[0] != point:
            return
        _, at, later = self._exit_at
        if round == at or (later and round > at):
            log.warning("round %d: test fault: the process dies %s", round, point)
            logging.shutdown()
            os._exit(137)

    def _push(
        self, machine: RoundMachine, action: Push, payload: serde.Buffer, weight: int,
        timeout: float,
    ) -> None:
        self._die_at("before-push", action.round)
        if weight == 0:  # nothing to add: the leader counts zero-weight participants as in
            machine.on_pushed(action.attempt)
            return
        try:
            self.pool.client(action.leader).push_update(
                action.round, weight, payload, timeout=timeout,
                digest=self._own_digest(payload),
            )
        except DuplicateUpdate:  # our earlier push arrived; only its reply was lost
            pass
        except SwarmError as exc:  # the leader is down, not yet aware, or already merged
            log.warning("round %d: push to leader %s failed: %s", action.round, action.leader, exc)
            return
        finally:
            serde.evict(payload)  # sent (or to be sent again): not needed in memory now
        machine.on_pushed(action.attempt)
        self._die_at("after-push", action.round)
        log.info("round %d: update sent to leader %s", action.round, action.leader)
        fetch = threading.Thread(target=self._prefetch, args=(action.round, action.leader),
                                 name=f"prefetch-{action.round}", daemon=True)
        self._fetching = {r: t for r, t in self._fetching.items() if t.is_alive()}
        self._fetching[action.round] = fetch
        fetch.start()

    def _prefetch(self, round: int, leader: str) -> None:
        """Fetch round ``round``'s merged model from its leader as soon as it has merged (long
        polls), before the commit; it is verified against the chain's digest when it is used."""
        until = time.monotonic() + self.timing.deadline_s
        while time.monotonic() < until and round not in self._prefetched:
            if self.store.get(round) is not None:
                return
            seen = self.seen.get(round)
            if seen is not None and seen.leader != leader:  # re-elected: this leader is out
                return
            asked = time.monotonic()
            try:
                data = self.pool.client(leader).pull(round, timeout=self.transfer_timeout_s,
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

    def note_served(self, round: int, to: str) -> None:
        """The peer API handed ``round``'s merged model to ``to`` (a member now holds a copy)."""
        with self._replica:
            self._served.setdefault(round, set()).add(to)
            self._served = {r: v for r, v in self._served.items() if r >= round - 2}
            self._replica.notify_all()

    def _await_replica(self, round: int, others: set[str]) -> None:
        """Leader, before committing: wait (up to replicate_s) until one of ``others`` holds the
        merged model, so the swarm does not depend on this node alone once the digest is on
        chain."""
        if not others:
            return
        with self._replica:
            got = self._replica.wait_for(lambda: bool(self._served.get(round, set()) & others),
                                         timeout=self.replicate_s)
        if not got:
            log.info("round %d: no member fetched the merged model within %.1f s; committing",
                     round, self.replicate_s)

    def _merge(self, machine: RoundMachine, action: Merge, info: RoundInfo) -> None:
        if (action.round, action.attempt) in self._stalls:
            log.warning("round %d: test fault: hanging before the commit", action.round)
            threading.Event().wait(self._stalls[(action.round, action.attempt)])
        key = (action.round, action.attempt)
        stages = self._stages
        if key not in self._merged:
            collector = self.collectors.get(action.round, action.attempt)
            merged, senders, _total = collector.seal(self._reference(collector, action.round))
            base = None if merged is not None else self._base_model(action.round)
            if base is not None:  # every participant added weight 0: the model stays as it was
                data, digest = base.data, base.digest
            else:
                done = collector.encoded()  # the mean, already in place as canonical bytes
                data, digest = done if done is not None else serde.Encoded(
                    merged if merged is not None else collector.result()).to_buffer()
                del merged, done
                try:  # never commit what members must refuse
                    serde.view_state(data, spec=self.spec, reject_nonfinite=True)
                except NonFiniteValues as exc:
                    log.error("round %d: the merge of %s holds NaN/Inf (%s); not committing it",
                              action.round, ", ".join(sorted(senders)), exc)
                    collector.release()
                    return
            collector.release()  # the bytes are all that is kept
            zero = {p for p in info.participants if self.weight_of(action.round, p) == 0}
            members = [p for p in info.participants
                       if (p in senders or p in zero) and not self.pool.authority.node(p).revoked]
            self._merged = {k: v for k, v in self._merged.items() if k[0] >= action.round}
            self._merged[key] = (digest, members)
            self.store.put(action.round, digest, data)
            del data
        digest, members = self._merged[key]
        pushed = self.collectors.get(action.round, action.attempt).senders - {self.me}
        self._await_replica(action.round, set(pushed))
        t1 = time.monotonic()
        try:
            self.chain.commit_merge(action.round, digest, members)
        except ContractReverted as exc:
            log.warning("round %d: commit refused: %s", action.round, exc)
            return
        finally:  # the leader's merge and its commit transaction, apart from collecting
            stages["commit_tx"] = stages.get("commit_tx", 0.0) + time.monotonic() - t1
        machine.on_merged(action.attempt, digest)
        log.info("round %d: merged %d updates, committed %s", action.round, len(members),
                 digest.hex()[:12])
        self._die_at("after-commit", action.round)

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

    def _pull(self, machine: RoundMachine, action: Pull) -> None:
        held = self.store.get(action.round)
        if held is not None and held.digest == action.digest:
            machine.on_pulled(action.digest)
            return
        fetch = self._fetching.pop(action.round, None)
        if fetch is not None:  # a prefetch is under way: let it finish rather than pull twice
            fetch.join(self.transfer_timeout_s)
        early = self._prefetched.pop(action.round, None)
        if early is not None:
            try:
                self._verify(early, action.digest)
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
                got = self.pool.client(source).pull(action.round, timeout=self.transfer_timeout_s,
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
            self._unpullable_since.pop(action.round, None)
            machine.on_pulled(action.digest)
            return
        since = self._unpullable_since.setdefault(action.round, time.monotonic())
        if time.monotonic() - since > self.timing.deadline_s:
            # the leader died before any member held a copy: the digest is on chain, the model
            # nowhere. Waiting longer cannot help; the next round merges the sites again.
            log.error("round %d: no participant can serve the committed merged model (digest %s) "
                      "for %.0f s: %s; this site keeps its own parameters for this round",
                      action.round, action.digest.hex()[:12], self.timing.deadline_s,
                      "; ".join(errors))
            self._unpullable_since.pop(action.round, None)
            machine.on_refused(action.digest)
            return
        log.warning("round %d: could not pull the merged model yet: %s", action.round,
                    "; ".join(errors))
        time.sleep(self.timing.retry_s)

    def _verify(self, got: serde.Received, digest: bytes) -> None:
        """A pulled model is the committed one: its digest (hashed as it arrived) is the chain's,
        its header matches the training spec (parsed, not copied), and it holds no NaN/Inf (a
        leader's poison is refused like a member's)."""
        got.check_digest(digest)
        serde.view_state(got.data, spec=self.spec, reject_nonfinite=self.reject_nonfinite)

    def latest_committed_before(self, round: int) -> StoredModel | None:
        """The newest committed merged model before ``round`` (None if no round committed yet),
        pulled from that round's members if this node does not hold it."""
        for r in range(round - 1, 0, -1):
            info = self.chain.round(r)
            if info.status is not RoundStatus.COMMITTED or info.digest is None:
                continue
            for held in (self.store.get(r), self.store.latest()):
                if held is not None and held.round == r and held.digest == info.digest:
                    return held
            outcome = self.run_round(r, {}, b"", 0, contribute=False)
            return self.store.get(outcome.round)
        return None
