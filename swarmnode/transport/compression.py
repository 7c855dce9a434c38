"""Compressed updates: what a member sends the leader when the training spec sets ``compression``.

A member's update travels as its change from the round's starting model (the newest merged model
committed before the round, whose digest is on chain, so member and leader hold the same bytes),
encoded per floating tensor:

* ``none``: the whole model in its own dtypes (float32), as without this module.
* ``bf16`` / ``fp16``: the change rounded to bfloat16 / float16, round-to-nearest-even (no
  stochastic rounding: the same update always gives the same bytes, so the same seed gives the
  same merged digest). Half the bytes of float32.
* ``int8``: the change in blocks of :data:`BLOCK` values, each block an int8 per value and one
  float32 scale (its largest magnitude / 127). About a quarter of the bytes of float32.

Every code has error feedback: each site keeps what the rounding dropped (its *residual*, one
float32 model) and adds it to its next round's change, so nothing is lost for good, only late,
and rounding errors do not pile up over the rounds. Tensors of fewer than
  :data:`BLOCK` values travel whole (a bias of 10 values: its scale's header entry would cost
  more than the code saves).

Tensors that are not floating (integer buffers such as BatchNorm's ``num_batches_tracked``, bool
masks) and floating tensors no wider than the code (a bfloat16 tensor under ``fp16``) travel as
they are, whole. A round with no committed model before it (the first), or an update whose change
the code cannot hold (a float16 change beyond 65504, a non-finite value), travels whole in its own
dtypes: the payload's dtypes say which it is, and the training spec's :class:`UpdateSpec` accepts
exactly those two layouts.

The leader turns every update back into a full model in the spec's dtypes (starting model + the
decoded change) before it is merged, its own update included (:meth:`UpdateCodec.own` encodes and
decodes it as if it had sent it), so every merge rule runs unchanged on float32 models, the merged
model stays float32, and who leads does not change the merged bytes.

The pure functions (:func:`layout`, :func:`encode`, :func:`decode`) hold the codec;
:class:`UpdateCodec` is one site's use of it over a training: the starting model per round, the
residual, the encoded update cached per round (a push retried to a re-elected leader sends the
same bytes, and the residual moves once per round).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping

import torch

from swarmnode.errors import (
    ChainTimeout,
    ChainUnavailable,
    ConfigError,
    PayloadRejected,
    SwarmError,
)
from swarmnode.transport import serde
from swarmnode.transport.shards import ShardLayout
from swarmnode.types import StateDict

__all__ = ["BLOCK", "MODES", "SCALE_SUFFIX", "UpdateCodec", "UpdateSpec", "check_mode", "decode",
           "encode", "layout", "wire_bytes"]

log = logging.getLogger("swarmnode.compression")

MODES = ("none", "bf16", "fp16", "int8")
_CODE = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
BLOCK = 256  # int8: values per float32 scale (4 bytes of scale per 256 values: +1.6%)
SCALE_SUFFIX = "#int8_scale"  # int8: the tensor of block scales of parameter NAME is NAME + this
_FP16_MAX = float(torch.finfo(torch.float16).max)

Layout = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype name), as ParamSpec


def check_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`MODES`, else ValueError saying which ones are."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"compression must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _compressed(dtype: str, shape: tuple[int, ...], mode: str) -> bool:
    """Whether a tensor of ``dtype`` and ``shape`` travels as a coded change under ``mode``."""
    if mode == "none" or (mode == "int8" and math.prod(shape) < BLOCK):
        return False  # int8: a scale tensor's header entry would cost more than the code saves
    t = getattr(torch, dtype)
    return t.is_floating_point and t.itemsize > _CODE[mode].itemsize


def layout(params: Mapping[str, tuple[tuple[int, ...], str]], mode: str) -> Layout:
    """The tensors of a compressed update of a model with ``params`` (name -> (shape, dtype)).
    ConfigError if a parameter's name is one the int8 code needs for a scale tensor."""
    check_mode(mode)
    out: Layout = {}
    for name, (shape, dtype) in params.items():
        if not _compressed(dtype, tuple(shape), mode):
            out[name] = (tuple(shape), dtype)
            continue
        out[name] = (tuple(shape), "bfloat16" if mode == "bf16" else
                     "float16" if mode == "fp16" else "int8")
        if mode == "int8":
            scale = name + SCALE_SUFFIX
            if scale in params:
                raise ConfigError(
                    f"compression int8 names the block scales of tensor {name!r} {scale!r}, "
                    "which is also a tensor of the model; rename that tensor or use compression "
                    "bf16")
            out[scale] = ((-(-math.prod(shape) // BLOCK),), "float32")
    return out


def wire_bytes(params: Mapping[str, tuple[tuple[int, ...], str]], mode: str) -> int:
    """The size of a canonical compressed update of a model with ``params``."""
    return serde.ParamSpec(layout(params, mode)).payload_bytes


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _quantize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 block scales of the float tensor ``v``."""
    flat = v.reshape(-1).to(torch.float32)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)
    scale = blocks.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n].reshape(v.shape), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of int8 ``q`` with block scales ``scale`` (what the leader decodes)."""
    n = q.numel()
    blocks = torch.nn.functional.pad(q.reshape(-1).to(torch.float32), (0, -n % BLOCK))
    return (blocks.view(-1, BLOCK) * scale.to(torch.float32)[:, None]).reshape(-1)[:n] \
        .reshape(q.shape)


def encode(
    state: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    mode: str,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[StateDict, StateDict] | None:
    """``state``'s change from ``base`` in ``mode``: (the tensors to send, the new residual:
    what the code dropped), or None when the change does not fit the code (a non-finite value,
    a float16 change beyond 65504): send ``state`` whole then. ``residual``: what the previous
    round's code dropped (added to this change)."""
    check_mode(mode)
    if mode == "none":
        return dict(state), {}
    out: StateDict = {}
    kept: StateDict = {}
    with torch.no_grad():
        for name, t in state.items():
            if not _compressed(str(t.dtype).removeprefix("torch."), tuple(t.shape), mode):
                out[name] = t
                continue
            acc = _acc(t.dtype)
            # in place where the dtypes allow (one pass each, no temporaries); the same bits
            # as (t.to(acc) - base.to(acc)) + residual.to(acc): each operand is promoted to acc
            change = (torch.sub(t, base[name]) if t.dtype == acc == base[name].dtype
                      else t.to(acc) - base[name].to(acc))
            if residual is not None and name in residual:
                change.add_(residual[name])
            if mode != "int8":
                low, high = ((float(v) for v in torch.aminmax(change)) if change.numel()
                             else (0.0, 0.0))  # one pass (NaN anywhere: both NaN)
                if (not (math.isfinite(low) and math.isfinite(high))
                        or (mode == "fp16" and max(-low, high) > _FP16_MAX)):
                    return None
                out[name] = change.to(_CODE[mode])
                kept[name] = change.sub_(out[name]).to(torch.float32)  # what the code dropped
                continue
            q, scale = _quantize(change)
            if not bool(torch.isfinite(scale).all()):
                return None
            out[name], out[name + SCALE_SUFFIX] = q, scale
            kept[name] = (change - _dequantize(q, scale).to(acc)).to(torch.float32)
    return out, kept


def decode(
    wire: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    params: Mapping[str, tuple[tuple[int, ...], str]],
    mode: str,
) -> StateDict:
    """The full model a compressed update ``wire`` stands for: ``base`` + its decoded change, in
    the dtypes of ``params`` (the training spec); tensors sent whole are taken as they are."""
    out: StateDict = {}
    with torch.no_grad():
        for name, (shape, dtype) in params.items():
            t = wire[name]
            if not _compressed(dtype, shape, mode):
                out[name] = t
                continue
            target = getattr(torch, dtype)
            acc = _acc(target)
            change = (_dequantize(t, wire[name + SCALE_SUFFIX]) if mode == "int8" else t)
            if base[name].dtype == acc == target:  # one pass: the change is promoted to acc
                out[name] = torch.add(base[name], change)
            else:
                out[name] = (base[name].to(acc) + change.to(acc)).to(target)
    return out


class UpdateSpec(serde.ParamSpec):
    """What a pushed update may look like under ``mode``: the model whole (the training spec's
    layout) or its compressed change (:func:`layout`). Its size limits are the whole model's."""

    def __init__(self, params: Mapping[str, tuple[tuple[int, ...], str]], mode: str) -> None:
        super().__init__(params)
        object.__setattr__(self, "mode", check_mode(mode))
        object.__setattr__(self, "wire", serde.ParamSpec(layout(self.params, mode)))

    def __hash__(self) -> int:
        return hash((tuple(self.params.items()), self.mode))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, UpdateSpec) and self.params == other.params
                and self.mode == other.mode)

    def payload_sizes(self) -> tuple[int, ...]:
        """Whole, then (if it differs) coded."""
        whole, coded = self.payload_bytes, self.wire.payload_bytes
        return (whole,) if coded == whole else (whole, coded)

    def is_compressed(self, got: Mapping[str, tuple[tuple[int, ...], str]]) -> bool:
        """Whether tensors named and typed as ``got`` are a compressed change (else: whole)."""
        if self.mode == "none" or dict(got) == self.params:
            return False
        return any(got.get(name, ((), ""))[1] == self.wire.params[name][1]
                   for name, (shape, dtype) in self.params.items()
                   if _compressed(dtype, shape, self.mode))

    def _check(self, got: Mapping[str, tuple[tuple[int, ...], str]], who: str) -> None:
        if self.is_compressed(got):
            self.wire._check(got, f"{who} (a {self.mode}-compressed update)")
        else:
            super()._check(got, who)



# (round, pull) -> the bytes of the model the round starts from, None if no round committed
# before it; pull=False: only if this node holds it (else a SwarmError)
StartOf = Callable[[int, bool], "serde.Buffer | None"]


class UpdateCodec:
    """One site's compressed updates over a training: what it sends for a round
    (:meth:`outgoing`), what the leader folds of its own update (:meth:`own`) and of a member's
    (:meth:`incoming`). ``start_of`` finds the model a round starts from; the leader's transport
    threads ask it with ``pull=False`` (they must not fetch a model themselves) and wait up to
    ``wait_s`` for the round's thread to fetch one this node lacks."""

    def __init__(self, mode: str, params: Mapping[str, tuple[tuple[int, ...], str]],
                 start_of: StartOf | None = None, wait_s: float = 10.0) -> None:
        self.mode = check_mode(mode)
        self.update_spec = UpdateSpec(params, mode)
        self.params = self.update_spec.params
        self._model_spec = serde.ParamSpec(self.params)
        self._start_of, self.wait_s = start_of, wait_s
        self._cond = threading.Condition()
        self._bases: dict[int, StateDict | None] = {}
        self._sent: tuple[int, serde.Buffer] | None = None  # the last round encoded, its bytes
        self._residual: StateDict = {}  # what the codes sent so far dropped
        # (round, the residual before that round): a round encoded again another way (whole
        # after slices) starts from what the rounds before it dropped, not from itself
        self._before: tuple[int, StateDict] | None = None
        # a sharded round's coded slices: (round, index -> bytes or None: sent whole)
        self._slices: tuple[int, dict[int, serde.Buffer | None]] | None = None

    @property
    def compresses(self) -> bool:
        return self.mode != "none"

    def outgoing(self, round: int, state: StateDict, payload: serde.Buffer) -> serde.Buffer:
        """The bytes this site sends as its update for ``round`` (``state``, whose canonical
        bytes are ``payload``): the same bytes however often it is asked for one round."""
        if not self.compresses:
            return payload
        with self._cond:
            if self._sent is not None and self._sent[0] == round:
                return self._sent[1]
        try:
            base = self._base(round, pull=True)
        except (ChainUnavailable, ChainTimeout):
            raise  # the round retries the step: a passing outage must not change what is sent
        except SwarmError as exc:
            log.warning("round %d: the model the round starts from is not at hand (%s); the "
                        "update is sent whole", round, exc)
            base = None
        coded = None if base is None else encode(state, base, self.mode,
                                                 self._residual_for(round))
        if coded is None:
            if base is not None:
                log.warning("round %d: the update's change does not fit %s (a value beyond its "
                            "range, or NaN/Inf); it is sent whole", round, self.mode)
            data: serde.Buffer = payload
        else:
            wire, kept = coded
            data = serde.encode(wire)
            with self._cond:
                self._residual = kept
        with self._cond:
            self._sent = (round, data)
        return data

    def _residual_for(self, round: int) -> StateDict:
        """What the codes of the rounds before ``round`` dropped (added to its change)."""
        with self._cond:
            if self._before is None or self._before[0] != round:
                self._before = (round, self._residual)
            return self._before[1]

    # -- sharded rounds: one coded slice per owner (transport.shards) ----------------------------
    def slice_spec(self, layout: ShardLayout, index: int) -> UpdateSpec:
        """What slice ``index`` of an update may look like: the slice whole (the model's
        dtypes) or its coded change."""
        return UpdateSpec(layout.slice_spec(index).params, self.mode)

    def start_slices(self, round: int) -> bool:
        """Before a sharded round's slices are coded (on the round's own thread): fetch the
        model the round starts from. False: the slices go whole (no compression, the first
        round, or that model cannot be had)."""
        if not self.compresses:
            return False
        try:
            base = self._base(round, pull=True)
        except (ChainUnavailable, ChainTimeout):
            raise
        except SwarmError as exc:
            log.warning("round %d: the model the round starts from is not at hand (%s); the "
                        "slices are sent whole", round, exc)
            return False
        if base is None:
            return False
        with self._cond:
            if self._slices is None or self._slices[0] != round:
                # the residual after this round: each slice writes its own elements (what its
                # code dropped; a slice sent whole keeps what was dropped there before), into
                # the tensors of the residual two rounds back when there is one (no
                # model-sized allocation a round)
                old = self._before
                previous = self._residual_for(round)
                spare = (old[1] if old is not None and old[0] != round
                         and old[1] is not previous else {})
                self._slices = (round, {})
                self._residual = {
                    name: (spare[name] if name in spare and spare[name].shape == tuple(shape)
                           and spare[name].dtype == torch.float32
                           else torch.empty(shape, dtype=torch.float32))
                    for name, (shape, dtype) in self.params.items()
                    if getattr(torch, dtype).is_floating_point}
        return True

    def outgoing_slice(self, round: int, state: StateDict, layout: ShardLayout,
                       index: int) -> serde.Buffer | None:
        """Slice ``index`` of this site's update for ``round`` as its coded change (canonical
        safetensors of :meth:`slice_spec`'s coded layout), the same bytes however often it is
        asked; None: send the slice whole (nothing to code against, or its change does not fit
        the code). Call :meth:`start_slices` first; slices may be coded on threads of their
        own (each writes only its own elements of the residual)."""
        with self._cond:
            if self._slices is None or self._slices[0] != round:
                return None
            done = self._slices[1]
            if index in done:
                return done[index]
            residual = self._before[1] if self._before is not None else {}
            kept_into = self._residual
        base = self._bases.get(round)
        if base is None:
            return None
        coded = encode(layout.cut_state(state, index), layout.cut_state(base, index), self.mode,
                       layout.cut_state(residual, index, partial=True))
        data: serde.Buffer | None = None
        kept: StateDict = {}
        if coded is None:
            log.warning("round %d: slice %d's change does not fit %s (a value beyond its range, "
                        "or NaN/Inf); it is sent whole", round, index, self.mode)
        else:
            wire, kept = coded
            data = serde.encode(wire)
        before = layout.cut_state(residual, index, partial=True)
        for name, into in layout.cut_state(kept_into, index, partial=True).items():
            if name in kept:
                into.copy_(kept[name])
            elif name in before:  # sent whole (or not coded): what was dropped there stays
                into.copy_(before[name])
            else:
                into.zero_()
        with self._cond:
            if self._slices is not None and self._slices[0] == round:
                data = self._slices[1].setdefault(index, data)
        return data

    def incoming_slice(self, round: int, layout: ShardLayout, index: int, state: StateDict,
                       sender: str) -> StateDict:
        """The float32 slice (the model's dtypes) that slice ``index`` from ``sender``, checked
        against :meth:`slice_spec`, stands for: itself if it came whole, else the round's
        starting model's slice + the decoded change (the leader topology's :meth:`incoming`,
        element by element, so the merged bytes are the same)."""
        spec = self.slice_spec(layout, index)
        got = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in state.items()}
        if not spec.is_compressed(got):
            return state
        base = self._base_for_incoming(round, sender)
        return decode(state, layout.cut_state(base, index), spec.params, self.mode)

    def _base_for_incoming(self, round: int, sender: str) -> StateDict:
        try:
            base = self._base(round, pull=False)
        except SwarmError as exc:
            raise PayloadRejected(
                f"round {round}: the {self.mode} update of {sender} is a change from the round's "
                f"starting model, which this node does not hold ({exc}); send it again") from None
        if base is None:
            raise PayloadRejected(
                f"round {round}: the update of {sender} is a {self.mode} change, but no model was "
                "committed before this round to apply it to (the first round's updates travel "
                "whole)")
        return base

    def own(self, round: int, state: StateDict, payload: serde.Buffer) -> StateDict:
        """What the leader folds of its own update for ``round``: what a member would fold of
        it had the leader sent it (so who leads does not change the merged bytes)."""
        if not self.compresses:
            return state
        data = self.outgoing(round, state, payload)
        if data is payload:
            return state
        wire = serde.view_state(data, spec=self.update_spec, reject_nonfinite=False)
        return self.incoming(round, wire, "this node")

    def incoming(self, round: int, state: StateDict, sender: str) -> StateDict:
        """The full model (the training spec's dtypes) of an update for ``round`` that was
        checked against :attr:`update_spec`; PayloadRejected if it is compressed and this node
        cannot get the model the round starts from."""
        got = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in state.items()}
        if not self.update_spec.is_compressed(got):
            return state
        return decode(state, self._base_for_incoming(round, sender), self.params, self.mode)

    def _base(self, round: int, pull: bool) -> StateDict | None:
        """The model ``round`` starts from (None: none was committed before it), cached."""
        with self._cond:
            if round in self._bases:
                return self._bases[round]
        if self._start_of is None:
            raise ConfigError("this codec was given no way to find a round's starting model")
        try:
            data = self._start_of(round, pull)
        except SwarmError:
            if pull:
                raise
            with self._cond:  # the round's own thread may be fetching it: wait for that
                if not self._cond.wait_for(lambda: round in self._bases, self.wait_s):
                    raise
                return self._bases[round]
        base = None if data is None else serde.view_state(data, spec=self._model_spec,
                                                          reject_nonfinite=False)
        with self._cond:
            self._bases = {r: b for r, b in self._bases.items() if r >= round - 1}
            self._bases[round] = base
            self._cond.notify_all()
        return base
