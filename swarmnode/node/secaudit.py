"""A member's check of a committed secure-aggregation round (issue 20): the leader's sum was
built from exactly the masked updates whose hashes are on chain (and the dropouts' revealed
seeds), and the model committed on chain is that sum decoded the way the leader decodes it.

The leader keeps each summed round's evidence (:mod:`swarmnode.privacy.evidence`, the newest
``node.secure.KEEP_EVIDENCE`` rounds) and gives it to members of the training on its data plane
(op ``evidence``). A member checks, in order:

1. the evidence is for this round and states the digest the chain committed; its model is
   the round's starting model (the digest of the latest round committed before it), or, for a
   round without one, the committed model itself;
2. every seed it says this member revealed is the seed this member computes;
3. ``privacy.audit.verify_sum``: the masked updates are those of exactly the mask-set sites
   that checked in, each matching the hash its check-in carries (an update changed, dropped
   or added fails here); their sum less the revealed masks is the round's sum (evidence from
   an older leader that states its ring sum must state that one);
4. that sum decoded (the round's plan), divided by the checked-in weights (on chain), added to
   the round's starting model, has the digest committed on chain (a wrong reveal, or a leader
   that summed one thing and committed another, fails here).

Any failure is an AggregateRejected naming the round, its leader and what differed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from swarmnode.chain.models import RoundInfo, RoundStatus
from swarmnode.errors import AggregateRejected, RoundError
from swarmnode.node.secure import ATTEMPT, SecureAggregation
from swarmnode.privacy.audit import verify_sum
from swarmnode.privacy.encoding import decode_sum
from swarmnode.privacy.evidence import Evidence
from swarmnode.transport import serde

__all__ = ["RoundCheck", "check_round"]


@dataclass(frozen=True)
class RoundCheck:
    """A committed round that passed the check."""

    round: int
    leader: str
    digest: bytes
    summed: tuple[str, ...]  # the sites whose masked updates are in the sum
    dropouts: tuple[str, ...]  # mask-set sites that never checked in (their masks revealed)

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "leader": self.leader, "digest": self.digest.hex(),
                "summed": list(self.summed), "dropouts": list(self.dropouts), "ok": True}


def check_round(secure: SecureAggregation, info: RoundInfo, weights: Mapping[str, int],
                onchain: Mapping[str, bytes], evidence: bytes, start: bytes | None,
                spec: serde.ParamSpec) -> RoundCheck:
    """Check committed round ``info`` from its leader's ``evidence`` (bytes as fetched).
    ``weights`` and ``onchain``: each participant (lower-case) -> its check-in weight and the
    masked hash its check-in carries (chain events, SecureAggregation.checkins); ``start``: the
    digest of the latest round committed before it (chain; None: none was); ``spec``: the
    training's parameters (the models in the evidence must be of it)."""
    where = f"round {info.round} (leader {info.leader})"
    if info.status is not RoundStatus.COMMITTED or info.digest is None:
        raise RoundError(f"{where} is {info.status.value}, not committed: only a committed "
                         "round's sum can be checked")
    ev = Evidence.from_bytes(evidence, secure.size, f"{where}: the leader's evidence")
    if ev.round != info.round:
        raise AggregateRejected(f"{where}: the leader sent the evidence of round {ev.round}")
    if ev.digest != info.digest:
        raise AggregateRejected(
            f"{where}: the evidence states digest {ev.digest.hex()[:16]}..., the chain "
            f"committed {info.digest.hex()[:16]}...: not the sum of the committed model")
    if ev.first != (start is None):
        raise AggregateRejected(
            f"{where}: the leader encoded the round as one {'without' if ev.first else 'with'} "
            "a starting model, but the chain says otherwise")
    model_digest = serde.digest(ev.model)
    if model_digest != (info.digest if start is None else start):
        raise AggregateRejected(
            f"{where}: the model in the evidence (digest {model_digest.hex()[:16]}...) is not "
            f"the round's {'committed' if start is None else 'starting'} model on chain")
    held = serde.view_state(ev.model, spec=spec, reject_nonfinite=False)
    base = None if start is None else held
    roster = secure.roster(info.round)
    if roster is None:
        raise RoundError(f"{where}: its mask set is not fixed on chain; nothing to check")
    low = {p.lower(): p for p in roster}
    summed = sorted(p.lower() for p in info.participants if p.lower() in low)
    missing_hash = [s for s in summed if s not in onchain]
    if missing_hash:
        raise AggregateRejected(f"{where}: {missing_hash} checked in without a masked hash")
    hashes = {s: onchain[s] for s in summed}
    me = secure.me.lower()
    mine = [r for r in ev.reveals if r.revealer == me]
    if mine:
        want = secure.seeds(info.round, [low.get(r.missing, r.missing) for r in mine])
        want = {k.lower(): v for k, v in want.items()}
        for r in mine:
            if want.get(r.missing) != r.seed:
                raise AggregateRejected(
                    f"{where}: the evidence says this site revealed seed "
                    f"{r.seed.hex()[:12]}... for {r.missing}; its seed with that site is not "
                    "that: the leader used a reveal this site never gave")
    plan = secure.plan_for(base, roster)  # the round's ring, as its sites and leader chose it
    ring_sum = verify_sum(set(low), hashes, ev.masked, ev.reveals, plan, ev.ring_sum,
                          info.round, ATTEMPT)  # the evidence's own sum, if it states one
    weighted = decode_sum(ring_sum, plan)
    total = sum(int(weights[s]) for s in summed)
    merged = secure.unflatten(weighted / float(max(total, 1)), base, held)
    _, digest = serde.Encoded(merged).to_buffer()
    if digest != info.digest:
        raise AggregateRejected(
            f"{where}: the verified sum decodes to a model with digest {digest.hex()[:16]}..., "
            f"not the committed {info.digest.hex()[:16]}...: the leader committed a model "
            "other than the mean of the masked updates on chain")
    return RoundCheck(info.round, info.leader or "", info.digest, tuple(summed),
                      tuple(sorted(set(low) - set(summed))))
