"""The leader's side: sum the masked updates, remove the masks of dropouts, decode, check.

Inputs are what the chain and the pushes give the leader of one round attempt: the roster (the
elected participants, every one of which masked with every other), the sites that checked in
(each with its public weight), the masked update of every site that checked in, and the survivors'
seed reveals for the sites that never checked in. The masks between sites that checked in cancel
in the sum; the revealed seeds remove the rest. A site that checked in and never pushed makes the
round unrecoverable: its masks stay in the others' updates, and only its own seeds (which would
unmask it) could remove them, so the round is abandoned and nothing is revealed.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from swarmnode.errors import AggregateRejected, RoundAbandoned
from swarmnode.privacy.dropout import SeedReveal
from swarmnode.privacy.encoding import SCREEN, decode_sum, squares, sum_squares
from swarmnode.privacy.guards import MIN_SITES
from swarmnode.privacy.masks import add_pair_mask, adds_first
from swarmnode.privacy.ring import RingPlan

__all__ = ["Aggregate", "aggregate", "check_bound", "unmasked_sum"]


@dataclass(frozen=True)
class Aggregate:
    """One round's result: the exact ring sum and what it decodes to."""

    ring_sum: np.ndarray  # the plan's dtype: the sum of the encoded updates, masks removed
    weighted_sum: np.ndarray | None  # float64: sum of weight x clipped change, per coordinate
    # (None: not decoded whole; a node decodes ring_sum a piece at a time into the model)
    total_weight: int
    contributors: tuple[str, ...]  # the sites whose updates are in the sum
    dropouts: tuple[str, ...]  # roster sites that never checked in

    @property
    def mean(self) -> np.ndarray:
        """The weighted mean change (add it to the round's starting model)."""
        if self.weighted_sum is None:
            raise AggregateRejected("this aggregate was not decoded whole: decode ring_sum "
                                    "(encoding.decode_sum) with the round's plan")
        return self.weighted_sum / float(self.total_weight)


def _where(round_number: int, attempt: int) -> str:
    return f"round {round_number} (attempt {attempt})"


def unmasked_sum(roster: Collection[str], checked_in: Collection[str],
                 masked: Mapping[str, np.ndarray], reveals: Sequence[SeedReveal],
                 plan: RingPlan, round_number: int, attempt: int = 0,
                 summed: np.ndarray | None = None) -> np.ndarray:
    """The exact ring sum of the checked-in sites' encoded updates (masks removed).
    ``summed``: the sum (modulo the ring) of exactly the vectors in ``masked``, formed already (a
    leader adds them as they arrive); every check still runs, and it is returned itself when
    no revealed mask is to be removed (else a copy is)."""
    where = _where(round_number, attempt)
    roster_set, checked = set(roster), set(checked_in)
    if len(roster_set) > plan.n_sites:
        raise AggregateRejected(f"{where}: {len(roster_set)} sites on the roster but the ring "
                                f"was planned for {plan.n_sites}; plan it for the roster")
    if not checked <= roster_set:
        raise AggregateRejected(f"{where}: {sorted(checked - roster_set)} checked in without "
                                "being on the round's roster")
    strangers = set(masked) - checked
    if strangers:
        raise AggregateRejected(f"{where}: updates from {sorted(strangers)}, which did not "
                                "check in; a site pushes only after its check-in is mined")
    silent = checked - set(masked)
    if silent:
        raise RoundAbandoned(
            f"{where} is abandoned: {', '.join(sorted(silent))} checked in but never pushed "
            "its masked update, so its masks stay in the others' updates and only its own "
            "seeds could remove them (which would unmask it); nothing is revealed, the next "
            "round goes on")
    if len(checked) < MIN_SITES:
        raise RoundAbandoned(
            f"{where} is abandoned: only {len(checked)} sites checked in and secure "
            f"aggregation needs at least {MIN_SITES} (the sum of two gives each away); nothing "
            "is revealed, the next round goes on")
    dropouts = roster_set - checked
    by_pair: dict[tuple[str, str], SeedReveal] = {}
    for r in reveals:
        if (r.round, r.attempt) != (round_number, attempt):
            raise AggregateRejected(f"{where}: a reveal from {r.revealer} is for round "
                                    f"{r.round} (attempt {r.attempt})")
        if r.missing not in dropouts:
            raise AggregateRejected(
                f"{where}: {r.revealer} revealed its seed with {r.missing}, which is not a "
                "dropout (it checked in, or is not on the roster); refused: seeds are revealed "
                "only for sites that never checked in")
        if r.revealer not in checked:
            raise AggregateRejected(f"{where}: a reveal from {r.revealer}, which did not "
                                    "check in")
        if (r.revealer, r.missing) in by_pair:
            raise AggregateRejected(f"{where}: {r.revealer} revealed its seed with "
                                    f"{r.missing} twice")
        by_pair[(r.revealer, r.missing)] = r
    lacking = [(s, d) for s in sorted(checked) for d in sorted(dropouts)
               if (s, d) not in by_pair]
    if lacking:
        shown = ", ".join(f"{s} for {d}" for s, d in lacking[:4])
        raise AggregateRejected(f"{where}: {len(lacking)} seed reveals are missing ({shown}"
                                f"{', ...' if len(lacking) > 4 else ''}); wait for them")
    lengths = {v.shape for v in masked.values()}
    if len(lengths) != 1:
        raise AggregateRejected(f"{where}: masked updates of different lengths {lengths}")
    dtype = plan.dtype
    for site in sorted(masked):
        vector = masked[site]
        if vector.dtype != dtype or vector.ndim != 1:
            raise AggregateRejected(
                f"{where}: {site}'s masked update is not a 1-D {np.dtype(dtype).name} vector "
                f"(the round's {plan.ring_bits}-bit ring); it was encoded with another plan")
    if summed is not None:
        if summed.dtype != dtype or summed.shape != next(iter(lengths)):
            raise AggregateRejected(f"{where}: the running sum is not a "
                                    f"{np.dtype(dtype).name} vector of the updates' length")
        total = summed.copy() if by_pair else summed
    else:
        first, *rest = sorted(masked)
        total = masked[first].copy()
        for site in rest:
            total += masked[site]
    for (survivor, dropout), r in sorted(by_pair.items()):
        # the survivor added (+) or subtracted (-) the pair's mask: take it back out
        add_pair_mask(total, r.seed, -1 if adds_first(survivor, dropout) else 1)
    if plan.reduces:
        total &= plan.modulus_mask
    return total


def check_bound(weighted_sum: np.ndarray, total_weight: int, n_contributors: int,
                plan: RingPlan, where: str = "the sum", noise: float = 0.0,
                squares_: float | None = None) -> None:
    """AggregateRejected unless ||sum||_2 <= W C (+ the encoding error, + ``noise``: the bound
    on the distributed noise's norm in ring units, privacy.noise.sum_noise_bound): an honest sum
    of clipped, weighted changes never exceeds it; a wrong revealed seed or a site that skipped
    clipping does. ``weighted_sum``: the decoded sum (float64), or the ring sum itself (uint32 /
    uint64, decoded a chunk at a time: no float64 copy). ``squares_``: the decoded sum's sum of
    squares, summed already by the pass that decoded it (a leader's, into the model): the check
    then reads the vector again only when the norm is within SCREEN of the limit."""
    if weighted_sum.dtype in (np.uint32, np.uint64):
        def norm_(blas: bool) -> float:
            return math.sqrt(sum_squares(weighted_sum, plan, blas))
    else:
        def norm_(blas: bool) -> float:
            if blas:
                return math.sqrt(float(np.dot(weighted_sum, weighted_sum)))
            return math.sqrt(squares(weighted_sum))  # without BLAS; decided by it near the limit
    norm = math.sqrt(squares_) if squares_ is not None else norm_(False)
    error = math.sqrt(weighted_sum.shape[0]) * plan.sum_error(n_contributors) + noise * plan.unit
    limit = (total_weight * plan.clip + error) * (1 + 1e-9)
    if not norm <= limit * (1 - SCREEN):
        norm = norm_(True)
    if not norm <= limit:
        raise AggregateRejected(
            f"{where}: the decoded sum has norm {norm:.6g}, over the bound {limit:.6g} (total "
            f"weight {total_weight} x clip_norm {plan.clip}): a revealed seed is wrong or a "
            "site did not clip its update; the round's result is refused")


def aggregate(roster: Collection[str], weights: Mapping[str, int],
              masked: Mapping[str, np.ndarray], reveals: Sequence[SeedReveal], plan: RingPlan,
              round_number: int, attempt: int = 0) -> Aggregate:
    """The round's :class:`Aggregate`. ``weights``: every checked-in site -> its weight (from
    its check-in); the sites in ``weights`` are the ones that checked in."""
    where = _where(round_number, attempt)
    for site, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= plan.weight_cap:
            raise AggregateRejected(f"{where}: {site}'s weight {w!r} is outside "
                                    f"1..{plan.weight_cap} (the spec's max_weight)")
    ring_sum = unmasked_sum(roster, weights.keys(), masked, reveals, plan, round_number,
                            attempt)
    weighted = decode_sum(ring_sum, plan)
    total_weight = sum(weights.values())
    check_bound(weighted, total_weight, len(weights), plan, where)
    return Aggregate(ring_sum, weighted, total_weight, tuple(sorted(weights)),
                     tuple(sorted(set(roster) - set(weights))))
