"""A node's side of sharded rounds (``topology: sharded``): the slice of the parameters it merges
and the merged slice it serves.

In a sharded round every participant owns one slice of the model (:mod:`transport.shards`). Each
contributor sends slice ``j`` of its update to owner ``j``; each owner folds the slices it gets in
the fold order with the leader's own :class:`~swarmnode.node.collector.Collector` (the same rule,
the same checks), merges once every contributor's slice is in, and serves its merged slice to the
round's leader, which assembles and commits the whole model, and to every other participant,
which assembles it too and checks it against the committed digest. Each site sends and receives
about 2(N-1)/N models a round instead of the leader's 2(N-1).

What this module decides nothing about: when to send, merge or give up (the round machine and
:mod:`~swarmnode.node.rules`); how bytes travel (the transports).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from swarmnode.errors import DuplicateUpdate, RoundError, SwarmError, TransportError
from swarmnode.node.collector import Collector
from swarmnode.transport import serde
from swarmnode.transport.compression import UpdateCodec
from swarmnode.transport.shards import EncodedSlice, ShardLayout
from swarmnode.types import StateDict, Update

__all__ = ["ShardExchange", "gather", "scatter"]

log = logging.getLogger("swarmnode.node")

_Key = tuple[int, int]  # (round, attempt)


class ShardExchange:
    """The slices this node merges, one collector per (round, attempt), and what they merged."""

    def __init__(self, spec: serde.ParamSpec, method: str, options: Mapping[str, float],
                 me: str, on_add: Callable[[], None] | None = None) -> None:
        self.spec, self.method, self.options, self.me = spec, method, dict(options), me
        self.on_add = on_add
        self._cond = threading.Condition()
        self._layouts: dict[int, ShardLayout] = {}
        self._collectors: dict[_Key, Collector] = {}
        self._merged: dict[_Key, serde.Buffer] = {}
        self._failed: dict[_Key, str] = {}

    def layout(self, round: int, participants: Iterable[str]) -> ShardLayout:
        """The cut of ``round``'s model among its participants (fixed once it is elected)."""
        with self._cond:
            layout = self._layouts.get(round)
            owners = tuple(sorted(participants, key=str.lower))
            if layout is None or layout.owners != owners:
                layout = ShardLayout(self.spec, owners)
                self._layouts = {r: v for r, v in self._layouts.items() if r >= round - 2}
                self._layouts[round] = layout
            return layout

    def mine(self, round: int, participants: Iterable[str]) -> int:
        """The slice this node merges in ``round``; RoundError if it is not a participant."""
        index = self.layout(round, participants).index_of(self.me)
        if index is None:
            raise RoundError(f"round {round}: this node is not a participant, so it merges no "
                             "slice")
        return index

    def collector(self, round: int, attempt: int, participants: Iterable[str],
                  contributors: Iterable[str]) -> Collector:
        """This node's collector of its slice in (round, attempt), told whose slices it folds."""
        parts = tuple(participants)
        layout = self.layout(round, parts)
        index = self.mine(round, parts)
        with self._cond:
            key = (round, attempt)
            c = self._collectors.get(key)
            if c is None:
                c = Collector(round, attempt, self.method, self.options, self.on_add,
                              spec=layout.slice_spec(index))
                self._collectors = {k: v for k, v in self._collectors.items()
                                    if k[0] >= round - 1}
                self._collectors[key] = c
        c.expect(contributors)
        return c

    def senders(self, round: int, attempt: int) -> frozenset[str]:
        with self._cond:
            c = self._collectors.get((round, attempt))
        return c.senders if c is not None else frozenset()

    def add(self, collector: Collector, sender: str, weight: int, state: StateDict,
            evict: Callable[[], None] | None = None) -> None:
        collector.add(Update(state, float(weight), sender, evict=evict))

    def reduce(self, round: int, attempt: int, participants: Iterable[str],
               contributors: Iterable[str]) -> serde.Buffer:
        """Merge this node's slice of (round, attempt) once (later calls return the same bytes):
        canonical safetensors of the merged slice. Not hashed: nobody reads a slice's digest
        (every site checks the assembled model's SHA-256 against the one the leader commits),
        and a pass over the slice here would delay its serving."""
        key = (round, attempt)
        with self._cond:
            done = self._merged.get(key)
        if done is not None:
            return done
        parts = tuple(participants)
        layout = self.layout(round, parts)
        index = self.mine(round, parts)
        collector = self.collector(round, attempt, parts, contributors)
        done: serde.Buffer
        if layout.empty(index):
            done = serde.Encoded({}).to_bytes()
        else:
            merged, _senders, _total = collector.seal()
            encoded = collector.encoded_bytes()
            if encoded is not None:
                done = encoded
            else:
                assert merged is not None
                done = serde.Encoded(merged).to_bytes()
            collector.release()
        with self._cond:
            self._merged = {k: v for k, v in self._merged.items() if k[0] >= round - 1}
            self._merged[key] = done
            self._cond.notify_all()
        return done

    def fail(self, round: int, attempt: int, why: str) -> None:
        """This node will not merge its slice of (round, attempt): askers stop waiting."""
        with self._cond:
            self._failed[(round, attempt)] = why
            self._failed = {k: v for k, v in self._failed.items() if k[0] >= round - 1}
            self._cond.notify_all()

    def merged(self, round: int, attempt: int, wait_s: float) -> serde.Buffer | None:
        """This node's merged slice of (round, attempt), waited for up to ``wait_s``."""
        key = (round, attempt)
        with self._cond:
            self._cond.wait_for(lambda: key in self._merged or key in self._failed,
                                timeout=max(0.0, wait_s))
            return self._merged.get(key)

    def held(self, round: int, attempt: int, index: int) -> serde.Buffer | None:
        """Slice ``index`` of (round, attempt) if this node merged it (and still holds it),
        whatever the round became since; None otherwise. Does not wait."""
        with self._cond:
            layout = self._layouts.get(round)
            if layout is None or layout.index_of(self.me) != index:
                return None
            return self._merged.get((round, attempt))


# -- the transfers ---------------------------------------------------------------------------------
def _start(jobs: Mapping[int, Callable[[], Any]]
           ) -> tuple[list[threading.Thread], dict[int, Any], dict[int, threading.Event]]:
    """Start each job on a thread of its own: the threads, index -> its result or the
    SwarmError it raised (once its event is set), index -> set when that job ended."""
    results: dict[int, Any] = {}
    ended = {i: threading.Event() for i in jobs}

    def run(i: int, job: Callable[[], Any]) -> None:
        try:
            results[i] = job()
        except SwarmError as exc:
            results[i] = exc
        except Exception as exc:  # a bug or a broken peer's bytes: that slice failed
            log.exception("sharded transfer %d failed", i)
            results[i] = TransportError(f"{type(exc).__name__}: {exc}")
        finally:
            ended[i].set()

    threads = [threading.Thread(target=run, args=(i, job), name=f"shard-{i}", daemon=True)
               for i, job in jobs.items()]
    for t in threads:
        t.start()
    return threads, results, ended


def _parallel(jobs: Mapping[int, Callable[[], Any]]) -> dict[int, Any]:
    """Run each job on a thread of its own; index -> its result or the SwarmError it raised."""
    threads, results, _ = _start(jobs)
    for t in threads:
        t.join()
    return results


def scatter(exchange: ShardExchange, pool: Any, round: int, attempt: int,
            participants: Iterable[str], contributors: Iterable[str], payload: serde.Buffer,
            weight: int, timeout: float, done: set[int],
            codec: UpdateCodec | None = None, state: StateDict | None = None) -> dict[int, str]:
    """Send slice ``j`` of this node's update (canonical ``payload``) to owner ``j``, for every
    slice not in ``done`` (which gains each slice delivered; this node's own goes into its own
    collector). Returns the failures: index -> why (retried by the next Scatter).

    With a ``codec`` that compresses (the spec's ``compression``) and the round's starting
    model at hand, each slice travels as its coded change from that model (``state``: the
    update's tensors, viewing ``payload``), coded on the thread that sends it, so the slices
    are coded and sent at once; this node's own slice is folded as its owner would fold it had
    it been sent (coded, then decoded)."""
    parts, contrib = tuple(participants), tuple(contributors)
    layout = exchange.layout(round, parts)
    me = exchange.mine(round, parts)
    coder = (codec if codec is not None and state is not None and codec.start_slices(round)
             else None)
    update: StateDict = state or {}

    def coded_slice(index: int) -> serde.Buffer | None:
        return None if coder is None else coder.outgoing_slice(round, update, layout, index)

    def piece_of(index: int) -> EncodedSlice:
        coded = coded_slice(index)
        if coded is None:  # a view of the payload: no copy
            return layout.encode(payload, index)
        view = memoryview(coded).cast("B")  # its header, then its tensors' bytes
        head = 8 + int.from_bytes(view[:8], "little")
        return EncodedSlice(bytes(view[:head]), view[head:])

    def own_slice(index: int) -> StateDict:
        coded = coded_slice(index)
        if coder is None or coded is None:  # views of the payload's bytes, no copy
            return layout.cut(payload, index)
        wire = serde.view_state(coded, spec=coder.slice_spec(layout, index),
                                reject_nonfinite=False)
        return coder.incoming_slice(round, layout, index, wire, exchange.me)

    def send(index: int) -> Callable[[], None]:
        def job() -> None:
            if index == me:
                collector = exchange.collector(round, attempt, parts, contrib)
                try:
                    exchange.add(collector, exchange.me, weight, own_slice(index))
                except DuplicateUpdate:
                    pass
                return
            piece = piece_of(index)
            try:
                pool.client(layout.owners[index]).push_shard(
                    round, attempt, index, weight, piece, timeout=timeout)
            except DuplicateUpdate:  # an earlier try arrived; only its reply was lost
                pass
        return job

    wanted = [i for i in range(len(layout.owners)) if i not in done and not layout.empty(i)]
    failed: dict[int, str] = {}
    for index, result in _parallel({i: send(i) for i in wanted}).items():
        if isinstance(result, SwarmError):
            failed[index] = f"{layout.owners[index]}: {result}"
        else:
            done.add(index)
    done.update(i for i in range(len(layout.owners)) if layout.empty(i))
    return failed


def gather(exchange: ShardExchange, pool: Any, round: int, attempt: int,
           participants: Iterable[str], timeout: float,
           stop: threading.Event | None = None) -> tuple[Any, bytes]:
    """The round's merged model from every owner's merged slice (this node's own included, once
    merged): canonical bytes and their SHA-256. TransportError naming the owners that did not
    serve theirs within ``timeout``; PayloadRejected for a slice that is not one.

    The model is assembled in one buffer allocated up front: each owner's slice is received
    straight into its place (its header compared with the layout's, not parsed), and the whole
    model is hashed once, in order, while the slices still to come are arriving. A slice's own
    SHA-256 is not computed again on the way: TLS authenticates every byte of the hop, and the
    owner's claim about its slice adds nothing the assembled model's digest (committed by the
    leader, checked by every member against the chain) does not check."""
    parts = tuple(participants)
    layout = exchange.layout(round, parts)
    me = exchange.mine(round, parts)
    until = time.monotonic() + timeout
    out, _views = layout.spec.allocate()  # the header written, the pages faulted in

    def fetch(index: int) -> Callable[[], None]:
        def job() -> None:
            into = layout.body(out, index)
            try:
                if index == me:
                    held = exchange.merged(round, attempt, max(0.0, until - time.monotonic()))
                    if held is None:
                        raise RoundError(f"round {round}: this node's own slice is not merged")
                    into[:] = layout.slice_body(held, index)
                    return
                while True:
                    left = until - time.monotonic()
                    if left <= 0 or (stop is not None and stop.is_set()):
                        raise TransportError(f"round {round}: slice {index} not served in time")
                    asked = time.monotonic()
                    try:
                        pool.client(layout.owners[index]).pull_shard_into(
                            round, attempt, index, layout.header(index), into, timeout=left,
                            wait_s=min(left * 0.9, 10.0))
                        return
                    except RoundError:  # not merged yet (the owner held the ask): ask again
                        if time.monotonic() - asked < 0.5:
                            (stop or threading.Event()).wait(0.2)
            finally:
                into.release()
        return job

    wanted = [i for i in range(len(layout.owners)) if not layout.empty(i)]
    threads, results, ended = _start({i: fetch(i) for i in wanted})
    # hashed in the model's order as the slices come in (the header, then slice 0, 1, ...:
    # the slices' ranges are contiguous), so little is left to hash once the last one is in
    with memoryview(out) as whole:
        sha = hashlib.sha256(bytes(whole[:layout.head_len]))
    for i in wanted:
        ended[i].wait()
        if isinstance(results.get(i), SwarmError):
            break
        with layout.body(out, i) as body:
            sha.update(body)
    for t in threads:
        t.join()
    missing = {i: r for i, r in results.items() if isinstance(r, SwarmError)}
    if missing:
        raise TransportError(
            f"round {round}: no merged slice from "
            + "; ".join(f"{layout.owners[i]} ({r})" for i, r in sorted(missing.items())))
    return out, sha.digest()
