"""Round benchmark: real anvil, real node services and trainers as separate processes over mTLS.

    python benchmarks/round.py [--configs 1M:2,1M:4,25M:4,250M:3:4] [--rounds 6] \
        [--out results/round.json] [--append]

Per configuration (``P:N``, ``P:N:R`` or ``P:N:R:MERGE``: P float32 parameters, N sites, R
rounds, default ``--rounds``; MERGE ``mean`` (default) or ``secure``, ``mean`` with secure
aggregation at the demo's clip norm and a weight cap of 128 (the 2^32 ring: ``_spec``); a
``secure`` row measured after the same ``mean`` one in one run gets ``over_plain_mean``, the
ratio of their rounds) it reports, with medians over rounds 2..R of every trainer's syncs:

* ``median_round_s``: the trainer's whole sync (hand the parameters over, the round, take the
  merged model back), and its split into stages: ``upload_handback`` (trainer <-> node, the local
  API) and the node's own stages (``checkin``, ``election``, ``push``, ``collect``, ``merge``,
  ``commit_tx``, ``commit`` (waiting for the leader's commit), ``pull``);
* ``raw_bound_s``: moving 2*N*P*4 bytes over loopback TCP in the same run (every update to the
  leader and the merged model back to every site);
* ``leader_growth_over_model``: the largest (peak RSS during the rounds - RSS before the first
  round) / model bytes over the node services (each leads some rounds), ``member_growth`` the
  smallest; peak RSS is VmHWM, reset before the first round (``/proc/PID/clear_refs``);
  ``node_growth_over_model`` the same per node service;
* ``trainer_growth_over_model``: the largest (trainer's peak RSS from its first sync on - its RSS
  once its model is built and has taken a step, i.e. what it needs to train) / model bytes;
* ``digests_equal``: every trainer ended with the same final digest (the chain's);
  ``same_rounds_every_site``: every trainer's syncs ran in the same rounds (no site fell behind
  or skipped one);
* ``sync_split_s``: where a sync's time goes: ``serialise`` (the trainer writes its parameters
  for the node), ``hash`` (one SHA-256 of the model's bytes, measured apart: nodes hash each
  update they receive or send while it streams), ``transfer`` (the node's push and pull stages),
  ``merge`` (the leader's merge, from the rounds it led), ``load`` (the trainer copies the merged
  model into its parameters), ``other`` (the rest: the chain, waiting for other sites, the
  node reading the trainer's file);
* ``min_mem_available_gib``: the least ``MemAvailable`` of the machine seen during the run (the
  run stops if it falls under ``--min-free-gib``);

``--transfer 600M`` adds a ``transfers`` row: one update of P parameters pushed from one node's
peer client to another node's peer server (a child process: data plane, mutual TLS, received
into a spill file, digest, training spec and NaN/Inf checks, as a node receives an update), then
the same size pulled back from it (served from a model file, as a node serves its stored merged
model; received into memory and checked against its digest, as a member pulls). The update is
pushed from a file mapping, as a node pushes the update its trainer handed over. Each side's
memory above its baseline: peak RSS (VmHWM, reset before the push) - RSS before.
* CPU seconds per node service and trainer; ``rpc_calls_per_round``: JSON-RPC requests of all
  node services per round.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import torch  # noqa: E402
import yaml  # noqa: E402

from swarmnode.chain.accounts import dev_account  # noqa: E402
from swarmnode.chain.client import SwarmContract, connect  # noqa: E402
from swarmnode.chain.launcher import DevChain  # noqa: E402
from swarmnode.demo.swarm import SECURE_CLIP_NORM  # noqa: E402
from swarmnode.identity import (  # noqa: E402
    TlsFiles,
    create_ca,
    describe,
    issue_node_cert,
    make_bundle,
)
from swarmnode.spec import TrainingSpec  # noqa: E402
from swarmnode.transport import serde  # noqa: E402
from swarmnode.transport.local import LocalClient  # noqa: E402
from swarmnode.transport.peer import PeerClient, PeerServer  # noqa: E402

HERE = Path(__file__).resolve().parent
SECURE_ROUND_MAX_WEIGHT = 128  # the secure rows' max_weight (see _spec)
ROOT = HERE.parent
DEFAULT_CONFIGS = "1M:2,1M:4,1M:8,25M:2,25M:4,25M:8,1M:16,1M:32"


def _size(text: str) -> int:
    return int(float(text[:-1]) * 1_000_000) if text[-1] in "Mm" else int(text)


def _proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_bound(nbytes: int) -> float:
    """Seconds to move ``nbytes`` through one loopback TCP connection into a reused buffer."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    chunk = 4 << 20

    def receive() -> None:
        conn, _ = srv.accept()
        buf = bytearray(chunk)
        view, left = memoryview(buf), nbytes
        while left:
            got = conn.recv_into(view[:min(chunk, left)])
            if not got:
                break
            left -= got
        conn.sendall(b"k")
        conn.close()

    t = threading.Thread(target=receive)
    t.start()
    data = memoryview(bytes(chunk))
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        left = nbytes
        while left:
            n = min(chunk, left)
            c.sendall(data[:n])
            left -= n
        c.recv(1)
        seconds = time.perf_counter() - t0
    t.join()
    srv.close()
    return seconds


def _spec(params: int, nodes: int, secure: bool = False) -> TrainingSpec:
    sys.path.insert(0, str(HERE))
    from round_trainer import Synthetic

    spec = TrainingSpec.from_state(Synthetic(params).state_dict(), sync_frequency=1,
                                   min_peers=nodes, merge_method="mean")
    if secure:  # the demo's clip (a step of the synthetic trainer moves far less than it) and
        # a weight cap that fits the trainers' weights (num_samples 100 + index): W C = 6,400
        # leaves 4 sites 16 fraction bits, the 2^32 ring's floor (privacy.ring); the demo's cap
        # (100,000) would take the 2^64 ring every round
        spec = dataclasses.replace(spec, merge_options={"clip_norm": SECURE_CLIP_NORM},
                                   max_weight=SECURE_ROUND_MAX_WEIGHT, secure_aggregation=True)
    return spec


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def sha256_seconds(nbytes: int) -> float:
    """Seconds for one SHA-256 of ``nbytes`` (as a node hashes an update), over a buffer of at
    most 64 MiB hashed as many times as it takes."""
    block = memoryview(bytes(max(1, min(nbytes, 64 << 20))))
    t0, left = time.perf_counter(), nbytes
    sha = hashlib.sha256()
    while left > 0:
        sha.update(block[:min(left, len(block))])
        left -= len(block)
    return time.perf_counter() - t0


class _Peers:
    """Both ends' view of who is who: the two benchmark identities, participants of round 1."""

    def __init__(self, fps: dict[str, bytes]) -> None:
        self.fps = fps

    def fingerprint_of(self, address: str) -> bytes | None:
        return self.fps.get(address)

    def is_participant(self, round: int, address: str) -> bool:
        return address in self.fps


class _Holder:
    """The receiving node's peer handler: a pushed update is checked by the data plane and let
    go (a node folds it); a pull is served the model file, as a node serves its stored model."""

    def __init__(self, path: Path, digest: bytes) -> None:
        self.path, self.digest = path, digest

    def accept_update(self, round, sender, weight, state, digest, evict=None):  # type: ignore[no-untyped-def]  # noqa: E501
        if evict is not None:
            evict()

    def merged(self, round: int, timeout: float, to: str | None = None) -> Any:
        return serde.map_file(self.path), self.digest

    def health(self) -> dict[str, object]:
        return {"ok": True}


_SENDER, _RECEIVER = "0x" + "5e" * 20, "0x" + "7c" * 20


def _peer_tls(pki: Path, name: str) -> TlsFiles:
    return TlsFiles(pki / name / f"{name}.pem", pki / name / f"{name}.key", pki / "trust.pem")


def _peers(pki: Path) -> _Peers:
    return _Peers({_SENDER: _peer_tls(pki, "sender").fingerprint(),
                   _RECEIVER: _peer_tls(pki, "receiver").fingerprint()})


def serve_peer(pki: Path, params: int, model: Path, digest: str) -> None:
    """The receiving node (a child process of ``transfer``)."""
    spec = serde.ParamSpec.from_state(_spec_state(params))
    spill = pki / "spill"
    spill.mkdir(exist_ok=True)
    server = PeerServer("127.0.0.1:0", _peer_tls(pki, "receiver"), _peers(pki),
                        _Holder(model, bytes.fromhex(digest)), spec=spec,
                        max_bytes=int(params * 4 * 1.1) + (1 << 20), spill_dir=str(spill))
    print(server.start(), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


def _spec_state(params: int) -> dict[str, torch.Tensor]:
    """The synthetic model's names and shapes, as empty (meta) tensors: no memory."""
    sys.path.insert(0, str(HERE))
    from round_trainer import TENSOR

    sizes = [TENSOR] * (params // TENSOR) + ([params % TENSOR] if params % TENSOR else [])
    return {f"w.{i}": torch.empty(n, device="meta") for i, n in enumerate(sizes)}


def _write_model(path: Path, params: int) -> bytes:
    """The canonical bytes of a synthetic model of ``params`` float32 values, written to
    ``path`` one tensor at a time (never whole in memory); their SHA-256."""
    spec = serde.ParamSpec.from_state(_spec_state(params))
    head, items = spec._canonical()  # noqa: SLF001 - the header, without the tensors
    sha = hashlib.sha256(head)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(head)
        for _, shape, _ in items:
            data = torch.rand(shape, generator=gen).numpy().tobytes()
            sha.update(data)
            f.write(data)
    return sha.digest()


def transfer(params: int, work: Path) -> dict[str, Any]:
    """One push of ``params`` float32 values to another node and one pull back (see above)."""
    work.mkdir(parents=True)
    ca = create_ca(work / "ca", "bench-ca", org="bench")
    make_bundle([ca[0]], work / "trust.pem")
    for name in ("sender", "receiver"):
        issue_node_cert(*ca, work / name, name, dns=["localhost"], ips=["127.0.0.1"])
    update, model = work / "update.safetensors", work / "merged.safetensors"
    digest = _write_model(update, params)
    os.link(update, model)  # the bytes the receiver serves: same size, same digest
    nbytes = update.stat().st_size
    child = subprocess.Popen([sys.executable, __file__, "--serve-peer", str(work), str(params),
                              str(model), digest.hex()], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        payload = serde.map_file(update)  # as a node holds its trainer's update: a file's pages
        serde.evict(payload)
        pids = {"sender": os.getpid(), "receiver": child.pid}
        rss0 = {k: _proc_status(pid, "VmRSS") for k, pid in pids.items()}
        for pid in pids.values():
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        avail0 = _mem_available()
        with PeerClient(f"127.0.0.1:{port}", _peer_tls(work, "sender"), _SENDER, _RECEIVER,
                        _peers(work), max_bytes=nbytes + (1 << 20)) as client:
            t0 = time.perf_counter()
            client.push_update(1, 1, payload, timeout=1800, digest=digest)
            push_s = time.perf_counter() - t0
            hwm_push = {k: _proc_status(pid, "VmHWM") for k, pid in pids.items()}
            t0 = time.perf_counter()
            got = client.pull(1, timeout=1800, size_hint=nbytes)
            got.check_digest(digest)
            pull_s = time.perf_counter() - t0
        hwm = {k: _proc_status(pid, "VmHWM") for k, pid in pids.items()}
        avail = _mem_available()
        del got
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
    return {
        "params": params, "payload_bytes": nbytes, "push_s": round(push_s, 2),
        "pull_s": round(pull_s, 2), "push_gbps": round(nbytes / push_s / 1e9, 3),
        "pull_gbps": round(nbytes / pull_s / 1e9, 3), "digest_checked": True,
        "growth_over_model_during_push": {k: round((hwm_push[k] - rss0[k]) / nbytes, 2)
                                          for k in pids},
        "growth_over_model": {k: round((hwm[k] - rss0[k]) / nbytes, 2) for k in pids},
        "sha256_s": round(sha256_seconds(nbytes), 2),
        "mem_available_gib_before_after": [round(avail0 / 2**30, 1), round(avail / 2**30, 1)],
    }


def run_config(params: int, nodes: int, rounds: int, work: Path,
               min_free: int = 0, secure: bool = False) -> dict[str, Any]:
    work.mkdir(parents=True)
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1"}
    ca_cert, ca_key = create_ca(work / "ca", "bench-ca", org="bench")
    trust = make_bundle([ca_cert], work / "trust.pem")
    model_bytes = params * 4
    procs: list[subprocess.Popen[bytes]] = []
    with DevChain(block_time=1.0) as chain:
        w3 = connect(chain.url)
        # a round's deadline: 120 s, more for models whose bytes take longer on a loaded host
        deadline_s = max(120, int(60 + model_bytes / 10e6))
        contract = SwarmContract.deploy(w3, dev_account(0),
                                        _spec(params, nodes, secure).to_json(), nodes, 2,
                                        deadline_s)
        nodes_p, socks = [], []
        for i in range(nodes):
            name = f"site-{i + 1}"
            cert, key = issue_node_cert(ca_cert, ca_key, work / name, name, dns=["localhost"],
                                        ips=["127.0.0.1"])
            contract.authorize(dev_account(i + 1).address, describe(cert).fingerprint)
            cfg = {"name": name, "rpc_url": chain.url, "contract": contract.address,
                   "key_index": i + 1, "peer_listen": "127.0.0.1:0", "cert": str(cert),
                   "key": str(key), "trust": str(trust), "data_dir": str(work / name / "data"),
                   # a masked update is 4 bytes a parameter (32-bit ring words), 8 in round 1
                   "max_update_mb": max(64.0, model_bytes * (2.4 if secure else 1.2) / 2**20)}
            (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            log = open(work / f"{name}-node.log", "wb")  # noqa: SIM115
            p = subprocess.Popen([sys.executable, "-m", "swarmnode", "run", "--config",
                                  str(work / f"{name}.yaml")], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
            procs.append(p)
            nodes_p.append(p)
            socks.append(f"unix://{work / name / 'data' / 'node.sock'}")
        try:
            deadline = time.monotonic() + 120 + 5 * nodes
            while not all(contract.node(dev_account(i + 1).address).enrolled
                          for i in range(nodes)):
                if time.monotonic() > deadline or any(p.poll() is not None for p in nodes_p):
                    raise RuntimeError(f"node services did not enrol; logs in {work}")
                time.sleep(0.2)
            status0 = [LocalClient(s).call("status", {})[0] for s in socks]
            rss0 = []
            for p in nodes_p:
                rss0.append(_proc_status(p.pid, "VmRSS"))
                Path(f"/proc/{p.pid}/clear_refs").write_text("5")  # reset VmHWM
            trainers = []
            for i in range(nodes):
                log = open(work / f"site-{i + 1}-trainer.log", "wb")  # noqa: SIM115
                t = subprocess.Popen(
                    [sys.executable, str(HERE / "round_trainer.py"), "--local-api", socks[i],
                     "--params", str(params), "--nodes", str(nodes), "--rounds", str(rounds),
                     "--index", str(i), "--out", str(work / f"t{i}.json"),
                     *(["--clip-norm", str(SECURE_CLIP_NORM)] if secure else [])],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                procs.append(t)
                trainers.append(t)
            t_start = time.monotonic()
            cpu_t = [0.0] * nodes
            min_avail = _mem_available()
            while any(t.poll() is None for t in trainers):
                min_avail = min(min_avail, _mem_available())
                if min_avail < min_free:
                    raise RuntimeError(f"the machine's available memory fell to "
                                       f"{min_avail / 2**30:.1f} GiB; stopped")
                for i, t in enumerate(trainers):
                    if t.poll() is None:
                        cpu_t[i] = _cpu_s(t.pid)
                if any(t.poll() not in (None, 0) for t in trainers):
                    raise RuntimeError(f"a trainer failed; logs in {work}")
                if time.monotonic() - t_start > 600 + rounds * (60 + deadline_s):
                    raise RuntimeError(f"timed out; logs in {work}")
                time.sleep(0.2)
            hwm = [_proc_status(p.pid, "VmHWM") for p in nodes_p]
            cpu_n = [_cpu_s(p.pid) for p in nodes_p]
            status1 = [LocalClient(s).call("status", {})[0] for s in socks]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        outs = [json.loads((work / f"t{i}.json").read_text()) for i in range(nodes)]
        syncs = [s for o in outs for s in o["syncs"]]
        played = len({s["round"] for s in syncs})
        rpc = sum(b.get("rpc_calls", 0) - a.get("rpc_calls", 0)
                  for a, b in zip(status0, status1, strict=True))
        methods: dict[str, float] = {}
        for a, b in zip(status0, status1, strict=True):
            for m, n in b.get("rpc_by_method", {}).items():
                methods[m] = methods.get(m, 0) + n - a.get("rpc_by_method", {}).get(m, 0)
    stage_names = sorted({k for s in syncs for k in s["stages"]})
    stages = {k: statistics.median(s["stages"].get(k, 0.0) for s in syncs) for k in stage_names}
    stages["upload_handback"] = statistics.median(s["total_s"] - s["node_s"] for s in syncs)
    bound = statistics.median(raw_bound(2 * nodes * model_bytes) for _ in range(3))
    median_round = statistics.median(s["total_s"] for s in syncs)
    growth = [(h - r) / model_bytes for h, r in zip(hwm, rss0, strict=True)]
    t_growth = [(o["hwm"] - o["rss_train"]) / model_bytes for o in outs if "hwm" in o]
    digests = {o.get("final_digest") for o in outs}
    split = {k: statistics.median(s.get(k + "_s", 0.0) for s in syncs)
             for k in ("serialise", "load")}
    split["hash"] = sha256_seconds(model_bytes)
    split["transfer"] = stages.get("push", 0.0) + stages.get("pull", 0.0)
    led = [s["stages"]["merge"] for s in syncs if "merge" in s["stages"]]
    split["merge"] = statistics.median(led) if led else 0.0
    split["other"] = max(0.0, median_round - split["serialise"] - split["load"]
                         - split["transfer"] - split["merge"])
    return {
        "params": params, "nodes": nodes, "rounds": rounds, "rounds_completed": played + 1,
        "merge": "mean+secure_aggregation" if secure else "mean",
        "median_round_s": round(median_round, 4), "raw_bound_s": round(bound, 4),
        "round_over_bound": round(median_round / bound, 2),
        "leader_growth_over_model": round(max(growth), 2),
        "member_growth_over_model": round(min(growth), 2),
        "node_growth_over_model": [round(g, 2) for g in growth],
        "trainer_growth_over_model": round(max(t_growth), 2) if t_growth else None,
        "trainer_rss_train_gib": [round(o["rss_train"] / 2**30, 2) for o in outs
                                  if "rss_train" in o],
        "digests_equal": len(digests) == 1 and "" not in digests and None not in digests,
        "same_rounds_every_site": len({tuple(s["round"] for s in o["syncs"]) for o in outs}) == 1,
        "sync_split_s": {k: round(v, 3) for k, v in split.items()},
        "min_mem_available_gib": round(min_avail / 2**30, 1),
        "rpc_calls_per_round": round(rpc / max(played + 2, 1), 1),  # + round 1 and the final
        "rpc_calls_per_round_by_method": {m: round(n / max(played + 2, 1), 1)
                                          for m, n in sorted(methods.items())},
        "stages_s": {k: round(v, 4) for k, v in stages.items()},
        "cpu_s_per_node": [round(c, 2) for c in cpu_n],
        "cpu_s_per_trainer": [round(c, 2) for c in cpu_t],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated PARAMS:NODES, PARAMS like 1M or 25M")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "round.json")
    p.add_argument("--append", action="store_true",
                   help="add the runs to those already in --out (replacing a run of the same "
                        "params and nodes) instead of writing a new file")
    p.add_argument("--min-free-gib", type=float, default=2.0,
                   help="stop a run when the machine's available memory falls under this")
    p.add_argument("--transfer", default="",
                   help="comma-separated PARAMS: one push and pull of that size between two "
                        "nodes each (the transfers rows)")
    p.add_argument("--serve-peer", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_peer:
        return serve_peer(Path(a.serve_peer[0]), int(a.serve_peer[1]), Path(a.serve_peer[2]),
                          a.serve_peer[3])
    runs, transfers = [], []
    with tempfile.TemporaryDirectory(prefix="swarmnode-round-") as tmp:
        for n, size in enumerate(x for x in a.transfer.split(",") if x):
            row = transfer(_size(size), Path(tmp) / f"transfer-{n}")
            transfers.append(row)
            print(f"transfer P={size}: {row}", flush=True)
        for n, spec in enumerate(x for x in a.configs.split(",") if x):
            params, nodes, *rest = spec.split(":")
            rounds = rest[0] if rest and rest[0] else None
            mode = rest[1] if len(rest) > 1 else "mean"
            if mode not in ("mean", "secure"):
                p.error(f"--configs {spec}: the fourth field is the merge, 'mean' or 'secure' "
                        f"(mean with secure aggregation), not {mode!r}")
            keep = os.environ.get("SWARMNODE_BENCH_KEEP")  # a folder: keep the logs there
            work = (Path(keep) if keep else Path(tmp)) / str(n)
            run = run_config(_size(params), int(nodes), int(rounds) if rounds else a.rounds,
                             work, int(a.min_free_gib * 2**30), secure=mode == "secure")
            # the latest plain row of the same size: interleaved pairs compare pair by pair
            plain = next((r for r in reversed(runs) if (r["params"], r["nodes"], r["merge"])
                          == (run["params"], run["nodes"], "mean")), None)
            if mode == "secure" and plain is not None:  # measured in the same run
                run["over_plain_mean"] = round(run["median_round_s"] / plain["median_round_s"],
                                               2)
            runs.append(run)
            print(f"P={params:>4} N={int(nodes):>2} {run['merge']}: "
                  f"round {run['median_round_s']:.3f} s, "
                  f"raw bound {run['raw_bound_s']:.3f} s ({run['round_over_bound']}x), "
                  f"leader growth {run['leader_growth_over_model']}x, "
                  f"trainer growth {run['trainer_growth_over_model']}x, "
                  f"digests equal {run['digests_equal']}, split {run['sync_split_s']}, "
                  f"{run['rpc_calls_per_round']} RPC calls/round, stages {run['stages_s']}",
                  flush=True)
    if a.append and a.out.exists():
        before = json.loads(a.out.read_text())
        def key(r: dict[str, Any]) -> tuple[int, int, str]:
            return r["params"], r["nodes"], r.get("merge", "mean")

        new = {key(r) for r in runs}
        runs = [r for r in before["runs"] if key(r) not in new] + runs
        sizes = {t["params"] for t in transfers}
        transfers = [t for t in before.get("transfers", [])
                     if t["params"] not in sizes] + transfers
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                       "python": platform.python_version()}, "runs": runs}
    if transfers:
        out["transfers"] = transfers
    a.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
