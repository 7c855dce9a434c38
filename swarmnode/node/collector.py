"""The leader's side of one round: updates folded in as they arrive, then merged once.

For ``mean`` the updates are folded into a running weighted sum (two models in memory, whatever the
number of nodes); robust rules need every update at once and keep them.

The fold order is fixed: by site (node address), never by arrival, so the same updates give the
same merged bytes on every run, whoever leads and whatever the network did (float32 sums depend on
their order). Once the leader knows the round's contributors (:meth:`Collector.expect`) an update
is folded as soon as every contributor before it in that order is in; one that arrives early waits
(its received buffer is held) until then, and :meth:`Collector.seal` folds whatever still waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from swarmnode import merge
from swarmnode.errors import DuplicateUpdate, MergeError, NonFiniteValues, RoundError
from swarmnode.transport import serde
from swarmnode.types import StateDict, Update

__all__ = ["SAFE_SUM", "Collector", "Collectors"]

# What a merge may sum at most: float32 overflows to Inf above 3.4e38. Updates whose weighted
# largest values would push the sum past this are refused, naming their sender.
SAFE_SUM = 1e38


def _fold_key(node: str) -> str:
    """The fold order: by node address, case-insensitive (checksummed or not)."""
    return node.lower()


def _largest(state: StateDict) -> float:
    """The largest absolute value among the floating tensors of ``state`` (NaN if any NaN)."""
    top = 0.0
    with torch.no_grad():
        for t in state.values():
            if t.is_floating_point() and t.numel():
                low, high = torch.aminmax(t)  # one pass, no temporary
                m = max(-float(low), float(high))
                if float(low) != float(low) or float(high) != float(high):
                    return float("nan")
                top = max(top, m)
    return top


class Collector:
    def __init__(self, round: int, attempt: int, method: str, options: Mapping[str, float],
                 on_add: Callable[[], None] | None = None,
                 spec: serde.ParamSpec | None = None) -> None:
        """With the training ``spec``, ``mean`` accumulates inside a canonical payload of the
        spec (one model's worth of memory for the sum and the merged bytes together)."""
        self.round = round
        self.attempt = attempt
        self.method = method
        self.options = dict(options)
        self._lock = threading.Lock()
        self._senders: dict[str, float] = {}
        self._spec = spec
        self._bound = 0.0  # sum of weight x largest |value| over the updates added
        self._out: Any = None  # the canonical payload the mean accumulates in
        self._views: dict[str, torch.Tensor] = {}
        # clip_norm clips each update's change from the round's starting model (given to seal)
        self.clip_norm = self.options.pop("clip_norm", None)
        self.options = merge.coerce_options(method, self.options)
        streaming = method == "mean" and self.clip_norm is None
        self._stream = merge.StreamingMean() if streaming else None
        self._updates: list[Update] = []
        self._pending: dict[str, Update] = {}  # arrived, waiting for its turn in the fold order
        self._order: list[str] | None = None  # the contributors, in fold order
        self._folded = 0  # how many of _order are folded
        self._sealed: tuple[StateDict | None, frozenset[str], float] | None = None
        self._sealing = False
        self._reference: StateDict | None = None
        self._on_add = on_add

    def add(self, update: Update) -> None:
        """Fold one participant's update in; a second one from the same sender is a replay."""
        with self._lock:
            self._check_locked(update.node)
            amax = _largest(update.state)
            share = update.weight if update.weight > 0 else 1.0
            if not amax <= (SAFE_SUM - self._bound) / share:  # also catches NaN/Inf
                raise NonFiniteValues(
                    f"round {self.round}: the update of {update.node} holds values up to "
                    f"{amax:.3g}; with its weight {update.weight:g} the leader's float32 sum "
                    "would overflow to Inf, so it is refused (a diverged or hostile trainer)"
                )
            if self._stream is not None:
                self._stream.check(update, len(self._senders))  # MergeError: refused, no change
                self._pending[update.node] = update
            else:
                self._updates.append(update)
            self._senders[update.node] = update.weight
            self._bound += share * amax
            if self._stream is None or not self._next_is(update.node):
                update.drop_resident()  # read again when its turn comes, or at the merge
            self._drain_locked()
        if self._on_add is not None:
            self._on_add()  # the leader's round loop looks again at once

    def check(self, node: str) -> None:
        """Refuse, before its bytes are taken in, an update :meth:`add` would refuse whatever it
        holds: a second one from ``node``, or one after the merge."""
        with self._lock:
            self._check_locked(node)

    def _check_locked(self, node: str) -> None:
        if node in self._senders:
            raise DuplicateUpdate(
                f"round {self.round}: {node} already sent its update; "
                "a replayed or duplicate update is refused"
            )
        if self._sealed is not None:
            raise RoundError(
                f"round {self.round}: the leader has already merged (attempt {self.attempt}); "
                "this update came too late and takes the merged model instead"
            )

    def expect(self, contributors: Iterable[str]) -> None:
        """The round's contributors (participants with a weight): updates fold in their order
        from now on. The first call counts; the set is fixed once the round is elected."""
        with self._lock:
            if self._order is None:
                self._order = sorted(set(contributors), key=_fold_key)
                self._drain_locked()

    def _next_is(self, node: str) -> bool:
        return self._order is not None and self._order[self._folded:self._folded + 1] == [node]

    def _drain_locked(self) -> None:
        """Fold the waiting updates whose turn has come."""
        if self._stream is None or self._order is None:
            return
        while self._folded < len(self._order):
            update = self._pending.pop(self._order[self._folded], None)
            if update is None:
                return
            self._fold_locked(update)
            self._folded += 1

    def _fold_locked(self, update: Update) -> None:
        assert self._stream is not None
        if self._spec is not None and self._out is None:
            self._out, self._views = self._spec.allocate()
            self._stream = merge.StreamingMean(into=self._views)
        self._stream.add(update)
        update.drop_resident()

    @property
    def senders(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._senders)

    @property
    def total_weight(self) -> float:
        with self._lock:
            return sum(self._senders.values())

    def seal(
        self, reference: StateDict | None = None
    ) -> tuple[StateDict | None, frozenset[str], float]:
        """Merge once and refuse later updates: (merged state or None if the total weight is 0,
        the senders merged, their total weight). Later calls return the same result.
        ``reference``: the model the round started from, for ``clip_norm``."""
        with self._lock:
            self._reference = reference
            if self._sealed is None:
                total = sum(self._senders.values())
                if self._stream is not None:  # whatever still waits, in the fold order
                    for node in sorted(self._pending, key=_fold_key):
                        self._fold_locked(self._pending.pop(node))
                self._sealing = True
                merged = self._merge_locked() if total > 0 else None
                if merged is not None:
                    self._stream = None  # spent by the in-place merge
                self._sealed = (merged, frozenset(self._senders), total)
            return self._sealed

    def result(self) -> StateDict:
        with self._lock:
            return self._merge_locked()

    def encoded(self) -> tuple[Any, bytes] | None:
        """After :meth:`seal`: the merged model as canonical bytes and their SHA-256, when the
        mean was accumulated in place (else None: encode the merged state)."""
        out = self.encoded_bytes()
        return None if out is None else (out, serde.digest(out))

    def encoded_bytes(self) -> Any | None:
        """:meth:`encoded` without the SHA-256: the canonical bytes alone (a sharded round's
        merged slice, whose digest nothing reads: the assembled model's is what is checked)."""
        with self._lock:
            if self._sealed is None or self._sealed[0] is None or self._out is None:
                return None
            with torch.no_grad():
                for name, tensor in self._sealed[0].items():
                    view = self._views[name]
                    if tensor.data_ptr() != view.data_ptr() and view.numel():
                        view.copy_(tensor)  # a float16/bfloat16 mean, computed in float32
            return self._out

    def release(self) -> None:
        """Free the merged tensors and the accumulator once the merged model is encoded (they
        are a model's worth of memory each); :meth:`seal` then returns no state."""
        with self._lock:
            if self._sealed is not None:
                self._sealed = (None, self._sealed[1], self._sealed[2])
            self._stream, self._updates, self._pending = None, [], {}
            self._out, self._views = None, {}

    def retire(self) -> None:
        """The round is over for this node: refuse later updates (as after a merge) and free
        what is held (:meth:`release`)."""
        with self._lock:
            if self._sealed is None:
                self._sealed = (None, frozenset(self._senders), sum(self._senders.values()))
        self.release()

    def _merge_locked(self) -> StateDict:
        if not self._senders:
            raise MergeError(f"round {self.round}: no update arrived to merge")
        if self._stream is not None:
            if self._sealed is None and self._sealing:
                return self._stream.result_in_place()  # sealed: nothing is added any more
            return self._stream.result()
        updates = sorted(self._updates, key=lambda u: _fold_key(u.node))
        if self.clip_norm is not None and self._reference is not None:
            return merge.merge(self.method, updates, clip_norm=float(self.clip_norm),
                               reference=self._reference, **self.options)
        return merge.merge(self.method, updates, **self.options)


class Collectors:
    """One collector per (round, attempt): a re-elected leader starts afresh."""

    def __init__(self, method: str, options: Mapping[str, float],
                 on_add: Callable[[], None] | None = None,
                 spec: serde.ParamSpec | None = None) -> None:
        self.spec = spec
        self.method = method
        self.options = dict(options)
        self.on_add = on_add
        self._lock = threading.Lock()
        self._by_key: dict[tuple[int, int], Collector] = {}

    def get(self, round: int, attempt: int) -> Collector:
        with self._lock:
            key = (round, attempt)
            if key not in self._by_key:
                self._by_key = {k: v for k, v in self._by_key.items() if k[0] >= round - 1}
                self._by_key[key] = Collector(round, attempt, self.method, self.options,
                                              self.on_add, self.spec)
            return self._by_key[key]

    def forget(self, upto: int) -> None:
        """Retire the collectors of rounds up to ``upto`` (over for this node): an attempt that
        never merged (abandoned, or re-elected to another leader) would otherwise keep its
        accumulator, a model's worth, until this node next leads a round."""
        with self._lock:
            old = [c for k, c in self._by_key.items() if k[0] <= upto]
            self._by_key = {k: c for k, c in self._by_key.items() if k[0] > upto}
        for collector in old:
            collector.retire()
