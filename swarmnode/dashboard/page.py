"""The dashboard's page: HTML, style and script, served as they are (no file fetched from
anywhere else; the chart is drawn here as SVG).

The script polls ``/api/status`` and builds the document from it with ``textContent`` and
``setAttribute`` only: a site's name (from its certificate), an endpoint or a stage label from a
peer's metrics is always text, never markup. Numbers carry their exact value in ``data-value``
(what the browser test compares with ``swarmnode status --format json``).
"""

from __future__ import annotations

__all__ = ["PAGE_CSS", "PAGE_HTML", "PAGE_JS"]

PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>swarmnode dashboard</title>
<link rel="stylesheet" href="/dashboard.css">
<script src="/dashboard.js" defer></script>
</head>
<body data-updates="0">
<header>
  <h1>swarmnode training <span id="contract">-</span></h1>
  <p>chain <span id="chain">-</span> &middot; read <span id="read-at">-</span>
     <span id="error" class="error" hidden></span></p>
</header>
<section class="facts">
  <div><b>state</b> <span id="state">loading&hellip;</span></div>
  <div><b>current round</b> <span id="current-round">-</span></div>
  <div><b>final round</b> <span id="final-round">-</span></div>
  <div><b>active sites</b> <span id="active-count">-</span></div>
  <div><b>min peers</b> <span id="min-peers">-</span></div>
  <div><b>grace / deadline</b> <span id="timing">-</span></div>
  <div><b>spec</b> <span id="spec-hash">-</span></div>
</section>
<p id="waiting" class="waiting">-</p>
<h2>Sites</h2>
<table id="sites">
  <thead><tr><th>site</th><th>state</th><th>last seen</th><th>last check-in</th>
    <th>endpoint</th><th>metrics</th><th>stage</th><th>node round</th><th>bytes sent</th>
    <th>bytes received</th><th>last loss</th><th>last metric</th><th>last commit</th></tr></thead>
  <tbody></tbody>
</table>
<p id="unmatched" class="error" hidden></p>
<h2>Loss and metric per round and site</h2>
<div class="charts">
  <figure><figcaption>validation loss</figcaption><svg id="chart-loss"></svg></figure>
  <figure><figcaption>metric</figcaption><svg id="chart-metric"></svg></figure>
</div>
<div id="legend" class="legend"></div>
<h2>Rounds</h2>
<table id="rounds">
  <thead><tr><th>round</th><th>status</th><th>leader</th><th>attempt</th><th>participants</th>
    <th>digest</th><th>mean loss</th><th>mean metric</th><th>reports</th></tr></thead>
  <tbody></tbody>
</table>
</body>
</html>
"""

PAGE_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.3em; margin: 0; } h2 { font-size: 1.1em; margin: 1.2em 0 0.4em; }
#contract, #chain, .mono, td[data-k=address], td[data-k=digest] { font-family: monospace; }
.facts { display: flex; flex-wrap: wrap; gap: 0.4em 2em; margin: 0.8em 0; }
.waiting { background: #eef4fb; padding: 0.4em 0.8em; border-left: 4px solid #1f77b4; }
.error { color: #a40000; font-weight: bold; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
th { background: #f4f4f4; }
tr.silent td { background: #fde2e2; }
tr.silent td[data-k=state] { color: #a40000; font-weight: bold; }
td.unreachable { color: #a40000; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-weight: bold; }
figure svg { width: 460px; height: 240px; background: #fcfcfc; border: 1px solid #ddd; }
.legend span { margin-right: 1.5em; }
"""

PAGE_JS = r"""
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let wait = 2000;

  // Every string goes in as text or as an attribute value: never as markup.
  function el(tag, text, attrs) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }
  function sv(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function set(id, text, value) {
    const e = $(id);
    e.textContent = String(text);
    e.setAttribute("data-value", value === null || value === undefined ? "" : String(value));
  }
  function cell(row, key, text, value, title) {
    const td = el("td", text, {"data-k": key});
    if (value !== undefined && value !== null) td.setAttribute("data-value", String(value));
    if (title) td.setAttribute("title", title);
    row.appendChild(td);
    return td;
  }
  const fixed = (x, n) => (x === null || x === undefined ? "-" : Number(x).toFixed(n));
  const utc = (t) => (t ? new Date(t * 1000).toISOString().slice(11, 19) : "-");
  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function renderSites(d) {
    const body = $("sites").tBodies[0];
    const silent = new Set(d.silent);
    const rows = d.nodes.map((n) => {
      const tr = el("tr", null, {"data-address": n.address});
      const quiet = silent.has(n.address) || n.state === "absent";
      if (quiet) tr.className = "silent";
      cell(tr, "name", n.name, null, n.address);
      cell(tr, "state", quiet && n.state !== "absent" ? n.state + " (silent)" : n.state,
           n.state);
      const age = n.last_seen ? Math.max(0, d.now - n.last_seen) : null;
      cell(tr, "last-seen", age === null ? "never" : utc(n.last_seen) + " (" + age + " s ago)",
           n.last_seen);
      cell(tr, "checkin", n.last_checkin_round || "-", n.last_checkin_round);
      cell(tr, "endpoint", n.endpoint);
      const m = (d.metrics || {})[n.address];
      if (!m) {
        cell(tr, "m-state", "off", "off", "no metrics port given for this site");
        for (const k of ["m-stage", "m-round", "m-sent", "m-received", "m-loss", "m-metric",
                         "m-commit"]) cell(tr, k, "-");
      } else if (m.state !== "ok") {
        cell(tr, "m-state", "unreachable", "unreachable", m.url + ": " + m.error)
          .className = "unreachable";
        for (const k of ["m-stage", "m-round", "m-sent", "m-received", "m-loss", "m-metric",
                         "m-commit"]) cell(tr, k, "-");
      } else {
        cell(tr, "m-state", "ok", "ok", m.url);
        cell(tr, "m-stage", m.stage || "-", m.stage);
        cell(tr, "m-round", m.round === null ? "-" : m.round, m.round);
        cell(tr, "m-sent", bytes(m.bytes_sent), m.bytes_sent);
        cell(tr, "m-received", bytes(m.bytes_received), m.bytes_received);
        cell(tr, "m-loss", fixed(m.site_loss, 4), m.site_loss);
        cell(tr, "m-metric", fixed(m.site_metric, 4), m.site_metric);
        cell(tr, "m-commit", m.last_commit_age_seconds === null ? "-"
             : Math.round(m.last_commit_age_seconds) + " s ago", m.last_commit_age_seconds);
      }
      return tr;
    });
    body.replaceChildren(...rows);
    const un = $("unmatched");
    un.hidden = !(d.metrics_unmatched || []).length;
    un.textContent = "--metrics names no site of this training: " +
      (d.metrics_unmatched || []).join(", ");
  }

  function renderRounds(d) {
    const rows = d.rounds.slice().reverse().map((r) => {
      const tr = el("tr", null, {"data-round": r.round});
      cell(tr, "round", r.round + (r.is_final ? " (final)" : ""), r.round);
      cell(tr, "status", r.status, r.status);
      cell(tr, "leader", r.leader_name || "-", r.leader, r.leader);
      cell(tr, "attempt", r.attempt || "-", r.attempt);
      cell(tr, "participants", r.participants.length, r.participants.length,
           r.participant_names.join(", "));
      cell(tr, "digest", r.digest ? r.digest.slice(0, 16) + "\u2026" : "-", r.digest, r.digest);
      cell(tr, "loss", fixed(r.mean_loss, 4), r.mean_loss);
      cell(tr, "metric", fixed(r.mean_metric, 4), r.mean_metric);
      cell(tr, "reports", r.metric_reports, r.metric_reports);
      return tr;
    });
    $("rounds").tBodies[0].replaceChildren(...rows);
  }

  // One line per site over the rounds; a log axis when the values span more than log_ratio x.
  function chart(id, d, key, logRatio) {
    const box = $(id), W = 460, H = 240, L = 56, R = 10, T = 10, B = 28;
    box.setAttribute("viewBox", "0 0 " + W + " " + H);
    const pts = d.site_rounds.filter((p) => p[key] !== null && isFinite(p[key]));
    const parts = [];
    if (!pts.length) {
      parts.push(sv("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#888"},
                    "no metrics reported yet"));
      box.replaceChildren(...parts);
      return;
    }
    const vals = pts.map((p) => p[key]), rs = pts.map((p) => p.round);
    let lo = Math.min(...vals), hi = Math.max(...vals);
    const log = logRatio && lo > 0 && hi > logRatio * lo;
    const f = log ? Math.log10 : (v) => v;
    if (hi === lo) { hi += 0.5; lo -= 0.5; }
    const r0 = Math.min(...rs), r1 = Math.max(r0 + 1, Math.max(...rs));
    const x = (r) => L + (W - L - R) * (r - r0) / (r1 - r0);
    const y = (v) => T + (H - T - B) * (1 - (f(v) - f(lo)) / (f(hi) - f(lo)));
    parts.push(sv("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}));
    parts.push(sv("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}));
    for (const v of [lo, hi]) {
      parts.push(sv("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10},
                    Number(v).toPrecision(3)));
    }
    for (const [r, anchor] of [[r0, "start"], [r1, "end"]]) {
      parts.push(sv("text", {x: x(r), y: H - B + 14, "text-anchor": anchor, "font-size": 10},
                    "round " + r));
    }
    if (log) parts.push(sv("text", {x: W - R, y: T + 10, "text-anchor": "end",
                                    "font-size": 10, fill: "#888"}, "log scale"));
    const sites = [...new Set(pts.map((p) => p.address))];
    for (const a of sites) {
      const mine = pts.filter((p) => p.address === a).sort((p, q) => p.round - q.round);
      const colour = (d.colours || {})[mine[0].site] || "#444";
      const g = sv("g", {"data-address": a});
      g.appendChild(sv("polyline", {fill: "none", stroke: colour, "stroke-width": 2,
        points: mine.map((p) => x(p.round) + "," + y(p[key])).join(" ")}));
      for (const p of mine) {
        const c = sv("circle", {cx: x(p.round), cy: y(p[key]), r: 3, fill: colour,
                                "data-round": p.round, "data-value": p[key]});
        c.appendChild(sv("title", {}, p.site + ", round " + p.round + ": " + p[key]));
        g.appendChild(c);
      }
      parts.push(g);
    }
    box.replaceChildren(...parts);
  }

  function render(d) {
    set("contract", d.contract, d.contract);
    set("chain", d.chain, d.chain);
    const state = d.training_finished ? "finished" : "running";
    set("state", state, state);
    set("current-round", d.current_round, d.current_round);
    set("final-round", d.final_round === null ? "not fixed" : d.final_round, d.final_round);
    set("active-count", d.active_count, d.active_count);
    set("min-peers", d.settings.min_peers, d.settings.min_peers);
    set("timing", d.settings.grace_s + " s / " + d.settings.deadline_s + " s");
    set("spec-hash", d.settings.spec_hash.slice(0, 16) + "\u2026", d.settings.spec_hash);
    set("waiting", d.waiting_text || "-", d.waiting ? d.waiting.stage : null);
    set("read-at", utc(d.dashboard.read_at) + " UTC", d.dashboard.read_at);
    const err = $("error");
    err.hidden = !d.dashboard.error;
    err.textContent = d.dashboard.error ? "showing an older read: " + d.dashboard.error : "";
    renderSites(d);
    chart("chart-loss", d, "loss", (d.chart || {}).log_ratio);
    chart("chart-metric", d, "metric", null);
    const legend = [...new Map(d.site_rounds.map((p) => [p.address, p.site])).entries()];
    $("legend").replaceChildren(...legend.map(([a, name]) => {
      const s = el("span", null, {"data-address": a});
      const swatch = sv("svg", {width: 18, height: 8, class: "swatch"});
      swatch.appendChild(sv("rect", {width: 18, height: 8, fill: (d.colours || {})[name]}));
      s.appendChild(swatch);
      s.appendChild(document.createTextNode(" " + name));
      return s;
    }));
    renderRounds(d);
    wait = Math.max(500, 1000 * (d.dashboard.interval_s || 2));
    document.body.setAttribute("data-updates",
      String(Number(document.body.getAttribute("data-updates")) + 1));
  }

  function poll() {
    fetch("/api/status", {cache: "no-store"})
      .then((r) => r.json().then((body) => {
        if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
        render(body);
      }))
      .catch((e) => {
        const err = $("error");
        err.hidden = false;
        err.textContent = "cannot read the dashboard's data: " + e.message;
      })
      .finally(() => setTimeout(poll, wait));
  }
  poll();
})();
"""
