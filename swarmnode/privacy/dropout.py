"""Dropouts: what a surviving site reveals for a site that never checked in, and nothing else.

The round's roster (its elected participants) is public and fixed; every site masks with every
other. A site that never checked in for the round never pushed, so its pair masks stay in the
survivors' updates: each survivor reveals its pair's seed for this round and attempt, and only
for such a site. Two rules an honest site keeps (the round engine must enforce them):

- reveal only after the round's check-ins are closed on chain (a late check-in after a reveal
  would let the leader unmask it), and only for sites the chain shows never checked in;
- never reveal for a site that checked in: if it then fails to push, the round is abandoned
  (:class:`~swarmnode.errors.RoundAbandoned`), because its seeds would unmask its update.

A reveal is one round's seed: it exposes no pair key, no private key and no other round.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from swarmnode.errors import ConfigError, RoundAbandoned
from swarmnode.privacy.guards import MIN_SITES

__all__ = ["SeedReveal", "reveal_seeds"]


@dataclass(frozen=True)
class SeedReveal:
    """``revealer``'s pair seed with ``missing`` for one round attempt."""

    revealer: str
    missing: str
    round: int
    attempt: int
    seed: bytes


def reveal_seeds(me: str, roster: Collection[str], checked_in: Collection[str],
                 round_number: int, attempt: int,
                 seeds: Mapping[str, bytes]) -> list[SeedReveal]:
    """The reveals ``me`` sends for the round: its seed with each roster site that never checked
    in. ``seeds``: peer -> this round's pair seed. Refuses (RoundAbandoned) when fewer than
    MIN_SITES checked in: the sum of two updates gives each away to the other."""
    roster_set, checked = set(roster), set(checked_in)
    if me not in roster_set or me not in checked:
        raise ConfigError(f"secure aggregation: {me} reveals seeds only for a round it is in "
                          "and checked in to")
    if not checked <= roster_set:
        raise ConfigError("secure aggregation: the checked-in sites must be on the round's "
                          "roster")
    if len(checked) < MIN_SITES:
        raise RoundAbandoned(
            f"round {round_number} (attempt {attempt}) is abandoned: only {len(checked)} "
            f"sites checked in and secure aggregation needs at least {MIN_SITES} (with fewer, "
            "the sum gives an update away); nothing is revealed, the next round goes on")
    reveals = []
    for missing in sorted(roster_set - checked):
        if missing not in seeds:
            raise ConfigError(f"secure aggregation: no pair seed with {missing} for round "
                              f"{round_number}")
        reveals.append(SeedReveal(me, missing, round_number, attempt, seeds[missing]))
    return reveals
