"""The metrics port's format (node.metrics): Prometheus' text exposition over a real HTTP
server; one HELP/TYPE per family, histograms as cumulative buckets with _sum and _count."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from swarmnode.node.metrics import Histogram, MetricsServer, counter, gauge, render


def test_families_render_once_with_their_samples_and_histograms_are_cumulative() -> None:
    h = Histogram("swarmnode_round_stage_seconds", "per step", "stage")
    for v in (0.2, 0.2, 7.0):
        h.observe("push", v)
    text = render([gauge("swarmnode_round", "the round", 3),
                   counter("swarmnode_peer_bytes_total", "bytes", 10, direction="sent"),
                   counter("swarmnode_peer_bytes_total", "", 12.5, direction="received"),
                   h.family()])
    lines = text.splitlines()
    assert lines.count("# TYPE swarmnode_peer_bytes_total counter") == 1
    assert 'swarmnode_peer_bytes_total{direction="received"} 12.5' in lines
    assert "swarmnode_round 3" in lines
    assert 'swarmnode_round_stage_seconds_bucket{le="0.25",stage="push"} 2' in lines
    assert 'swarmnode_round_stage_seconds_bucket{le="5",stage="push"} 2' in lines
    assert 'swarmnode_round_stage_seconds_bucket{le="10",stage="push"} 3' in lines
    assert 'swarmnode_round_stage_seconds_bucket{le="+Inf",stage="push"} 3' in lines
    assert 'swarmnode_round_stage_seconds_count{stage="push"} 3' in lines
    assert any(x.startswith('swarmnode_round_stage_seconds_sum{stage="push"} 7.4') for x in lines)


def test_the_server_answers_metrics_only_and_survives_a_failing_collection() -> None:
    calls = {"n": 0}

    def collect():  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("broken")
        return [gauge("swarmnode_round", 'a "quoted"\nhelp', 1, site='x"y')]

    srv = MetricsServer("127.0.0.1", 0, collect)
    port = srv.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'swarmnode_round{site="x\\"y"} 1' in body
        assert '# HELP swarmnode_round a "quoted"\\nhelp' in body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert err.value.code == 500
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/admin", timeout=10)
        assert err.value.code == 404
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200  # the failed scrape did not take the server down
    finally:
        srv.stop()
