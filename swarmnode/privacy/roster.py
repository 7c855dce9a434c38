"""The mask set of a round: which sites mask with each other, by a rule every site and the
leader compute the same way from the chain, before anyone checks in.

A site's check-in carries the hash of its masked update, so the set it masked for must be fixed
before the round's check-ins (the round's elected participants are known only after them). The
rule uses only what no later transaction can change while the round is open:

    M_r = the first K_r sites of the training's member list (join order, append-only), with
    K_r = max(min_peers, the number of members that joined before round r opened)

A site's ``joinedRound`` is the round that was open when it joined, so the members that joined
before round r opened are a prefix of the member list, and no later join adds to it (a join
during round r gets joinedRound >= r). The first ``min_peers`` members are likewise a prefix no
later join changes. So M_r is fixed as soon as the member list holds K_r sites; until then it is
not known (None) and nobody checks in. A site outside M_r (it joined while round r was open,
past the first ``min_peers``) takes round r's merged model without adding to it and is in the
mask set from round r + 1 on.

A member whose key (the registry's slot as the training copied it when the site joined: a later
``setPublicKey`` does not change it) is not a usable X25519 public key (``keys.usable_public``:
all zero, or a low-order point no pair key can be made with) is left out of M_r, in every round:
no site could mask with it, and one such member must not stop every honest site's check-in. It
still counts towards K_r (the prefix is the join order's, whatever the keys), so leaving it out
changes no other member's place. A training deployed with this version's contract refuses such a
key at ``join`` (``LowOrderMaskKey``, the same set), so no member of it holds one; the exclusion
here stays for trainings deployed before, whose ``join`` took any non-zero key.

Revoked, finished and absent members stay in the set (the rule must not change mid-round): they
never check in, so every survivor reveals its round seed with them (one seed each; nothing of
theirs is in the sum). A site that checked in but is not in M_r (a site not following the rule)
is left out of the sum: the masks of the sites in M_r cancel without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from swarmnode.errors import ConfigError
from swarmnode.privacy.keys import usable_public

__all__ = ["mask_set"]


def mask_set(members: Sequence[tuple[str, int, bytes | None]], round_number: int,
             min_peers: int) -> tuple[str, ...] | None:
    """M_r (sorted by address, lower-case compare) from ``members``: every member of the
    training in join order, as (address, the round open when it joined, the key it joined with
    or None). None while it is not fixed yet (fewer members than K_r)."""
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
        raise ConfigError(f"secure aggregation: round {round_number!r} must be a whole number "
                          ">= 1")
    if isinstance(min_peers, bool) or not isinstance(min_peers, int) or min_peers < 1:
        raise ConfigError(f"secure aggregation: min_peers {min_peers!r} must be >= 1")
    joined = [r for _, r, _ in members]
    if any(b < a for a, b in zip(joined, joined[1:], strict=False)):
        raise ConfigError("secure aggregation: the member list is not in join order (a "
                          "member's joined round is lower than an earlier member's)")
    before = sum(1 for r in joined if r < round_number)
    k = max(min_peers, before)
    if len(members) < k:
        return None
    return tuple(sorted((a for a, _, key in members[:k] if usable_public(key)), key=str.lower))
