"""The chain as the source of truth for who a peer is: identity binding and peer connections."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from swarmnode.chain.client import RoundStatus, SwarmContract
from swarmnode.chain.models import NodeInfo
from swarmnode.errors import PeerRefused, PeerUnavailable
from swarmnode.identity import TlsFiles
from swarmnode.node import lifecycle
from swarmnode.transport.peer import PeerClient

__all__ = ["ChainAuthority", "PeerPool"]

_SLOT_S = 0.25  # without a block source: how long a 'block' of the read bound lasts
_READS_PER_BLOCK = 3  # rounds read per block for one caller at most, whatever rounds it names
_CLAIMS_PER_BLOCK = 3  # addresses not cached read per block for one presented certificate
_MAX_NODES = 1024  # node records kept (least recently used dropped first)


class _Round(NamedTuple):
    """A round as the authority last read it: its status, participants (lower case), whether
    it is the training's final round, and the block (or time slot) it was read in."""

    status: RoundStatus
    members: frozenset[str]
    final: bool
    mark: int


class ChainAuthority:
    """Answers the peer API's identity questions from the contract (PeerAuthority protocol).

    A certificate is accepted for an address only while the contract holds its fingerprint for
    a node that joined this training and is not revoked; once the training finished, also for a
    site of its registry that never joined (authorised, not revoked): it may pull the final
    model and nothing else (:meth:`is_participant`). Caches keep a busy round from hammering the
    RPC node (one read per node per ``ttl``, not one per call): a revocation takes effect within
    ``ttl`` seconds. A round is read again for a caller its participants do not name: an open
    round each time, an elected one once per block (``block``: the latest block number this
    node knows, its BlockWatcher's; without one, per ``_SLOT_S`` seconds), and at most
    ``_READS_PER_BLOCK`` rounds per block for one caller: a check-in mined a moment ago is seen
    at once, and a non-participant's requests cost a few chain reads per block, not one per
    request (callers are addresses their certificates proved: one cannot spend another's).
    """

    def __init__(self, chain: SwarmContract, ttl: float = 5.0,
                 block: Callable[[], int] | None = None) -> None:
        self.chain = chain
        self.ttl = ttl
        self.block = block
        self._lock = threading.Lock()
        self._nodes: OrderedDict[str, tuple[float, NodeInfo]] = OrderedDict()
        # (block, chain reads in it by presented certificate) for claimed addresses
        self._claims: tuple[int, dict[bytes, int]] = (0, {})
        self._rounds: dict[int, _Round] = {}
        self._finished: tuple[float, bool] | None = None  # (when read, training finished)
        self._reads: tuple[int, dict[str, int]] = (0, {})  # (block, reads in it by caller)

    def _mark(self) -> int:
        """The block this node knows as the latest (or, without a block source, a time slot)."""
        if self.block is not None:
            block = self.block()
            if block >= 0:  # -1: the watcher has seen no block yet
                return block
        return int(time.monotonic() / _SLOT_S) - (1 << 40)  # never a block number

    def node(self, address: str) -> NodeInfo:
        """The contract's record of ``address``, at most ``ttl`` seconds old (the newest
        ``_MAX_NODES`` addresses asked about are kept)."""
        now = time.monotonic()
        key = address.lower()
        with self._lock:
            hit = self._nodes.get(key)
            if hit is not None:
                self._nodes.move_to_end(key)
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        info = self.chain.node(address)
        with self._lock:
            self._nodes[key] = (now, info)
            self._nodes.move_to_end(key)
            while len(self._nodes) > _MAX_NODES:
                self._nodes.popitem(last=False)
        return info

    def claimed_fingerprint(self, address: str, presented: bytes) -> bytes | None:
        """:meth:`fingerprint_of` for an address a connection claims, its certificate's
        fingerprint ``presented``: an address not held fresh in the cache costs a chain read,
        and one certificate gets ``_CLAIMS_PER_BLOCK`` of those per block (per ``_SLOT_S`` s
        without a block source): a CA-certificate holder claiming ever new addresses makes a
        few reads per block, not one per connection. PeerRefused past that."""
        key = address.lower()
        with self._lock:
            hit = self._nodes.get(key)
        if hit is None or time.monotonic() - hit[0] >= self.ttl:
            mark = self._mark()
            with self._lock:
                if self._claims[0] != mark:
                    self._claims = (mark, {})
                spent = self._claims[1].get(presented, 0)
                if spent >= _CLAIMS_PER_BLOCK:
                    raise PeerRefused(
                        f"this certificate claimed {spent} addresses the node had to look up "
                        f"on chain in this block (the limit is {_CLAIMS_PER_BLOCK}); {address} "
                        "is refused for now: claim the address your certificate is enrolled "
                        "for, and try again in the next block")
                self._claims[1][presented] = spent + 1
        return self.fingerprint_of(address)

    def forget(self, address: str) -> None:
        """Read ``address`` afresh next time (after a failed connection, say)."""
        with self._lock:
            self._nodes.pop(address.lower(), None)

    def training_finished(self) -> bool:
        """Whether the training finished (read at most every ``ttl`` s until it has; final)."""
        now = time.monotonic()
        with self._lock:
            hit = self._finished
        if hit is not None and (hit[1] or now - hit[0] < self.ttl):
            return hit[1]
        done = self.chain.training_finished()
        with self._lock:
            self._finished = (now, done)
        return done

    def fingerprint_of(self, address: str) -> bytes | None:
        info = self.node(address)
        if info.revoked:
            return None
        if info.enrolled:
            return info.fingerprint
        # a site of the consortium that did not join: only once the training finished (the
        # final model is all it may take), so a site that could still join is not served
        if lifecycle.may_take_final(info.enrolled, info.authorized, info.revoked,
                                    self.training_finished()):
            return info.fingerprint
        return None

    def is_participant(self, round: int, address: str) -> bool:
        """A participant of ``round``; once it is committed, any node that joined this training
        may pull it, and once the training finished a site of its registry that did not join
        may pull the final round's."""
        key = address.lower()
        with self._lock:
            hit = self._rounds.get(round)
        if hit is not None and key in hit.members:
            return True
        # an open round's participants grow with each check-in (the caller's may have been
        # mined a moment ago, in a block this node has not seen yet): read again; an elected
        # one's are fixed, so only its status can change (committed: others may pull), once
        # per block; a committed one's never. Either way within this block's reads.
        if hit is None or hit.status is RoundStatus.OPEN or (
                hit.status is not RoundStatus.COMMITTED and hit.mark != self._mark()):
            read = self._read_round(round, key)
            if read is None:  # this block's reads are spent: the caller asks again later
                return False
            hit = read
        if key in hit.members:
            return True
        if hit.status is not RoundStatus.COMMITTED:
            return False
        info = self.node(address)
        if info.enrolled and not info.revoked:
            return True
        return hit.final and self.fingerprint_of(address) is not None

    def _read_round(self, round: int, caller: str) -> _Round | None:
        """``round`` read now (and kept) for ``caller`` (an address its certificate proved);
        None when ``_READS_PER_BLOCK`` rounds were read for it in this block already: a caller
        naming ever new rounds costs no more, and uses up no other caller's reads."""
        mark = self._mark()
        with self._lock:
            if self._reads[0] != mark:
                self._reads = (mark, {})
            spent = self._reads[1].get(caller, 0)
            if spent >= _READS_PER_BLOCK:
                return None
            self._reads[1][caller] = spent + 1
        info = self.chain.round(round)
        got = _Round(info.status, frozenset(p.lower() for p in info.participants),
                     info.is_final, mark)
        if got.status is RoundStatus.OPEN and not got.members:
            # a round ahead of the current one (or one nobody checked in to yet) is not kept:
            # an open round is read again on every call anyway, and the cache keeps the
            # highest rounds, so a caller naming far-future rounds would push out the ones in use
            return got
        with self._lock:
            self._rounds[round] = got
            for old in sorted(self._rounds)[:-8]:
                del self._rounds[old]
        return got


class PeerPool:
    """PeerClients by chain address, built from the endpoint the contract holds."""

    def __init__(self, chain: SwarmContract, me: str, tls: TlsFiles, authority: ChainAuthority):
        self.chain, self.me, self.tls, self.authority = chain, me, tls, authority
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[str, PeerClient]] = {}
        self._dropped: set[str] = set()  # dropped after a failure, not reached since

    def reachability(self) -> tuple[int, int]:
        """(peers reachable, peers not) as this node's last attempt to reach each found it; a
        peer not tried yet counts in neither."""
        with self._lock:
            states = {a: c.reachable for a, (_, c) in self._clients.items()}
            dropped = set(self._dropped)
        for address in dropped:
            if states.get(address) is None:
                states[address] = False
        return (sum(1 for v in states.values() if v is True),
                sum(1 for v in states.values() if v is False))

    def client(self, address: str) -> PeerClient:
        info = self.authority.node(address)
        if not info.enrolled or info.revoked:
            raise PeerUnavailable(f"node {address} is not enrolled or was revoked on chain")
        with self._lock:
            cached = self._clients.get(address)
            if cached and cached[0] == info.endpoint:
                return cached[1]
            if cached:
                cached[1].close()
            client = PeerClient(info.endpoint, self.tls, self.me, address, self.authority)
            self._clients[address] = (info.endpoint, client)
            if cached is None and address in self._dropped:
                client.reachable = False  # until it is reached again
            self._dropped.discard(address)
            return client

    def drop(self, address: str) -> None:
        self.authority.forget(address)
        with self._lock:
            cached = self._clients.pop(address, None)
            self._dropped.add(address)
        if cached:
            cached[1].close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, {}
        for _, client in clients.values():
            client.close()
