"""Secure aggregation, the pure core: the round's leader learns only the sum of the updates.

The round engine runs it (:mod:`swarmnode.node.secure`); a node without a data plane, which
carries the seed reveals, refuses it (:func:`swarmnode.privacy.guards.refuse_until_wired`). One
concept per module:

- :mod:`~swarmnode.privacy.ring`: the ring Z_{2^k}, its width and the encoding's error bound;
- :mod:`~swarmnode.privacy.encoding`: clip, weight, fixed point with stochastic rounding; decode;
- :mod:`~swarmnode.privacy.keys`: per-training X25519 keys, pair keys (HKDF), round seeds (HMAC);
- :mod:`~swarmnode.privacy.masks`: pairwise masks from AES-256-CTR, which cancel in the sum;
- :mod:`~swarmnode.privacy.roster`: the round's mask set, fixed from the chain before check-ins;
- :mod:`~swarmnode.privacy.dropout`: what a survivor reveals for a site that never checked in;
- :mod:`~swarmnode.privacy.aggregate`: the leader's sum, unmasking, decoding and bound check;
- :mod:`~swarmnode.privacy.wire`: a masked update's canonical bytes (the pushed payload) and hash;
- :mod:`~swarmnode.privacy.audit`: any member's check that the sum matches the hashed updates;
- :mod:`~swarmnode.privacy.guards`: the spec rules and the refusal where it is not wired.

Submodules are imported by name (``from swarmnode.privacy import masks``): the training spec
needs only the guards, not the cryptography.
"""
