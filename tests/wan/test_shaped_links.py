"""Sites on shaped links (swarmnode.testing.netns): each site in its own network namespace, a
tbf-limited veth to a shared bridge. The links deliver their rate, leave nothing behind, and a
real swarm (anvil, node services and trainers as processes inside the namespaces) trains on them
at the speed its topology allows and no faster. The full grid is `benchmarks/wan.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from swarmnode.testing.netns import ShapedNetwork, unavailable

ROOT = Path(__file__).resolve().parents[2]
WHY = unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no shaped links here: {WHY}")


def _leftovers(net: ShapedNetwork) -> list[str]:
    found = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True).stdout.split() if n.startswith(net.base)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [net.bridge] if net.bridge in links else []
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    found += [r for r in rules.splitlines() if net.bridge in r]
    return found


def test_shaped_links_deliver_their_rate_both_ways_and_leave_nothing_behind() -> None:
    with ShapedNetwork(3, rate_mbit=100) as net:
        assert len({net.address(i) for i in range(3)}) == 3
        up = net.goodput(0, 1, seconds=1.5)
        down = net.goodput(2, 0, seconds=1.5)
        # one TCP stream gets 90-97% of a tbf link's rate; never more than the rate
        for mbit in (up, down):
            assert 80 <= mbit <= 102, (up, down)
        before = net.counters(0)
        assert before.sent > 15_000_000 and before.received > 15_000_000, before
    assert _leftovers(net) == []


def test_a_swarm_on_shaped_links_trains_no_faster_than_its_leaders_link() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tempfile

    import wan
    with tempfile.TemporaryDirectory(prefix="wan-test-") as tmp:
        run = wan.run_config(1_000_000, 3, 100.0, 4, Path(tmp), timeout_s=300)
    assert run["all_digests_agree"], run
    assert run["periods_s"], run
    # the leader's link carries 2 (N-1) models a round: no round can beat that bound, and the
    # rounds run within 2x of it (the local API, check-ins and the merge add the rest)
    assert 0.9 * run["star_bound_s"] <= run["median_period_s"] <= 2.0 * run["star_bound_s"], run
    # the leader received N-1 updates and sent the merged model to N-1 members, not much more
    assert 0.95 <= run["leader_out_over_model"] <= 1.15, run
    assert 3.8 <= run["bytes_per_round_over_model"] <= 4.6, run
