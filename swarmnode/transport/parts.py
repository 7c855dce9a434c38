"""A merged model in verifiable parts, for members that serve each other what they hold.

The leader's link need not carry the merged model N-1 times: each member can fetch some parts
from the leader and the rest from the other members as they arrive, so the leader sends about one
model and every member's uplink carries a share. What makes that safe is that each part is
checked the moment it arrives:

* the :class:`Manifest` of a model is its size, its part size and the SHA-256 of every part,
  made by the model's author (the round's leader) and fetched from it; a part from any peer is
  accepted only if it hashes to the manifest's entry, so a lying or broken peer costs a retry of
  that part from another source, never a wrong model;
* the manifest itself is bound to the chain: the whole model's SHA-256 (the digest the leader
  commits) is checked once every part is in (:meth:`PartBuffer.finish`), so a manifest that does
  not describe the committed model is found out too, at the cost of the transfer;
* :func:`plan` gives every member the same deterministic share of the parts (part ``i`` belongs
  to member ``i mod (N-1)`` in the round's fold order): a member fetches its own parts from the
  leader and each other part from the member it belongs to, falling back to the leader and then
  to every other member;
* :class:`PartBuffer` holds a model being received: which parts are verified, and a wait for a
  part that another member asked for before it arrived (a member serves parts as they come in).

Pure logic and buffers, no sockets: the data plane moves the bytes.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from swarmnode.errors import PayloadRejected
from swarmnode.transport import serde

log = logging.getLogger("swarmnode.transport.parts")

__all__ = [
    "MAX_PARTS",
    "FullSource",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "Manifest",
    "PartBuffer",
    "Schedule",
    "check_part_size",
    "fetch_resumable",
    "part_size_for",
    "plan",
]

MIN_PART_SIZE = 256 << 10
MAX_PART_SIZE = 8 << 20
MAX_PARTS = 1 << 16  # 65,536 parts x 8 MiB: 512 GiB, far above any model a site sends
_MAGIC = b"SNPM1\x00\x00\x00"
_HEAD = struct.Struct("<8sQII")  # magic, total bytes, part size, part count
_HASH = 32


def part_size_for(total: int, members: int) -> int:
    """A part size giving each of ``members`` about four parts (so shares stay even and a member
    starts serving early), a power of two within MIN_PART_SIZE..MAX_PART_SIZE."""
    if total < 0 or members < 1:
        raise ValueError(f"part_size_for({total}, {members}): total >= 0, members >= 1")
    want = max(1, total // (4 * members))
    size = MIN_PART_SIZE
    while size < want and size < MAX_PART_SIZE:
        size <<= 1
    while -(-total // size) > MAX_PARTS:
        size <<= 1
    return size


@dataclass(frozen=True)
class Manifest:
    """The parts of one model: ``total`` bytes in parts of ``part_size`` (the last may be
    shorter), and each part's SHA-256."""

    total: int
    part_size: int
    hashes: tuple[bytes, ...]

    @property
    def count(self) -> int:
        return len(self.hashes)

    def span(self, i: int) -> tuple[int, int]:
        """Byte range [start, end) of part ``i``."""
        if not 0 <= i < self.count:
            raise IndexError(f"part {i} of {self.count}")
        start = i * self.part_size
        return start, min(self.total, start + self.part_size)

    def check(self, i: int, data: bytes | bytearray | memoryview) -> None:
        """PayloadRejected unless ``data`` is part ``i``."""
        start, end = self.span(i)
        if len(data) != end - start:
            raise PayloadRejected(f"part {i}: {len(data)} bytes, the manifest says {end - start}")
        if hashlib.sha256(data).digest() != self.hashes[i]:
            raise PayloadRejected(f"part {i} (bytes {start}..{end}) does not hash to the "
                                  "manifest's entry: a corrupt or lying source")

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview, part_size: int,
           threads: int = 2) -> Manifest:
        """The manifest of ``data`` (hashlib releases the GIL: parts hash on ``threads``)."""
        check_part_size(part_size)
        view = memoryview(data).cast("B")
        total = len(view)
        count = -(-total // part_size)
        if count > MAX_PARTS:
            raise ValueError(f"{total} bytes in parts of {part_size}: over {MAX_PARTS} parts")

        def one(i: int) -> bytes:
            return hashlib.sha256(view[i * part_size:(i + 1) * part_size]).digest()

        if threads > 1 and count > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="parts") as pool:
                hashes = tuple(pool.map(one, range(count)))
        else:
            hashes = tuple(one(i) for i in range(count))
        return cls(total, part_size, hashes)

    # -- wire -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return _HEAD.pack(_MAGIC, self.total, self.part_size, self.count) + b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, raw: bytes, max_total: int) -> Manifest:
        """Parse a peer's manifest (hostile input): every field bounded, sizes consistent."""
        if len(raw) < _HEAD.size:
            raise PayloadRejected(f"a parts manifest of {len(raw)} bytes is too short")
        magic, total, part_size, count = _HEAD.unpack_from(raw)
        if magic != _MAGIC:
            raise PayloadRejected("not a parts manifest (bad magic)")
        if total > max_total:
            raise PayloadRejected(f"the manifest names {total} bytes, over the limit of "
                                  f"{max_total}")
        try:
            check_part_size(part_size)
        except ValueError as exc:
            raise PayloadRejected(f"the manifest's {exc}") from None
        if count != -(-total // part_size) or count > MAX_PARTS:
            raise PayloadRejected(f"the manifest names {count} parts for {total} bytes in parts "
                                  f"of {part_size}")
        if len(raw) != _HEAD.size + count * _HASH:
            raise PayloadRejected(f"the manifest holds {len(raw)} bytes, not "
                                  f"{_HEAD.size + count * _HASH} for {count} parts")
        body = raw[_HEAD.size:]
        return cls(total, part_size,
                   tuple(bytes(body[k * _HASH:(k + 1) * _HASH]) for k in range(count)))


def check_part_size(part_size: int) -> None:
    """ValueError unless ``part_size`` is a power of two within the bounds."""
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE or part_size & (part_size - 1):
        raise ValueError(f"part size {part_size} is not a power of two within "
                         f"{MIN_PART_SIZE}..{MAX_PART_SIZE}")


def plan(count: int, members: Sequence[str], me: str, leader: str) -> list[list[str]]:
    """For each of ``count`` parts, the sources member ``me`` tries in order.

    ``members``: the round's members other than the leader, in the round's fold order (the same
    list at every member). Part ``i`` belongs to ``members[i % len(members)]``: its owner fetches
    it from the leader, everyone else from its owner first; then the leader; then the others in
    order. Every member thus asks the leader for about count/(N-1) parts, and the leader's link
    carries one model however many members there are."""
    if me not in members:
        raise ValueError(f"{me} is not one of the round's members")
    if leader in members:
        raise ValueError("the leader is not one of the members it serves")
    out = []
    for i in range(count):
        owner = members[i % len(members)]
        first = [leader] if owner == me else [owner, leader]
        rest = [m for m in members if m != me and m not in first]
        out.append(first + rest)
    return out


class Schedule:
    """Which parts to ask which source for next: every part starts at the first source of its
    :func:`plan`; after each pass (all sources asked at once) a part still missing moves on to
    its next source, and a part with none left is lost."""

    def __init__(self, sources: list[list[str]], only: Iterable[int] | None = None) -> None:
        """``only``: the parts still wanted (a resumed transfer: the others are held)."""
        wanted = set(range(len(sources))) if only is None else set(only)
        self._left = {i: list(s) for i, s in enumerate(sources) if i in wanted}
        self.lost: list[int] = []

    @property
    def done(self) -> bool:
        return not self._left

    def requests(self) -> dict[str, list[int]]:
        """This pass: source -> the parts to ask it for, in part order."""
        out: dict[str, list[int]] = {}
        for i, srcs in sorted(self._left.items()):
            out.setdefault(srcs[0], []).append(i)
        return out

    def settle(self, held: Callable[[int], bool]) -> None:
        """After a pass: forget the parts now ``held``, move the others to their next source."""
        for i in list(self._left):
            if held(i):
                del self._left[i]
                continue
            self._left[i].pop(0)
            if not self._left[i]:
                del self._left[i]
                self.lost.append(i)


def fetch_resumable(buf: PartBuffer, sources: list[list[str]],
                    fetch: Callable[[str, list[int]], None], *, deadline_s: float,
                    pause_s: float, goes_on: Callable[[], bool] = lambda: True,
                    stop: threading.Event | None = None) -> bool:
    """Fill ``buf`` from the peers of :func:`plan` (``sources``: per part, whom to ask in order).

    Each pass asks every source for its parts at once (``fetch(source, parts)``, a thread per
    source; it puts what arrives into ``buf``, which verifies each part, and swallows its own
    errors); a part still missing moves on to its next source. Once every source failed some
    part (a link down, peers gone), the missing parts start over at their first source after
    ``pause_s``: verified parts are kept, so a link that returns within ``deadline_s`` costs only
    the parts in flight when it broke, not the transfer. True once ``buf`` is complete; False at
    the deadline, on ``stop``, or once ``goes_on()`` says the transfer is moot."""
    stop = stop or threading.Event()
    schedule = Schedule(sources, only=buf.missing())
    until = time.monotonic() + deadline_s
    while not buf.complete:
        if stop.is_set() or time.monotonic() > until:
            return False
        if schedule.done:  # every source failed some part
            if not goes_on():
                return False
            log.warning("no source served parts %s; asking again from the last verified part",
                        schedule.lost[:8])
            stop.wait(pause_s)
            schedule = Schedule(sources, only=buf.missing())
            continue
        threads = [threading.Thread(target=fetch, args=(source, wanted), name="parts",
                                    daemon=True)
                   for source, wanted in schedule.requests().items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        schedule.settle(buf.has)
    return True


class PartBuffer:
    """A model being received part by part: written parts are verified first, other threads can
    wait for a part (to serve it on), and :meth:`finish` checks the whole model's digest."""

    def __init__(self, manifest: Manifest, buf: bytearray | memoryview | None = None) -> None:
        self.manifest = manifest
        self.buf = buf if buf is not None else bytearray(manifest.total)
        if len(self.buf) != manifest.total:
            raise ValueError(f"buffer of {len(self.buf)} bytes for a {manifest.total}-byte model")
        self._have = [False] * manifest.count
        self._missing = manifest.count
        self._cond = threading.Condition()
        self._failed: str | None = None

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def has(self, i: int) -> bool:
        return self._have[i]

    def missing(self) -> list[int]:
        with self._cond:
            return [i for i, got in enumerate(self._have) if not got]

    def put(self, i: int, data: bytes | bytearray | memoryview) -> None:
        """Verify part ``i`` against the manifest, then keep it (PayloadRejected if it is not
        the part: nothing is written). A part already held is left as it is."""
        self.manifest.check(i, data)
        start, end = self.manifest.span(i)
        with self._cond:
            if self._have[i]:
                return
            memoryview(self.buf).cast("B")[start:end] = data
            self._have[i] = True
            self._missing -= 1
            self._cond.notify_all()

    def part(self, i: int, timeout: float) -> memoryview | None:
        """Part ``i`` once it is held (None after ``timeout`` seconds, or if the transfer
        failed): a member serves another what it received itself."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._have[i] or self._failed is not None,
                                       timeout):
                return None
            if not self._have[i]:
                return None
        start, end = self.manifest.span(i)
        return memoryview(self.buf).cast("B")[start:end]

    def fail(self, why: str) -> None:
        """The transfer is given up: wake every waiter (they get None)."""
        with self._cond:
            self._failed = why
            self._cond.notify_all()

    def finish(self, digest: bytes) -> None:
        """Every part is in and the whole model hashes to ``digest`` (the one on chain), else
        PayloadRejected: a manifest that does not describe the committed model."""
        if not self.complete:
            raise PayloadRejected(f"{self._missing} of {self.manifest.count} parts missing")
        got = hashlib.sha256(self.buf).digest()
        if got != digest:
            raise PayloadRejected(f"the assembled model hashes to {got.hex()[:12]}..., not the "
                                  f"committed {digest.hex()[:12]}...: its manifest is wrong")

    # -- as a source: what a member serves while it still receives --------------------------------
    def manifest_for(self, part_size: int) -> Manifest | None:
        return self.manifest if part_size == self.manifest.part_size else None

    def slice(self, i: int, part_size: int, timeout: float) -> memoryview | None:
        if part_size != self.manifest.part_size:
            return None
        return self.part(i, timeout)


class FullSource:
    """A whole model this node holds (the leader's merged model, or a member's stored copy),
    served in parts of whatever valid size a member asks for; manifests are made once per part
    size. ``on_served(member)`` is told when every part of a part size has gone out at least
    once, with the member that took the last of them (the leader: the swarm now holds the whole
    model outside this node)."""

    def __init__(self, data: bytes | bytearray | memoryview | Any,
                 on_served: Callable[[str], None] | None = None) -> None:
        self.data = data
        self._view = memoryview(data).cast("B")
        self._manifests: dict[int, Manifest] = {}
        self._sent: dict[int, set[int]] = {}
        self._on_served = on_served
        self._lock = threading.Lock()

    def manifest_for(self, part_size: int) -> Manifest:
        check_part_size(part_size)
        with self._lock:
            m = self._manifests.get(part_size)
        if m is None:
            m = Manifest.of(self._view, part_size)
            with self._lock:
                self._manifests[part_size] = m
        return m

    def rebase(self, data: Any) -> None:
        """Serve the same bytes from ``data`` from now on (the stored model's file once it is
        written), so the memory they were in can go; manifests and what was sent stay."""
        view = memoryview(data).cast("B")
        if len(view) != len(self._view):
            raise ValueError(f"rebase onto {len(view)} bytes, {len(self._view)} were served")
        with self._lock:
            self.data, self._view = data, view

    def slice(self, i: int, part_size: int, timeout: float) -> memoryview | None:
        check_part_size(part_size)
        with self._lock:
            view = self._view
        count = -(-len(view) // part_size)
        if not 0 <= i < count:
            return None
        return view[i * part_size:(i + 1) * part_size]

    def sent(self, i: int, part_size: int, to: str = "") -> None:
        """Part ``i`` went out whole, to ``to`` (a file's pages of it leave resident memory)."""
        count = -(-len(self._view) // part_size)
        serde.evict(self.data, i * part_size, (i + 1) * part_size)
        with self._lock:
            done = self._sent.setdefault(part_size, set())
            before = len(done)
            done.add(i)
            now_all = before < count <= len(done)
        if now_all and self._on_served is not None:
            self._on_served(to)
