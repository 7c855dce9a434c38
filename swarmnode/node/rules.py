"""The merge and commit rules of a round, free of I/O: who the leader folds and commits, what it
commits when nobody added weight, when it must not commit, how long it waits for a replica, and
when a member's early fetch of the merged model stops.

The driver gathers the facts (the chain's check-in weights, which updates arrived, which members
fetched the model) and performs what these functions decide.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from enum import Enum

from swarmnode.errors import PayloadRejected, RoundError

__all__ = [
    "Source",
    "check_update_weight",
    "collected",
    "commit_members",
    "commit_source",
    "contributors",
    "may_commit",
    "prefetch_goes_on",
    "replica_held",
    "runs_sharded",
]


def contributors(participants: Iterable[str], weights: Mapping[str, int]) -> tuple[str, ...]:
    """The participants whose update the leader folds: those that checked in with a weight > 0
    (``weights``: the chain's check-in weights; a missing one is no check-in)."""
    return tuple(p for p in participants if weights.get(p, -1) > 0)


def collected(participants: Iterable[str], senders: Collection[str],
              weights: Mapping[str, int]) -> frozenset[str]:
    """The participants the leader counts as in: those whose update arrived, and those with
    weight 0 (nothing to add: they never push)."""
    return frozenset(p for p in participants if p in senders or weights.get(p, -1) == 0)


def commit_members(participants: Iterable[str], senders: Collection[str],
                   weights: Mapping[str, int], revoked: Callable[[str], bool]) -> tuple[str, ...]:
    """The members a commit records, in check-in order: the participants merged (their update
    arrived) and those with weight 0, less any revoked since they checked in."""
    return tuple(p for p in participants
                 if (p in senders or weights.get(p, -1) == 0) and not revoked(p))


def check_update_weight(round: int, sender: str, sent: int, on_chain: int | None) -> None:
    """A pushed update counts with the weight its sender checked in with, never another: no
    check-in (``on_chain`` None) is RoundError, a different weight PayloadRejected."""
    if on_chain is None or on_chain < 0:
        raise RoundError(f"round {round}: {sender} did not check in, so it cannot contribute")
    if on_chain != sent:
        raise PayloadRejected(
            f"round {round}: {sender} sent weight {sent} but checked in with {on_chain}"
        )


class Source(Enum):
    """What the leader commits."""

    MERGED = "merged"  # the merge of the updates
    BASE = "base"  # every participant added weight 0: the model the round started from, again
    EQUAL = "equal"  # weight 0 all round and no earlier model to re-commit: an unweighted merge


def commit_source(total_weight: float, base_held: bool | None) -> Source:
    """``base_held``: whether the newest earlier committed model could be had (None: not asked;
    the leader asks only when :func:`commit_source` with ``None`` says BASE)."""
    if total_weight > 0:
        return Source.MERGED
    if base_held is None or base_held:
        return Source.BASE
    return Source.EQUAL


def may_commit(source: Source, finite: bool) -> bool:
    """The NaN veto: a leader never commits a merge holding NaN/Inf (every member would refuse
    it); the round's deadline then re-elects. A re-committed base was accepted before."""
    return source is Source.BASE or finite


def replica_held(pushed: Collection[str], served: Collection[str], waited_s: float,
                 replicate_s: float) -> bool:
    """Replicate before commit: the leader commits once a member that pushed holds the merged
    model (it fetched it), so the swarm does not depend on the leader alone once the digest is on
    chain; or once ``replicate_s`` passed; or at once if nobody else pushed."""
    return not pushed or bool(set(pushed) & set(served)) or waited_s >= replicate_s


def prefetch_goes_on(*, held: bool, fetched: bool, leader_now: str | None, leader: str,
                     elapsed_s: float, deadline_s: float) -> bool:
    """A member's early fetch from the round's leader keeps asking (the leader has not merged
    yet) until this node holds the round's model, fetched it, the round was re-elected to another
    leader, or a deadline passed (any other failure ends it too: the pull after the commit asks
    every participant)."""
    if held or fetched or elapsed_s >= deadline_s:
        return False
    return leader_now is None or leader_now == leader


def runs_sharded(topology: str, attempt: int, participants: Collection[str],
                 contributors: Collection[str]) -> bool:
    """Whether an elected attempt merges in slices (``topology: sharded``): only a round's first
    attempt, with two participants or more and someone adding weight. An attempt after a
    re-election (a site was lost, so a slice may be missing) gathers whole updates at its
    leader, as the leader topology does, and so does a round where nobody adds weight (its
    leader re-commits the model the round started from)."""
    return (topology == "sharded" and attempt == 1 and len(participants) >= 2
            and len(contributors) >= 1)
