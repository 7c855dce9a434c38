"""`swarmnode dashboard` without a browser: /api/status is `swarmnode status --format json`'s
object (the same function) plus the sites' losses per round, the silent sites (the contract's
rule) and the nodes' metrics (a real metrics port, a closed one); strings from the chain stay
strings; nothing but GET is served. On a real anvil; the page in a real Chromium against a real
swarm is test_dashboard_browser.py."""

from __future__ import annotations

import csv
import hashlib
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swarmnode.chain import launcher
from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.chain.overview import overview, read_names
from swarmnode.cli import app
from swarmnode.dashboard.page import PAGE_HTML, PAGE_JS
from swarmnode.dashboard.scrape import parse_exposition, parse_target, scrape
from swarmnode.dashboard.server import DashboardServer, to_json
from swarmnode.dashboard.state import DashboardState, read_status
from swarmnode.errors import ConfigError
from swarmnode.node.metrics import MetricsServer, counter, gauge

pytestmark = pytest.mark.anvil

HOSTILE = "<img src=x onerror=\"document.title='pwned'\">h3 & </script>"
EXTRAS = {"site_rounds", "silent", "colours", "chart", "waiting_text", "metrics",
          "metrics_unmatched", "dashboard"}
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def played(anvil: DevChain, tmp_path: Path) -> tuple[SwarmContract, list[str], Path]:
    """Three sites (a hostile name for the third): round 1 committed with a and b, who carry
    their metrics of it into round 2; c never checks in and is silent past three deadlines."""
    w3 = connect(anvil.url)
    admin = SwarmContract.deploy(w3, dev_account(0), '{"merge_method": "mean"}', 2, 0, 5)
    sites = [admin.with_account(dev_account(i)) for i in (1, 2, 3)]
    for i, site in enumerate(sites):
        admin.authorize(site.account_address, hashlib.sha256(bytes([i])).digest())
        site.enroll(f"127.0.0.1:{7100 + i}")
    names = tmp_path / "sites.csv"
    with open(names, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "address", "cert"])
        for name, site in zip(("hospital-a", "hospital-b", HOSTILE), sites, strict=True):
            w.writerow([name, site.account_address, "x.pem"])
    for site in sites[:2]:
        site.checkin(1, 10)
    if admin.round(1).status.name == "OPEN":  # c is missing: elected once the grace is over
        sites[0].elect(1)
    if admin.round(1).leader is None:
        sites[0].draw(1)
    info = admin.round(1)
    leader = next(s for s in sites if s.account_address == info.leader)
    leader.commit_merge(1, hashlib.sha256(b"merged 1").digest(), info.participants)
    for site, loss in zip(sites[:2], (0.5, 0.25), strict=True):
        site.checkin(2, 10, metrics=(1, loss, 1 - loss))
    launcher.advance_time(w3, 100)  # c: silent for more than three round deadlines
    return admin, [s.account_address for s in sites], names


def test_api_status_is_status_json_plus_what_the_page_adds(played: tuple) -> None:
    contract, addresses, names_csv = played
    names = read_names(names_csv)
    metrics = MetricsServer("127.0.0.1", 0, lambda: [
        gauge("swarmnode_round", "", 2), counter("swarmnode_rounds_total", "", 1),
        gauge("swarmnode_stage", "", 1, stage='collect "quoted"\nline'),
        gauge("swarmnode_stage", "", 0, stage="push"),
        counter("swarmnode_peer_bytes_total", "", 1234, direction="sent"),
        counter("swarmnode_peer_bytes_total", "", 99, direction="received"),
        gauge("swarmnode_site_loss", "", 0.25), gauge("swarmnode_site_metric", "", float("nan")),
    ])
    port = metrics.start()
    closed = _free_port()
    targets = [parse_target(f"hospital-a=127.0.0.1:{port}"),
               parse_target(f"{addresses[1].lower()}=http://127.0.0.1:{closed}/metrics"),
               parse_target("nobody=127.0.0.1:1")]
    state = DashboardState(lambda: contract, interval=60.0, read=lambda c: read_status(
        c, names=names, targets=targets, scrape_timeout=2.0))
    server = DashboardServer("127.0.0.1", 0, state)
    base = f"http://127.0.0.1:{server.start()}"
    try:
        code, headers, body = _get(base + "/api/status")
        expected = overview(contract, names=names).to_json()
    finally:
        server.stop()
        metrics.stop()
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert b"<" not in body and b">" not in body  # escaped even inside strings
    data = json.loads(body)
    assert {k: v for k, v in data.items() if k not in EXTRAS} == expected
    assert set(data) == set(expected) | EXTRAS
    # the hostile name is the exact string the names file holds, as status shows it
    assert [n["name"] for n in data["nodes"]] == ["hospital-a", "hospital-b", HOSTILE]
    assert data["current_round"] == 2 and data["rounds"][0]["digest"] == \
        hashlib.sha256(b"merged 1").hexdigest()
    assert [(r["round"], r["site"], r["loss"], r["metric"]) for r in data["site_rounds"]] == [
        (1, "hospital-a", 0.5, 0.5), (1, "hospital-b", 0.25, 0.75)]
    assert data["silent"] == [addresses[2]]  # the contract's absentCandidates
    assert data["waiting_text"].startswith("round 2 waits")
    assert set(data["colours"]) == {"hospital-a", "hospital-b", HOSTILE}
    a, b = data["metrics"][addresses[0]], data["metrics"][addresses[1]]
    assert (a["state"], a["round"], a["rounds_total"], a["bytes_sent"], a["bytes_received"],
            a["site_loss"], a["site_metric"]) == ("ok", 2, 1, 1234, 99, 0.25, None)
    assert a["stage"] == 'collect "quoted"\nline'
    assert b["state"] == "unreachable" and b["error"] and str(closed) in b["url"]
    assert addresses[2] not in data["metrics"]  # no port given: the page says "off"
    assert data["metrics_unmatched"] == ["nobody"]
    assert data["dashboard"]["error"] is None and data["dashboard"]["interval_s"] == 60.0


def test_the_server_is_read_only_and_serves_only_its_own_files(played: tuple) -> None:
    contract, _, _ = played
    server = DashboardServer("127.0.0.1", 0, DashboardState(lambda: contract))
    base = f"http://127.0.0.1:{server.start()}"
    try:
        code, headers, body = _get(base + "/")
        assert code == 200 and body.decode() == PAGE_HTML
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert _get(base + "/dashboard.js")[2].decode() == PAGE_JS
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            code, _, body = _get(base + "/api/status", method)
            assert code == 405 and b"read-only" in body, method
        code, _, body = _get(base + "/../etc/passwd")
        assert code == 404 and b"/api/status" in body
    finally:
        server.stop()


def test_a_chain_that_does_not_answer_is_a_503_naming_it_then_the_last_read_stays() -> None:
    closed = _free_port()
    url = f"http://127.0.0.1:{closed}"
    state = DashboardState(lambda: SwarmContract.resolve(connect(url, timeout=2), "0x" + "1" * 40),
                           interval=0.0)
    server = DashboardServer("127.0.0.1", 0, state)
    base = f"http://127.0.0.1:{server.start()}"
    try:
        code, _, body = _get(base + "/api/status")
    finally:
        server.stop()
    assert code == 503 and str(closed) in json.loads(body)["error"]
    # once read, a failing chain keeps the last read and says why it is old
    reads = iter([{"a": 1}])

    def read(_: object) -> dict:
        try:
            return dict(next(reads))
        except StopIteration:
            raise ConnectionRefusedError("chain down") from None

    state = DashboardState(lambda: object(), interval=0.0, read=read)  # type: ignore[arg-type]
    first = state.current()  # interval 0: every call reads again
    assert first["a"] == 1 and first["dashboard"]["error"] is None
    second = state.current()
    assert second["a"] == 1 and "chain down" in second["dashboard"]["error"]


def test_the_page_puts_strings_in_as_text_only() -> None:
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "http://", "https://"):
        assert sink not in PAGE_JS.replace('"http://www.w3.org/2000/svg"', ""), sink
    assert "http" not in PAGE_HTML.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert to_json({"name": HOSTILE}).count(b"<") == 0
    assert json.loads(to_json({"name": HOSTILE}))["name"] == HOSTILE
    with pytest.raises(ValueError):
        to_json({"x": float("nan")})


def test_metrics_text_and_targets_are_checked() -> None:
    samples = parse_exposition('# HELP x y\nx_total{a="1\\"2",b="c"} 3\ny NaN\nz +Inf 123\n')
    assert samples == [("x_total", {"a": '1"2', "b": "c"}, 3.0), ("y", {}, None), ("z", {}, None)]
    with pytest.raises(ValueError, match="line 1 is not a Prometheus sample"):
        parse_exposition("<html>hello</html>")
    assert parse_target("h1=10.0.0.5:9464").url == "http://10.0.0.5:9464/metrics"
    for bad in ("10.0.0.5:9464", "h1=10.0.0.5", "h1=10.0.0.5:port", "=1.2.3.4:5"):
        with pytest.raises(ConfigError, match="--metrics"):
            parse_target(bad)
    # a port that answers something else than metrics is unreachable, saying why
    down = scrape(f"http://127.0.0.1:{_free_port()}/metrics", timeout=2.0)
    assert down["state"] == "unreachable" and down["error"]


def test_the_command_names_a_bad_flag() -> None:
    env = {"SWARMNODE_CONTRACT": None, "SWARMNODE_RPC_URL": None}
    result = runner.invoke(app, ["dashboard", "--contract", "0x" + "1" * 40, "--listen", "nope"],
                           env=env)
    assert result.exit_code != 0 and "--listen 'nope' is not HOST:PORT" in result.output
    result = runner.invoke(app, ["dashboard", "--contract", "0x" + "1" * 40, "--metrics", "x"],
                           env=env)
    assert result.exit_code != 0 and "write SITE=HOST:PORT" in result.output


def test_hostile_clients_neither_hold_the_page_nor_reach_it_under_another_name() -> None:
    """200 connections that send half a request line and stay: the page still answers (the
    server serves a bounded number at once, each with an idle timeout). A request naming a host
    that is not an IP address, localhost or allowed (DNS rebinding) is refused."""
    state = DashboardState(lambda: (_ for _ in ()).throw(LookupError("no chain")))
    server = DashboardServer("127.0.0.1", 0, state, allowed_hosts=["dash.example.org"])
    port = server.start()
    held = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /api/sta")
            held.append(s)
        code, _, body = _get(f"http://127.0.0.1:{port}/")
        assert code == 200 and body.decode() == PAGE_HTML
        for host, expected in (("evil.example.com", 421), ("dash.example.org:8780", 200),
                               ("localhost:1", 200), ("[::1]:8780", 200), ("", 421)):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                             headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    got = reply.status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == expected, host
    finally:
        for s in held:
            s.close()
        server.stop()


def test_a_metrics_port_that_redirects_is_not_followed_and_its_answer_not_echoed() -> None:
    """A site's endpoint is on chain: its 'metrics port' must not send the dashboard elsewhere
    or have what it fetched shown on the page."""
    import http.server
    import threading

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/metrics":
                self.send_response(302)
                self.send_header("Location", "/secret")
                self.end_headers()
            else:
                body = b"SECRET-TOKEN=abc123\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        redirected = scrape(f"http://127.0.0.1:{port}/metrics", timeout=5)
        direct = scrape(f"http://127.0.0.1:{port}/secret", timeout=5)
    finally:
        server.shutdown()
    assert redirected["state"] == "unreachable" and redirected["error"] == "HTTP 302"
    assert direct["state"] == "unreachable" and "SECRET" not in direct["error"]
