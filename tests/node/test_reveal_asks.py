"""The secure-aggregation leader asks every survivor for its seed reveals at once, waiting no
longer than the round's transfer timeout (tied to its deadline): silent survivors cost that
once, not 120 s each in turn (node.driver.ask_all; the machine's Reveals.timeout_s)."""

from __future__ import annotations

import threading
import time

from swarmnode.errors import PeerUnavailable
from swarmnode.node.driver import ask_all


def test_silent_survivors_cost_one_timeout_not_one_each() -> None:
    release = threading.Event()
    calls: list[str] = []
    began: dict[str, float] = {}

    def ask(peer: str) -> list[str]:
        calls.append(peer)
        began[peer] = time.monotonic()
        if peer.startswith("silent"):
            release.wait(60)  # a peer that never answers (until the test ends)
            return ["late"]
        if peer == "broken":
            raise PeerUnavailable("broken: nobody answers")
        return [f"seed of {peer}"]

    peers = ["a", "silent-1", "b", "silent-2", "broken", "silent-3", "silent-4"]
    started = time.monotonic()
    try:
        got = ask_all(peers, ask, 1.5, "round 7: seed reveals")
    finally:
        elapsed = time.monotonic() - started
        release.set()
    assert sorted(calls) == sorted(peers)  # every survivor asked
    assert got == [("a", ["seed of a"]), ("b", ["seed of b"])]  # in order; late and failed out
    # asked all at once: every ask began before the first timeout ran out (asked one after
    # another, silent-2 would begin only once silent-1's 1.5 s were over), and the wait ended
    # at that one timeout, not at the silent ones' answers (they never come before release)
    assert max(began.values()) - started < 1.5, {p: t - started for p, t in began.items()}
    assert elapsed >= 1.4, elapsed


def test_answers_in_time_end_the_wait_at_once() -> None:
    started = time.monotonic()
    got = ask_all(["a", "b"], lambda p: p.upper(), 30.0, "round 1: seed reveals")
    assert got == [("a", "A"), ("b", "B")]
    assert time.monotonic() - started < 10.0  # not the 30 s timeout
