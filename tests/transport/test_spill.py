"""Models a node holds but is not reading live in files (page cache), not in its resident memory:
spilled buffers, the store's files, updates at the leader. Measured on this process's own RSS."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from transport_support import MemoryAuthority, MemoryHandler, Pki, model_state

from swarmnode.errors import PayloadRejected
from swarmnode.transport import serde
from swarmnode.transport.peer import PeerClient, PeerServer

MB = 1 << 20


def _resident_mb() -> float:
    """This process's resident file-backed and shared pages, in MiB (where spills live)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return sum(int(fields[k].split()[0]) for k in ("RssFile", "RssShmem")) / 1024


def test_an_evicted_spill_buffer_leaves_resident_memory_and_keeps_its_bytes(tmp_path) -> None:
    buf = serde.spill_buffer(tmp_path, 64 * MB)
    assert isinstance(buf, serde.SpillMap)
    assert not list(tmp_path.iterdir())  # an unlinked file: nothing left behind on disk
    pattern = bytes(range(256)) * (MB // 256)
    for i in range(64):
        buf[i * MB:(i + 1) * MB] = pattern
    touched = _resident_mb()
    serde.evict(buf)
    dropped = touched - _resident_mb()
    assert dropped > 48, f"evicting 64 MiB dropped only {dropped:.1f} MiB"
    assert all(buf[i * MB:(i + 1) * MB] == pattern for i in range(64))  # read back from the file


def test_a_file_read_into_a_spill_is_a_copy_of_its_bytes(tmp_path) -> None:
    """read_file with a spill folder (the trainer's update, from its exchange file): the bytes
    are copied file to file by the kernel into an unlinked spill file of the node's own; a later
    write to the trainer's file does not change them, and a file shorter or longer than
    announced is refused as before."""
    import os

    src = tmp_path / "up.bin"
    data = os.urandom(MB) * 20  # over SPILL_MIN: spilled
    src.write_bytes(data)
    spill = tmp_path / "spill"
    spill.mkdir()
    fd = os.open(src, os.O_RDWR)
    try:
        buf = serde.read_file(fd, len(data), len(data), spill=spill)
        assert isinstance(buf, serde.SpillMap)
        assert not list(spill.iterdir())  # unlinked
        os.pwrite(fd, b"\0" * MB, 0)  # the trainer rewrites its file in place next round
        assert bytes(buf) == data
        buf[:4] = b"mine"  # the node's own memory: writable, the trainer's file untouched
        assert os.pread(fd, 4, len(data) - 4) == data[-4:]
        with pytest.raises(PayloadRejected, match="holds"):
            serde.read_file(fd, len(data) + 8, 2 * len(data), spill=spill)
    finally:
        os.close(fd)


def test_evict_leaves_anything_but_a_spill_alone(tmp_path) -> None:
    anon = mmap.mmap(-1, 4 * MB)
    anon[:4] = b"abcd"
    serde.evict(anon)  # anonymous memory would lose its bytes: evict must not touch it
    serde.evict(bytearray(b"x"))
    serde.evict(b"bytes")
    assert anon[:4] == b"abcd"
    mapped = tmp_path / "m.bin"
    mapped.write_bytes(b"y" * MB)
    view = serde.map_file(mapped)
    serde.evict(view, 10, 20)  # an unaligned range is widened to whole pages, harmlessly
    assert bytes(view) == b"y" * MB


def test_a_spilled_update_is_checked_held_evicted_and_still_merged_right(
        pki: Pki, tmp_path, monkeypatch) -> None:
    """A leader whose data plane spills: an honest update arrives whole and is offered for
    eviction; its tensors read the right values after it; a NaN update is still refused."""
    monkeypatch.setattr(serde, "SPILL_MIN", 0)  # the test's model is small: spill it anyway
    leader, alice, bob = ("0x" + c * 40 for c in "abc")
    tls = {a: pki.node(f"s-{a[2]}") for a in (leader, alice, bob)}
    authority = MemoryAuthority(fingerprints={a: t.fingerprint() for a, t in tls.items()},
                                participants={1: {leader, alice, bob}})
    handler = MemoryHandler()
    srv = PeerServer("127.0.0.1:0", tls[leader], authority, handler,
                     serde.ParamSpec.from_state(model_state()), max_bytes=1 << 24,
                     spill_dir=str(tmp_path))
    port = srv.start()
    try:
        with PeerClient(f"127.0.0.1:{port}", tls[alice], alice, leader, authority) as c:
            c.push_update(1, 5, serde.encode(model_state(3)), timeout=20)
            assert c._data is not None  # over the data plane
        weight, state, _ = handler.updates[(1, alice)]
        assert handler.evicted == [alice] and weight == 5
        for name, tensor in model_state(3).items():
            assert torch.equal(state[name], tensor)  # evicted, then read back from the file
        poisoned = model_state(4)
        next(iter(poisoned.values()))[0] = float("nan")
        with PeerClient(f"127.0.0.1:{port}", tls[bob], bob, leader, authority) as c:
            with pytest.raises(PayloadRejected, match="NaN"):
                c.push_update(1, 5, serde.encode(poisoned), timeout=20)
        assert (1, bob) not in handler.updates
    finally:
        srv.stop(0)
    assert not list(tmp_path.iterdir())  # the spill files went with their updates
