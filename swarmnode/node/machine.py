"""The round protocol of one node as a state machine, free of I/O.

The node service observes the contract (and, when it leads, which updates have arrived), hands the
observation to :meth:`RoundMachine.decide`, performs the action it gets back, and reports the
outcome through the ``on_*`` methods. Unit tests drive the machine with synthetic observations; no
sockets, no chain. One machine lives for one round of one node::

    CHECKIN -> ELECTION -> (draw) -> PUSH ----------> COMMIT -> PULL -> DONE
                                  \\-> COLLECT (leader) ----------------/
    (late joiner: COMMIT -> PULL -> DONE;  deadline passed: reelect, back to the draw)

    sharded attempt (topology sharded, the observation says so: rules.runs_sharded):
    ELECTION -> PUSH (Scatter: a slice to each owner) -> COLLECT (Reduce: this node's slice,
    once every contributor's is in) -> leader: Merge(sharded) assembles and commits;
    member: COMMIT (assembling in the background) -> PULL -> DONE
    (the slices' owners are the participants, fixed when the round closes: the scatter and the
    reduce do not wait for the leader's draw; only the merge and the commit need the leader)

The contract draws each round's leader from the hash of the block that closed the round (no
participant knows it when it sends its transaction), so an elected round has no leader until a
later block exists. The node whose transaction closed the round sends ``draw`` at once (on a chain
that mines only on transactions, nothing else would bring that block); the others send it when
the leader is still unknown ``draw_wait_s`` after the close.

Besides the step, the machine decides how long a push may take (:attr:`Push.timeout_s`), that a
weight-0 participant sends nothing, that a member fetches the merged model from the leader before
the commit (:attr:`Push.prefetch`), whom a pull asks (the leader first, then the other
participants), when a member gives up on a committed model nobody serves, that a leader whose
merge holds NaN/Inf does not merge again (:meth:`RoundMachine.on_vetoed`), and when a participant
looks for absent sites (:func:`absent_check_due`). Time is the chain's, passed in with each
observation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from swarmnode.chain.models import RoundInfo, RoundStatus
from swarmnode.errors import RoundError
from swarmnode.node.lifecycle import Metrics
from swarmnode.privacy import guards

__all__ = [
    "Action",
    "CheckIn",
    "Done",
    "Draw",
    "Elect",
    "MarkAbsent",
    "Merge",
    "Observation",
    "Pull",
    "Push",
    "Reduce",
    "Reelect",
    "Reveals",
    "RoundMachine",
    "Scatter",
    "SecureView",
    "Stage",
    "Timing",
    "Wait",
    "absent_check_due",
]


class Stage(Enum):
    CHECKIN = "checkin"  # the round is open and this node has not checked in yet
    ELECTION = "election"  # checked in; the contract has not elected a leader yet
    PUSH = "push"  # a member: its update has to reach the round's leader
    COLLECT = "collect"  # the leader: waiting for the participants' updates
    COMMIT = "commit"  # waiting for the merged digest on chain (member or late joiner)
    PULL = "pull"  # the digest is on chain; fetching the merged model
    DONE = "done"  # this node holds the round's merged model, or the round was abandoned


# -- actions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckIn:
    round: int
    weight: int
    metrics: Metrics | None = None  # an earlier round's, carried by this check-in
    masked: bool = False  # secure aggregation: carries the hash of this site's masked update


@dataclass(frozen=True)
class Reveals:
    """Secure-aggregation leader: ask these participants (this node included) for their round
    seeds with the mask-set sites that never checked in."""

    round: int
    attempt: int
    survivors: tuple[str, ...]
    # how long to wait for them (equality ignores it): the transfer timeout, tied to the
    # round's deadline (a reveal past it is moot: the members re-elect)
    timeout_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Elect:
    round: int


@dataclass(frozen=True)
class Draw:
    """Have the contract pin the elected round's leader (its draw block is mined)."""

    round: int


@dataclass(frozen=True)
class MarkAbsent:
    """Nodes that missed the last rounds hold the election up: have the contract set them aside."""

    round: int
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Push:
    round: int
    leader: str
    attempt: int
    # how the push is done, not which push (equality ignores them): how long the transfer may
    # take, and whether, once the update is in, the member fetches the merged model from the
    # leader as soon as it has it (before the commit; verified against the chain's digest when
    # used), so the pull overlaps the commit
    timeout_s: float = field(default=0.0, compare=False)
    prefetch: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Scatter:
    """Sharded round: send each slice of this node's update to the participant that owns it."""

    round: int
    attempt: int
    timeout_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Reduce:
    """Sharded round: every contributor's slice of this node's share is in; merge it (and, a
    member, start assembling the merged model from the owners' slices)."""

    round: int
    attempt: int


@dataclass(frozen=True)
class Merge:
    """Leader: merge the collected updates and commit the digest with these members. Sharded:
    assemble the owners' merged slices instead, and commit that."""

    round: int
    attempt: int
    members: tuple[str, ...]
    sharded: bool = False
    # secure aggregation with fewer than MIN_SITES checked-in sites of the mask set: commit the
    # round's starting model again (no sum is formed: the sum of two gives each away)
    keep: bool = False


@dataclass(frozen=True)
class Reelect:
    round: int
    attempt: int
    leader: str


@dataclass(frozen=True)
class Pull:
    round: int
    digest: bytes
    sources: tuple[str, ...]  # the leader first, then the other participants


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str


@dataclass(frozen=True)
class Done:
    round: int
    abandoned: bool = False
    # why a round ends without its merged model: "abandoned" (on chain), "refused" (the
    # committed model holds NaN/Inf), "unservable" (nobody served it for a deadline)
    why: str = field(default="", compare=False)


Action = (CheckIn | Elect | Draw | MarkAbsent | Push | Scatter | Reduce | Merge | Reelect | Pull
          | Reveals | Wait | Done)


@dataclass(frozen=True)
class Timing:
    """Protocol timing, in chain seconds. ``collect_s`` < ``deadline_s``: the leader stops waiting
    for stragglers after ``collect_s`` (if it has a quorum), so it commits before it is
    re-elected."""

    grace_s: float
    deadline_s: float
    collect_s: float
    min_peers: int
    poll_s: float = 0.05
    retry_s: float = 0.5
    draw_wait_s: float = 2.0  # a leader still undrawn this long after the close: draw it
    transfer_s: float = 120.0  # the longest a push may take
    min_transfer_s: float = 5.0  # the shortest time a push is given, whatever the deadline says
    absent_check_s: float = 2.0  # how often an open round's participant looks for absent sites

    @property
    def replicate_s(self) -> float:
        """How long a leader waits, before committing, for a member to hold the merged model."""
        return min(5.0, self.deadline_s * 0.25)


@dataclass(frozen=True)
class SecureView:
    """What a secure-aggregation round looks like to this node: the round's mask set (None:
    not fixed yet, see privacy.roster), leading, the participants whose seed reveals are in,
    and, once elected, the participants that checked in with a weight above 0 (lower-case;
    None: not read, and then nothing is summed). A weight-0 site's masked zero adds nothing
    to the sum, so it does not count towards the MIN_SITES a sum needs."""

    roster: tuple[str, ...] | None
    revealed: frozenset[str] = frozenset()
    adding: frozenset[str] | None = None


@dataclass(frozen=True)
class Observation:
    now: float  # chain time (unix seconds)
    info: RoundInfo  # the round as the contract holds it
    collected: frozenset[str] = frozenset()  # leader: participants whose update is in
    absent: tuple[str, ...] = ()  # active nodes that missed the last rounds (after the grace)
    # seconds this node has seen the chain answer without a stall (an error or a slow answer):
    # after a stall nobody could reach the chain, so the leader gets time to commit and the
    # other sites time to check in before anyone is judged failed or absent
    chain_up_s: float = float("inf")
    # this attempt runs sharded (rules.runs_sharded), and the participants whose slice of this
    # node's share is in (weight-0 ones count as in: they send nothing)
    sharded: bool = False
    shard_in: frozenset[str] = frozenset()
    secure: SecureView | None = None  # secure aggregation (the machine was made secure)


class RoundMachine:
    """Decides the next step of one node in one round."""

    def __init__(
        self,
        me: str,
        round: int,
        weight: int,
        timing: Timing,
        *,
        contribute: bool = True,
        drive: bool = True,
        metrics: Metrics | None = None,
        secure: bool = False,
    ) -> None:
        """``drive=False``: never elect (a node whose trainer is done must not turn rounds over
        by itself while another site still trains); it still sets silent sites aside.
        ``metrics``: an earlier round's, for the check-in to carry. ``secure``: the training
        runs secure aggregation (its observations carry a :class:`SecureView`)."""
        self.me = me
        self.round = round
        self.weight = weight
        self.timing = timing
        self.contribute = contribute
        self.drive = drive
        self.stage = Stage.CHECKIN if contribute else Stage.COMMIT
        self.checked_in = False
        self.late = not contribute
        self.pushed_attempt: int | None = None
        self.scattered_attempt: int | None = None
        self.reduced_attempt: int | None = None
        self.merged_attempt: int | None = None
        self.merged_digest: bytes | None = None
        self.refused_digest: bytes | None = None
        self.vetoed_attempt: int | None = None
        self.metrics = metrics
        self.secure = secure
        self.closer = False  # this node's transaction closed the round (or re-elected)
        self.unpullable_since: float | None = None  # chain time of the first failed pull
        self.gave_up = False  # no participant served the committed model for a deadline
        self._last_try: dict[str, float] = {}

    # -- the decision ----------------------------------------------------------------------------
    def decide(self, obs: Observation) -> Action:
        info = obs.info
        if info.round != self.round:
            raise RoundError(
                f"observation of round {info.round} given to the round-{self.round} machine"
            )
        if info.status is RoundStatus.ABANDONED:
            self.stage = Stage.DONE
            return Done(self.round, abandoned=True, why="abandoned")
        if info.status is RoundStatus.COMMITTED:
            return self._committed(obs)
        if info.status is RoundStatus.OPEN:
            return self._open(obs)
        return self._elected(obs)

    def _committed(self, obs: Observation) -> Action:
        info = obs.info
        assert info.digest is not None
        if self.refused_digest == info.digest:  # a poisoned merge: keep this site's own model
            self.stage = Stage.DONE
            return Done(self.round, abandoned=True,
                        why="unservable" if self.gave_up else "refused")
        if self.merged_digest == info.digest:
            self.stage = Stage.DONE
            return Done(self.round)
        if (self.unpullable_since is not None
                and obs.now - self.unpullable_since > self.timing.deadline_s):
            # the leader died before any member held a copy: the digest is on chain, the model
            # nowhere. Waiting longer cannot help; the next round merges the sites again.
            self.gave_up = True
            self.refused_digest = info.digest
            self.stage = Stage.DONE
            return Done(self.round, abandoned=True, why="unservable")
        self.stage = Stage.PULL
        if self.unpullable_since is not None and not self._may_try("pull", obs.now):
            return Wait(self.timing.retry_s, "retrying the pull soon")
        leader = info.leader or ""
        others = tuple(p for p in info.participants if p not in (leader, self.me))
        return Pull(self.round, info.digest, ((leader,) if leader else ()) + others)

    def _open(self, obs: Observation) -> Action:
        info, t = obs.info, self.timing
        if self.me in info.participants:
            self.checked_in = True
        if not self.checked_in and not self.late and self.secure:
            roster = obs.secure.roster if obs.secure is not None else None
            if roster is None:
                self.stage = Stage.CHECKIN
                return Wait(t.poll_s, "waiting for the round's mask set (members joining)")
            if self.me.lower() not in {p.lower() for p in roster}:
                # not in the mask set (it joined during this round): the others masked without
                # it, so it takes the merged model and adds nothing (a weight-0 site of the set
                # checks in and pushes a masked zero: its masks must cancel the others')
                self.late = True
            else:
                self.stage = Stage.CHECKIN
                return CheckIn(self.round, self.weight, self.metrics, masked=True)
        if not self.checked_in and not self.late:
            self.stage = Stage.CHECKIN
            return CheckIn(self.round, self.weight, self.metrics)
        self.stage = Stage.ELECTION if self.checked_in else Stage.COMMIT
        if self.checked_in and info.first_checkin_at:
            ready_at = info.first_checkin_at + t.grace_s
            if obs.now < ready_at:
                return Wait(min(max(ready_at - obs.now, t.poll_s), 1.0), "grace period")
            # a follower sets dead sites aside too (the contract only lets silent ones go):
            # once every live site finished, nobody else would, and the final round waits
            if (obs.absent and obs.chain_up_s >= t.deadline_s
                    and self._may_try("absent", obs.now)):
                return MarkAbsent(self.round, obs.absent)
            if (self.drive and len(info.participants) >= t.min_peers
                    and self._may_try("elect", obs.now)):
                return Elect(self.round)
        return Wait(t.poll_s, "waiting for the election")

    def _elected(self, obs: Observation) -> Action:
        info, t = obs.info, self.timing
        if self.me not in info.participants:
            self.late = True
            self.stage = Stage.COMMIT
            return Wait(t.poll_s, "late: waiting for the merged model")
        self.checked_in = True
        leader, attempt = info.leader or "", info.attempt
        if obs.sharded:  # the slices' owners are fixed at the close: no need to wait for the draw
            return self._sharded(obs, leader, attempt)
        if not leader:  # closed, the draw block not mined yet (or no transaction since)
            self.stage = Stage.ELECTION
            return self._draw(obs) or Wait(t.poll_s, "waiting for the leader draw")
        if leader == self.me:
            if self.merged_attempt == attempt:
                self.stage = Stage.COMMIT
                return Wait(t.poll_s, "commit sent")
            if self.vetoed_attempt == attempt:  # nothing to commit: the deadline re-elects
                self.stage = Stage.COMMIT
                # the leader is a participant too: when it is the only one (the others set
                # aside), nobody else would replace it and the round would never end
                if self._overdue(obs) and self._may_try(f"reelect{attempt}", obs.now):
                    return Reelect(self.round, attempt, leader)
                return Wait(t.poll_s, "merge vetoed: waiting for the re-election")
            self.stage = Stage.COLLECT
            if self.secure:
                return self._secure_collect(obs, attempt)
            members = frozenset(info.participants) & (obs.collected | {self.me})
            everyone = len(members) == len(info.participants)
            quorum = min(t.min_peers, len(info.participants))
            late = obs.now >= info.elected_at + t.collect_s
            if (everyone or (late and len(members) >= quorum)) and self._may_try(
                f"merge{attempt}", obs.now
            ):
                return Merge(self.round, attempt, tuple(sorted(members)))
            return Wait(t.poll_s, f"collecting updates ({len(members)}/{len(info.participants)})")
        if self._overdue(obs) and self._may_try(f"reelect{attempt}", obs.now):
            return Reelect(self.round, attempt, leader)
        if self.pushed_attempt != attempt and self.weight == 0 and not self.secure:
            self.pushed_attempt = attempt  # nothing to add: the leader counts it as in
        if self.pushed_attempt != attempt and self.secure and not self._summed(obs):
            self.pushed_attempt = attempt  # too few to sum: the leader keeps the starting model
        if self.pushed_attempt != attempt:
            self.stage = Stage.PUSH
            if self._may_try(f"push{attempt}", obs.now):
                return Push(self.round, leader, attempt, self._transfer_timeout(obs),
                            prefetch=True)
            return Wait(t.poll_s, "retrying the push soon")
        self.stage = Stage.COMMIT
        return Wait(t.poll_s, "waiting for the leader's commit")

    @staticmethod
    def _summed(obs: Observation) -> bool:
        """Secure aggregation: whether the round's masked updates are summed: at least
        MIN_SITES sites of the mask set checked in with a weight above 0 (with fewer, the sum
        gives an update away: weight-0 sites add a masked zero). Weights not known: no."""
        view = obs.secure
        if view is None or view.roster is None or view.adding is None:
            return False
        low = {p.lower() for p in view.roster} & view.adding
        return guards.sums(sum(1 for p in obs.info.participants if p.lower() in low))

    def _secure_collect(self, obs: Observation, attempt: int) -> Action:
        """Secure-aggregation leader: every checked-in site of the mask set must push (a missing
        masked update leaves its masks in the others' and only its own seeds could remove
        them: no quorum merge, the round is re-elected at its deadline and, every leader
        failing, abandoned); then, if some mask-set sites never checked in, every survivor's
        seed reveals for them; then the merge."""
        info, t = obs.info, self.timing
        roster = obs.secure.roster if obs.secure is not None else None
        if not roster:
            return Wait(t.poll_s, "waiting for the round's mask set")
        low = {p.lower() for p in roster}
        required = {p.lower(): p for p in info.participants if p.lower() in low}
        if not self._summed(obs):  # too few to sum: the starting model goes on, no sum
            if self._may_try(f"merge{attempt}", obs.now):
                return Merge(self.round, attempt, tuple(sorted(info.participants)), keep=True)
            return Wait(t.poll_s, "committing the starting model again")
        have = {c.lower() for c in obs.collected} | {self.me.lower()}
        missing = set(required) - have
        if missing:
            return Wait(t.poll_s, f"collecting masked updates ({len(required) - len(missing)}"
                        f"/{len(required)})")
        dropouts = low - set(required)
        revealed = {r.lower() for r in obs.secure.revealed} if obs.secure is not None else set()
        need = sorted(required[p] for p in set(required) - revealed) if dropouts else []
        if need:
            if self._may_try(f"reveal{attempt}", obs.now):
                return Reveals(self.round, attempt, tuple(need),
                               timeout_s=self._transfer_timeout(obs))
            return Wait(t.poll_s, f"waiting for seed reveals ({len(need)} to come)")
        if self._may_try(f"merge{attempt}", obs.now):
            return Merge(self.round, attempt, tuple(sorted(required.values())))
        return Wait(t.poll_s, "merging the masked updates")

    def _sharded(self, obs: Observation, leader: str, attempt: int) -> Action:
        """An attempt of a sharded round: send the slices, merge this node's slice once every
        contributor's is in, then the leader assembles and commits, the others wait for the
        commit (re-electing at the deadline, as in any round: a lost slice stalls the attempt,
        and the next attempt gathers whole updates at its leader).

        The slices go out and this node's slice is merged before the leader is drawn: until
        then the draw waits for the scatter and the merge of this node's slice (the others'
        gathers wait for that slice; only the commit needs the leader), and is sent while
        there is nothing else to do."""
        info, t = obs.info, self.timing
        draw = self._draw if not leader else lambda _obs: None
        if self.merged_attempt == attempt or self.vetoed_attempt == attempt:
            self.stage = Stage.COMMIT
            return Wait(t.poll_s, "commit sent" if self.merged_attempt == attempt
                        else "the merged model could not be committed: waiting for the "
                        "re-election")
        if (leader and leader != self.me and self._overdue(obs)
                and self._may_try(f"reelect{attempt}", obs.now)):
            return Reelect(self.round, attempt, leader)
        if self.scattered_attempt != attempt and self.weight == 0:
            self.scattered_attempt = attempt  # nothing to add: the owners count it as in
        if self.scattered_attempt != attempt:
            self.stage = Stage.PUSH
            if self._may_try(f"scatter{attempt}", obs.now):
                return Scatter(self.round, attempt, self._transfer_timeout(obs))
            return draw(obs) or Wait(t.poll_s, "retrying the slices soon")
        if self.reduced_attempt != attempt:
            self.stage = Stage.COLLECT
            if set(info.participants) <= obs.shard_in and self._may_try(f"reduce{attempt}",
                                                                        obs.now):
                return Reduce(self.round, attempt)
            return draw(obs) or Wait(t.poll_s, f"collecting slices ({len(obs.shard_in)}/"
                                     f"{len(info.participants)})")
        if not leader:
            self.stage = Stage.ELECTION
            return draw(obs) or Wait(t.poll_s, "slices merged: waiting for the leader draw")
        if leader == self.me:
            self.stage = Stage.COLLECT
            if self._may_try(f"merge{attempt}", obs.now):
                return Merge(self.round, attempt, tuple(sorted(info.participants)),
                             sharded=True)
            return Wait(t.poll_s, "assembling the merged slices")
        self.stage = Stage.COMMIT
        return Wait(t.poll_s, "waiting for the leader's commit")

    def _draw(self, obs: Observation) -> Draw | None:
        """The leader draw, when this node is to send it now: at once if its transaction closed
        the round, else once the leader is still undrawn ``draw_wait_s`` after the close."""
        info, t = obs.info, self.timing
        due = self.closer or (self.drive and obs.now >= info.elected_at + t.draw_wait_s)
        if due and self._may_try(f"draw{info.attempt}", obs.now):
            return Draw(self.round)
        return None

    def _overdue(self, obs: Observation) -> bool:
        """The elected leader's deadline passed (and the chain was up long enough to judge)."""
        t = self.timing
        return (obs.now >= obs.info.elected_at + t.deadline_s
                and obs.chain_up_s >= t.deadline_s / 2)

    def _transfer_timeout(self, obs: Observation) -> float:
        """How long a push (or a sharded round's slices) may take: a transfer is moot once the
        leader's deadline passed (the member re-elects then), so a leader that froze
        mid-transfer holds this node no longer than that."""
        t = self.timing
        left = obs.info.elected_at + t.deadline_s - obs.now
        return min(t.transfer_s, max(t.min_transfer_s, left + 2.0))

    def _may_try(self, key: str, now: float) -> bool:
        """Rate-limit actions that may fail and be retried (elect, push, reelect)."""
        last = self._last_try.get(key)
        if last is not None and now - last < self.timing.retry_s:
            return False
        self._last_try[key] = now
        return True

    # -- outcomes reported by the service ---------------------------------------------------------
    def on_checked_in(self) -> None:
        self.checked_in = True
        self.stage = Stage.ELECTION

    def on_closed(self) -> None:
        """This node's transaction closed the round or re-elected its leader: draw it next."""
        self.closer = True

    def on_drawn(self) -> None:
        self.closer = False

    def on_checkin_too_late(self) -> None:
        """The round was elected before our check-in landed: take the merged model, add nothing."""
        self.late = True
        self.stage = Stage.COMMIT

    def on_pushed(self, attempt: int) -> None:
        self.pushed_attempt = attempt
        self.stage = Stage.COMMIT

    def on_scattered(self, attempt: int) -> None:
        self.scattered_attempt = attempt

    def on_reduced(self, attempt: int) -> None:
        self.reduced_attempt = attempt

    def on_merged(self, attempt: int, digest: bytes) -> None:
        self.merged_attempt = attempt
        self.merged_digest = digest
        self.stage = Stage.COMMIT

    def on_vetoed(self, attempt: int) -> None:
        """Leader: ``attempt`` has nothing to commit (its merge holds NaN/Inf, which every
        member would refuse; or a secure round had too few sites to sum and no model before
        it), so it is not merged again; the participants, this leader included, re-elect at the
        deadline."""
        self.vetoed_attempt = attempt
        self.stage = Stage.COMMIT

    def on_pulled(self, digest: bytes) -> None:
        self.merged_digest = digest
        self.unpullable_since = None
        self.stage = Stage.DONE

    def on_pull_failed(self, now: float) -> None:
        """No source served the committed model (chain time ``now``): tried again after
        ``retry_s``, given up a deadline after the first failure (:class:`Done`, "unservable")."""
        if self.unpullable_since is None:
            self.unpullable_since = now
        self._last_try["pull"] = now

    def on_refused(self, digest: bytes) -> None:
        """The committed merged model is unusable (NaN/Inf in it): the round ends for this node
        without it, as an abandoned round does (the trainer keeps its own parameters)."""
        self.refused_digest = digest
        self.stage = Stage.DONE


def absent_check_due(me: str, info: RoundInfo, now: float, timing: Timing,
                     last_checked: float) -> bool:
    """Whether a step of ``me`` should read which sites the contract lets go (a read of every
    node: at most every ``absent_check_s``, not on every block): only in an open round it checked
    in for, once the grace period after the first check-in is over."""
    return (info.status is RoundStatus.OPEN and me in info.participants
            and bool(info.first_checkin_at) and now >= info.first_checkin_at + timing.grace_s
            and now >= last_checked + timing.absent_check_s)
