"""Verifiable parts of a merged model (swarmnode.transport.parts): manifests, the shared plan
that sends each part out of the leader once, and the buffer members serve each other from."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter

import pytest

from swarmnode.errors import PayloadRejected
from swarmnode.transport.parts import (
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    Manifest,
    PartBuffer,
    part_size_for,
    plan,
)

MODEL = os.urandom(5 * MIN_PART_SIZE + 12345)  # 6 parts, the last one short


def test_a_manifest_names_every_part_and_survives_the_wire() -> None:
    m = Manifest.of(MODEL, MIN_PART_SIZE)
    assert m.count == 6 and m.total == len(MODEL)
    assert m.span(5) == (5 * MIN_PART_SIZE, len(MODEL))
    for i in range(m.count):
        start, end = m.span(i)
        assert m.hashes[i] == hashlib.sha256(MODEL[start:end]).digest()
        m.check(i, MODEL[start:end])
    assert Manifest.from_bytes(m.to_bytes(), max_total=len(MODEL)) == m
    assert Manifest.of(MODEL, MIN_PART_SIZE, threads=1) == m


def test_a_part_that_is_not_the_manifests_is_refused() -> None:
    m = Manifest.of(MODEL, MIN_PART_SIZE)
    start, end = m.span(2)
    bad = bytearray(MODEL[start:end])
    bad[100] ^= 1
    with pytest.raises(PayloadRejected, match="part 2 .* does not hash"):
        m.check(2, bad)
    with pytest.raises(PayloadRejected, match="bytes, the manifest says"):
        m.check(2, MODEL[start:end - 1])


@pytest.mark.parametrize("mangle, match", [
    (lambda raw: raw[:10], "too short"),
    (lambda raw: b"XXXXXXXX" + raw[8:], "bad magic"),
    (lambda raw: raw[:-1], "holds"),
    (lambda raw: raw + b"\0" * 32, "holds"),
    (lambda raw: raw[:16] + (1000).to_bytes(4, "little") + raw[20:], "power of two"),
    (lambda raw: raw[:20] + (7).to_bytes(4, "little") + raw[24:], "names 7 parts"),
    (lambda raw: raw[:8] + (1 << 40).to_bytes(8, "little") + raw[16:], "over the limit"),
])
def test_a_hostile_manifest_is_refused_with_its_reason(mangle, match) -> None:  # type: ignore[no-untyped-def]
    raw = Manifest.of(MODEL, MIN_PART_SIZE).to_bytes()
    with pytest.raises(PayloadRejected, match=match):
        Manifest.from_bytes(mangle(raw), max_total=len(MODEL))


def test_part_sizes_are_powers_of_two_within_bounds() -> None:
    assert part_size_for(0, 3) == MIN_PART_SIZE
    assert part_size_for(40_000_000, 7) == 2 << 20  # 40 MB over 7 members: about 4 parts each
    assert part_size_for(4_000_000_000, 2) == MAX_PART_SIZE
    for total, members in ((1, 1), (10**8, 3), (10**9, 31)):
        size = part_size_for(total, members)
        assert size & (size - 1) == 0 and MIN_PART_SIZE <= size <= MAX_PART_SIZE


def test_the_plan_sends_each_part_out_of_the_leader_once_and_spreads_the_rest() -> None:
    members = [f"m{k}" for k in range(7)]
    count = 28
    plans = {me: plan(count, members, me, "leader") for me in members}
    # first choices: the leader serves each part exactly once (to its owner) ...
    from_leader = Counter(i for me in members for i, srcs in enumerate(plans[me])
                          if srcs[0] == "leader")
    assert sorted(from_leader) == list(range(count)) and set(from_leader.values()) == {1}
    # ... and every member serves its own share to the 5 others
    served = Counter(srcs[0] for me in members for srcs in plans[me] if srcs[0] != "leader")
    assert served == {m: 4 * 6 for m in members}
    for me in members:
        for srcs in plans[me]:
            assert me not in srcs and "leader" in srcs
            assert sorted(srcs) == sorted([m for m in members if m != me] + ["leader"])
    with pytest.raises(ValueError):
        plan(3, members, "stranger", "leader")
    with pytest.raises(ValueError):
        plan(3, members, "m0", "m1")


def test_a_member_serves_a_part_as_soon_as_it_arrives_and_checks_the_whole() -> None:
    m = Manifest.of(MODEL, MIN_PART_SIZE)
    buf = PartBuffer(m)
    got: list[bytes | None] = []
    waiter = threading.Thread(target=lambda: got.append(
        None if (p := buf.part(3, timeout=60)) is None else bytes(p)))
    waiter.start()
    start, end = m.span(3)
    bad = bytearray(MODEL[start:end])
    bad[0] ^= 0xFF
    with pytest.raises(PayloadRejected):
        buf.put(3, bad)  # a lying source: nothing written, the waiter still waits
    assert not buf.has(3)
    buf.put(3, MODEL[start:end])
    waiter.join(60)
    assert got == [MODEL[start:end]]
    assert buf.missing() == [0, 1, 2, 4, 5]
    assert buf.part(0, timeout=0.01) is None
    for i in buf.missing():
        s, e = m.span(i)
        buf.put(i, MODEL[s:e])
    buf.finish(hashlib.sha256(MODEL).digest())
    assert bytes(buf.buf) == MODEL
    with pytest.raises(PayloadRejected, match="its manifest is wrong"):
        buf.finish(hashlib.sha256(b"another model").digest())


def test_a_failed_transfer_wakes_whoever_waits_for_a_part() -> None:
    buf = PartBuffer(Manifest.of(MODEL, MIN_PART_SIZE))
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(buf.part(1, timeout=60)))
    t.start()
    buf.fail("the leader went away")
    t.join(60)
    assert out == [None]
    with pytest.raises(PayloadRejected, match="6 of 6 parts missing"):
        buf.finish(hashlib.sha256(MODEL).digest())


def test_a_schedule_moves_a_missing_part_to_its_next_source_until_none_is_left() -> None:
    from swarmnode.transport.parts import Schedule

    sched = Schedule(plan(4, ["a", "b", "c"], "a", "L"))
    assert sched.requests() == {"L": [0, 3], "b": [1], "c": [2]}
    sched.settle(lambda i: i in (0, 3, 2))  # b had nothing (dead): part 1 goes to the leader
    assert sched.requests() == {"L": [1]}
    sched.settle(lambda i: False)  # the leader failed too: then c
    assert sched.requests() == {"c": [1]}
    sched.settle(lambda i: False)
    assert sched.done and sched.lost == [1]
