"""Rounds on shaped links between hospitals: each site in its own network namespace.

    python benchmarks/wan.py [--configs 10M:4:1000,10M:4:200,25M:4:1000,10M:8:200] [--rounds 6]
                             [--out results/wan.json]        (needs root, iproute2's ip and tc)

Per configuration PARAMS:SITES:MBIT, every site (its node service and its trainer,
``round_trainer.py``) runs in a network namespace of its own, joined to the others by a bridge,
with a ``tbf`` qdisc of MBIT on both ends of its link (upload and download:
``swarmnode.testing.netns``). The chain (anvil, 1 s blocks) runs in the root namespace on the
bridge's address. In the same run it measures:

* ``goodput_mbit``: one TCP stream from one site to another over the shaped links;
* ``median_period_s``: the median time between the elections of successive rounds, over rounds
  2..R (the chain's current round, read at every new block, which is watched every 50 ms);
* ``star_bound_s`` = 2 (N-1) M / B: the leader's one link carries N-1 updates in and the merged
  model to N-1 members (M model bytes, B the measured goodput); ``allreduce_bound_s`` =
  2 (N-1) M / (N B): a reduce-scatter + all-gather, each site sending and receiving 2 (N-1)/N
  models;
* ``leader_bytes_in`` / ``leader_bytes_out``: medians over those rounds of the bytes the round's
  leader (read from the chain) received and sent on its link from the round's election to the
  next one's, ``leader_out_over_model``: that out over the (N-1) M its topology needs, and
  ``bytes_per_round_over_model``: what all links carried per round, in models;
* ``all_digests_agree``: every trainer ended with the chain's final digest.

``topology`` is the merge topology (``leader``: the elected leader collects, merges and serves)
and ``compression`` the update encoding (the spec's: ``none`` sends the float32 model,
``bf16``/``fp16``/``int8`` its change from the round's starting model; ``--compression``), with
``update_bytes`` what one update takes after the first round; ``load_avg`` the host's load
averages as the run began and ended; ``node_warnings`` the WARNING lines of all node logs (a
failed, refused or retried transfer, a missed deadline; not an ask for what a peer does not
hold yet; a few in ``warning_samples``). Rows
of configurations not run stay in the output file; a configuration run again replaces its row.
The namespaces, the bridge and its forwarding rule are removed at the end, also on Ctrl-C or
SIGTERM; ``python -m swarmnode.testing.netns clean`` removes what a killed run left.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from swarmnode.chain.accounts import dev_account  # noqa: E402
from swarmnode.chain.client import SwarmContract, connect  # noqa: E402
from swarmnode.chain.launcher import DevChain  # noqa: E402
from swarmnode.chain.models import RoundStatus  # noqa: E402
from swarmnode.identity import create_ca, describe, issue_node_cert, make_bundle  # noqa: E402
from swarmnode.spec import TrainingSpec  # noqa: E402
from swarmnode.testing.netns import ShapedNetwork, remove_stale  # noqa: E402
from swarmnode.transport.compression import MODES, wire_bytes  # noqa: E402

DEFAULT_CONFIGS = "10M:4:1000,10M:4:200,25M:4:1000,10M:8:200"
PEER_PORT = 7441
PULLS = ("leader", "peers")


def _size(text: str) -> int:
    return int(float(text[:-1]) * 1_000_000) if text[-1] in "Mm" else int(text)


def _spec(params: int, nodes: int, compression: str = "none",
          topology: str = "leader") -> TrainingSpec:
    from round_trainer import Synthetic

    spec = TrainingSpec.from_state(Synthetic(params).state_dict(), sync_frequency=1,
                                   min_peers=nodes, merge_method="mean")
    return dataclasses.replace(spec, compression=compression, topology=topology)


class _BlockNumber:
    """The chain's latest block number by one bare ``eth_blockNumber`` request on a kept-alive
    connection (no web3: watching the chain must not take the CPU the nodes measured need);
    -1 when the chain does not answer (read again next time)."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1",
                                               parsed.port or 80, timeout=5)
        self.path = parsed.path or "/"

    def __call__(self) -> int:
        body = b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}'
        try:
            self.conn.request("POST", self.path, body, {"Content-Type": "application/json"})
            return int(json.loads(self.conn.getresponse().read())["result"], 16)
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            self.conn.close()
            return -1


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` used so far; nan when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_config(params: int, nodes: int, mbit: float, rounds: int, work: Path,
               *, timeout_s: float | None = None, pulls: str = "leader",
               compression: str = "none", topology: str = "leader",
               node_threads: int | None = None) -> dict[str, Any]:
    """One swarm of ``nodes`` sites on links of ``mbit``, ``rounds`` rounds of a synthetic
    model of ``params`` float32 parameters; returns its row of results/wan.json. ``pulls``:
    ``leader`` (every member pulls the whole merged model from the leader) or ``peers`` (in
    verified parts, a share from the leader and the rest from the other members);
    ``compression``: the spec's (how members send their updates)."""
    if pulls not in PULLS:
        raise ValueError(f"pulls must be one of {PULLS}, not {pulls!r}")
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = params * 4
    load_before = os.getloadavg()
    spec = _spec(params, nodes, compression, topology)
    update_bytes = wire_bytes({n: (p.shape, p.dtype) for n, p in spec.params.items()},
                              compression)
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # the node services' torch threads (OpenMP): every site here shares this host's cores, and
    # each site's idle threads spinning for work take them from the others
    node_env = env if node_threads is None else {**env, "OMP_NUM_THREADS": str(node_threads)}
    ca_cert, ca_key = create_ca(work / "ca", "wan-ca", org="wan")
    trust = make_bundle([ca_cert], work / "trust.pem")
    procs: list[subprocess.Popen[bytes]] = []
    with ShapedNetwork(nodes, rate_mbit=mbit) as net:
        goodput = statistics.median(net.goodput(1 % nodes, 0) for _ in range(2))
        link_bps = goodput * 1e6 / 8
        star = 2 * (nodes - 1) * model_bytes / link_bps
        allreduce = star / nodes
        # a round takes about the star bound; leave the deadline far above it
        deadline = int(max(120, 6 * star))
        with DevChain(host=net.gateway, block_time=1.0) as chain:
            w3 = connect(chain.url)
            contract = SwarmContract.deploy(w3, dev_account(0),
                                            spec.to_json(), nodes, 2, deadline)
            addresses = []
            try:
                for i in range(nodes):
                    name, ip = f"site-{i + 1}", net.address(i)
                    cert, key = issue_node_cert(ca_cert, ca_key, work / name, name, dns=[],
                                                ips=[ip])
                    account = dev_account(i + 1)
                    addresses.append(account.address)
                    contract.authorize(account.address, describe(cert).fingerprint)
                    cfg = {"name": name, "rpc_url": chain.url, "contract": contract.address,
                           "key_index": i + 1, "peer_listen": f"{ip}:{PEER_PORT}",
                           "peer_endpoint": f"{ip}:{PEER_PORT}", "cert": str(cert),
                           "key": str(key), "trust": str(trust),
                           "data_dir": str(work / name / "data"),
                           "round_timeout_s": float(deadline * 4),
                           "peer_served_pulls": pulls == "peers",
                           "max_update_mb": max(64.0, model_bytes * 1.2 / 2**20)}
                    (work / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
                    log = open(work / f"{name}-node.log", "wb")  # noqa: SIM115
                    procs.append(net.run(i, [sys.executable, "-m", "swarmnode", "run",
                                             "--config", str(work / f"{name}.yaml")],
                                         stdout=log, stderr=subprocess.STDOUT, env=node_env))
                limit = time.monotonic() + 300 + 10 * nodes  # a loaded host starts slowly
                while not all(contract.node(a).enrolled for a in addresses):
                    if time.monotonic() > limit or any(p.poll() is not None for p in procs):
                        raise RuntimeError(f"node services did not enrol; logs in {work}")
                    time.sleep(0.2)
                trainers = []
                for i in range(nodes):
                    sock = f"unix://{work / f'site-{i + 1}' / 'data' / 'node.sock'}"
                    log = open(work / f"site-{i + 1}-trainer.log", "wb")  # noqa: SIM115
                    t = net.run(i, [sys.executable, str(HERE / "round_trainer.py"),
                                    "--local-api", sock, "--params", str(params), "--nodes",
                                    str(nodes), "--rounds", str(rounds), "--index", str(i),
                                    "--out", str(work / f"t{i}.json")],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
                    procs.append(t)
                    trainers.append(t)
                # per round: when it was seen elected (its leader known), and every link's
                # counters then; a round's traffic (pushes in, merge, merged model out) runs
                # from its election to the next round's
                elected: dict[int, tuple[float, list[Any]]] = {}
                limit = time.monotonic() + (timeout_s or (600 + rounds * 4 * deadline))
                # the chain changes only when a block is mined: the contract is read once per
                # new block (watched every 50 ms with one bare JSON-RPC call), not every 50 ms
                # (web3's contract calls cost this 2-core host's nodes ~10% of its CPU)
                head = _BlockNumber(chain.url)
                seen_block = -1
                while any(t.poll() is None for t in trainers):
                    if any(t.poll() not in (None, 0) for t in trainers):
                        raise RuntimeError(f"a trainer failed; logs in {work}")
                    if time.monotonic() > limit:
                        raise RuntimeError(f"timed out; logs in {work}")
                    block = head()
                    if block != seen_block:
                        seen_block = block
                        r = contract.current_round()
                        if (r not in elected
                                and contract.round(r).status is not RoundStatus.OPEN):
                            elected[r] = (time.monotonic(),
                                          [net.counters(i) for i in range(nodes)])
                    time.sleep(0.05)
                final = contract.final_round()
                final_digest = contract.round(final).digest.hex() if final else ""
                rows = []
                for r in sorted(elected):
                    if r < 2 or r + 1 not in elected:
                        continue
                    info = contract.round(r)
                    if info.leader is None or info.leader not in addresses:
                        continue
                    k = addresses.index(info.leader)
                    (t0, c0), (t1, c1) = elected[r], elected[r + 1]
                    total = sum(b.sent - a.sent for a, b in zip(c0, c1, strict=True))
                    rows.append((t1 - t0, c1[k].received - c0[k].received,
                                 c1[k].sent - c0[k].sent, total))
                # what each node service used of the host's CPU over the whole run (`ip netns
                # exec` execs the command: the Popen's pid is the node's)
                node_cpu = [_cpu_s(p.pid) for p in procs[:nodes]]
            finally:
                _stop(procs)
    if not rows:
        raise RuntimeError(f"no complete round was observed; logs in {work}")
    digests = []
    for i in range(nodes):
        out = json.loads((work / f"t{i}.json").read_text())
        digests.append(out.get("final_digest", ""))
    # what went wrong on the way, as the nodes logged it (a failed or refused transfer, a
    # retried push, a missed deadline): every WARNING line of every node's log but the asks
    # for a part or a slice a peer did not hold yet (the asker asks again or elsewhere)
    warnings = [line.split(" WARNING ", 1)[1].strip()
                for i in range(nodes)
                for line in (work / f"site-{i + 1}-node.log").read_text(errors="replace")
                .splitlines() if " WARNING " in line and "(yet)" not in line]
    period = statistics.median(row[0] for row in rows)
    leader_out = statistics.median(row[2] for row in rows)
    return {
        "params": params, "nodes": nodes, "link_mbit": mbit, "topology": topology,
        "pulls": pulls,
        "compression": compression, "rounds": rounds, "model_bytes": model_bytes,
        # OMP_NUM_THREADS of the node services (None: torch's default, one per core)
        "node_threads": node_threads,
        # what one member's update takes on the wire (rounds after the first; the first is whole)
        "update_bytes": update_bytes,
        "goodput_mbit": round(goodput, 1),
        "median_period_s": round(period, 3), "periods_s": [round(row[0], 3) for row in rows],
        "star_bound_s": round(star, 3), "allreduce_bound_s": round(allreduce, 3),
        "period_over_star_bound": round(period / star, 2),
        "leader_bytes_in": int(statistics.median(row[1] for row in rows)),
        "leader_bytes_out": int(leader_out),
        # over what its topology needs: (N-1) M for the leader, 2 (N-1) M / N sharded (its
        # update's slices out, its merged slice to the N-1 others)
        "leader_out_over_model": round(leader_out / (
            (nodes - 1) * model_bytes * (2 / nodes if topology == "sharded" else 1)), 3),
        # every site's link together, per round, in models: 2 (N-1) for the leader topology,
        # 2 (N-1) sharded (each site 2 (N-1)/N)
        "bytes_per_round_over_model": round(statistics.median(row[3] for row in rows)
                                            / model_bytes, 2),
        "all_digests_agree": bool(final_digest) and all(d == final_digest for d in digests),
        # CPU seconds (user + system) each node service used from its start to the end of the
        # run (enrolment and all rounds): where the period goes when the cores are the bound
        "node_cpu_s": [round(c, 2) for c in node_cpu],
        "node_warnings": len(warnings), "warning_samples": sorted(set(warnings))[:5],
        # the host's 1/5/15-minute load averages as the run began and ended (a shared 2-core
        # machine: compare periods within one sitting)
        "load_avg": [[round(x, 2) for x in load_before],
                     [round(x, 2) for x in os.getloadavg()]],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated PARAMS:SITES:MBIT, PARAMS like 10M or 25M")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--pulls", default="leader,peers",
                   help="comma-separated: leader (whole model from the leader), peers (parts "
                   "from the leader and the other members); each configuration runs with each")
    p.add_argument("--compression", default="none",
                   help=f"comma-separated update encodings ({', '.join(MODES)}; the spec's "
                   "compression); each configuration runs with each")
    p.add_argument("--topology", default="leader",
                   help="comma-separated merge topologies (leader, sharded: the spec's); each "
                   "configuration runs with each (pulls apply to the leader topology)")
    p.add_argument("--node-threads", type=int, default=None,
                   help="torch (OpenMP) threads per node service (default: torch's, one per "
                   "core; the sites here share the host's cores)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "wan.json")
    a = p.parse_args()

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds: every namespace is removed

    signal.signal(signal.SIGTERM, interrupted)
    for stale in remove_stale():
        print(f"removed {stale}, left by an earlier run", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="swarmnode-wan-") as tmp:
        grid = [(conf, pulls, code, topo) for conf in a.configs.split(",")
                for topo in a.topology.split(",")
                for pulls in (a.pulls.split(",") if topo == "leader" else ["leader"])
                for code in a.compression.split(",")]
        for n, (conf, pulls, code, topo) in enumerate(grid):
            params, nodes, mbit = conf.split(":")
            keep = os.environ.get("SWARMNODE_BENCH_KEEP")  # a folder: keep the logs there
            work = (Path(keep) if keep else Path(tmp)) / str(n)
            run = run_config(_size(params), int(nodes), float(mbit), a.rounds, work,
                             pulls=pulls, compression=code, topology=topo,
                             node_threads=a.node_threads)
            runs.append(run)
            print(f"P={params:>4} N={int(nodes):>2} {float(mbit):>6.0f} Mbit/s {topo} "
                  f"pulls={pulls} compression={code} "
                  f"(goodput {run['goodput_mbit']}): period {run['median_period_s']:.2f} s, "
                  f"star bound {run['star_bound_s']:.2f} s ({run['period_over_star_bound']}x), "
                  f"all-reduce bound {run['allreduce_bound_s']:.2f} s, leader out "
                  f"{run['leader_out_over_model']}x (N-1)M, digests agree "
                  f"{run['all_digests_agree']}", flush=True)
    # rows of other configurations already in the file stay; a configuration run again
    # replaces its row
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(k) for k in ("params", "nodes", "link_mbit", "topology", "pulls",
                                          "compression"))

    old = json.loads(a.out.read_text()).get("runs", []) if a.out.exists() else []
    fresh = {key(r) for r in runs}
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "runs": [r for r in old if key(r) not in fresh] + runs}
    a.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
