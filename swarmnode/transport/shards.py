"""How a sharded round (``topology: sharded``) cuts the model among its participants.

The tensors' bytes of a canonical payload (everything after its header, see :mod:`serde`) are cut
into one contiguous range per *owner*: the round's participants in fold order (by address). Every
cut falls on a multiple of :data:`ALIGN` bytes; since a canonical payload starts every tensor at a
multiple of its item size (1, 2, 4 or 8), an aligned cut never splits an element. The ranges are
as even as that allows.

A *slice* is what one range holds: for each tensor the range overlaps, the elements inside it,
flattened, under the tensor's own name. Slices travel as canonical safetensors (a slice's
:meth:`ShardLayout.slice_spec` says exactly which names, lengths and dtypes it must have, so the
receiver checks it like any payload). Those bytes are the slice's own header followed by the
payload's bytes in the range, unchanged (the slice keeps the payload's canonical tensor order and
has no holes): :meth:`ShardLayout.encode` sends them as the header and a *view* of the payload,
and a member assembling the merged model receives each slice's tensor bytes straight into their
place in the model (:meth:`ShardLayout.body`), so no slice is ever copied into a buffer of its
own.

Why this gives the leader topology's bytes: the coordinate-wise rules (mean, coordmedian,
trimmedmean) compute every element from that element's values alone, in the fold order, so merging
a slice gives exactly the elements merging the whole model gives there; :meth:`ShardLayout.place`
puts each owner's merged slice where it belongs, and the assembled payload, header included, is
byte for byte the one the leader topology commits.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from swarmnode.errors import PayloadRejected
from swarmnode.transport import serde

__all__ = ["ALIGN", "EncodedSlice", "Segment", "ShardLayout"]

ALIGN = 8  # bytes: the largest item size a canonical payload holds


@dataclass(frozen=True)
class Segment:
    """The part of one tensor that a slice holds: ``count`` elements from element ``first``."""

    name: str
    dtype: torch.dtype
    first: int
    count: int
    offset: int  # byte offset of the tensor in the payload's tensor bytes (after the header)

    @property
    def start(self) -> int:
        """Byte offset of the segment in the payload's tensor bytes."""
        return self.offset + self.first * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


@dataclass(frozen=True, eq=False)
class EncodedSlice:
    """A slice as canonical safetensors without a copy: its header, then its tensors' bytes (a
    view of the payload it was cut from, valid while that payload is). Nothing hashes it on the
    way: TLS authenticates every byte of the hop, and a digest the sender sends along the same
    connection adds nothing to that; :attr:`digest` is computed only when asked."""

    head: bytes
    body: memoryview

    @property
    def nbytes(self) -> int:
        return len(self.head) + len(self.body)

    @functools.cached_property
    def digest(self) -> bytes:
        """The SHA-256 of the slice's bytes (head and body), computed once when first asked."""
        sha = hashlib.sha256(self.head)
        sha.update(self.body)
        return sha.digest()

    def to_bytes(self) -> bytes:
        return self.head + bytes(self.body)


class ShardLayout:
    """The cut of one training's model among ``owners`` (any order; kept in fold order)."""

    def __init__(self, spec: serde.ParamSpec, owners: Sequence[str]) -> None:
        if not owners:
            raise ValueError("a sharded round needs at least one owner")
        self.spec = spec
        self.owners = tuple(sorted(owners, key=str.lower))
        if len({o.lower() for o in self.owners}) != len(self.owners):
            raise ValueError(f"owners are not distinct: {list(self.owners)}")
        self.head_len, self._items = spec.layout()
        self.total = spec.nbytes
        n = len(self.owners)
        cuts = [0] + [self.total * i // n // ALIGN * ALIGN for i in range(1, n)] + [self.total]
        self.ranges = [(cuts[i], cuts[i + 1]) for i in range(n)]
        self._segments = [self._cut(lo, hi) for lo, hi in self.ranges]
        self._heads: dict[int, bytes] = {}

    def _cut(self, lo: int, hi: int) -> list[Segment]:
        out = []
        for name, shape, dtype, offset in self._items:
            size = dtype.itemsize
            end = offset + size * _numel(shape)
            a, b = max(lo, offset), min(hi, end)
            if a < b:
                out.append(Segment(name, dtype, (a - offset) // size, (b - a) // size, offset))
        return out

    # -- who holds what ---------------------------------------------------------------------------
    def index_of(self, owner: str) -> int | None:
        """The slice ``owner`` merges; None if it is not one of the owners."""
        key = owner.lower()
        for i, o in enumerate(self.owners):
            if o.lower() == key:
                return i
        return None

    def segments(self, index: int) -> list[Segment]:
        return self._segments[index]

    def empty(self, index: int) -> bool:
        """A slice with no bytes (a model smaller than ALIGN bytes per owner)."""
        lo, hi = self.ranges[index]
        return lo == hi

    def slice_spec(self, index: int) -> serde.ParamSpec:
        """The names, lengths and dtypes a slice must have."""
        return serde.ParamSpec({s.name: ((s.count,), serde._name(s.dtype))
                                for s in self._segments[index]})

    def slice_payload_bytes(self, index: int) -> int:
        """The size of slice ``index`` as canonical safetensors."""
        return self.slice_spec(index).payload_bytes

    # -- moving bytes -----------------------------------------------------------------------------
    def cut(self, payload: serde.Buffer, index: int) -> dict[str, torch.Tensor]:
        """Slice ``index`` of a canonical payload of the spec: tensors viewing its bytes (not
        copies; valid while ``payload`` is)."""
        body, lo = self.body(payload, index), self.ranges[index][0]
        out = {}
        with warnings.catch_warnings():  # a read-only payload: the views are only read
            warnings.simplefilter("ignore", UserWarning)
            for s in self._segments[index]:
                out[s.name] = torch.frombuffer(body, dtype=s.dtype, count=s.count,
                                               offset=s.start - lo)
        return out

    def cut_state(self, state: Mapping[str, torch.Tensor], index: int,
                  partial: bool = False) -> dict[str, torch.Tensor]:
        """Slice ``index`` of a whole model's tensors (name -> tensor of the spec's shape, any
        dtype: a model, its change, a residual): flat views of each segment's elements, no
        copy. ``partial``: tensors ``state`` lacks are left out (else KeyError)."""
        return {s.name: state[s.name].reshape(-1)[s.first:s.first + s.count]
                for s in self._segments[index] if not partial or s.name in state}

    def place(self, into: serde.Buffer, index: int, state: Mapping[str, torch.Tensor]) -> None:
        """Copy slice ``index`` (checked against :meth:`slice_spec`) into its place in ``into``,
        a canonical payload of the spec (e.g. from ``spec.allocate()``)."""
        self.slice_spec(index).check(state, f"slice {index}")
        view = memoryview(into).cast("B")
        for s in self._segments[index]:
            at = self.head_len + s.start
            src = state[s.name].detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            view[at:at + s.nbytes] = memoryview(src).cast("B")

    def header(self, index: int) -> bytes:
        """The canonical safetensors header of slice ``index`` (length field included): the
        same for every payload of the spec, so a received slice's header is compared, not
        parsed."""
        head = self._heads.get(index)
        if head is None:
            head = self._heads[index] = self.slice_spec(index)._canonical()[0]
        return head

    def body(self, payload: serde.Buffer, index: int) -> memoryview:
        """The bytes of slice ``index``'s tensors inside ``payload`` (a canonical payload of
        the spec), as a view: what follows the slice's header on the wire."""
        view = memoryview(payload).cast("B")
        if len(view) != self.head_len + self.total:
            raise PayloadRejected(
                f"a payload of {len(view)} bytes is not a canonical payload of the training "
                f"spec ({self.head_len + self.total} bytes): cannot cut slice {index}")
        lo, hi = self.ranges[index]
        return view[self.head_len + lo:self.head_len + hi]

    def encode(self, payload: serde.Buffer, index: int) -> EncodedSlice:
        """Slice ``index`` of ``payload`` as canonical safetensors: its header and a view of
        the payload (no copy, no pass over the bytes)."""
        return EncodedSlice(self.header(index), self.body(payload, index))

    def slice_body(self, data: serde.Buffer, index: int) -> memoryview:
        """The tensors' bytes of a canonical slice ``index`` (``data``: its header and body, as
        :meth:`encode` or a merge made it); PayloadRejected if its header is not the slice's."""
        view = memoryview(data).cast("B")
        head = self.header(index)
        lo, hi = self.ranges[index]
        if len(view) != len(head) + hi - lo or view[:len(head)] != head:
            raise PayloadRejected(f"slice {index}: not a canonical slice of the training spec "
                                  f"({len(view)} bytes; its header differs from the layout's)")
        return view[len(head):]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
