"""`swarmnode report`: per-round metrics by site as CSV and PNG, from a real anvil; and the
writers on hand-built rows."""

from __future__ import annotations

import csv
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.chain.report import (
    CSV_COLUMNS,
    Row,
    collect,
    figure,
    finished_round,
    site_colours,
    summarize,
    write_csv,
    write_png,
)
from swarmnode.cli import app
from swarmnode.errors import ConfigError

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTS = ("hospital-a.example.org", "hospital-b.example.org", "hospital-c.example.org")
# (round, site index) -> (validation loss, metric) each site reports; site c skips round 2
REPORTS = {
    (1, 0): (0.693147, 0.5125), (1, 1): (0.70123449, 0.48), (1, 2): (0.65, 0.55),
    (2, 0): (0.412, 0.8031), (2, 1): (0.3999999, 0.8123456),
}
# site a trains with DP: its (epsilon, delta) rides with its metrics of each round
PRIVACY = {(1, 0): (3.14159265, 1e-5), (2, 0): (7.9999996, 1e-5)}
SPEC_JSON = '{"merge_method": "mean", "min_peers": 2}'
NO_CHAIN_ENV = {"SWARMNODE_CONTRACT": None, "SWARMNODE_RPC_URL": None}


def invoke(*args: str):  # noqa: ANN201 - typer's Result
    return runner.invoke(app, list(args), env={**NO_CHAIN_ENV, "COLUMNS": "200"})


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def deploy(anvil: DevChain, spec_json: str) -> tuple[SwarmContract, list[SwarmContract]]:
    """A fresh contract with three enrolled sites (dev accounts 1..3) named by their hosts."""
    admin = SwarmContract.deploy(connect(anvil.url), dev_account(0), spec_json, 2, 0, 60)
    sites = [admin.with_account(dev_account(i)) for i in (1, 2, 3)]
    for host, site in zip(HOSTS, sites, strict=True):
        admin.authorize(site.account_address,
                        hashlib.sha256(f"cert {host}".encode()).digest())
        site.enroll(f"{host}:7441")
    return admin, sites


@pytest.fixture(scope="module")
def played(anvil: DevChain) -> tuple[str, dict[int, tuple[str, bytes]], list[str]]:
    """Two committed rounds with metrics: every site checks in, the drawn leader commits, the
    sites report (site c skips round 2) with their next check-in, then with finish. Returns the
    contract's address, each round's leader and digest, and the sites' addresses."""
    admin, sites = deploy(anvil, SPEC_JSON)
    by_address = {s.account_address: s for s in sites}
    rounds = {}
    for r in (1, 2):
        for i, site in enumerate(sites):  # a check-in carries the site's metrics of r - 1
            carried = ((r - 1, *REPORTS[(r - 1, i)], PRIVACY.get((r - 1, i)))
                       if (r - 1, i) in REPORTS else None)
            site.checkin(r, 10, metrics=carried)
        info = admin.round(r)
        if info.leader is None:
            sites[0].draw(r)
            info = admin.round(r)
        assert info.leader is not None
        digest = hashlib.sha256(f"merged {r}".encode()).digest()
        by_address[info.leader].commit_merge(r, digest, info.participants)
        rounds[r] = (info.leader, digest)
    for i, site in enumerate(sites):  # round 2's metrics ride on finish
        if (2, i) in REPORTS:
            site.finish(metrics=(2, *REPORTS[(2, i)], PRIVACY.get((2, i))))
    return admin.address, rounds, [s.account_address for s in sites]


@pytest.mark.anvil
def test_report_writes_the_rounds_metrics_by_site(
        anvil: DevChain, played: tuple, tmp_path: Path) -> None:
    address, rounds, sites = played
    out = tmp_path / "out" / "nested"
    result = invoke("report", "--contract", address, "--rpc-url", anvil.url, "--out", str(out))
    assert result.exit_code == 0, result.output
    csv_path, png_path = out / "report.csv", out / "report.png"
    assert result.stdout.splitlines()[:2] == [str(csv_path), str(png_path)]

    rows = read_rows(csv_path)
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(int(x["round"]), x["address"]) for x in rows] == [
        (r, sites[i]) for r, i in REPORTS]
    for row, ((r, i), (loss, metric)) in zip(rows, REPORTS.items(), strict=True):
        assert row["site"] == HOSTS[i]  # no --names: the endpoint's host
        # the chain's fixed point: 1e-6 (0.3999999 is recorded as 0.400000)
        assert row["loss"] == f"{round(loss * 1_000_000) / 1_000_000:.6f}"
        assert row["metric"] == f"{round(metric * 1_000_000) / 1_000_000:.6f}"
        assert float(row["loss"]) == pytest.approx(loss, abs=1e-6)
        assert float(row["metric"]) == pytest.approx(metric, abs=1e-6)
        leader, digest = rounds[r]
        assert row["leader_address"] == leader
        assert row["leader"] == HOSTS[sites.index(leader)]
        assert row["participants"] == "3" and row["digest"] == digest.hex()
        # site a's epsilon at the chain's precision (1e-6) at its delta; empty for the others
        eps, delta = PRIVACY.get((r, i), (None, None))
        assert (row["epsilon"], row["delta"]) == (
            (f"{round(eps * 1_000_000) / 1_000_000:.6f}", "1e-05") if eps else ("", ""))
    # the table: each site's last epsilon (at its delta), "-" for a site without DP
    table = {line.split()[1]: line for line in result.stdout.splitlines()
             if line.startswith("│ hospital-")}
    assert "8 (δ 1e-05)" in table[HOSTS[0]]
    assert "δ" not in table[HOSTS[1]] and re.search(r"│ - +│$", table[HOSTS[1]].rstrip())

    png = png_path.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    # the sites finished, the final round is not committed: the plot marks no final round
    chain = SwarmContract.resolve(connect(anvil.url), address)
    assert not chain.training_finished() and finished_round(chain) is None
    # the summary: each site's first and last round
    assert "hospital-a.example.org" in result.stdout and "0.6931" in result.stdout
    assert "0.4120" in result.stdout and "0.8123" in result.stdout


@pytest.mark.anvil
def test_report_names_sites_from_a_names_file(
        anvil: DevChain, played: tuple, tmp_path: Path) -> None:
    address, _, sites = played
    names = tmp_path / "sites.csv"
    names.write_text("name,address\n" + "".join(
        f"Site {'ABC'[i]},{a.lower()}\n" for i, a in enumerate(sites)))
    result = invoke("report", "--contract", address, "--rpc-url", anvil.url,
                    "--names", str(names), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "report.csv")
    assert [x["site"] for x in rows] == ["Site A", "Site B", "Site C", "Site A", "Site B"]
    assert {x["leader"] for x in rows} <= {"Site A", "Site B", "Site C"}
    assert "Site C" in result.stdout


@pytest.mark.anvil
def test_report_takes_the_chain_from_a_nodes_data_dir(
        anvil: DevChain, played: tuple, tmp_path: Path) -> None:
    """`--data-dir`: the contract and RPC URL of the node config next to the data dir (the
    layout `swarmnode demo` writes: <site>/node.yaml, <site>/data)."""
    address, _, _ = played
    (tmp_path / "site" / "data").mkdir(parents=True)
    (tmp_path / "site" / "node.yaml").write_text(
        f"name: site\nrpc_url: {anvil.url}\ncontract: '{address}'\nkey_index: 1\n")
    result = invoke("report", "--data-dir", str(tmp_path / "site" / "data"),
                    "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(read_rows(tmp_path / "out" / "report.csv")) == len(REPORTS)

    result = invoke("report", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 10, result.output
    assert "no node config" in result.stderr and "Traceback" not in result.output
    result = invoke("report", "--out", str(tmp_path / "out"))
    assert result.exit_code == 10, result.output
    assert "pass --contract" in result.stderr


@pytest.mark.anvil
def test_report_before_any_metrics_is_a_clear_error(anvil: DevChain, tmp_path: Path) -> None:
    admin, _ = deploy(anvil, SPEC_JSON)
    assert collect(admin) == []
    result = invoke("report", "--contract", admin.address, "--rpc-url", anvil.url,
                    "--out", str(tmp_path / "out"))
    assert result.exit_code == 10, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "no site has reported metrics yet" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the writers, no chain


def hand_rows() -> list[Row]:
    """North trains with DP (epsilon 1.5 per round at delta 1e-5), south without."""
    rows = []
    for r in range(1, 6):
        for i, site in enumerate(("north", "south")):
            rows.append(Row(round=r, site=site, address=f"0x{i:040x}", loss=1.0 / (r + i),
                            metric=0.5 + 0.08 * r - 0.01 * i, leader="north",
                            leader_address=f"0x{0:040x}", participants=2,
                            digest=f"{r:064x}" if r < 5 else None,
                            epsilon=1.5 * r if i == 0 else None, delta=1e-5 if i == 0 else None))
    return rows


def test_write_csv_and_png_from_rows(tmp_path: Path) -> None:
    rows = hand_rows()
    write_csv(rows, tmp_path / "r.csv")
    back = read_rows(tmp_path / "r.csv")
    assert len(back) == 10 and tuple(back[0]) == CSV_COLUMNS
    assert back[1] == {"round": "1", "site": "south", "address": f"0x{1:040x}",
                       "loss": "0.500000", "metric": "0.570000", "leader": "north",
                       "leader_address": f"0x{0:040x}", "participants": "2",
                       "digest": f"{1:064x}", "epsilon": "", "delta": ""}  # south: not DP
    assert (back[-2]["epsilon"], back[-2]["delta"]) == ("7.500000", "1e-05")  # north, round 5
    assert back[-1]["digest"] == ""  # what the chain lacks stays empty

    path = write_png(rows, tmp_path / "r.png", title="test")
    assert path == tmp_path / "r.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000

    (north, south) = summarize(rows)
    assert (north.site, north.rounds, north.first.round, north.last.round) == ("north", 5, 1, 5)
    assert south.last.loss == pytest.approx(1 / 6)
    assert (north.last.privacy, south.last.privacy) == ("7.5 (δ 1e-05)", "-")
    with pytest.raises(ConfigError, match="no site has reported metrics yet"):
        write_png([], tmp_path / "empty.png")


def test_the_plot_is_readable_whatever_round_1_did() -> None:
    """Issue 21: round 1's loss squashed the axis, the metric was labelled "metric", the final
    round was cut off and colours changed between runs."""
    from matplotlib.colors import to_hex

    rows = [r if r.round > 1 else Row(**{**r.__dict__, "loss": 40.0}) for r in hand_rows()]
    fig = figure(rows, metric_name="accuracy")
    top, bottom = fig.axes[:2]
    assert top.get_yscale() == "log" and "log" in top.get_ylabel()
    assert bottom.get_ylabel() == "accuracy"
    last = max(r.round for r in rows)
    assert top.get_xlim()[1] > last and "last: 5" in bottom.get_xlabel()
    for ax in (top, bottom):
        sites = [line for line in ax.get_lines() if line.get_label() in ("north", "south")]
        assert sites and all(max(line.get_xdata()) == last for line in sites)
    # a gentle loss stays linear
    gentle = [Row(**{**r.__dict__, "loss": 0.5 - 0.02 * r.round}) for r in hand_rows()]
    assert figure(gentle).axes[0].get_yscale() == "linear"
    # colours by site name: the same in another run with other sites, in another order
    first = {line.get_label(): to_hex(line.get_color()) for line in top.get_lines()}
    other = [Row(**{**r.__dict__, "site": "east", "address": f"0x{9:040x}"})
             for r in hand_rows() if r.site == "north"]
    again = figure(list(reversed(rows)) + other).axes[0]
    second = {line.get_label(): to_hex(line.get_color()) for line in again.get_lines()}
    assert first["north"] == second["north"] and first["south"] == second["south"]
    assert len({second["north"], second["south"], second["east"]}) == 3
    assert site_colours(["b", "a"]) == site_colours(["a", "b"])
    many = site_colours(f"hospital-{i}" for i in range(20))
    assert len(set(many.values())) == 20  # no two of 20 sites share a colour


def test_the_plot_marks_the_final_round() -> None:
    """Issue 21: the final round was not marked. A finished training's final round is a dotted
    line on both axes, named in the legend, and each site's value there a star in its colour."""
    from matplotlib.colors import to_hex

    rows = hand_rows()
    colours = site_colours(["north", "south"])
    fig = figure(rows, metric_name="accuracy", final_round=5)
    top, bottom = fig.axes[:2]
    assert bottom.get_xlabel() == "round (final: 5)"
    for ax, value in ((top, "loss"), (bottom, "metric")):
        marks = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [5, 5]
        stars = [c for c in ax.collections if c.get_gid() == "final"]
        got = {to_hex(c.get_facecolor()[0]): [float(x) for x in c.get_offsets()[0]]
               for c in stars}
        want = {colours[r.site]: [5.0, getattr(r, value)] for r in rows if r.round == 5}
        assert got.keys() == want.keys() and len(got) == 2
        for colour, point in want.items():
            assert got[colour] == pytest.approx(point)
    assert "final round 5" in [t.get_text() for t in top.get_legend().get_texts()]
    assert top.get_xlim()[1] > 5
    # a final round past the last reported one (its metrics not reported yet) is on the axis
    assert figure(rows, final_round=7).axes[0].get_xlim()[1] > 7
    # a training still running says so, and marks nothing
    running = figure(rows).axes
    assert "not finished" in running[1].get_xlabel()
    assert not [line for line in running[0].get_lines() if line.get_linestyle() == ":"]


def test_write_png_without_matplotlib_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ConfigError, match=r"pip install 'swarmnode\[demo\]'"):
        write_png(hand_rows(), tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_swarmnode_imports_without_matplotlib() -> None:
    code = ("import sys; import swarmnode.chain.report, swarmnode.cli; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
