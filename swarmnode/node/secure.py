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
- The ring (privacy.ring.round_plan, from public data: the spec, the round's mask set, whether a
  model was committed before the round): the narrow 2^32 ring (4 bytes per parameter, fraction
  bits from the mask set's size) for a round with a starting model and no distributed noise,
  else the wide 2^64 ring. The site, the leader and an auditor each derive it (plan_for).
- Seeds are those of attempt 0 of the round: the check-in fixes the masked update (its hash is
  on chain), and a re-elected leader receives the same vector. A site masks one vector per round
  (cached): the same seeds never mask two different vectors; a site that restarted after its
  check-in and no longer holds the vector it checked in with pushes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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

__all__ = ["KEY_FILE", "MASKED", "SecureAggregation", "load_or_make_key", "masked_params",
           "masked_spec"]

log = logging.getLogger("swarmnode.node")

KEY_FILE = "secagg.key"
MASKED = wire.FORMAT  # the one tensor of a pushed masked update (int32 / int64: the ring's)
ATTEMPT = 0  # seeds of attempt 0: one masked vector per round (see the module docstring)
EVIDENCE_DIR = "secagg-evidence"  # in the data folder: the summed rounds' evidence (a leader's)
KEEP_EVIDENCE = 8  # summed rounds whose evidence a leader keeps (the newest)
# blocks read again below where the last MaskedUpdate read stopped (SecureAggregation.hashes):
# an event of a block the node read just as it was replaced (a short reorg) is read again
REREAD_BLOCKS = 16


def _background() -> None:
    """Lower the calling thread's CPU priority to the lowest (Linux: a thread is a task of its
    own to setpriority; elsewhere nothing): for work off the round's path."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class _DirectFile:
    """A new file written past the page cache (Linux O_DIRECT, through one aligned buffer;
    elsewhere, or on a filesystem that refuses it, an ordinary file): a leader's evidence is
    some 8 bytes per parameter per summed site each round, and filling the page cache with it
    costs several times the CPU of the write itself (measured here: 800 MB took 1.3-2 CPU-s
    buffered, 0.13 s direct). Only ``write`` (file-like) and the context manager."""

    BLOCK = 4096  # the alignment O_DIRECT wants (buffer, offsets, lengths)
    SIZE = 8 << 20  # bytes per write

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
        except OSError:  # tmpfs and others: no direct I/O
            self.fd = os.open(path, flags, 0o600)
        self.buf = mmap.mmap(-1, self.SIZE)  # page-aligned
        self.view = memoryview(self.buf)
        self.fill = 0  # bytes waiting in buf
        self.size = 0  # bytes written to the file

    def write(self, data: bytes | memoryview) -> int:
        src = memoryview(data).cast("B")
        at = 0
        while at < len(src):
            k = min(len(src) - at, self.SIZE - self.fill)
            self.view[self.fill: self.fill + k] = src[at: at + k]
            self.fill += k
            at += k
            if self.fill == self.SIZE:
                self._flush(self.SIZE)
        return len(src)

    def _flush(self, length: int) -> None:
        done = 0
        while done < length:
            done += os.pwrite(self.fd, self.view[done: length], self.size + done)
        self.size += length
        self.fill = 0

    def __enter__(self) -> _DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None and self.fill:  # the tail, padded to a block, then cut back
                real = self.size + self.fill
                padded = self.fill + (-self.fill % self.BLOCK)
                self.view[self.fill: padded] = bytes(padded - self.fill)
                self._flush(padded)
                os.ftruncate(self.fd, real)
        finally:
            os.close(self.fd)
            self.view.release()
            self.buf.close()


_T = TypeVar("_T")


def _recent(held: dict[int, _T], round: int) -> dict[int, _T]:
    """``held`` without the rounds before ``round - 1``: what a node keeps per round (this
    round's and the one before, for a late push or reveal of it), one rule for every such map."""
    return {r: v for r, v in held.items() if r >= round - 1}


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


def masked_params(params: Mapping[str, tuple[tuple[int, ...], str]], ring_bits: int = 64
                  ) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layout of a pushed masked update: one vector, an element per floating one (int32 in
    the narrow ring, int64 in the wide one)."""
    n = sum(c for _, c in _floating(params))
    if n == 0:
        raise ConfigError("secure aggregation needs a model with floating-point parameters")
    return wire.params(n, ring_bits)


def masked_spec(params: Mapping[str, tuple[tuple[int, ...], str]]) -> wire.MaskedSpec:
    """What a pushed masked update may look like (either ring's width: the leader checks the
    round's)."""
    return wire.MaskedSpec(next(iter(masked_params(params).values()))[0][0])


# A round with no starting model encodes the parameters whole (privacy.ring: the rule; the
# spec guard refuses a max_weight that leaves it no room)
FIRST_FRACTION_BITS = ring.FIRST_FRACTION_BITS
first_round_clip = ring.first_round_clip


class _Vector:
    """A masked vector in a pushable payload of its own (its canonical bytes, privacy.wire: one
    int32 or int64 tensor, MASKED): ``vector`` views the tensor's bytes as the ring's type
    (uint32 / uint64), so pushing it copies nothing, and the payload's digest is the vector's
    hash (wire.update_hash)."""

    def __init__(self, params: Mapping[str, tuple[tuple[int, ...], str]],
                 dtype: type[np.unsignedinteger]) -> None:
        bits = 8 * np.dtype(dtype).itemsize
        self.buf, views = serde.ParamSpec(masked_params(params, bits)).allocate()
        self.vector = views[MASKED].numpy().view(dtype)


@dataclass
class _Mine:
    vector: np.ndarray
    hash: bytes  # wire.update_hash(vector): the SHA-256 of made.buf, the pushed payload
    made: _Vector  # the pushed bytes (made.buf): ``vector`` is a view of their tensor


class _Running:
    """A leader's running sum of a round's masked vectors (modulo 2^64), as they arrive."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: _Vector | None = None  # the sum, in a reused buffer
        self.sites: set[str] = set()  # whose vectors are in it (lower-case)
        self.sealed = False  # aggregate read it: nothing more is added


# dtypes numpy reads from a torch tensor's memory as is (flatten, unflatten: no float64 copies
# through torch; the same IEEE arithmetic, so the same bits)
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


class _PairMasks:
    """A round's sum of this site's pair masks (masks.pair_masks), made by a thread of its own
    as soon as the round's mask set is fixed: it does not depend on the update, so the check-in
    waits only for the encoding, one addition and the hash."""

    def __init__(self, peers: tuple[str, ...], dtype: type[np.unsignedinteger]) -> None:
        self.peers = peers  # the other sites of the mask set it was made for
        self.dtype = dtype  # the ring's type it was made in (the round's plan, as foreseen)
        self.done = threading.Event()
        self.total: _Vector | None = None  # None once done: it failed (made again inline)


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
        self.weight_cap, self.clip = weight_cap, clip
        # the wide ring's plans (a round with distributed noise; a round with no starting
        # model); a round's own plan: plan_for (privacy.ring.round_plan)
        self.plan = ring.plan(ring.MAX_SITES, weight_cap, clip)
        self.first_plan = ring.plan(ring.MAX_SITES, weight_cap, first_round_clip(weight_cap),
                                    fraction_bits=FIRST_FRACTION_BITS)
        self._started = False  # a round with a starting model was planned here
        self._lock = threading.Lock()
        self._chain_id: int | None = None
        self._rosters: dict[int, tuple[str, ...]] = {}
        self._pair: dict[tuple[str, bytes], bytes] = {}  # (peer, its public key) -> pair key
        self._joined: dict[str, bytes] = {}  # site (lower-case) -> the key it joined with
        self._join_rounds: dict[str, int] = {}  # site (lower-case) -> the round it joined in
        self._mine: dict[int, _Mine] = {}
        # payload buffers of masked vectors no longer held, by the ring's type (reused: a fresh
        # buffer of 4 or 8 bytes per parameter costs its page faults every round), and the
        # rounds whose own vector the evidence still reads (never reused)
        self._spare: dict[type, list[_Vector]] = {}
        self._pinned: set[int] = set()
        self._pair_masks: dict[int, _PairMasks] = {}  # round -> its pair masks, made ahead
        self._plans: dict[int, ring.RingPlan] = {}  # round -> the plan its vectors use
        self._received: dict[int, dict[str, np.ndarray]] = {}
        self._running: dict[int, _Running] = {}  # round -> the running sum of what arrived
        self._reveals: dict[int, dict[str, list[dropout.SeedReveal]]] = {}
        self._hashes: dict[int, dict[str, bytes]] = {}
        self._hashes_read_to: int | None = None  # MaskedUpdate events read up to this block
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

    def _joined_round(self, site: str) -> int:
        with self._lock:
            held = self._join_rounds.get(site.lower())
        if held is None:
            held = self.chain.node(site).enrolled_round
            with self._lock:
                self._join_rounds[site.lower()] = held
        return held

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
        # the member list (one read: it only grows) and each member's joined round and key,
        # read once per member (fixed at its join)
        members = [(a, self._joined_round(a), self.joined_key(a))
                   for a in self.chain.node_list()]
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
        # the ring the round will use as far as this site can tell now (a model committed
        # before it: the plans so far had one, or the round is past the first); made again at
        # the check-in in the other ring if that was wrong
        first = not self._started and round <= 1
        job = _PairMasks(peers, self._round_plan(first, roster_).dtype)
        with self._lock:
            if any(r >= round for r in self._mine) or any(r >= round for r in self._pair_masks):
                return
            self._pair_masks = {round: job}
        threading.Thread(target=self._make_masks, args=(round, job), daemon=True,
                         name=f"secagg-masks-{round}").start()

    def _vector(self, dtype: type[np.unsignedinteger]) -> _Vector:
        """A payload buffer for a masked vector of the ring's type: a spare one, else fresh."""
        with self._lock:
            spare = self._spare.get(dtype)
            if spare:
                return spare.pop()
        return _Vector(self.params, dtype)

    def _keep_spare(self, made: _Vector) -> None:
        """Keep ``made`` for reuse (at most two per type; caller holds the lock)."""
        spare = self._spare.setdefault(made.vector.dtype.type, [])
        if len(spare) < 2:
            spare.append(made)

    def _pair_masks_into(self, round: int, peers: Collection[str],
                         dtype: type[np.unsignedinteger]) -> _Vector:
        held = self._vector(dtype)
        masks.pair_masks(self.size, self.me, self.seeds(round, peers), out=held.vector)
        return held

    def _make_masks(self, round: int, job: _PairMasks) -> None:
        try:
            job.total = self._pair_masks_into(round, job.peers, job.dtype)
        except Exception as exc:  # noqa: BLE001 - made again (and raised) at the check-in
            log.warning("round %d: could not make the pair masks ahead (%s); they are made "
                        "at the check-in", round, exc)
        finally:
            job.done.set()

    def _masks_for(self, round: int, peers: list[str],
                   dtype: type[np.unsignedinteger]) -> _Vector:
        """``round``'s pair masks with ``peers`` in the ring's type (in a payload buffer the
        masked vector is then made in): the ones made ahead (waited for), else made now. Taken
        once: the same seeds never mask a second vector (masks made ahead in the other ring's
        type masked nothing: dropped)."""
        with self._lock:
            job = self._pair_masks.pop(round, None)
        if job is not None and job.peers == tuple(sorted(peers)) and job.dtype == dtype:
            job.done.wait()
            if job.total is not None:
                return job.total
        return self._pair_masks_into(round, peers, dtype)

    def plan_for(self, base: StateDict | None, roster_: Collection[str]) -> ring.RingPlan:
        """The plan of a round with mask set ``roster_`` and starting model ``base`` (None: no
        model was committed before the round): privacy.ring.round_plan, from public data
        only, so the sites, the leader and auditors agree on it."""
        if base is not None:
            self._started = True
        return self._round_plan(base is None, roster_)

    def _round_plan(self, first: bool, roster_: Collection[str]) -> ring.RingPlan:
        got = ring.round_plan(len(roster_), self.weight_cap, self.clip, first=first,
                              noise=self.noise is not None)
        for held in (self.plan, self.first_plan):  # the same objects (account's check)
            if got == held:
                return held
        return got

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

    def pieces(self, state: Mapping[str, torch.Tensor],
               base: StateDict | None) -> encoding.Pieces:
        """The change from ``base`` (the parameters whole when None) as encoding.Pieces: what
        :meth:`flatten` gives, read by the encoder a chunk at a time (no float64 copy)."""
        parts: list[tuple[np.ndarray, np.ndarray | None]] = []
        for name, _count in self.layout:
            a = state[name].detach().reshape(-1)
            b = None if base is None else base[name].detach().reshape(-1)
            if a.device.type == "cpu" and a.dtype in _NUMPY_FLOATS and (
                    b is None or (b.device.type == "cpu" and b.dtype in _NUMPY_FLOATS)):
                parts.append((a.numpy(), None if b is None else b.numpy()))
                continue
            t = a.to(torch.float64)
            if b is not None:
                t = t - b.to(torch.float64)
            parts.append((t.cpu().numpy(), None))
        return encoding.Pieces(parts)

    def masked(self, round: int, state: Mapping[str, torch.Tensor], weight: int,
               base: StateDict | None, roster_: Collection[str]) -> tuple[np.ndarray, bytes]:
        """This site's masked update for ``round`` and its hash: made once per round (the same
        seeds never mask a second vector). Made in the buffer of the pair masks (addition
        modulo 2^64 in any order: the same bits as encoding, noise, then masks)."""
        with self._lock:
            held = self._mine.get(round)
        if held is not None:
            return held.vector, held.hash
        plan = self.plan_for(base, roster_)
        seed = int.from_bytes(hashlib.sha256(
            b"swarmnode-secagg/1 rounding" + keys.address_bytes(self.chain.address)
            + keys.address_bytes(self.me) + round.to_bytes(8, "big")).digest()[:16], "big")
        made = self._masks_for(round, [p for p in roster_ if p != self.me], plan.dtype)
        values = made.vector
        if weight != 0:  # weight 0 adds nothing, but its masks must cancel the others'
            encoded = encoding.encode(self.pieces(state, base), weight, plan, seed, out=values)
            if encoded.clipped:
                log.info("round %d: the update's change (norm %.4g) was clipped to %g", round,
                         encoded.norm, plan.clip)
        if self.noise is not None and base is not None:  # a weight-0 site adds its share too
            rng = noise.generator(self.key.private_bytes(), keys.address_bytes(
                self.chain.address), keys.address_bytes(self.me), round)
            values += noise.share(self.noise, plan, self.size, len(roster_), rng)
        if plan.reduces:  # as masks.mask_update: the same bits
            values &= plan.modulus_mask
        digest = serde.digest(made.buf)  # wire.update_hash(values): its canonical bytes
        with self._lock:
            kept = _recent(self._mine, round)
            for r, m in self._mine.items():  # no longer pushed: its buffer is reused
                if r not in kept and r not in self._pinned:
                    self._keep_spare(m.made)
            self._pinned = {r for r in self._pinned if r >= round - KEEP_EVIDENCE}
            self._mine = kept
            self._mine.setdefault(round, _Mine(values, digest, made))
            return self._mine[round].vector, self._mine[round].hash

    def held(self, round: int) -> tuple[np.ndarray, bytes] | None:
        with self._lock:
            m = self._mine.get(round)
        return None if m is None else (m.vector, m.hash)

    @staticmethod
    def payload(vector: np.ndarray) -> serde.Buffer:
        """The pushed bytes of ``vector``: safetensors of one int32 / int64 tensor holding the
        ring elements (a copy; a held vector's own are :meth:`held_payload`)."""
        signed = np.int32 if vector.dtype == np.uint32 else np.int64
        return serde.encode({MASKED: torch.from_numpy(vector.view(signed))})

    def held_payload(self, round: int) -> tuple[serde.Buffer, bytes] | None:
        """The pushed bytes of this site's masked vector for ``round`` (its own buffer, never
        changed while the round's vector is held) and their digest (its hash: privacy.wire),
        None if it holds none."""
        with self._lock:
            m = self._mine.get(round)
        if m is None:
            return None
        return m.made.buf, m.hash

    # -- the leader: masked updates and reveals ---------------------------------------------------
    def hashes(self, round: int, refresh: bool = False) -> dict[str, bytes]:
        """site (lower-case) -> the masked hash it checked in with for ``round`` (chain), as
        far as the blocks read so far hold them (``refresh``: read the blocks mined since).

        The MaskedUpdate events are read forward from where the last read stopped (less
        REREAD_BLOCKS), never again from the training's deployment: a read from there costs
        as many blocks as the training has mined, every round, which made long secure
        trainings slower with every round (the in-process quality study's digits swarm took
        ~20 s a round by round 100, the chain's reads blocking the rounds)."""
        with self._lock:
            held = self._hashes.get(round)
            start = self._hashes_read_to
        if held is not None and not refresh:
            return held
        head, _ = self.chain.latest_block()
        since = None if start is None else max(start - REREAD_BLOCKS, 0)
        found = self.chain.events(since, head, names={"MaskedUpdate"})
        with self._lock:
            self._hashes = _recent(self._hashes, round)
            self._hashes.setdefault(round, {})
            for e in found:
                r = int(e.args["round"])
                if r >= round - 1:
                    self._hashes.setdefault(r, {}).setdefault(str(e.args["node"]).lower(),
                                                              bytes(e.args["hash"]))
            self._hashes_read_to = max(head, self._hashes_read_to or 0)
            return self._hashes[round]

    def receive(self, round: int, sender: str, state: StateDict, digest: bytes) -> None:
        """A member's masked update: kept once its hash is the one its check-in carries.
        ``digest``: the SHA-256 of the payload ``state`` was decoded from, as the transport
        computed and checked it over the received bytes (privacy.wire: that is the update's
        hash; not computed again here)."""
        tensor = state.get(MASKED)
        if tensor is None or len(state) != 1 or tensor.dtype not in (torch.int32, torch.int64):
            raise PayloadRejected(f"round {round}: {sender} sent no masked update in format "
                                  f"{MASKED} (a training with secure aggregation takes only "
                                  "those)")
        # a view of the received bytes (a spill file's pages at a node): not copied; nothing
        # writes them, and the evidence reads them from there. Its ring (width) is checked
        # against the round's plan where it is summed (privacy.aggregate.unmasked_sum)
        vector = tensor.numpy().view(np.uint32 if tensor.dtype == torch.int32 else np.uint64)
        onchain = self.hashes(round).get(sender.lower()) or self.hashes(round, True).get(
            sender.lower())
        if onchain is None:
            raise PeerRefused(f"round {round}: {sender} checked in without a masked update's "
                              "hash; its update is refused")
        if digest != onchain:
            raise PayloadRejected(f"round {round}: the masked update of {sender} does not match "
                                  "the hash its check-in carries on chain; refused")
        with self._lock:
            got = self._received.setdefault(round, {})
            if sender.lower() in got:
                from swarmnode.errors import DuplicateUpdate
                raise DuplicateUpdate(f"round {round}: {sender}'s masked update is already in")
            got[sender.lower()] = vector
            self._received = _recent(self._received, round)
            running = self._running.get(round)
            if running is None:
                running = self._running[round] = _Running()
            for r in [r for r in self._running if r < round - 1]:
                old = self._running.pop(r)
                if old.made is not None:
                    self._keep_spare(old.made)
            mine = self._mine.get(round)
        self._fold(running, sender.lower(), vector, mine)

    def _fold(self, running: _Running, sender: str, vector: np.ndarray,
              mine: _Mine | None) -> None:
        """Add a received masked vector to the round's running sum (the leader's own first, if
        it holds one): summed as they arrive, as a plain leader folds its updates."""
        with running.lock:
            if running.sealed:  # aggregate took it: what came later is summed from scratch
                return
            if running.made is not None and running.made.vector.dtype != vector.dtype \
                    or mine is not None and mine.vector.dtype != vector.dtype:
                return  # another ring than the others': not summed here (aggregate refuses it)
            if running.made is None:
                running.made = self._vector(vector.dtype.type)
                if mine is not None:
                    np.add(mine.vector, vector, out=running.made.vector)
                    running.sites.add(self.me.lower())
                else:
                    np.copyto(running.made.vector, vector)
            else:
                running.made.vector += vector
            running.sites.add(sender)

    def forget(self, round: int) -> None:
        """``round`` is over at this node: the masked updates it received for it and before, and
        their running sums, go (the evidence keeps what it summed). A leader receives masked
        updates into memory (NodeService), so this bounds what it holds to one round's."""
        with self._lock:  # (a running sum's buffer is not reused: a late fold may hold it)
            self._received = {r: v for r, v in self._received.items() if r > round}
            self._running = {r: v for r, v in self._running.items() if r > round}

    def senders(self, round: int) -> frozenset[str]:
        with self._lock:
            return frozenset(self._received.get(round, {}))

    def add_reveals(self, round: int, revealer: str, reveals: list[dropout.SeedReveal]) -> None:
        with self._lock:
            self._reveals.setdefault(round, {})[revealer.lower()] = reveals
            self._reveals = _recent(self._reveals, round)

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
                  plan: ring.RingPlan, check: bool = True) -> agg.Aggregate:
        """The leader's sum of the checked-in roster sites' masked updates (its own included),
        the dropouts' masks removed with the survivors' reveals, bound-checked (``check``;
        False: the caller checks, as :meth:`merge` does while it decodes). Weight-0 sites push
        a masked zero: in the sum (their masks cancel), not in the total weight. Fewer than
        MIN_SITES sites with weight (but some): abandoned, since the sum of two updates gives
        each away; none: the mean change is zero."""
        low = {p.lower() for p in roster_}
        w = {p.lower(): int(v) for p, v in weights.items() if p.lower() in low}
        with self._lock:
            received = dict(self._received.get(round, {}))
            reveals = [r for rs in self._reveals.get(round, {}).values() for r in rs]
            mine = self._mine.get(round)
            running = self._running.get(round)
        if mine is not None:
            received[self.me.lower()] = mine.vector
        masked = {s: v for s, v in received.items() if s in w}
        where = f"round {round}"
        for site, weight in w.items():
            if not 0 <= weight <= plan.weight_cap:
                raise AggregateRejected(f"{where}: {site}'s weight {weight} is outside "
                                        f"0..{plan.weight_cap} (the spec's max_weight)")
        adding = sorted(s for s, v in w.items() if v > 0)
        if adding and not guards.sums(len(adding)):
            raise RoundAbandoned(
                f"{where} is abandoned: only {len(adding)} sites add weight and secure "
                f"aggregation needs at least {guards.MIN_SITES} (the sum of two gives each "
                "away); nothing is revealed, the next round goes on")
        summed = None
        if running is not None:
            with running.lock:  # the running sum, if it holds exactly these vectors
                running.sealed = True
                if running.made is not None and running.sites == set(masked):
                    summed = running.made.vector
        ring_sum = agg.unmasked_sum(low, w.keys(), masked, reveals, plan, round, ATTEMPT,
                                    summed=summed)
        with self._lock:  # the evidence, kept once the merged model's digest is known
            self._summed = _recent(self._summed, round)
            self._summed[round] = (masked, reveals, None)
        total = sum(w.values())
        if total and check:  # the norm of the decoded sum, decoded a chunk at a time
            self._check_bound(round, ring_sum, w, len(low), plan)
        if self.noise is not None:
            self.account(round, w, plan is self.plan)
        # not decoded whole: unflatten(plan=...) decodes it into the model a piece at a time
        return agg.Aggregate(ring_sum, None, max(total, 1), tuple(sorted(w)),
                             tuple(sorted(low - set(w))))

    def _check_bound(self, round: int, ring_sum: np.ndarray, w: Mapping[str, int],
                     expected: int, plan: ring.RingPlan, squares: float | None = None) -> None:
        adding = sum(1 for v in w.values() if v > 0)
        agg.check_bound(ring_sum, sum(w.values()), adding, plan, f"round {round}",
                        noise=self._noise_bound(plan, len(w), expected), squares_=squares)

    def merge(self, round: int, roster_: Collection[str], weights: Mapping[str, int],
              plan: ring.RingPlan, base: StateDict | None, own: Mapping[str, torch.Tensor]
              ) -> tuple[agg.Aggregate, dict[str, torch.Tensor]]:
        """The leader's round: :meth:`aggregate`, then the sum decoded into the merged model
        (:meth:`unflatten`) and bound-checked in that same pass over it (its norm summed as
        it is decoded: one pass over the sum, not two)."""
        result = self.aggregate(round, roster_, weights, plan, check=False)
        squares: list[float] = []
        merged = self.unflatten(result.ring_sum, base, own,
                                divide=float(result.total_weight), plan=plan, squares=squares)
        low = {p.lower() for p in roster_}
        w = {p.lower(): int(v) for p, v in weights.items() if p.lower() in low}
        if sum(w.values()):
            self._check_bound(round, result.ring_sum, w, len(low), plan, math.fsum(squares))
        return result, merged

    # -- the evidence of a summed round (privacy.evidence) -----------------------------------------
    def _evidence_path(self, round: int) -> Path:
        assert self.evidence_dir is not None
        return self.evidence_dir / f"round-{round}.safetensors"

    def keep_evidence(self, round: int, digest: bytes, model: serde.Buffer,
                      first: bool) -> None:
        """The leader: keep what it summed for ``round`` (aggregate's parts) with the digest of
        the model it made of them and ``model`` (the starting model's bytes; ``first``: there
        was none, the merged model's), on disk, the newest KEEP_EVIDENCE rounds. Written by a
        thread of its own, off the commit's path (served once the file is in place), from
        ``model``'s own memory (a stored model's bytes, never written to: not copied)."""
        with self._lock:
            parts = self._summed.pop(round, None)
            if parts is not None and self.evidence_dir is not None:
                self._pinned.add(round)  # its own vector is written from its buffer: kept
        if parts is None or self.evidence_dir is None:
            return
        # no ring sum: the member recomputes it from the updates and reveals (privacy.evidence)
        evidence = Evidence(round, first, digest, None, parts[0], parts[1], model)
        threading.Thread(target=self._write_evidence, args=(evidence,), daemon=True,
                         name=f"evidence-{round}").start()

    def _write_evidence(self, evidence: Evidence) -> None:
        assert self.evidence_dir is not None
        _background()  # gives way to the rounds' own work (this thread only)
        try:
            self.evidence_dir.mkdir(parents=True, exist_ok=True)
            path = self._evidence_path(evidence.round)
            tmp = path.with_suffix(".tmp")
            with _DirectFile(tmp) as f:  # streamed from the vectors' memory, past the cache
                evidence.write_to(f)
            os.replace(tmp, path)
            kept = sorted((int(p.stem.split("-", 1)[1]), p)
                          for p in self.evidence_dir.glob("round-*.safetensors")
                          if p.stem.split("-", 1)[1].isdigit())
            for _, old in kept[:-KEEP_EVIDENCE]:
                old.unlink(missing_ok=True)
        except (OSError, ValueError) as exc:  # ValueError: a mapping closed under it
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
    def note_checkin(self, round: int, block: int, masked_hash: bytes | None = None) -> None:
        """This site's check-in for ``round`` was mined in ``block`` (its hash's event is
        there). ``masked_hash``: the hash that check-in transaction carried: its receipt says
        it succeeded, so that is the hash on chain (own_hash needs no read)."""
        with self._lock:
            self._checkin_block = _recent(self._checkin_block, round)
            self._checkin_block[round] = block
            if masked_hash is not None:
                self._own_hash = _recent(self._own_hash, round)
                self._own_hash[round] = masked_hash

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
                self._own_hash = _recent(self._own_hash, round)
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
                  divide: float | None = None,
                  plan: ring.RingPlan | None = None,
                  squares: list[float] | None = None) -> dict[str, torch.Tensor]:
        """The merged model: ``base`` + the mean change (the mean itself without a base), in the
        spec's dtypes; tensors that are not floating point from ``base`` (else ``own``).
        ``divide``: ``mean`` is a weighted sum, divided by it here piece by piece (the same
        bits as dividing the whole vector first, without that float64 copy). ``plan``: ``mean``
        is the ring sum (the plan's dtype), decoded with it here piece by piece
        (encoding.decode_sum: the same values as decoding it whole first). ``squares``: each
        decoded piece's sum of squares is appended (before ``divide``; the sum's norm, for
        the bound check, without another pass)."""
        out: dict[str, torch.Tensor] = {}
        at = 0
        counts = dict(self.layout)
        tmp = np.empty(min(encoding.CHUNK, max(counts.values(), default=0)))

        def decoded(piece: np.ndarray) -> np.ndarray:
            if plan is None:
                return piece
            got = encoding.decode_sum(piece, plan, out=tmp[: piece.shape[0]])
            if squares is not None:
                squares.append(float(np.einsum("i,i->", got, got)))
            return got

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
                    piece = decoded(change[start: start + encoding.CHUNK])
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
            if plan is not None:
                change = encoding.decode_sum(change, plan)
                if squares is not None:
                    squares.append(float(np.einsum("i,i->", change, change)))
            if divide is not None:
                change = change / divide
            part = torch.from_numpy(change.copy()).reshape(shape)
            if b is not None:
                part = b.to(torch.float64) + part
            out[name] = part.to(target).contiguous()
        return out
