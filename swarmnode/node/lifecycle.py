"""A node's course across rounds, free of I/O: what it does between rounds and after its trainer
is done.

- a sync whose check-in lost the race (the round was elected first) contributes to the next round
  instead of dropping the trainer's work (:func:`missed_checkin`), unless training is over;
- a trainer's weight above the swarm's ``max_weight`` counts at the cap (:func:`capped_weight`);
- the end-of-training policies (:func:`end_step`, :func:`adopts_merged`);
- which round holds the final model, whether this node must fetch it and which sites may have
  it (:func:`final_round`, :func:`holds_final`, :func:`may_take_final`);
- which rounds' metrics go on chain, carried by the next check-in or by ``finish``
  (:func:`eligible_metrics`, :func:`pending_after`, :func:`pending_after_sent`), a DP site's
  privacy spent with them (:class:`Privacy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from swarmnode.chain import epsilon as chain_epsilon
from swarmnode.errors import ConfigError
from swarmnode.privacy.guards import MIN_SITES

__all__ = [
    "END_POLICIES",
    "EndStep",
    "Metrics",
    "Privacy",
    "adopts_merged",
    "capped_weight",
    "check_policy",
    "eligible_metrics",
    "effective_policy",
    "end_step",
    "final_round",
    "holds_final",
    "may_take_final",
    "missed_checkin",
    "pending_after",
    "pending_after_sent",
    "secure_sums_over",
]

END_POLICIES = ("inactive", "snapshot", "active")


# -- a sync ----------------------------------------------------------------------------------------
def missed_checkin(contributed: bool, abandoned: bool, weight: int) -> bool:
    """Round r was elected before this node's check-in landed (it took the merged model and added
    nothing): rather than drop the trainer's work, it contributes the same update to the next
    round (which opens now), unless training is over. A weight-0 sync has nothing to add."""
    return not contributed and not abandoned and weight > 0


def capped_weight(weight: int, cap: int) -> int:
    """The contract refuses check-ins heavier than ``max_weight``: a heavier trainer counts at
    the cap."""
    return min(weight, cap)


# -- the end of training ---------------------------------------------------------------------------
def check_policy(policy: str) -> str:
    if policy not in END_POLICIES:
        raise ConfigError(
            f"unknown on_train_end policy {policy!r}; choose one of {', '.join(END_POLICIES)}"
        )
    return policy


@dataclass(frozen=True)
class EndStep:
    """What a node whose trainer is done does while round ``round`` runs."""

    take_part: bool  # run the round (else wait for it to end, setting silent sites aside)
    weight: int  # its check-in weight
    model: str  # what it contributes: "own" (its final weights), "latest" (the newest merged
    #             model it holds, its own if none), "current" (what it contributed last)
    drive: bool  # may turn the round over (elect, draw): only in the final round


def effective_policy(policy: str, secure: bool) -> str:
    """The policy a finished site follows. With secure aggregation it is always ``inactive``:
    a finished site that keeps adding weight adds a contribution the others can predict
    (``active``: a zero change; ``snapshot``: the same final weights every round, which a
    member removes by subtracting two rounds' sums), so with two sites still training each
    would learn the other's updates from the sums, which secure aggregation exists to prevent.
    A site that adds weight 0 adds nothing to the sum, and a round whose sites still training
    are too few to sum keeps its starting model (the round core's rule)."""
    check_policy(policy)
    return "inactive" if secure else policy


def secure_sums_over(mask_set: int, still_training: int) -> bool:
    """Secure aggregation: whether no later round can be summed. A round sums only when at
    least MIN_SITES sites add weight (with fewer, the sum gives an update away) and a finished
    site adds none (:func:`effective_policy`): once a training whose mask set had room for a
    sum has fewer than MIN_SITES sites still training (the others finished or were revoked),
    every further round would commit its starting model again and the trainers' work would be
    thrown away round after round. The sites still training then finish: their trainers stop
    and take the final model (the last summed one) instead."""
    return mask_set >= MIN_SITES and still_training < MIN_SITES


def end_step(policy: str, round: int, final: int | None, weight: int) -> EndStep:
    """``inactive`` (default) stops contributing: it waits, takes part only in the final round,
    with weight 0 and the newest merged model (so rounds do not wait for it, and stay
    reproducible). ``snapshot`` keeps contributing its final weights, ``active`` the merged
    weights of each round (:func:`adopts_merged`), every round at the trainer's weight. Before
    the final round a finished node only follows: it must not turn rounds over while another
    site still trains. Secure aggregation: :func:`effective_policy` first."""
    check_policy(policy)
    last = final == round
    if policy == "inactive":
        return EndStep(take_part=last, weight=0, model="latest", drive=last)
    return EndStep(take_part=True, weight=weight, model="current", drive=last)


def adopts_merged(policy: str) -> bool:
    """Whether the node contributes each round's merged model from then on (``active``)."""
    return policy == "active"


def final_round(current_round: int) -> int:
    """The final model is the merged model of the round before the current one (the contract
    opens no round after the final one)."""
    return current_round - 1


def may_take_final(joined: bool, authorized: bool, revoked: bool, finished: bool) -> bool:
    """Whether a site may have the training's final model: one that joined it, or, once it
    finished, one its registry authorised that did not join (its node came up after the
    others finished). A revoked site never; a site the registry never authorised never."""
    if revoked:
        return False
    return joined or (authorized and finished)


def holds_final(chain_digest: bytes | None, held_digest: bytes | None) -> bool:
    """Whether the model this node holds for the final round is the one on chain; if not it
    fetches it from that round's members (once: still not held, the node fails, naming the
    log's failed pulls)."""
    return held_digest is not None and held_digest == chain_digest


# -- metrics ---------------------------------------------------------------------------------------
class Privacy(NamedTuple):
    """A DP site's privacy spent so far, as its trainer reports it with its metrics: epsilon at
    the trainer's delta (Opacus' accountant). A trainer that sends none is not DP. It goes on
    chain with the metrics it came with (:mod:`swarmnode.chain.epsilon`)."""

    epsilon: float
    delta: float

    @classmethod
    def from_args(cls, args: dict[str, Any], method: str) -> Privacy | None:
        """``epsilon`` and ``delta`` of a local API call: both absent (an older callback, or no
        DP) is None; anything else must be a number >= 0 (``inf``: no noise) and one in (0, 1)
        (chain.epsilon.problem: what the chain records)."""
        epsilon, delta = args.get("epsilon"), args.get("delta")
        if epsilon is None and delta is None:
            return None
        why = chain_epsilon.problem(epsilon, delta)
        if why is not None:
            raise ConfigError(f"{method}: {why}")
        return cls(float(epsilon), float(delta))


class Metrics(NamedTuple):
    """An earlier round's validation loss and metric, as ``checkin``/``finish`` carry them, with
    a DP site's privacy spent as it reported it with them."""

    round: int
    loss: float
    metric: float
    privacy: Privacy | None = None


def eligible_metrics(round: int, committed: bool, contributed: bool, loss: float | None,
                     metric: float | None, privacy: Privacy | None = None) -> Metrics | None:
    """The trainer's metrics of ``round`` go on chain only for a committed round this node took
    part in (checked in, not late; what the contract accepts), and only if it measured any (a
    missing one goes as 0); a DP site's ``privacy`` rides with them (none measured: neither
    goes)."""
    if (loss is None and metric is None) or not committed or not contributed:
        return None
    return Metrics(round, loss or 0.0, metric or 0.0, privacy)


def pending_after(pending: Metrics | None, new: Metrics | None) -> Metrics | None:
    """The metrics the next check-in (or ``finish``) carries. One transaction carries one set:
    the newest eligible round's replace older ones not sent yet (those are dropped; a node sends
    after every round, so that is only a round whose next check-in never happened). Metrics left
    pending when the node checks in no more and ``finish`` is not sent (the training finished
    without it) are never recorded."""
    if new is None:
        return pending
    if pending is not None and pending.round > new.round:
        return pending
    return new


def pending_after_sent(pending: Metrics | None, sent: Metrics | None) -> Metrics | None:
    """After a check-in or ``finish`` carried ``sent`` (mined): nothing pending, unless newer
    metrics came meanwhile."""
    return None if pending == sent else pending
