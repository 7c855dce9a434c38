"""The wire format of model parameters: the only module that knows it.

A state dict travels as *canonical safetensors* bytes: an 8-byte little-endian header length, a
JSON header (keys sorted, no whitespace, padded with spaces to a multiple of 8 bytes, no
``__metadata__``), then the tensors' bytes, largest item size first and by name within one item
size (so every tensor starts aligned), with no holes. The same state always gives the same bytes,
so :func:`digest` (SHA-256 of those bytes) identifies a model; the contract stores it per round.
Any conforming safetensors file decodes, not only canonical ones.

:func:`decode` treats its input as hostile: it checks the size, then the digest, then parses and
validates the header itself (never pickle, never ``torch.load``; a pickle or ``torch.save`` file is
named as such), then names/shapes/dtypes against a :class:`ParamSpec`, then NaN/Inf.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from swarmnode.errors import NonFiniteValues, PayloadRejected

__all__ = [
    "CHUNK_SIZE",
    "Assembler",
    "Buffer",
    "Encoded",
    "ParamSpec",
    "Received",
    "buffer",
    "chunks",
    "decode",
    "digest",
    "encode",
    "evict",
    "load_into",
    "map_file",
    "read_file",
    "spill_buffer",
    "view_state",
]

if sys.byteorder != "little":  # safetensors is little-endian; so is every supported platform
    raise ImportError("swarmnode's wire format needs a little-endian machine")

CHUNK_SIZE = 1 << 20  # bytes per streamed chunk
_BACKGROUND_HASH = 8 << 20  # payloads from this size on are hashed on a helper thread
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- encoding -------------------------------------------------------------------------------------
Buffer = bytes | bytearray | memoryview | mmap.mmap  # canonical bytes, owned or viewed


class Encoded:
    """A state dict laid out as canonical safetensors, not yet written anywhere: ``nbytes``;
    :meth:`to_bytes`, :meth:`to_buffer` (fresh memory, with its digest) and :meth:`write_to` (a
    file) write each byte once, straight from the tensors' memory."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        tensors: list[tuple[str, torch.Tensor]] = []
        for name, tensor in state.items():
            if not isinstance(name, str) or not name:
                raise PayloadRejected(
                    f"cannot encode parameter name {name!r}: names must be strings")
            if not isinstance(tensor, torch.Tensor):
                kind = type(tensor).__name__
                raise PayloadRejected(f"cannot encode {name!r}: a {kind}, not a tensor")
            if tensor.dtype not in _CODES:
                raise PayloadRejected(
                    f"cannot encode tensor {name!r}: dtype {_name(tensor.dtype)} has no "
                    "safetensors code; cast it (e.g. to float32) before syncing"
                )
            tensors.append((name, tensor.detach().to("cpu").contiguous()))
        tensors.sort(key=lambda nt: (-nt[1].element_size(), nt[0]))
        text, offset = _header([(n, t.shape, t.dtype) for n, t in tensors])
        self.head = struct.pack("<Q", len(text)) + text
        self.tensors = tensors
        self.nbytes = len(self.head) + offset

    def _parts(self) -> Iterator[Any]:
        yield self.head
        for _, t in self.tensors:
            if t.numel():
                yield t.reshape(-1).view(torch.uint8).numpy()

    def to_bytes(self) -> bytes:
        return b"".join(self._parts())

    def to_buffer(self) -> tuple[mmap.mmap | bytearray, bytes]:
        """The canonical bytes in fresh memory of their own, and their SHA-256: a helper thread
        hashes each tensor while the next one is copied, so the digest is ready with the bytes."""
        if not self.nbytes:
            return bytearray(), digest(b"")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        buf = mmap.mmap(-1, self.nbytes, flags=flags)
        view = memoryview(buf)
        sha = hashlib.sha256()
        with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:  # runs in order
            pos = 0
            for part in self._parts():
                src = memoryview(part).cast("B")
                n = len(src)
                view[pos : pos + n] = src
                hasher.submit(sha.update, view[pos : pos + n])
                pos += n
        view.release()
        return buf, sha.digest()

    def write_to(self, fd: int) -> None:
        """Write the canonical bytes at offset 0 of the open file ``fd`` and cut it to size.
        Rewriting the same file every round reuses its pages (no page faults after the first)."""
        pos = 0
        for part in self._parts():
            view = memoryview(part).cast("B")
            while len(view):
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        os.ftruncate(fd, pos)


def _header(items: list[tuple[str, Any, torch.dtype]]) -> tuple[bytes, int]:
    """Canonical JSON header (padded to 8 bytes) of tensors already in canonical order, and the
    tensors' total bytes."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in items:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8), offset


def encode(state: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of ``state`` (tensors are copied to contiguous CPU memory)."""
    return Encoded(state).to_bytes()


# Held while a spilled model is read whole (checked, folded): one at a time, so a node keeps at
# most one such model resident however many arrive together. Reentrant: a check may fold.
READING = threading.RLock()


class SpillMap(mmap.mmap):
    """A mapping of a file that nobody writes through while it is mapped: its resident pages
    may be dropped at any time (:func:`evict`) and are read back from the file on the next
    access. Made by :func:`spill_buffer` and :func:`map_file`."""


def map_file(path: str | os.PathLike[str]) -> SpillMap | bytes:
    """The bytes of the file at ``path``, mapped (copy-on-write, so tensors may view them; they
    must not be written). A file that is replaced by a rename later stays what it was here."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        return SpillMap(f.fileno(), size, access=mmap.ACCESS_COPY)


SPILL_MIN = 16 << 20  # bytes: smaller models are kept in memory (a file costs more than it saves)


def buffer(nbytes: int, spill: str | os.PathLike[str] | None = None,
           populate: bool = False) -> mmap.mmap | bytearray:
    """Fresh writable memory for ``nbytes`` of a model: with ``spill`` and at least
    :data:`SPILL_MIN` bytes a :func:`spill_buffer` in that folder, else anonymous memory;
    ``populate``: fault anonymous memory in at once (one syscall instead of a page fault per
    4 KiB as data arrives), for sizes already bounded by the training spec."""
    if spill is not None and nbytes >= SPILL_MIN:
        return spill_buffer(spill, nbytes)
    if not nbytes:
        return bytearray()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, nbytes, flags=flags)


def spill_buffer(directory: str | os.PathLike[str], nbytes: int,
                 source: int | None = None) -> SpillMap | bytearray:
    """``nbytes`` of writable memory backed by an unlinked file in ``directory``: its pages are
    the file's page cache, which the kernel can write back and reclaim, and :func:`evict` takes
    them out of this process's resident memory without losing a byte (they are read back on the
    next access). For models a node must hold but not touch: updates waiting for their turn at
    the leader, the own update between its checks and its push. The file is gone once the
    mapping is.

    ``source``: an open file whose first ``nbytes`` bytes the buffer starts with, copied by the
    kernel (``copy_file_range``: no page faults in this process, no page zeroed first); OSError
    if they cannot be copied that way (another filesystem, a source shorter than ``nbytes``:
    the caller copies them itself)."""
    if nbytes == 0:
        return bytearray()
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (OSError, AttributeError):  # a filesystem without O_TMPFILE: create, then unlink
        import tempfile

        fd, name = tempfile.mkstemp(dir=directory, prefix=".spill-")
        os.unlink(name)
    try:
        if source is None:
            os.ftruncate(fd, nbytes)
        else:
            pos = 0
            while pos < nbytes:
                n = os.copy_file_range(source, fd, nbytes - pos, pos, pos)
                if n <= 0:
                    raise OSError(f"the source ended after {pos} of {nbytes} bytes")
                pos += n
        return SpillMap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def evict(buf: Any, start: int = 0, end: int | None = None) -> None:
    """Drop the pages of ``buf[start:end]`` from resident memory, if ``buf`` is a
    :class:`SpillMap` (its bytes stay in the file; anything else is left alone)."""
    if not isinstance(buf, SpillMap):
        return
    end = len(buf) if end is None else min(end, len(buf))
    low = start - start % mmap.PAGESIZE
    if end > low:
        try:
            buf.madvise(mmap.MADV_DONTNEED, low, end - low)
        except (ValueError, OSError):  # closed meanwhile: nothing resident to drop
            pass


def read_file(
    fd: int, nbytes: int, max_bytes: int, what: str = "payload",
    spill: str | os.PathLike[str] | None = None,
) -> mmap.mmap | bytearray:
    """The ``nbytes`` bytes of the open file ``fd`` in fresh memory that the caller owns (a
    copy: the file's writer cannot change them afterwards), placed by :func:`buffer`;
    PayloadRejected if the file is not exactly ``nbytes`` long or ``nbytes`` is over
    ``max_bytes``."""
    if nbytes > max_bytes:
        raise PayloadRejected(
            f"{what}: {nbytes} bytes, over the limit of {max_bytes} bytes (raise max_update_mb "
            "if the model really is that large)"
        )
    size = os.fstat(fd).st_size
    if size != nbytes:
        raise PayloadRejected(
            f"{what}: the file holds {size} bytes but {nbytes} were announced (it was changed "
            "while being read, or truncated); send it again"
        )
    if nbytes == 0:
        return bytearray()
    if spill is not None and nbytes >= SPILL_MIN and hasattr(os, "copy_file_range"):
        try:  # copied by the kernel, file to file (at 100 MB: 28 instead of 45 CPU-ms)
            return spill_buffer(spill, nbytes, source=fd)
        except OSError:  # (another filesystem, truncated meanwhile): read it below, which says
            pass
    buf = buffer(nbytes, spill)
    view = memoryview(buf)
    pos = 0
    while pos < nbytes:
        n = os.preadv(fd, [view[pos:]], pos)
        if n <= 0:
            raise PayloadRejected(
                f"{what}: the file ended after {pos} of {nbytes} bytes (truncated while being "
                "read); send it again"
            )
        pos += n
    view.release()
    return buf


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 (32 bytes) of canonical bytes."""
    return hashlib.sha256(data).digest()


def chunks(data: bytes | bytearray | memoryview, size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """``data`` in slices of ``size`` bytes, as memoryviews (no copies)."""
    if size <= 0:
        raise ValueError("chunk size must be positive")
    view = memoryview(data).cast("B")
    for start in range(0, len(view), size):
        yield view[start : start + size]


# -- the training spec's view of a payload ---------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """Parameter name -> (shape, dtype name such as ``"float32"``) that every payload must match."""

    params: Mapping[str, tuple[tuple[int, ...], str]]

    def __post_init__(self) -> None:
        norm = {
            str(name): (tuple(int(d) for d in shape), str(dtype))
            for name, (shape, dtype) in sorted(self.params.items())
        }
        object.__setattr__(self, "params", norm)

    def __hash__(self) -> int:
        return hash(tuple(self.params.items()))

    @property
    def nbytes(self) -> int:
        """The tensors' bytes (a payload is this plus its header)."""
        return sum(math.prod(shape) * getattr(torch, dtype).itemsize
                   for shape, dtype in self.params.values())

    def _canonical(self) -> tuple[bytes, list[tuple[str, tuple[int, ...], torch.dtype]]]:
        items = [(n, shape, getattr(torch, dtype)) for n, (shape, dtype) in self.params.items()]
        items.sort(key=lambda it: (-it[2].itemsize, it[0]))
        text, _ = _header(items)
        return struct.pack("<Q", len(text)) + text, items

    def header(self) -> bytes:
        """The bytes before the tensors in a canonical payload of this spec."""
        return self._canonical()[0]

    def layout(self) -> tuple[int, list[tuple[str, tuple[int, ...], torch.dtype, int]]]:
        """Where a canonical payload of this spec keeps each tensor: the header's length (the
        tensors' bytes start there) and (name, shape, dtype, byte offset after the header) in
        canonical order. Every offset is a multiple of its tensor's item size."""
        head, items = self._canonical()
        out, pos = [], 0
        for name, shape, dtype in items:
            out.append((name, shape, dtype, pos))
            pos += math.prod(shape) * dtype.itemsize
        return len(head), out

    @property
    def payload_bytes(self) -> int:
        """The size of a canonical payload of this spec (what :func:`encode` makes)."""
        head, _ = self._canonical()
        return len(head) + self.nbytes

    def payload_sizes(self) -> tuple[int, ...]:
        """The sizes a canonical payload this spec accepts may have (one here; a spec that
        takes more than one layout says so)."""
        return (self.payload_bytes,)

    def allocate(self) -> tuple[mmap.mmap, dict[str, torch.Tensor]]:
        """A canonical payload of this spec to fill in: fresh memory with the header written,
        and one tensor per parameter viewing its place (what :func:`encode` would put there)."""
        head, items = self._canonical()
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        buf = mmap.mmap(-1, max(1, len(head) + self.nbytes), flags=flags)
        buf[: len(head)] = head
        views: dict[str, torch.Tensor] = {}
        pos = len(head)
        for name, shape, dtype in items:
            count = math.prod(shape)
            if count:
                views[name] = torch.frombuffer(buf, dtype=dtype, count=count,
                                               offset=pos).reshape(shape)
            else:
                views[name] = torch.empty(shape, dtype=dtype)
            pos += count * dtype.itemsize
        return buf, views

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> ParamSpec:
        return cls({name: (tuple(t.shape), _name(t.dtype)) for name, t in state.items()})

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace."""
        body = {n: {"dtype": dt, "shape": list(shape)} for n, (shape, dt) in self.params.items()}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ParamSpec:
        try:
            raw = json.loads(text)
            return cls({n: (tuple(p["shape"]), p["dtype"]) for n, p in raw.items()})
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PayloadRejected(f"not a parameter spec in JSON ({exc})") from None

    def check(self, state: Mapping[str, torch.Tensor], who: str = "the payload") -> None:
        """PayloadRejected naming the first tensor whose name, shape or dtype differs."""
        self._check({n: (tuple(t.shape), _name(t.dtype)) for n, t in state.items()}, who)

    def _check(self, got: Mapping[str, tuple[tuple[int, ...], str]], who: str) -> None:
        missing = sorted(set(self.params) - set(got))
        extra = sorted(set(got) - set(self.params))
        hint = "the sender's model differs from the swarm's training spec"
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks tensor(s) {_few(missing)}")
            if extra:
                parts.append(f"has tensor(s) {_few(extra)} that the spec does not name")
            raise PayloadRejected(f"{who} {' and '.join(parts)}; {hint}")
        for name, (shape, dtype) in self.params.items():
            g_shape, g_dtype = got[name]
            if g_shape != shape:
                raise PayloadRejected(
                    f"{who}: tensor {name!r} has shape {list(g_shape)}, the spec says "
                    f"{list(shape)}; {hint}"
                )
            if g_dtype != dtype:
                raise PayloadRejected(
                    f"{who}: tensor {name!r} has dtype {g_dtype}, the spec says {dtype}; {hint}"
                )


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


# -- decoding -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _not_safetensors(data: memoryview, why: str) -> PayloadRejected:
    head = bytes(data[:4])
    if head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5:
        what = "a pickle stream (pickle.dumps or old torch.save output)"
    elif head == b"PK\x03\x04":
        what = "a zip archive (torch.save output?)"
    else:
        return PayloadRejected(
            f"payload is not safetensors: {why} (random or truncated bytes?); send parameters "
            "encoded with swarmnode.transport.serde.encode"
        )
    return PayloadRejected(
        f"payload is {what}, not safetensors; refused unread: unpickling a peer's bytes could run "
        "its code. Send parameters encoded with swarmnode.transport.serde.encode"
    )


MAX_DEPTH = 4  # a safetensors header nests 3 deep: {name: {"shape": [...]}}
_STEPS = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))
_BLOCK = 1 << 20


def _too_deep(raw: bytes) -> bool:
    """True if the JSON in ``raw`` nests deeper than MAX_DEPTH (brackets in strings not counted).

    Checked before ``json.loads``, whose C parser recurses once per level: in a process whose
    recursion limit was raised (web3's dependencies raise it to 100000), a header of 100 kB of
    ``[`` would overflow the C stack and kill the node. Linear time, bounded memory.
    """
    # Neutralise escapes left to right as JSON reads them, so that every remaining '"' delimits.
    clean = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    depth, quotes = 0, 0
    for start in range(0, len(clean), _BLOCK):
        block = clean[start : start + _BLOCK]
        is_quote = np.frombuffer(block, dtype=np.uint8) == 0x22
        inside = (np.cumsum(is_quote, dtype=np.int64) + quotes) & 1
        steps = np.frombuffer(block.translate(_STEPS), dtype=np.int8).copy()
        steps[inside == 1] = 0
        levels = np.cumsum(steps, dtype=np.int64) + depth
        if int(levels.max()) > MAX_DEPTH:
            return True
        depth, quotes = int(levels[-1]), quotes + int(np.count_nonzero(is_quote))
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse(view: memoryview) -> tuple[list[_Entry], int]:
    """Validated header entries (sorted by offset) and where the tensor bytes start."""
    if len(view) < 8:
        raise _not_safetensors(view, f"only {len(view)} bytes, less than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", view[:8])
    if hlen > min(MAX_HEADER, len(view) - 8):
        raise _not_safetensors(
            view, f"the first 8 bytes announce a {hlen}-byte header, {len(view) - 8} bytes follow"
        )
    raw = bytes(view[8 : 8 + hlen])
    if _too_deep(raw):
        raise _not_safetensors(view, f"the header nests deeper than {MAX_DEPTH} levels")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _not_safetensors(view, f"the header is not JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(view, "the header is not a JSON object")
    header.pop("__metadata__", None)
    start, size = 8 + hlen, len(view) - 8 - hlen
    entries = [_entry(name, spec) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else "leaves a hole before it"
            raise PayloadRejected(f"safetensors header: tensor {e.name!r} {what}; malformed")
        pos = e.end
    if pos != size:
        raise PayloadRejected(
            f"safetensors header describes {pos} bytes of tensors but {size} bytes follow it; "
            "truncated or malformed payload"
        )
    return entries, start


def _entry(name: str, spec: Any) -> _Entry:
    bad = f"safetensors header: entry {name!r}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise PayloadRejected(f"{bad} needs exactly dtype, shape and data_offsets")
    dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise PayloadRejected(f"{bad} has unknown dtype {spec['dtype']!r}")
    shape, offs = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise PayloadRejected(f"{bad} has an invalid shape {shape!r}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_uint(o) for o in offs):
        raise PayloadRejected(f"{bad} has invalid data_offsets {offs!r}")
    begin, end = offs
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise PayloadRejected(
            f"{bad}: shape {shape} of {spec['dtype']} needs {nbytes} bytes, data_offsets give "
            f"{end - begin}"
        )
    return _Entry(name, dtype, tuple(shape), begin, end)


def _uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _materialize(
    buf: bytearray | mmap.mmap, base: int, entries: list[_Entry]
) -> dict[str, torch.Tensor]:
    """Tensors viewing ``buf`` (which the caller hands over); misaligned ones get their own copy."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        count = e.end - e.begin
        if count == 0:
            out[e.name] = torch.empty(e.shape, dtype=e.dtype)
            continue
        offset = base + e.begin
        if offset % e.dtype.itemsize:
            t = torch.frombuffer(bytearray(buf[offset : offset + count]), dtype=e.dtype)
        else:
            t = torch.frombuffer(buf, dtype=e.dtype, count=count // e.dtype.itemsize, offset=offset)
        if e.dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
            raise PayloadRejected(f"tensor {e.name!r} is bool but holds bytes other than 0 and 1")
        out[e.name] = t.reshape(e.shape)
    return out


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _nonfinite(state: Mapping[str, torch.Tensor]) -> None:
    for name, t in state.items():
        if t.is_floating_point() and t.numel():
            if t.dtype in _NUMPY_FLOATS:
                # Fast exact screen, single-threaded: a NaN or Inf makes the sum NaN/Inf; a
                # non-finite sum (or an overflow of the sum) falls through to the exact count.
                # float32 sums float16/float32 tensors (half the time of a float64 sum: no
                # conversion; a real model's sum is far below float32's 3.4e38)
                wide = np.float64 if t.dtype == torch.float64 else np.float32
                with np.errstate(over="ignore", invalid="ignore"):
                    total = np.add.reduce(t.numpy().reshape(-1), dtype=wide)
                if math.isfinite(total):
                    continue
            bad = ~torch.isfinite(t if t.element_size() > 1 else t.float())
            n = int(bad.sum())
            if n:
                raise NonFiniteValues(
                    f"tensor {name!r} holds {n} NaN/Inf value(s); the sender's training diverged "
                    "(lower its learning rate) or its parameters were tampered with"
                )


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expected_digest: bytes | None,
    spec: ParamSpec | None,
    max_bytes: int,
    reject_nonfinite: bool,
) -> dict[str, torch.Tensor]:
    """The state dict in ``data``, after size, digest, header, spec and NaN/Inf checks."""
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise PayloadRejected(
            f"payload of {len(view)} bytes exceeds the limit of {max_bytes} bytes "
            "(raise max_update_mb if the model really is that large)"
        )
    if expected_digest is not None:
        _check_digest(digest(view), expected_digest)
    return _decode_checked(view, None, spec, reject_nonfinite)


def view_state(
    data: Buffer,
    *,
    spec: ParamSpec | None,
    reject_nonfinite: bool,
    expected_digest: bytes | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`decode`, with tensors that view ``data`` instead of a copy of it when ``data``
    is a writable buffer (a ``bytearray`` or ``mmap``) that the caller hands over and does not
    change afterwards; read-only data (``bytes``) is copied. No size limit is applied: the
    caller read ``data`` under one."""
    view = memoryview(data).cast("B")
    if expected_digest is not None:
        _check_digest(digest(view), expected_digest)
    owned = data if isinstance(data, (bytearray, mmap.mmap)) else None
    return _decode_checked(view, owned, spec, reject_nonfinite)


def load_into(data: Buffer, targets: Mapping[str, torch.Tensor]) -> None:
    """Copy every tensor of the payload ``data`` into the tensor of the same name in
    ``targets``, in place (``Tensor.copy_``: onto the target's device and dtype, into its own
    storage, nothing reallocated), one tensor at a time in the payload's order; the pages of a
    file mapping (:class:`SpillMap`) leave resident memory as each tensor is copied
    (:func:`evict`), so loading a model into a module holds no second whole copy of it. A
    payload tensor without a target is refused by name, before anything is copied."""
    view = memoryview(data).cast("B")
    entries, start = _parse(view)
    missing = [e.name for e in entries if e.name not in targets]
    if missing:
        raise PayloadRejected(
            f"the payload has tensor(s) {_few(missing)} that the model does not; it is another "
            "model's (check the training spec)")
    owned = data if isinstance(data, (bytearray, mmap.mmap)) else None
    buf, base = (owned, start) if owned is not None else (bytearray(view[start:]), 0)
    with torch.no_grad():
        for e in entries:
            targets[e.name].copy_(_materialize(buf, base, [e])[e.name])
            evict(data, start + e.begin, start + e.end)


def _check_digest(got: bytes, expected: bytes | None) -> None:
    if expected is not None and got != expected:
        raise PayloadRejected(
            f"payload digest {got.hex()[:16]}... differs from the expected "
            f"{expected.hex()[:16]}...; the bytes were altered or truncated in transit"
        )


def _decode_checked(
    view: memoryview,
    owned: bytearray | mmap.mmap | None,
    spec: ParamSpec | None,
    reject_nonfinite: bool,
) -> dict[str, torch.Tensor]:
    entries, start = _parse(view)
    if spec is not None:
        spec._check({e.name: (e.shape, _name(e.dtype)) for e in entries}, "the payload")
    if owned is not None:
        buf, base = owned, start
    else:
        buf, base = bytearray(view[start:]), 0
    state = _materialize(buf, base, entries)
    if reject_nonfinite:
        _nonfinite(state)
    return dict(sorted(state.items()))


# -- receiving a chunk stream ---------------------------------------------------------------------
class Assembler:
    """Collects a chunk stream of ``total_bytes`` announced bytes, hashing as it goes.

    Refuses the moment the stream passes the announced size, an announcement over ``max_bytes``
    before any data, and a stream that ends short. Each chunk is copied once, into place, in an
    anonymous memory map of the announced size, whose pages the kernel commits only as data is
    written: a lying announcement costs address space, not memory. Payloads of 8 MiB and more
    are hashed on a helper thread while the next chunks arrive. Use as a context manager (or
    call :meth:`close`) so that the helper stops when a stream is abandoned.
    """

    def __init__(self, total_bytes: int, max_bytes: int, what: str = "payload") -> None:
        if total_bytes > max_bytes:
            raise PayloadRejected(
                f"{what}: the sender announced {total_bytes} bytes, over the limit of {max_bytes} "
                "bytes (raise max_update_mb if the model really is that large)"
            )
        self.total, self.what = total_bytes, what
        self._buf: mmap.mmap | bytearray = bytearray()
        if total_bytes:
            self._buf = mmap.mmap(-1, total_bytes)
        self._view = memoryview(self._buf)
        self._n = 0
        self._sha = hashlib.sha256()
        self._hasher = (
            ThreadPoolExecutor(1, thread_name_prefix="sha256")
            if total_bytes >= _BACKGROUND_HASH else None
        )

    @property
    def received(self) -> int:
        return self._n

    def add(self, data: bytes | memoryview) -> None:
        end = self._n + len(data)
        if end > self.total:
            self.close()
            raise PayloadRejected(
                f"{self.what}: the stream carries more than the {self.total} bytes announced in "
                "its header; refused"
            )
        self._view[self._n : end] = data
        if self._hasher is not None:
            self._hasher.submit(self._sha.update, self._view[self._n : end])
        else:
            self._sha.update(data)
        self._n = end

    def finish(self) -> Received:
        self.close()
        if self._n != self.total:
            raise PayloadRejected(
                f"{self.what}: the stream ended after {self._n} of the {self.total} bytes "
                "announced (truncated: the sender stopped or the connection broke); send it again"
            )
        return Received(self._buf, self._sha.digest())

    def close(self) -> None:
        """Wait for the hashing helper, if any, and stop it."""
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def __enter__(self) -> Assembler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, eq=False)
class Received:
    """A complete payload and its SHA-256, computed while it arrived."""

    data: bytearray | mmap.mmap
    digest: bytes

    def check_digest(self, expected: bytes | None) -> None:
        _check_digest(self.digest, expected)

    def decode(
        self, *, expected_digest: bytes | None, spec: ParamSpec | None, reject_nonfinite: bool
    ) -> dict[str, torch.Tensor]:
        """Like :func:`decode` (the size was checked on arrival); the tensors view ``data``."""
        _check_digest(self.digest, expected_digest)
        return _decode_checked(memoryview(self.data), self.data, spec, reject_nonfinite)

    def to_bytes(self) -> bytes:
        return bytes(self.data)
