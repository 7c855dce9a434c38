"""What a trainer's sync or final metrics may say of its privacy (lifecycle.Privacy): nothing (an
older callback, or a site without DP), or an epsilon >= 0 with a delta in (0, 1); and, in an
in-process swarm, a DP site's epsilon on the chain's record as `status` and `report` show it. The
real swarm with an Opacus site is tests/integrations/test_opacus.py."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from swarmnode.chain.overview import SitePrivacy, overview
from swarmnode.chain.report import collect, write_csv
from swarmnode.cli import chain_cmds
from swarmnode.errors import ConfigError
from swarmnode.node.lifecycle import Privacy
from swarmnode.node.service import _LocalApi
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site
from swarmnode.transport import serde

STATE = {"w": torch.zeros(3, 2)}


def test_absent_means_not_dp_and_valid_values_pass() -> None:
    assert Privacy.from_args({"loss": 0.5, "metric": 0.9}, "sync") is None
    assert Privacy.from_args({"epsilon": 2.5, "delta": 1e-5}, "sync") == Privacy(2.5, 1e-5)
    assert Privacy.from_args({"epsilon": 0, "delta": 1e-6}, "sync") == Privacy(0.0, 1e-6)
    infinite = Privacy.from_args({"epsilon": math.inf, "delta": 1e-5}, "final_metrics")
    assert infinite is not None and math.isinf(infinite.epsilon)  # no noise: said, not hidden


@pytest.mark.parametrize(("args", "said"), [
    ({"epsilon": 1.0}, "delta must be a number in (0, 1)"),
    ({"delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": -1.0, "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": math.nan, "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": "8", "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": True, "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": 1.0, "delta": 1.0}, "delta must be a number in (0, 1)"),
    ({"epsilon": 1.0, "delta": 0}, "delta must be a number in (0, 1)"),
])
def test_bad_values_are_refused_saying_what_to_send(args: dict, said: str) -> None:
    with pytest.raises(ConfigError, match="^sync: " + re.escape(said)):
        Privacy.from_args(args, "sync")


# ---------------------------------------------------------------- on the chain's record
DELTA = 1e-5
EPSILONS = (0.123456789, 0.987654321, 1.5, 2.25)  # the DP site's accountant, sync after sync


def test_a_dp_sites_epsilon_is_on_the_chains_record_and_shown_by_status_and_report(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process swarm (real node services, the real contracts on eth-tester): site-1 trains
    with DP and reports its epsilon with every sync and with its final metrics; site-2 does not.
    Each committed round's epsilon is the one site-1 sent with that round's sync (at the chain's
    precision), the final round's the one sent with the final metrics; `status` (overview, its
    table and JSON) and `report` (collect, its CSV) show them for site-1 and nothing for site-2.
    A malformed epsilon is refused by the local API before anything is sent."""
    spec = TrainingSpec.from_state(STATE, sync_frequency=1, min_peers=2, merge_method="mean")

    def step(site: Site, k: int, model):  # type: ignore[no-untyped-def]
        if k >= len(EPSILONS):
            return None
        base = model if model is not None else STATE
        report = {"loss": 0.5 / (k + 1), "metric": 0.5 + 0.1 * k}
        if site.index == 0:
            report |= {"epsilon": EPSILONS[k], "delta": DELTA}
        return {n: t + 0.1 * (site.index + 1) for n, t in base.items()}, 10, report

    with InProcessSwarm(2, spec, min_peers=2, grace_s=1, deadline_s=6) as swarm:
        dp, plain = swarm.sites
        swarm.run(step)
        final = swarm.final_round()
        assert final is not None
        reply, _ = _LocalApi(dp.service).call(
            "final_metrics", {"loss": 0.1, "metric": 0.9, "epsilon": 2.5, "delta": DELTA}, None)
        assert reply == {"recorded": True}
        assert plain.service.report_final_metrics(0.2, 0.8) is True

        # on the record: per round, what site-1 sent with that round's sync; none of site-2
        sent = {s.outcome.round: EPSILONS[k] for k, s in enumerate(dp.syncs)
                if s.outcome.contributed and s.outcome.digest}
        assert len(sent) >= 2, dp.syncs
        recorded = swarm.admin.privacy_reports()
        assert recorded == {**{(r, dp.address): (round(e, 6), DELTA) for r, e in sent.items()},
                            (final, dp.address): (2.5, DELTA)}

        # `swarmnode status`: the latest epsilon per site, each round's, table and JSON
        view = overview(swarm.admin)
        assert view.privacy == {dp.address: SitePrivacy(final, 2.5, DELTA)}
        js = {n["address"]: n["privacy"] for n in view.to_json()["nodes"]}
        assert js == {dp.address: {"round": final, "epsilon": 2.5, "delta": DELTA},
                      plain.address: None}
        by_round = {r["round"]: r["privacy"] for r in view.to_json()["rounds"]}
        first = min(sent)
        assert by_round[first] == [{"name": "site-1.inproc", "address": dp.address,
                                    "round": first, "epsilon": round(sent[first], 6),
                                    "delta": DELTA}]
        shown = Console(width=250, record=True)
        monkeypatch.setattr(chain_cmds, "console", shown)
        chain_cmds._print_overview(view)
        lines = shown.export_text().splitlines()
        dp_line = next(line for line in lines if dp.address in line)
        plain_line = next(line for line in lines if plain.address in line)
        assert f"2.5 (δ 1e-05) r{final}" in dp_line
        assert "δ" not in plain_line and re.search(r"│ - +│$", plain_line.rstrip()), plain_line
        assert any(line.startswith(f"│ {first} ") and f"site-1.inproc {sent[first]:.4g}" in line
                   for line in lines), lines

        # `swarmnode report`: each round's epsilon and delta per site (empty for site-2)
        rows = collect(swarm.admin)
        write_csv(rows, tmp_path / "report.csv")
        with open(tmp_path / "report.csv", newline="", encoding="utf-8") as f:
            csv_rows = list(csv.DictReader(f))
        for row in csv_rows:
            r = int(row["round"])
            if row["address"] == plain.address:
                assert (row["epsilon"], row["delta"]) == ("", "")
            else:
                eps = 2.5 if r == final else sent[r]
                assert (row["epsilon"], row["delta"]) == (f"{eps:.6f}", "1e-05")
        assert {(int(r["round"]), r["address"]) for r in csv_rows} >= {
            (final, dp.address), (final, plain.address)}

        # a malformed epsilon: refused by the local API, nothing reaches the node or the chain
        events = len(swarm.admin.events())
        payload = serde.encode({n: t.contiguous() for n, t in STATE.items()})
        for bad, said in (({"epsilon": math.nan, "delta": DELTA}, "epsilon must be a number"),
                          ({"epsilon": -1.0, "delta": DELTA}, "epsilon must be a number"),
                          ({"epsilon": 1.0, "delta": 1.5}, "delta must be a number in"),
                          ({"epsilon": 1.0, "delta": 1e-19}, "delta 1e-19 is below 1e-18")):
            with pytest.raises(ConfigError, match="^sync: " + re.escape(said)):
                _LocalApi(dp.service).call("sync", {"weight": 10, **bad}, payload)
        assert len(swarm.admin.events()) == events
