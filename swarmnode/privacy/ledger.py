"""The swarm's epsilon under distributed noise, from the chain's record alone.

Nothing about the noise is written on chain beyond the spec (its ``distributed_noise``, pinned
by the spec's hash): every round's noise follows from the pinned settings and the chain's
record of the round, so any reader can recompute what :mod:`swarmnode.privacy.accountant` says:
the round's mask set (privacy.roster: the member list in join order, each member's joined round
and join-time key, ``min_peers``), who checked in and with what weight (the check-ins), whether
the round closed (committed or abandoned) and whether a model was committed before it (its
starting model: without one, no noise).
"""

from __future__ import annotations

import json

from swarmnode.chain.client import SwarmContract
from swarmnode.chain.models import RoundStatus
from swarmnode.privacy import accountant, noise, ring
from swarmnode.privacy.roster import mask_set
from swarmnode.spec import TrainingSpec

__all__ = ["from_chain"]


def from_chain(chain: SwarmContract) -> accountant.Summary | None:
    """Each closed round's epsilon and the total (None: the spec adds no distributed noise)."""
    text = chain.spec_json()
    try:
        raw = json.loads(text)
    except ValueError:
        return None  # not a swarmnode spec (a bare test contract's): no noise to account
    if not isinstance(raw, dict) or raw.get("distributed_noise") is None:
        return None
    spec = TrainingSpec.from_json(text, "the contract's training spec")
    if spec.distributed_noise is None:
        return None
    plan = ring.plan(ring.MAX_SITES, int(spec.max_weight or 1), spec.merge_options["clip_norm"])
    size = noise.parameter_count(spec.params)
    members = [(n.address, n.enrolled_round, chain.mask_key(n.address)) for n in chain.nodes()]
    min_peers = chain.settings().min_peers
    weights: dict[int, dict[str, int]] = {}  # from the events: storage keeps recent rounds only
    for e in chain.events(names={"CheckedIn"}):
        weights.setdefault(int(e.args["round"]), {})[str(e.args["node"])] = int(e.args["weight"])
    rounds: list[accountant.RoundNoise] = []
    started = False  # a model was committed before the round: it had a starting model
    for r in range(1, chain.current_round() + 1):
        info = chain.round(r)
        if info.status not in (RoundStatus.COMMITTED, RoundStatus.ABANDONED):
            continue
        roster = mask_set(members, r, min_peers)
        if roster is not None:
            held = weights.get(r, {})
            rounds.append(noise.round_noise(r, roster, {p: held.get(p, 0) for p in
                                                        info.participants},
                                            spec.distributed_noise, plan, size, started))
        started = started or info.status is RoundStatus.COMMITTED
    return accountant.summarise(rounds, spec.distributed_noise.delta)
