"""What any member can check after a round: the sum was built from exactly the masked updates
whose hashes the check-ins carry (and the dropouts' revealed seeds), nothing added or left out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from swarmnode.errors import AggregateRejected
from swarmnode.privacy.aggregate import unmasked_sum
from swarmnode.privacy.dropout import SeedReveal
from swarmnode.privacy.ring import RingPlan
from swarmnode.privacy.wire import update_hash

__all__ = ["verify_sum"]


def verify_sum(roster: Collection[str], hashes: Mapping[str, bytes],
               masked: Mapping[str, np.ndarray], reveals: Sequence[SeedReveal],
               plan: RingPlan, ring_sum: np.ndarray | None, round_number: int,
               attempt: int = 0) -> np.ndarray:
    """The exact ring sum of exactly the updates in ``masked``, each matching the hash its site
    checked in with (``hashes``: every checked-in site -> its hash), less the revealed dropout
    masks; AggregateRejected unless they are those, and unless ``ring_sum`` (the sum the leader
    states, masks removed; None: it states none) is that sum."""
    where = f"round {round_number} (attempt {attempt})"
    if set(masked) != set(hashes):
        raise AggregateRejected(
            f"{where}: the updates given ({sorted(masked)}) are not those of the sites that "
            f"checked in ({sorted(hashes)})")
    for site in sorted(hashes):
        if update_hash(masked[site]) != hashes[site]:
            raise AggregateRejected(f"{where}: {site}'s masked update does not match the hash "
                                    "it checked in with")
    expected = unmasked_sum(roster, hashes.keys(), masked, reveals, plan, round_number, attempt)
    if ring_sum is not None and (ring_sum.dtype != expected.dtype
                                 or ring_sum.shape != expected.shape
                                 or not np.array_equal(ring_sum, expected)):
        raise AggregateRejected(f"{where}: the sum was not built from exactly the masked "
                                "updates whose hashes are on chain (and the revealed seeds)")
    return expected
