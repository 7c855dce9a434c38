"""One site's secure aggregation over a training: its key, the round's mask set, its masked
update, the masked updates and seed reveals its leader receives, and the leader's sum.

The pure rules live in :mod:`swarmnode.privacy` (ring, encoding, keys, masks, dropout,
aggregate, wire, roster); the round's decisions in :mod:`swarmnode.node.machine`; this module
holds the state between them and the chain reads they need.

- Key: one X25519 key per site (``secagg.key`` in the site's data folder, 0600), posted in the
  registry's per-site key slot. Several trainings share a registry and the slot: the pair keys
  are bound to the training (chain id, training address and both site addresses in the HKDF
  context), so each training's seeds differ, and only per-round pair seeds are ever revealed.
  The training copies the slot when the site joins (``maskKeyOf``): pair keys come from that
  copy only, so a key posted again later changes nothing for a running training; a member whose
  copy is no usable key is out of every mask set (privacy.roster).
- What is masked: the flattened floating tensors (sorted by name) of the site's update minus
  the model the round starts from (the latest committed one); before any commit, the parameters
  themselves, in 16 fractional bits and bounded by the widest clip the ring then holds rather
  than ``clip_norm`` (the first round has no common starting model, as in a plain ``mean``,
  which merges it unclipped).
  Tensors that are not floating point are not summed: the merged model takes the starting
  model's (the leader's own before any commit).
- Seeds are those of attempt 0 of the round: the check-in fixes the masked update (its hash is
  on chain), and a re-elected leader receives the same vector. A site masks one vector per round
  (cached): the same seeds never mask two different vectors; a site that restarted after its
  check-in and no longer holds the vector it checked in with pushes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swarmnode.chain.client import SwarmContract
from swarmnode.errors import (
    AggregateRejected,
    ConfigError,
    IdentityError,
    PayloadRejected,
    PeerRefused,
    RoundAbandoned,
    RoundError,
)
from swarmnode.privacy import (
    accountant,
    dropout,
    encoding,
    guards,
    keys,
    masks,
    noise,
    ring,
    roster,
    wire,
)
from swarmnode.privacy import aggregate as agg
from swarmnode.privacy.evidence import Evidence
from swarmnode.transport import serde
from swarmnode.types import StateDict

__all__ = ["KEY_FILE", "MASKED", "SecureAggregation", "load_or_make_key", "masked_params"]

log = logging.getLogger("swarmnode.node")

KEY_FILE = "secagg.key"
MASKED = "secagg.masked"  # the one tensor of a pushed masked update (int64: the ring's bits)
ATTEMPT = 0  # seeds of attempt 0: one masked vector per round (see the module docstring)
EVIDENCE_DIR = "secagg-evidence"  # in the data folder: the summed rounds' evidence (a leader's)
KEEP_EVIDENCE = 8  # summed rounds whose evidence a leader keeps (the newest)


def load_or_make_key(data_dir: Path) -> keys.SiteKey:
    """This site's secure-aggregation key from ``data_dir``, made (0600) the first time."""
    path = Path(data_dir) / KEY_FILE
    if path.exists():
        raw = path.read_bytes()
        try:
            return keys.SiteKey.from_private_bytes(raw)
        except IdentityError:
            raise IdentityError(f"{path} is not a 32-byte X25519 private key; remove it to make "
                                "a new one (the site then posts the new public key; a "
                                "training it already joined keeps the key of its join, and "
                                "its node refuses to start without that one)") from None
    key = keys.SiteKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes())
    return key


def _floating(params: Mapping[str, tuple[tuple[int, ...], str]]) -> list[tuple[str, int]]:
    """(name, element count) of the floating tensors, sorted by name: the masked layout."""
    out = []
    for name in sorted(params):
        shape, dtype = params[name]
        if getattr(torch, dtype).is_floating_point:
            out.append((name, math.prod(shape)))
    return out


def masked_params(params: Mapping[str, tuple[tuple[int, ...], str]]
                  ) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layout of a pushed masked update: one int64 vector, an element per floating one."""
    n = sum(c for _, c in _floating(params))
    if n == 0:
        raise ConfigError("secure aggregation needs a model with floating-point parameters")
    return {MASKED: ((n,), "int64")}


# A round with no starting model encodes the parameters whole (privacy.ring: the rule; the
# spec guard refuses a max_weight that leaves it no room)
FIRST_FRACTION_BITS = ring.FIRST_FRACTION_BITS
first_round_clip = ring.first_round_clip


@dataclass
class _Mine:
    vector: np.ndarray
    hash: bytes


# dtypes numpy reads from a torch tensor's memory as is (flatten, unflatten: no float64 copies
# through torch; the same IEEE arithmetic, so the same bits)
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


class _PairMasks:
    """A round's sum of this site's pair masks (masks.pair_masks), made by a thread of its own
    as soon as the round's mask set is fixed: it does not depend on the update, so the check-in
    waits only for the encoding, one addition and the hash."""

    def __init__(self, peers: tuple[str, ...]) -> None:
        self.peers = peers  # the other sites of the mask set it was made for
        self.done = threading.Event()
        self.total: np.ndarray | None = None  # None once done: it failed (made again inline)


class SecureAggregation:
    """A site's secure aggregation in one training (thread-safe: the round loop and the peer
    API's threads share it)."""

    def __init__(self, me: str, chain: SwarmContract, key: keys.SiteKey,
                 params: Mapping[str, tuple[tuple[int, ...], str]], *, clip: float,
                 weight_cap: int, min_peers: int, evidence_dir: Path | None = None) -> None:
        """``evidence_dir``: where a leader keeps its summed rounds' evidence (the newest
        KEEP_EVIDENCE; None: kept nowhere, and members cannot check its sums)."""
        self.me, self.chain, self.key = me, chain, key
        self.evidence_dir = evidence_dir
        self.params = dict(params)
        self.layout = _floating(self.params)
        self.size = sum(c for _, c in self.layout)
        self.min_peers = min_peers
        self.plan = ring.plan(ring.MAX_SITES, weight_cap, clip)
        self.first_plan = ring.plan(ring.MAX_SITES, weight_cap, first_round_clip(weight_cap),
                                    fraction_bits=FIRST_FRACTION_BITS)
        self._lock = threading.Lock()
        self._chain_id: int | None = None
        self._rosters: dict[int, tuple[str, ...]] = {}
        self._pair: dict[tuple[str, bytes], bytes] = {}  # (peer, its public key) -> pair key
        self._joined: dict[str, bytes] = {}  # site (lower-case) -> the key it joined with
        self._mine: dict[int, _Mine] = {}
        self._pair_masks: dict[int, _PairMasks] = {}  # round -> its pair masks, made ahead
        self._plans: dict[int, ring.RingPlan] = {}  # round -> the plan its vectors use
        self._received: dict[int, dict[str, np.ndarray]] = {}
        self._reveals: dict[int, dict[str, list[dropout.SeedReveal]]] = {}
        self._hashes: dict[int, dict[str, bytes]] = {}
        # distributed noise (privacy.noise; the spec's, set by the node): each masked vector
        # carries this site's share; the rounds' epsilon this site saw (privacy.accountant)
        self.noise: noise.DistributedNoise | None = None
        self._ledger: dict[int, accountant.RoundNoise] = {}
        self._closed: dict[int, tuple[dict[str, int], dict[str, bytes]]] = {}  # checkins()
        self._own_hash: dict[int, bytes] = {}  # round -> this site's hash as read from chain
        self._checkin_block: dict[int, int] = {}  # round -> the block of this site's check-in
        self._summed: dict[int, tuple[dict[str, np.ndarray], list[dropout.SeedReveal],
                                      np.ndarray]] = {}  # round -> what the leader summed

    # -- keys -------------------------------------------------------------------------------------
    def publish_key(self) -> None:
        """Post this site's public key in the registry's slot unless it is there already."""
        registry = self.chain.registry
        if registry.site(self.me).public_key != self.key.public_bytes:
            registry.set_public_key(self.key.public_bytes)
            log.info("posted this site's secure-aggregation key in the registry")

    def check_joined_key(self) -> None:
        """After the join: the key the training holds for this site must be this site's (its
        pair keys are made from it). IdentityError saying what to do otherwise."""
        held = self.joined_key(self.me)
        if held != self.key.public_bytes:
            what = "no key" if held is None else f"key {held.hex()[:16]}..."
            raise IdentityError(
                f"secure aggregation: {self.me} joined training {self.chain.address} with "
                f"{what}, not this site's secagg.key; pair keys are made from the key of the "
                "join: restore the secagg.key the site joined with, or leave this training")

    def joined_key(self, site: str) -> bytes | None:
        """The key ``site`` joined the training with (the contract's copy: fixed once joined,
        so cached; a site that has not joined yet is read again)."""
        with self._lock:
            if site.lower() in self._joined:
                return self._joined[site.lower()]
        key = self.chain.mask_key(site)
        if key is not None:
            with self._lock:
                self._joined[site.lower()] = key
        return key

    def _pair_key(self, peer: str) -> bytes:
        public = self.joined_key(peer)
        if not keys.usable_public(public):
            raise RoundError(f"secure aggregation: {peer} joined with no usable key; it is in "
                             "no mask set (privacy.roster) and has no pair key")
        assert public is not None
        with self._lock:
            cached = self._pair.get((peer.lower(), public))
        if cached is not None:
            return cached
        if self._chain_id is None:
            self._chain_id = self.chain.chain_id()
        pair = keys.pair_key(self.key, public, chain_id=self._chain_id,
                             training=self.chain.address, me=self.me, peer=peer)
        with self._lock:
            self._pair[(peer.lower(), public)] = pair
        return pair

    def seeds(self, round: int, peers: Collection[str]) -> dict[str, bytes]:
        """This round's pair seed with each of ``peers``."""
        return {p: keys.round_seed(self._pair_key(p), round, ATTEMPT) for p in peers
                if p.lower() != self.me.lower()}

    # -- the mask set -----------------------------------------------------------------------------
    def roster(self, round: int) -> tuple[str, ...] | None:
        """The round's mask set (privacy.roster); None while it is not fixed."""
        with self._lock:
            held = self._rosters.get(round)
        if held is not None:
            return held
        members = [(n.address, n.enrolled_round, self.joined_key(n.address))
                   for n in self.chain.nodes()]
        got = roster.mask_set(members, round, self.min_peers)
        if got is not None:
            with self._lock:
                self._rosters = {r: v for r, v in self._rosters.items() if r >= round - 2}
                self._rosters[round] = got
            self._prepare_masks(round, got)
        return got

    def prepare_ahead(self) -> None:
        """Fix the mask set of the round open now and start making this site's pair masks for
        it, in a thread (the node calls it when a round is over, while its trainer trains for
        the next one). Nothing when the round's set is not fixed yet or it is masked already."""
        def run() -> None:
            try:
                self.roster(self.chain.current_round())
            except Exception as exc:  # noqa: BLE001 - only ahead of time: the check-in reads it
                log.debug("the next round's mask set is not read ahead: %s", exc)

        threading.Thread(target=run, daemon=True, name="secagg-ahead").start()

    def _prepare_masks(self, round: int, roster_: Collection[str]) -> None:
        """Start making ``round``'s pair masks (one uint64 vector) when this site is in its
        mask set and has not masked it or a later round yet; older rounds' are dropped."""
        if self.me not in roster_:
            return
        peers = tuple(sorted(p for p in roster_ if p != self.me))
        if not peers:
            return
        job = _PairMasks(peers)
        with self._lock:
            if any(r >= round for r in self._mine) or any(r >= round for r in self._pair_masks):
                return
            self._pair_masks = {round: job}
        threading.Thread(target=self._make_masks, args=(round, job), daemon=True,
                         name=f"secagg-masks-{round}").start()

    def _make_masks(self, round: int, job: _PairMasks) -> None:
        try:
            job.total = masks.pair_masks(self.size, self.me, self.seeds(round, job.peers))
        except Exception as exc:  # noqa: BLE001 - made again (and raised) at the check-in
            log.warning("round %d: could not make the pair masks ahead (%s); they are made "
                        "at the check-in", round, exc)
        finally:
            job.done.set()

    def _masks_for(self, round: int, peers: list[str]) -> np.ndarray:
        """``round``'s pair masks with ``peers``: the ones made ahead (waited for), else made
        now. Taken once: the same seeds never mask a second vector."""
        with self._lock:
            job = self._pair_masks.pop(round, None)
        if job is not None and job.peers == tuple(sorted(peers)):
            job.done.wait()
            if job.total is not None:
                return job.total
        return masks.pair_masks(self.size, self.me, self.seeds(round, peers))

    def plan_for(self, base: StateDict | None) -> ring.RingPlan:
        return self.plan if base is not None else self.first_plan

    # -- a member's masked update -----------------------------------------------------------------
    def flatten(self, state: Mapping[str, torch.Tensor], base: StateDict | None) -> np.ndarray:
        """The change from ``base`` (the parameters whole when None) as one float64 vector."""
        out = np.empty(self.size, dtype=np.float64)
        at = 0
        for name, count in self.layout:
            dst = out[at: at + count]
            at += count
            a = state[name].detach().reshape(-1)
            b = None if base is None else base[name].detach().reshape(-1)
            if a.device.type == "cpu" and a.dtype in _NUMPY_FLOATS and (
                    b is None or (b.device.type == "cpu" and b.dtype in _NUMPY_FLOATS)):
                if b is None:
                    np.copyto(dst, a.numpy())
                else:  # in float64, as the torch path below
                    np.subtract(a.numpy(), b.numpy(), out=dst, dtype=np.float64)
                continue
            t = a.to(torch.float64)
            if b is not None:
                t = t - b.to(torch.float64)
            dst[:] = t.cpu().numpy()
        return out

    def masked(self, round: int, state: Mapping[str, torch.Tensor], weight: int,
               base: StateDict | None, roster_: Collection[str]) -> tuple[np.ndarray, bytes]:
        """This site's masked update for ``round`` and its hash: made once per round (the same
        seeds never mask a second vector)."""
        with self._lock:
            held = self._mine.get(round)
        if held is not None:
            return held.vector, held.hash
        plan = self.plan_for(base)
        change = self.flatten(state, base)
        seed = int.from_bytes(hashlib.sha256(
            b"swarmnode-secagg/1 rounding" + keys.address_bytes(self.chain.address)
            + keys.address_bytes(self.me) + round.to_bytes(8, "big")).digest()[:16], "big")
        if weight == 0:  # adds nothing, but its masks must cancel the others'
            values = np.zeros(self.size, dtype=np.uint64)
        else:
            encoded = encoding.encode(change, weight, plan, seed)
            values = encoded.values
            if encoded.clipped:
                log.info("round %d: the update's change (norm %.4g) was clipped to %g", round,
                         encoded.norm, plan.clip)
        if self.noise is not None and base is not None:  # a weight-0 site adds its share too
            rng = noise.generator(self.key.private_bytes(), keys.address_bytes(
                self.chain.address), keys.address_bytes(self.me), round)
            values += noise.share(self.noise, plan, self.size, len(roster_), rng)
        values += self._masks_for(round, [p for p in roster_ if p != self.me])
        if plan.ring_bits < 64:  # as masks.mask_update: the same bits
            values &= plan.modulus_mask
        vector = values
        digest = wire.update_hash(vector, plan)
        with self._lock:
            self._mine = {r: m for r, m in self._mine.items() if r >= round - 1}
            self._mine.setdefault(round, _Mine(vector, digest))
            return self._mine[round].vector, self._mine[round].hash

    def held(self, round: int) -> tuple[np.ndarray, bytes] | None:
        with self._lock:
            m = self._mine.get(round)
        return None if m is None else (m.vector, m.hash)

    @staticmethod
    def payload(vector: np.ndarray) -> serde.Buffer:
        """The pushed bytes: safetensors of one int64 tensor holding the ring elements (read
        from ``vector`` itself: a held masked vector is never changed in place)."""
        return serde.encode({MASKED: torch.from_numpy(vector.view(np.int64))})

    # -- the leader: masked updates and reveals ---------------------------------------------------
    def hashes(self, round: int, refresh: bool = False) -> dict[str, bytes]:
        """site (lower-case) -> the masked hash it checked in with for ``round`` (chain)."""
        with self._lock:
            held = self._hashes.get(round)
        if held is None or refresh:
            held = {k.lower(): v for k, v in self.chain.masked_hashes(round).items()}
            with self._lock:
                self._hashes = {r: h for r, h in self._hashes.items() if r >= round - 1}
                self._hashes[round] = held
        return held

    def receive(self, round: int, sender: str, state: StateDict, plan: ring.RingPlan) -> None:
        """A member's masked update: kept once its hash is the one its check-in carries."""
        tensor = state.get(MASKED)
        if tensor is None or len(state) != 1:
            raise PayloadRejected(f"round {round}: {sender} sent no masked update (a training "
                                  "with secure aggregation takes only those)")
        vector = tensor.numpy().view(np.uint64).copy()
        onchain = self.hashes(round).get(sender.lower()) or self.hashes(round, True).get(
            sender.lower())
        if onchain is None:
            raise PeerRefused(f"round {round}: {sender} checked in without a masked update's "
                              "hash; its update is refused")
        if wire.update_hash(vector, plan) != onchain:
            raise PayloadRejected(f"round {round}: the masked update of {sender} does not match "
                                  "the hash its check-in carries on chain; refused")
        with self._lock:
            got = self._received.setdefault(round, {})
            if sender.lower() in got:
                from swarmnode.errors import DuplicateUpdate
                raise DuplicateUpdate(f"round {round}: {sender}'s masked update is already in")
            got[sender.lower()] = vector
            self._received = {r: v for r, v in self._received.items() if r >= round - 1}

    def senders(self, round: int) -> frozenset[str]:
        with self._lock:
            return frozenset(self._received.get(round, {}))

    def add_reveals(self, round: int, revealer: str, reveals: list[dropout.SeedReveal]) -> None:
        with self._lock:
            self._reveals.setdefault(round, {})[revealer.lower()] = reveals
            self._reveals = {r: v for r, v in self._reveals.items() if r >= round - 1}

    def revealed(self, round: int) -> frozenset[str]:
        with self._lock:
            return frozenset(self._reveals.get(round, {}))

    def reveal(self, round: int, roster_: Collection[str],
               checked_in: Collection[str]) -> list[dropout.SeedReveal]:
        """This site's reveals for ``round``: its seed with each roster site that never checked
        in (dropout.reveal_seeds refuses anything else)."""
        lower = {p.lower(): p for p in roster_}
        missing = [p for p in lower if p not in {c.lower() for c in checked_in}]
        seeds = {p: keys.round_seed(self._pair_key(lower[p]), round, ATTEMPT) for p in missing}
        return dropout.reveal_seeds(self.me.lower(), lower, [c.lower() for c in checked_in
                                                            if c.lower() in lower],
                                    round, ATTEMPT, seeds)

    def answer_reveal(self, round: int, caller: str, participants: Collection[str],
                      leader: str | None, elected: bool) -> list[dropout.SeedReveal]:
        """A reveal request from ``caller``: answered only to the round's elected leader, once
        the check-ins are closed, and only with seeds for sites that never checked in."""
        if not elected:
            raise RoundError(f"round {round}: its check-ins are not closed (not elected); no "
                             "seed is revealed before")
        if leader is None or caller.lower() != leader.lower():
            raise PeerRefused(f"round {round}: {caller} asked for seed reveals but is not the "
                              f"round's elected leader ({leader}); refused")
        if self.me.lower() not in {p.lower() for p in participants}:
            raise RoundError(f"round {round}: this site did not check in; it reveals nothing")
        roster_ = self.roster(round)
        if roster_ is None:
            raise RoundError(f"round {round}: its mask set is not fixed; nothing to reveal")
        return self.reveal(round, roster_, participants)

    def aggregate(self, round: int, roster_: Collection[str], weights: Mapping[str, int],
                  plan: ring.RingPlan) -> agg.Aggregate:
        """The leader's sum of the checked-in roster sites' masked updates (its own included),
        the dropouts' masks removed with the survivors' reveals, decoded and bound-checked.
        Weight-0 sites push a masked zero: in the sum (their masks cancel), not in the total
        weight. Fewer than MIN_SITES sites with weight (but some): abandoned, since the sum of
        two updates gives each away; none: the mean change is zero."""
        low = {p.lower() for p in roster_}
        w = {p.lower(): int(v) for p, v in weights.items() if p.lower() in low}
        with self._lock:
            received = dict(self._received.get(round, {}))
            reveals = [r for rs in self._reveals.get(round, {}).values() for r in rs]
            mine = self._mine.get(round)
        if mine is not None:
            received[self.me.lower()] = mine.vector
        masked = {s: v for s, v in received.items() if s in w}
        where = f"round {round}"
        for site, weight in w.items():
            if not 0 <= weight <= plan.weight_cap:
                raise AggregateRejected(f"{where}: {site}'s weight {weight} is outside "
                                        f"0..{plan.weight_cap} (the spec's max_weight)")
        adding = sorted(s for s, v in w.items() if v > 0)
        if 0 < len(adding) < guards.MIN_SITES:
            raise RoundAbandoned(
                f"{where} is abandoned: only {len(adding)} sites add weight and secure "
                f"aggregation needs at least {guards.MIN_SITES} (the sum of two gives each "
                "away); nothing is revealed, the next round goes on")
        ring_sum = agg.unmasked_sum(low, w.keys(), masked, reveals, plan, round, ATTEMPT)
        with self._lock:  # the evidence, kept once the merged model's digest is known
            self._summed = {r: v for r, v in self._summed.items() if r >= round - 1}
            self._summed[round] = (masked, reveals, ring_sum)
        weighted = encoding.decode_sum(ring_sum, plan)
        total = sum(w.values())
        if total:
            agg.check_bound(weighted, total, len(adding), plan, where,
                            noise=self._noise_bound(plan, len(w), len(low)))
        if self.noise is not None:
            self.account(round, w, plan is self.plan)
        return agg.Aggregate(ring_sum, weighted, max(total, 1), tuple(sorted(w)),
                             tuple(sorted(low - set(w))))

    # -- the evidence of a summed round (privacy.evidence) -----------------------------------------
    def _evidence_path(self, round: int) -> Path:
        assert self.evidence_dir is not None
        return self.evidence_dir / f"round-{round}.safetensors"

    def keep_evidence(self, round: int, digest: bytes, model: bytes, first: bool) -> None:
        """The leader: keep what it summed for ``round`` (aggregate's parts) with the digest of
        the model it made of them and ``model`` (the starting model's bytes; ``first``: there
        was none, the merged model's), on disk, the newest KEEP_EVIDENCE rounds. Written by a
        thread of its own, off the commit's path (served once the file is in place)."""
        with self._lock:
            parts = self._summed.pop(round, None)
        if parts is None or self.evidence_dir is None:
            return
        evidence = Evidence(round, first, digest, parts[2], parts[0], parts[1], bytes(model))
        threading.Thread(target=self._write_evidence, args=(evidence,), daemon=True,
                         name=f"evidence-{round}").start()

    def _write_evidence(self, evidence: Evidence) -> None:
        assert self.evidence_dir is not None
        try:
            self.evidence_dir.mkdir(parents=True, exist_ok=True)
            path = self._evidence_path(evidence.round)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(evidence.to_bytes())
            os.replace(tmp, path)
            kept = sorted((int(p.stem.split("-", 1)[1]), p)
                          for p in self.evidence_dir.glob("round-*.safetensors")
                          if p.stem.split("-", 1)[1].isdigit())
            for _, old in kept[:-KEEP_EVIDENCE]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("round %d: could not keep the evidence of the sum in %s: %s; members "
                        "cannot check this round", evidence.round, self.evidence_dir, exc)

    def evidence(self, round: int) -> bytes | None:
        """The bytes of ``round``'s evidence if this node summed it and still keeps it."""
        if self.evidence_dir is None:
            return None
        try:
            return self._evidence_path(round).read_bytes()
        except FileNotFoundError:
            return None

    def evidence_digest(self, data: bytes) -> bytes:
        """The digest the leader committed, as the evidence ``data`` states it."""
        return Evidence.from_bytes(data, self.size, "this node's evidence").digest

    def checkins(self, round: int) -> tuple[dict[str, int], dict[str, bytes]]:
        """A closed round's check-ins from its events, in one read (kept: they are final):
        site (lower-case) -> weight, and site -> the masked hash it checked in with."""
        with self._lock:
            held = self._closed.get(round)
        if held is not None:
            return held
        weights: dict[str, int] = {}
        hashes: dict[str, bytes] = {}
        for e in self.chain.events(names={"CheckedIn", "MaskedUpdate"},
                                   round_topic="0x" + round.to_bytes(32, "big").hex()):
            site = str(e.args["node"]).lower()
            if e.name == "CheckedIn":
                weights.setdefault(site, int(e.args["weight"]))
            else:
                hashes.setdefault(site, bytes(e.args["hash"]))
        with self._lock:
            self._closed[round] = (weights, hashes)
            for old in sorted(self._closed)[:-KEEP_EVIDENCE]:
                del self._closed[old]
        return weights, hashes

    # -- a member: its own check-in's hash --------------------------------------------------------
    def note_checkin(self, round: int, block: int) -> None:
        """This site's check-in for ``round`` was mined in ``block`` (its hash's event is there)."""
        with self._lock:
            self._checkin_block = {r: b for r, b in self._checkin_block.items()
                                   if r >= round - 1}
            self._checkin_block[round] = block

    def own_hash(self, round: int) -> bytes | None:
        """The masked hash this site checked in with for ``round`` (chain): read from the block
        of its check-in when known (not from the deployment on), kept once found."""
        with self._lock:
            held = self._own_hash.get(round)
            since = self._checkin_block.get(round)
        if held is not None:
            return held
        got = {k.lower(): v for k, v in
               self.chain.masked_hashes(round, from_block=since).items()}.get(self.me.lower())
        if got is not None:
            with self._lock:
                self._own_hash = {r: h for r, h in self._own_hash.items() if r >= round - 1}
                self._own_hash[round] = got
        return got

    # -- distributed noise: the bound the sum keeps, the epsilon it gives -------------------------
    def _noise_bound(self, plan: ring.RingPlan, shares: int, expected: int) -> float:
        """The sum's noise norm bound (ring units) with ``shares`` of ``expected`` shares."""
        if self.noise is None or plan is not self.plan:
            return 0.0
        sigma = noise.sigma(self.noise, plan, self.size) * math.sqrt(shares / expected)
        return noise.sum_noise_bound(sigma, self.size)

    def accounted(self, round: int) -> bool:
        with self._lock:
            return round in self._ledger

    def account(self, round: int, weights: Mapping[str, int], covered: bool
                ) -> accountant.RoundEpsilon | None:
        """Log ``round``'s epsilon (once; None without noise or a fixed mask set): the noise its
        sum carried from the checked-in sites of the mask set (``weights``: every participant
        -> its weight) and the total over the rounds this site saw."""
        if self.noise is None:
            return None
        roster_ = self.roster(round)
        if roster_ is None:
            return None
        got = noise.round_noise(round, roster_, weights, self.noise, self.plan, self.size,
                                covered)
        with self._lock:
            fresh = round not in self._ledger
            self._ledger[round] = got
            ledger = list(self._ledger.values())
        summary = accountant.summarise(ledger, self.noise.delta)
        this = next(r for r in summary.rounds if r.round == round)
        if fresh:
            log.info("%s; %s (the rounds this site saw)", this.line(), summary.line())
        return this

    def unflatten(self, mean: np.ndarray, base: StateDict | None,
                  own: Mapping[str, torch.Tensor], *,
                  divide: float | None = None) -> dict[str, torch.Tensor]:
        """The merged model: ``base`` + the mean change (the mean itself without a base), in the
        spec's dtypes; tensors that are not floating point from ``base`` (else ``own``).
        ``divide``: ``mean`` is a weighted sum, divided by it here piece by piece (the same
        bits as dividing the whole vector first, without that float64 copy)."""
        out: dict[str, torch.Tensor] = {}
        at = 0
        counts = dict(self.layout)
        tmp = np.empty(min(encoding.CHUNK, max(counts.values(), default=0)))
        for name in sorted(self.params):
            shape, dtype = self.params[name]
            target = getattr(torch, dtype)
            if name not in counts:
                src = base if base is not None else own
                out[name] = src[name].detach().clone()
                continue
            n = counts[name]
            change = mean[at: at + n]
            at += n
            b = None if base is None else base[name].detach()
            if target in (torch.float32, torch.float64) and (
                    b is None or (b.device.type == "cpu" and b.dtype in _NUMPY_FLOATS)):
                # straight into the tensor: float64 arithmetic, one rounding to the dtype (as
                # the torch path below)
                t = torch.empty(shape, dtype=target)
                dst = t.numpy().reshape(-1)
                flat_b = None if b is None else b.reshape(-1).numpy()
                for start in range(0, n, encoding.CHUNK):
                    piece = change[start: start + encoding.CHUNK]
                    end = start + piece.shape[0]
                    if divide is not None:
                        piece = np.divide(piece, divide, out=tmp[: piece.shape[0]])
                    if flat_b is None:
                        np.copyto(dst[start: end], piece, casting="unsafe")
                    else:
                        np.add(flat_b[start: end], piece, out=dst[start: end],
                               dtype=np.float64, casting="unsafe")
                out[name] = t
                continue
            if divide is not None:
                change = change / divide
            part = torch.from_numpy(change.copy()).reshape(shape)
            if b is not None:
                part = b.to(torch.float64) + part
            out[name] = part.to(target).contiguous()
        return out
