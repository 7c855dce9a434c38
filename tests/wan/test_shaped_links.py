"""Sites on shaped links (swarmnode.testing.netns): each site in its own network namespace, a
tbf-limited veth to a shared bridge. The links deliver their rate, leave nothing behind, and a
real swarm (anvil, node services and trainers as processes inside the namespaces) trains on them
with members serving each other the merged model. The full grid is `benchmarks/wan.py`."""

from __future__ import annotations

import shutil
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
    if shutil.which("iptables") is not None:  # none: no rule can have been left either
        rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True,
                               text=True).stdout
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


def test_members_serve_each_other_the_merged_model_on_shaped_links() -> None:
    """4 sites on 100 Mbit/s links, members fetching the merged model in parts (their share
    from the leader, the rest from each other): the leader's link sends about one model a round
    instead of three, no round beats the leader's download of the three updates, and every site
    ends with the chain's final model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tempfile

    import wan

    with tempfile.TemporaryDirectory(prefix="wan-test-") as tmp:
        run = wan.run_config(1_000_000, 4, 100.0, 4, Path(tmp), timeout_s=300, pulls="peers")
    assert run["all_digests_agree"], run
    assert run["periods_s"], run
    leader_in_bound = run["star_bound_s"] / 2  # (N-1) updates over the leader's download
    assert 0.9 * leader_in_bound <= run["median_period_s"] <= 2.0 * run["star_bound_s"], run
    # the leader sent about one model (1/3 of the star's N-1), not three
    assert 0.3 <= run["leader_out_over_model"] <= 0.6, run
    # every link together: N-1 updates in, and N-1 copies of the merged model out, whoever sends
    assert 5.5 <= run["bytes_per_round_over_model"] <= 7.0, run
