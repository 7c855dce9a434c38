"""The swarm's convergence from the chain: per-round metrics by site as CSV and a plot
(``swarmnode report``).

Each node reports its validation loss and metric for every committed round it took part in
(``MetricsReported`` events, fixed point x1e6), a DP site its privacy spent with them
(``PrivacyReported``: epsilon at its delta, :mod:`swarmnode.chain.epsilon`); the leader, the
participant count and the merged digest of each round come from the ``RoundClosed`` and
``MergeCommitted`` events. Everything is
read with one log query, never one call per round. matplotlib is imported only by
:func:`write_png`, so the base install imports this module without it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmnode.chain import epsilon as chain_epsilon
from swarmnode.chain.client import FIXED_POINT, SwarmContract
from swarmnode.chain.overview import site_name
from swarmnode.errors import ConfigError

__all__ = [
    "CSV_COLUMNS",
    "Row",
    "SiteSummary",
    "collect",
    "figure",
    "finished_round",
    "report",
    "site_colours",
    "summarize",
    "write_csv",
    "write_png",
]

CSV_COLUMNS = ("round", "site", "address", "loss", "metric", "leader", "leader_address",
               "participants", "digest", "epsilon", "delta")
_EVENTS = {"MetricsReported", "PrivacyReported", "MergeCommitted", "RoundClosed"}


@dataclass(frozen=True)
class Row:
    """One site's validation loss and metric in one round, with that round's facts."""

    round: int
    site: str
    address: str
    loss: float
    metric: float
    leader: str | None = None  # the committing leader's site name
    leader_address: str | None = None
    participants: int | None = None  # nodes that checked in for the round
    digest: str | None = None  # the merged model's SHA-256 (hex)
    epsilon: float | None = None  # a DP site's privacy spent, at its delta; None: not DP
    delta: float | None = None

    @property
    def privacy(self) -> str:
        """The site's epsilon at its delta as ``status`` and ``report`` show it (``-``: not DP)."""
        return chain_epsilon.label(self.epsilon, self.delta)


@dataclass(frozen=True)
class SiteSummary:
    """A site's first and last reported round."""

    site: str
    address: str
    rounds: int
    first: Row
    last: Row


def collect(contract: SwarmContract, names: dict[str, str] | None = None) -> list[Row]:
    """Every metric report on chain, one :class:`Row` per site and round, ordered by round then
    by enrolment; ``names``: site names by address (lower case, e.g. from
    :func:`~swarmnode.chain.overview.read_names`), else the site's endpoint host, else its
    address. A site reporting a round twice counts with its last report. Empty when no site has
    reported yet."""
    reports: dict[tuple[int, str], tuple[int, int]] = {}
    privacy: dict[tuple[int, str], tuple[float, float]] = {}
    commits: dict[int, dict[str, Any]] = {}
    counts: dict[int, int] = {}
    for event in contract.events(names=_EVENTS):
        r = int(event.args["round"])
        if event.name == "MetricsReported":
            reports[(r, str(event.args["node"]))] = (int(event.args["loss"]),
                                                     int(event.args["metric"]))
            privacy.pop((r, str(event.args["node"])), None)  # a later report without it: not DP
        elif event.name == "PrivacyReported":  # in the same transaction, after its metrics
            privacy[(r, str(event.args["node"]))] = chain_epsilon.from_event(event.args)
        elif event.name == "MergeCommitted":
            commits[r] = event.args
        else:  # RoundClosed: the last (re-)election's participant count
            counts[r] = int(event.args["participantCount"])
    if not reports:
        return []
    nodes = contract.nodes()
    order = {n.address: i for i, n in enumerate(nodes)}
    named = {n.address: site_name(n, names) for n in nodes}

    def name(address: str) -> str:
        return named.get(address) or (names or {}).get(address.lower(), address)

    rows = []
    for (r, address), (loss, metric) in sorted(
            reports.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], len(order)), kv[0][1])):
        commit = commits.get(r)
        leader = str(commit["leader"]) if commit else None
        eps, delta = privacy.get((r, address), (None, None))
        rows.append(Row(
            round=r,
            site=name(address),
            address=address,
            loss=loss / FIXED_POINT,
            metric=metric / FIXED_POINT,
            leader=name(leader) if leader else None,
            leader_address=leader,
            participants=counts.get(r, len(commit["members"]) if commit else None),
            digest=bytes(commit["digest"]).hex() if commit else None,
            epsilon=eps,
            delta=delta,
        ))
    return rows


def summarize(rows: Iterable[Row]) -> list[SiteSummary]:
    """Per site (in the order sites first appear): its first and last reported round."""
    by_site: dict[str, list[Row]] = {}
    for row in rows:
        by_site.setdefault(row.address, []).append(row)
    out = []
    for address, mine in by_site.items():
        mine.sort(key=lambda x: x.round)
        out.append(SiteSummary(site=mine[0].site, address=address, rounds=len(mine),
                               first=mine[0], last=mine[-1]))
    return out


def _fixed(value: float) -> str:
    return f"{value:.6f}"  # the chain's fixed point: exact, no float noise


def _epsilon(row: Row) -> tuple[str, str]:
    if row.epsilon is None or row.delta is None:
        return "", ""
    # delta as recorded (x1e18): its shortest exact decimal
    return ("inf" if row.epsilon == float("inf") else _fixed(row.epsilon)), repr(row.delta)


def write_csv(rows: Sequence[Row], path: Path | str) -> Path:
    """Write ``rows`` as CSV (columns :data:`CSV_COLUMNS`, loss, metric and a DP site's epsilon
    with 6 decimals, the chain's precision; empty cells where the chain has no value: no epsilon
    and delta for a site without DP)."""
    path = Path(path)
    try:
        with open(path, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(CSV_COLUMNS)
            for row in rows:
                out.writerow([
                    row.round, row.site, row.address, _fixed(row.loss), _fixed(row.metric),
                    row.leader or "", row.leader_address or "",
                    "" if row.participants is None else row.participants, row.digest or "",
                    *_epsilon(row),
                ])
    except OSError as exc:
        raise ConfigError(f"cannot write the report {path}: {exc.strerror or exc}") from None
    return path


def _mean_by_round(rows: Sequence[Row], value: str) -> tuple[list[int], list[float]]:
    sums: dict[int, list[float]] = {}
    for row in rows:
        sums.setdefault(row.round, []).append(getattr(row, value))
    rounds = sorted(sums)
    return rounds, [sum(sums[r]) / len(sums[r]) for r in rounds]


#: Qualitative colours (matplotlib's tab10, then tab20's light shades), a site keeps its own
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
           "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
#: A loss whose largest value is this many times its smallest (round 1's, typically) is plotted
#: on a log axis, so the later rounds are not squashed against the floor
LOG_RATIO = 5.0


def site_colours(sites: Iterable[str]) -> dict[str, str]:
    """A colour per site, the same in every run: each site's slot comes from a hash of its name
    (not the order sites enrol or report in), the next free slot if two sites collide (in name
    order, so the same set of sites always gets the same colours)."""
    import hashlib

    out: dict[str, str] = {}
    taken: set[int] = set()
    for site in sorted(set(sites)):
        slot = int.from_bytes(hashlib.sha256(site.encode()).digest()[:4], "big") % len(PALETTE)
        if len(taken) < len(PALETTE):
            while slot in taken:
                slot = (slot + 1) % len(PALETTE)
        taken.add(slot)
        out[site] = PALETTE[slot]
    return out


def finished_round(contract: SwarmContract) -> int | None:
    """The training's final round once it is committed (the training finished), else None."""
    return contract.final_round() if contract.training_finished() else None


def figure(rows: Sequence[Row], title: str = "swarm convergence",
           metric_name: str = "metric", final_round: int | None = None) -> Any:
    """The report's figure (a matplotlib Figure on an Agg canvas, no pyplot state): validation
    loss (top; a log axis when its values span more than :data:`LOG_RATIO`x) and the metric
    (bottom, labelled with its name) per round, every reported round up to the final one, one
    line per site in the site's own colour and the swarm's mean (dashed). ``final_round`` (the
    training finished): a dotted line at that round on both axes (in the legend as "final round
    N") and each site's values there (its final model's, when it reported them) as stars
    (``gid`` "final")."""
    if not rows:
        raise ConfigError("no metrics to plot: no site has reported metrics yet")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError(
            "the report's plot needs matplotlib, which is not installed: "
            "pip install 'swarmnode[demo]' (or pip install matplotlib)"
        ) from None
    sites = summarize(rows)
    colours = site_colours(s.site for s in sites)
    by_site: dict[str, list[Row]] = {s.address: [] for s in sites}
    for row in rows:
        by_site[row.address].append(row)
    rounds_seen = sorted({r.round for r in rows})
    many = len(rounds_seen) > 40
    fig = Figure(figsize=(9, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax, value, label in ((top, "loss", "validation loss"), (bottom, "metric", metric_name)):
        for summary in sites:
            mine = sorted(by_site[summary.address], key=lambda x: x.round)
            ax.plot([r.round for r in mine], [getattr(r, value) for r in mine],
                    marker=None if many else "o", markersize=3, linewidth=1.2, alpha=0.85,
                    label=summary.site, color=colours[summary.site])
        rounds, means = _mean_by_round(rows, value)
        ax.plot(rounds, means, color="black", linestyle="--", linewidth=2,
                marker=None if many else "s", markersize=4, label="swarm mean")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    losses = [r.loss for r in rows]
    if min(losses) > 0 and max(losses) > LOG_RATIO * min(losses):
        top.set_yscale("log")
        top.set_ylabel("validation loss (log scale)")
    elif len(rounds_seen) > 2:  # round 1 far above the rest: the rest decides the axis
        later = sorted(r.loss for r in rows if r.round != rounds_seen[0])
        high = later[min(len(later) - 1, int(0.98 * len(later)))]
        low = min(later + [min(losses)])
        if max(losses) > 2 * high > 0 and high > low:
            top.set_ylim(low - 0.05 * (high - low), high + 0.3 * (high - low))
            top.set_ylabel("validation loss (clipped: round 1 above)")
    if final_round is not None:
        for ax, value in ((top, "loss"), (bottom, "metric")):
            ax.axvline(final_round, color="0.35", linestyle=":", linewidth=1.5,
                       label=f"final round {final_round}" if ax is top else "_final")
            for summary in sites:
                at = [getattr(r, value) for r in by_site[summary.address]
                      if r.round == final_round]
                if at:
                    ax.scatter([final_round], at[-1:], marker="*", s=140, zorder=3,
                               color=colours[summary.site], edgecolors="black",
                               linewidths=0.5, gid="final", label="_final")
    # every round up to the final one on the axis, however the locator rounds it
    last = max(rounds_seen[-1], final_round or 0)
    top.set_xlim(rounds_seen[0] - 0.5, last + 0.5)
    top.set_title(title)
    bottom.set_xlabel(f"round (final: {final_round})" if final_round is not None
                      else f"round (last: {rounds_seen[-1]}; the training has not finished)")
    top.legend(loc="best", fontsize="small", ncols=2 if len(sites) > 6 else 1)
    return fig


def write_png(rows: Sequence[Row], path: Path | str, title: str = "swarm convergence",
              metric_name: str = "metric", final_round: int | None = None) -> Path:
    """Write :func:`figure` as a PNG; needs matplotlib."""
    path = Path(path)
    fig = figure(rows, title, metric_name, final_round)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    return path


def report(contract: SwarmContract, out_dir: Path | str, names: dict[str, str] | None = None,
           *, rows: Sequence[Row] | None = None,
           metric_name: str = "metric") -> tuple[Path, Path]:
    """Write ``report.csv`` and ``report.png`` into ``out_dir`` (created if needed); returns
    their paths. ``rows``: what :func:`collect` already read (else it is read now). ConfigError
    when no site has reported metrics yet."""
    if rows is None:
        rows = collect(contract, names)
    if not rows:
        raise ConfigError(
            f"no site has reported metrics yet on contract {contract.address} ({contract.chain}); "
            "nodes report after each committed round: see `swarmnode status` for the rounds"
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    csv_path = write_csv(rows, out / "report.csv")
    try:
        png_path = write_png(rows, out / "report.png",
                             title=f"swarm convergence: contract {contract.address[:10]}…",
                             metric_name=metric_name, final_round=finished_round(contract))
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({csv_path} was written)") from None
    return csv_path, png_path
