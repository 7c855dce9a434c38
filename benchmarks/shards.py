"""CPU cost of a sharded merge (``topology: sharded``) per byte, in one process, no network.

    python benchmarks/shards.py [--params 10000000] [--sites 8] [--reps 3]
                                [--out results/shards.json] [--profile]

Eight sites, each with its own float32 update of ``--params`` parameters (canonical safetensors,
as the trainer hands it over), run one round's data path end to end, twice in the same run:

* ``before``: the path as it was up to this benchmark's commit, kept here verbatim: every slice
  encoded into a safetensors buffer of its own (a copy, hashed), the own slice decoded from that
  copy (another copy); each merged slice pulled into a buffer of its own, hashed, decoded (a
  copy) and placed into the assembled model (a copy), which is hashed again; and the merge
  rules' NaN/Inf check of every update as it was (``isfinite(t).all()``, run twice per update
  by the collector's streaming mean: the largest CPU cost on this path).
* ``after``: what the product runs now (``node.sharding.scatter`` / ``reduce`` / ``gather``):
  a slice travels as its header and a view of the payload (not hashed: TLS authenticates
  it), the own slice is folded from the payload's bytes, each merged slice lands straight in
  its place in one preallocated model, which is hashed once; the NaN/Inf check is one
  ``aminmax`` pass.

Both run the receivers' steps as the data plane runs them (the bytes copied into a fresh buffer
stand for the TLS socket's ``recv_into``; then the SHA-256 check, the header and NaN/Inf checks,
the fold with the leader's Collector in the fixed order, the merged slice's digest). TLS itself
is left out: it costs the same on both paths. Measured: CPU seconds of the whole process
(``time.process_time``, every thread) per phase, summed over the sites, and the bytes hashed
(counted at ``hashlib``), per site and as multiples of the model. Every site's assembled digest
must equal the leader topology's for the same updates (checked on both paths). Writes
``results/shards.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from swarmnode.errors import DuplicateUpdate, RoundError, TransportError
from swarmnode.merge import _common
from swarmnode.node import sharding
from swarmnode.node.collector import Collector
from swarmnode.node.sharding import ShardExchange
from swarmnode.transport import serde, shards
from swarmnode.transport.shards import EncodedSlice
from swarmnode.types import Update

ROUND, ATTEMPT = 5, 1


# -- counting the bytes hashed ------------------------------------------------------------------
class _Counted:
    """hashlib.sha256 that adds the bytes it hashes to ``HASHED``."""

    def __init__(self, data: Any = b"") -> None:
        self._sha = hashlib.sha256()
        self.update(data)

    def update(self, data: Any) -> None:
        n = memoryview(data).nbytes
        with _LOCK:
            HASHED[0] += n
        self._sha.update(data)

    def digest(self) -> bytes:
        return self._sha.digest()


class _Hashlib:
    sha256 = _Counted


HASHED = [0]
_LOCK = threading.Lock()
serde.hashlib = _Hashlib  # type: ignore[assignment]
shards.hashlib = _Hashlib  # type: ignore[assignment]


# -- the sites ------------------------------------------------------------------------------------
def _model(params: int, seed: int) -> dict[str, torch.Tensor]:
    """``params`` float32 parameters in a few layers, as a trainer's MLP would hold."""
    g = torch.Generator().manual_seed(seed)
    big = params // 10
    return {
        "l1.weight": torch.randn(5, big, generator=g),
        "l1.bias": torch.randn(params - 9 * big - 1000, generator=g),
        "l2.weight": torch.randn(4, big, generator=g),
        "l2.bias": torch.randn(1000, generator=g),
    }


class _Client:
    """What a site's pool gives it for one owner: the owner's data plane, run in process (the
    copy into a fresh buffer stands for the socket; then the server's own checks)."""

    def __init__(self, sender: str, owner: ShardExchange, sites: dict[str, Any]) -> None:
        self.sender, self.owner, self.sites = sender, owner, sites

    def _receive(self, index: int, weight: int, data: list[Any], digest: bytes | None) -> None:
        layout = self.owner.layout(ROUND, self.sites["participants"])
        spec = layout.slice_spec(index)
        total = sum(memoryview(d).nbytes for d in data)
        buf = serde.buffer(total, populate=True)  # as DataServer._shard_push
        view, pos = memoryview(buf), 0
        for d in data:
            n = memoryview(d).nbytes
            view[pos:pos + n] = memoryview(d).cast("B")
            pos += n
        view.release()
        if digest is not None:  # the old path; a slice now travels unhashed (TLS covers it)
            serde.Received(buf, serde.digest(buf)).check_digest(digest)
        state = serde.view_state(buf, spec=spec, reject_nonfinite=True)
        collector = self.owner.collector(ROUND, ATTEMPT, self.sites["participants"],
                                         self.sites["participants"])
        self.owner.add(collector, self.sender, weight, state)

    def push_shard(self, round: int, attempt: int, index: int, weight: int,
                   piece: EncodedSlice, timeout: float) -> None:
        self._receive(index, weight, [piece.head, piece.body], None)  # as push_shard sends

    def push_old(self, index: int, weight: int, data: Any, digest: bytes) -> None:
        self._receive(index, weight, [data], digest)

    def pull_shard_into(self, round: int, attempt: int, index: int, head: bytes,
                        into: memoryview, timeout: float, wait_s: float) -> None:
        held = self.owner.merged(round, attempt, wait_s)
        if held is None:
            raise RoundError("not merged")
        view = memoryview(held).cast("B")
        if view[:len(head)] != head:
            raise TransportError("not the slice's header")
        into[:] = view[len(head):]  # the socket's recv_into

    def pull_old(self, index: int) -> serde.Received:
        held = self.owner.merged(ROUND, ATTEMPT, 10.0)
        assert held is not None
        view = memoryview(held).cast("B")
        buf = serde.buffer(len(view))  # as DataClient.pull_shard did
        buf[:] = view
        received = serde.Received(buf, serde.digest(buf))
        received.check_digest(serde.digest(held))  # the owner hashed its merged slice then
        return received


class _Pool:
    def __init__(self, me: str, sites: dict[str, Any]) -> None:
        self.me, self.sites = me, sites

    def client(self, owner: str) -> _Client:
        return _Client(self.me, self.sites["exchanges"][owner], self.sites)


# -- the path before this benchmark's commit (kept to measure against) --------------------------
def _scatter_old(exchange: ShardExchange, pool: _Pool, payload: Any, weight: int,
                 parts: tuple[str, ...]) -> None:
    layout = exchange.layout(ROUND, parts)
    me = exchange.mine(ROUND, parts)

    def send(index: int) -> None:
        data, digest = serde.Encoded(layout.cut(payload, index)).to_buffer()
        if index == me:
            collector = exchange.collector(ROUND, ATTEMPT, parts, parts)
            try:
                exchange.add(collector, exchange.me, weight, serde.decode(
                    data, expected_digest=None, spec=layout.slice_spec(index),
                    max_bytes=len(data), reject_nonfinite=False))
            except DuplicateUpdate:
                pass
            return
        pool.client(layout.owners[index]).push_old(index, weight, data, digest)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _gather_old(exchange: ShardExchange, pool: _Pool, parts: tuple[str, ...]) -> tuple[Any, bytes]:
    layout = exchange.layout(ROUND, parts)
    me = exchange.mine(ROUND, parts)
    results: dict[int, Any] = {}

    def fetch(index: int) -> None:
        spec = layout.slice_spec(index)
        if index == me:
            held = exchange.merged(ROUND, ATTEMPT, 10.0)
            assert held is not None
            data = held
        else:
            data = pool.client(layout.owners[index]).pull_old(index).data
        results[index] = serde.decode(data, expected_digest=None, spec=spec,
                                      max_bytes=spec.payload_bytes, reject_nonfinite=False)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out, _views = layout.spec.allocate()
    for index in range(len(layout.owners)):
        layout.place(out, index, results[index])
    return out, serde.digest(out)


# -- one round, either path -----------------------------------------------------------------------
def _round(path: str, spec: serde.ParamSpec, payloads: dict[str, Any],
           weights: dict[str, int]) -> dict[str, Any]:
    parts = tuple(sorted(payloads, key=str.lower))
    sites: dict[str, Any] = {"participants": parts}
    sites["exchanges"] = {p: ShardExchange(spec, "mean", {}, me=p) for p in parts}
    pools = {p: _Pool(p, sites) for p in parts}
    cpu: dict[str, float] = {}
    wall: dict[str, float] = {}
    hashed: dict[str, int] = {}

    def phase(name: str, fn: Any) -> Any:
        HASHED[0] = 0
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu[name], wall[name] = time.process_time() - c0, time.perf_counter() - w0
        hashed[name] = HASHED[0]
        return out

    def scatter() -> None:
        for p in parts:
            ex = sites["exchanges"][p]
            if path == "before":
                _scatter_old(ex, pools[p], payloads[p], weights[p], parts)
            else:
                failed = sharding.scatter(ex, pools[p], ROUND, ATTEMPT, parts, parts,
                                          payloads[p], weights[p], 60.0, set())
                assert not failed, failed

    def reduce() -> None:
        for p in parts:
            sites["exchanges"][p].reduce(ROUND, ATTEMPT, parts, parts)

    def gather() -> list[bytes]:
        digests = []
        for p in parts:
            ex = sites["exchanges"][p]
            if path == "before":
                out, digest = _gather_old(ex, pools[p], parts)
            else:
                out, digest = sharding.gather(ex, pools[p], ROUND, ATTEMPT, parts, 60.0)
            digests.append(digest)
            del out
        return digests

    finite = _common._finite
    if path == "before":  # the merge rules' NaN/Inf check as it was
        _common._finite = lambda t: bool(torch.isfinite(t).all())
    try:
        phase("scatter", scatter)
        phase("reduce", reduce)
        digests = phase("gather", gather)
    finally:
        _common._finite = finite
    return {"cpu_s": cpu, "wall_s": wall, "hashed_bytes": hashed, "digests": digests}


def _leader_digest(spec: serde.ParamSpec, states: dict[str, dict[str, torch.Tensor]],
                   weights: dict[str, int]) -> bytes:
    """What the leader topology commits for the same updates."""
    c = Collector(ROUND, ATTEMPT, "mean", {}, spec=spec)
    c.expect(states)
    for p in sorted(states, key=str.lower):
        c.add(Update(states[p], float(weights[p]), p))
    c.seal()
    done = c.encoded()
    assert done is not None
    return done[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/shards.json"))
    ap.add_argument("--profile", action="store_true",
                    help="print each path's top functions by cumulative CPU (cProfile)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as a node's merge runs beside its other work

    addresses = [f"0x{(i + 1) * 0x1111:040x}" for i in range(args.sites)]
    states = {a: _model(args.params, i) for i, a in enumerate(addresses)}
    weights = {a: 10 + 7 * i for i, a in enumerate(addresses)}
    spec = serde.ParamSpec.from_state(states[addresses[0]])
    payloads = {a: serde.Encoded(s).to_buffer()[0] for a, s in states.items()}
    model_bytes = spec.payload_bytes
    expected = _leader_digest(spec, states, weights)
    print(f"{spec.nbytes // 4} float32 parameters ({model_bytes / 1e6:.1f} MB), "
          f"{args.sites} sites; leader topology digest {expected.hex()[:16]}")

    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for rep in range(args.reps):
        for path in ("before", "after"):  # alternated, so load drifts hit both alike
            got = _round(path, spec, payloads, weights)
            agree = all(d == expected for d in got.pop("digests"))
            got["digests_equal_leader_topology"] = agree
            runs[path].append(got)
            total = sum(got["cpu_s"].values())
            print(f"rep {rep} {path:6s}: cpu " + ", ".join(
                f"{k} {v:.2f}" for k, v in got["cpu_s"].items()) + f" = {total:.2f} s; "
                f"hashed {sum(got['hashed_bytes'].values()) / model_bytes / args.sites:.2f} "
                f"models per site; digests agree: {agree}")
            if not agree:
                sys.exit(f"{path}: a site's assembled digest differs from the leader topology's")

    if args.profile:
        for path in ("before", "after"):
            prof = cProfile.Profile()
            prof.enable()
            _round(path, spec, payloads, weights)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
            print(f"--- {path}: top functions by own time (main thread) ---")
            print(text.getvalue())

    def summary(path: str) -> dict[str, Any]:
        rows = runs[path]
        cpu = {k: statistics.median(r["cpu_s"][k] for r in rows) for k in rows[0]["cpu_s"]}
        wall = {k: statistics.median(r["wall_s"][k] for r in rows) for k in rows[0]["wall_s"]}
        hashed = {k: rows[0]["hashed_bytes"][k] / model_bytes / args.sites
                  for k in rows[0]["hashed_bytes"]}
        return {
            "cpu_s_all_sites": {k: round(v, 3) for k, v in cpu.items()},
            "cpu_s_all_sites_total": round(sum(cpu.values()), 3),
            "cpu_s_per_site": {k: round(v / args.sites, 3) for k, v in cpu.items()},
            "cpu_s_per_site_total": round(sum(cpu.values()) / args.sites, 3),
            "wall_s_all_sites": {k: round(v, 3) for k, v in wall.items()},
            "hashed_models_per_site": {k: round(v, 3) for k, v in hashed.items()},
            "hashed_models_per_site_total": round(sum(hashed.values()), 3),
            "digests_equal_leader_topology": all(r["digests_equal_leader_topology"]
                                                 for r in rows),
            "cpu_s_per_rep": [round(sum(r["cpu_s"].values()), 3) for r in rows],
        }

    before, after = summary("before"), summary("after")
    result = {
        "benchmark": "shards",
        "params": spec.nbytes // 4,
        "model_bytes": model_bytes,
        "sites": args.sites,
        "reps": args.reps,
        "statistic": "median over reps",
        "before": before,
        "after": after,
        # copies of model bytes per site besides the wire's (the socket's recv_into), counted in
        # the code: before, every slice encoded (1) and the own one decoded (1/N); every merged
        # slice decoded (1) and placed (1). After: the own merged slice put in place (1/N).
        "copies_besides_the_wire_models_per_site": {
            "before": round(2 + 1 + 1 / args.sites, 3), "after": round(1 / args.sites, 3)},
        "cpu_ratio_after_over_before": round(
            after["cpu_s_all_sites_total"] / before["cpu_s_all_sites_total"], 3),
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
                 "torch": torch.__version__},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"per site: before {before['cpu_s_per_site']} = {before['cpu_s_per_site_total']} s "
          f"CPU, hashing {before['hashed_models_per_site_total']} models; after "
          f"{after['cpu_s_per_site']} = {after['cpu_s_per_site_total']} s CPU, hashing "
          f"{after['hashed_models_per_site_total']} models; wrote {args.out}")


if __name__ == "__main__":
    main()
