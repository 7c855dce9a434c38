"""A swarm of real, separate processes on one machine: the demo's engine and the e2e tests' harness.

``LocalSwarm`` starts an anvil dev chain, makes a consortium CA and one certificate per hospital,
writes each hospital's data shard, deploys the contract with the training spec, authorises the
hospitals, and then starts node services (`swarmnode run`) and trainers
(`python -m swarmnode.demo.trainer`) on request, each its own process with its own log file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.demo.data import DemoData, save_shard
from swarmnode.demo.tasks import get_task
from swarmnode.errors import NodeError
from swarmnode.healthcheck import HEALTH_FILE
from swarmnode.identity import create_ca, describe, issue_node_cert, make_bundle
from swarmnode.spec import TrainingSpec

__all__ = ["LocalSwarm", "wait_until"]

# The demo's secure-aggregation settings: each site clips its round's change to this L2 norm;
# a weight is its sample count (well under the cap); cap x clip fits the 2^64 ring
SECURE_CLIP_NORM = 50.0
SECURE_MAX_WEIGHT = 100_000


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *, poll: float = 0.1,
               describe: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); after ``timeout`` s a
    TimeoutError naming ``what`` (and ``describe()``, e.g. the processes' last log lines)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    extra = f"\n{describe()}" if describe is not None else ""
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}{extra}")


class LocalSwarm:
    def __init__(
        self,
        workdir: Path,
        nodes: int = 3,
        *,
        merge: str = "mean",
        sync_frequency: int = 4,
        min_peers: int = 2,
        grace_s: int = 2,
        deadline_s: int = 6,
        seed: int = 0,
        epochs: int | None = None,
        state_file: bool = False,
        block_time: float = 1.0,
        instant_mining: bool = True,
        initial_state: dict[str, Any] | None = None,
        task: str = "breast-cancer",
        split: str | None = None,
        topology: str = "leader",
        secure_aggregation: bool = False,
    ) -> None:
        """``state_file``: the chain keeps its state in a file, so it can be stopped and started
        again (an outage) without losing the swarm. ``instant_mining=False``: transactions wait
        for the next block (every ``block_time`` s), as on a chain that is not anvil's.
        ``initial_state``: the model (state dict) of a training script other than the demo's;
        the training spec is made from it. ``task``/``split``: the demo example the trainers
        train (:mod:`swarmnode.demo.tasks`) and its data split (default: the task's first).
        ``secure_aggregation``: the spec turns it on (with SECURE_CLIP_NORM and
        SECURE_MAX_WEIGHT); min_peers must be 3 or more."""
        self.work = Path(workdir).resolve()
        self.n = nodes
        self.merge = merge
        self.topology = topology
        self.secure_aggregation = secure_aggregation
        self.sync_frequency = sync_frequency
        self.min_peers = min_peers
        self.grace_s = grace_s
        self.deadline_s = deadline_s
        self.seed = seed
        self.epochs = epochs
        self.initial_state = initial_state
        self.task = get_task(task)
        self.split = split
        self.names = [f"hospital-{i + 1}" for i in range(nodes)]
        self.accounts = [dev_account(i + 1) for i in range(nodes)]
        # block_time: time moves on, so grace periods and deadlines can pass
        self.chain = DevChain(block_time=block_time, instant=instant_mining,
                              state_file=self.work / "chain-state.json" if state_file else None)
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.trainers: dict[int, subprocess.Popen[bytes]] = {}
        self.env = dict(os.environ, GRPC_VERBOSITY="ERROR", PYTHONUNBUFFERED="1")
        self.data: DemoData
        self.contract: SwarmContract

    # -- set-up -----------------------------------------------------------------------------------
    def __enter__(self) -> LocalSwarm:
        if self.work.exists():
            shutil.rmtree(self.work)
        (self.work / "logs").mkdir(parents=True)
        self.chain.start()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        certs = self.work / "certs"
        ca_cert, ca_key = create_ca(certs / "ca", "swarm-demo-ca", org="swarmnode demo consortium")
        self.trust = certs / "trust.pem"
        make_bundle([ca_cert], self.trust)
        self.certs = [
            issue_node_cert(ca_cert, ca_key, certs / name, name, dns=["localhost"],
                            ips=["127.0.0.1"])
            for name in self.names
        ]
        self.data = self.task.split(self.n, self.seed, self.split)
        for i, name in enumerate(self.names):
            save_shard(self.work / f"{name}.npz", *self.data.hospitals[i])
        save_shard(self.work / "test.npz", self.data.X_test, self.data.y_test)
        state = self.initial_state
        if state is None:
            state = self.task.make_model(self.data.X_test.shape[1], self.seed).state_dict()
        self.spec = TrainingSpec.from_state(
            state, sync_frequency=self.sync_frequency, min_peers=self.min_peers,
            merge_method=self.merge,
        )
        if self.topology != "leader":
            self.spec = dataclasses.replace(self.spec, topology=self.topology)
        if self.secure_aggregation:
            self.spec = dataclasses.replace(
                self.spec, merge_options={"clip_norm": SECURE_CLIP_NORM},
                max_weight=SECURE_MAX_WEIGHT, secure_aggregation=True)
        self.w3 = connect(self.chain.url)
        self.contract = SwarmContract.deploy(
            self.w3, dev_account(0), self.spec.to_json(), self.min_peers, self.grace_s,
            self.deadline_s,
        )
        for (cert, _key), acct in zip(self.certs, self.accounts, strict=True):
            self.contract.authorize(acct.address, describe(cert).fingerprint)

    @property
    def rpc_url(self) -> str:
        return self.chain.url

    def log(self, i: int, kind: str) -> Path:
        return self.work / "logs" / f"{self.names[i]}-{kind}.log"

    def socket(self, i: int) -> str:
        return f"unix://{self.work / self.names[i] / 'data' / 'node.sock'}"

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    # -- processes --------------------------------------------------------------------------------
    def start_node(self, i: int, env: dict[str, str] | None = None,
                   faults: dict[str, str] | None = None,
                   settings: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
        """``faults``: the test-only ``faults:`` section of its node.yaml (``stall_commit``,
        ``exit``; see swarmnode.node.faults). ``settings``: more node.yaml settings."""
        node_dir = self.work / self.names[i]
        node_dir.mkdir(exist_ok=True)
        cfg = {
            "name": self.names[i], "rpc_url": self.rpc_url, "contract": self.contract.address,
            "key_index": i + 1, "peer_listen": "127.0.0.1:0", "cert": str(self.certs[i][0]),
            "key": str(self.certs[i][1]), "trust": str(self.trust),
            "data_dir": str(node_dir / "data"),
        }
        if faults:
            cfg["faults"] = dict(faults)
        cfg.update(settings or {})
        (node_dir / "node.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "swarmnode", "run", "--config", str(node_dir / "node.yaml")]
        self.nodes[i] = self._spawn(cmd, self.log(i, "node"), {**self.env, **(env or {})})
        return self.nodes[i]

    def wait_enrolled(self, indices: list[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in indices:
                if self.nodes[i].poll() is not None:
                    raise NodeError(f"node service {self.names[i]} exited "
                                    f"({self.nodes[i].returncode}): {self.tail(i, 'node')}")
            if all(self.contract.node(self.accounts[i].address).enrolled for i in indices):
                return
            time.sleep(0.1)
        raise NodeError(f"node services did not enrol within {timeout:.0f} s; see {self.work}/logs")

    def health(self, i: int, timeout: float = 60.0) -> dict[str, Any]:
        """Site ``i``'s health file (its ports), once its node service has written it: a node
        enrols before it writes the file (once its servers are up), so right after
        :meth:`wait_enrolled` it may not be there yet."""
        path = self.work / self.names[i] / "data" / HEALTH_FILE
        self.wait_until(path.exists, timeout, f"{self.names[i]}'s health file")
        return json.loads(path.read_text())  # written whole (a rename)

    def start_trainer(
        self, i: int, epochs: int | None = None, policy: str = "inactive",
        batch_delay: float = 0.0, script: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """``script``: a program taking the demo trainer's arguments, run instead of it (the
        failure tests run misbehaving trainers this way)."""
        name = self.names[i]
        program = [str(script)] if script is not None else ["-m", "swarmnode.demo.trainer"]
        cmd = [sys.executable, *program, "--name", name,
               "--shard", str(self.work / f"{name}.npz"), "--test", str(self.work / "test.npz"),
               "--out", str(self.work / f"{name}.json"), "--local-api", self.socket(i),
               "--sync-frequency", str(self.sync_frequency), "--min-peers", str(self.min_peers),
               "--merge", self.merge, "--seed", str(self.seed), "--on-train-end", policy,
               "--batch-delay", str(batch_delay)]
        epochs = epochs if epochs is not None else self.epochs
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
        if self.task.name != "breast-cancer":  # the trainer's default (scripts in tests lack it)
            cmd += ["--task", self.task.name]
        if "clip_norm" in self.spec.merge_options:
            cmd += ["--clip-norm", str(self.spec.merge_options["clip_norm"])]
        self.trainers[i] = self._spawn(cmd, self.log(i, "trainer"), self.env)
        return self.trainers[i]

    def trainer_indices(self) -> list[int]:
        return list(self.trainers)

    def trainer_exit(self, i: int) -> int | None:
        return self.trainers[i].poll()

    def trainer_failure(self, i: int) -> str:
        return f"{self.tail(i, 'trainer')}; log {self.log(i, 'trainer')}"

    def kill_node(self, i: int) -> None:
        self.nodes[i].kill()
        self.nodes[i].wait()

    def pause_node(self, i: int) -> None:
        """Freeze the node service (SIGSTOP): alive, holding its sockets, answering nothing."""
        self.nodes[i].send_signal(signal.SIGSTOP)

    def resume_node(self, i: int) -> None:
        self.nodes[i].send_signal(signal.SIGCONT)

    def index_of(self, address: str) -> int:
        """The site whose node signs with ``address``."""
        return next(i for i, a in enumerate(self.accounts) if a.address == address)

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str, *,
                   poll: float = 0.1) -> Any:
        """:func:`wait_until`, the running node services' last log lines on a timeout."""
        return wait_until(predicate, timeout, what, poll=poll, describe=lambda: "\n".join(
            f"{n}: {self.tail(i, 'node')}" for i, n in enumerate(self.names) if i in self.nodes))

    @staticmethod
    def wait_processes(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
        """Wait (blocking on each process, no polling) for processes started beside the swarm,
        such as training scripts, at most ``timeout`` s in all; the ones still running then are
        killed. Their exit codes, in order."""
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.01)))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def tail(self, i: int, kind: str, lines: int = 5) -> str:
        try:
            return " | ".join(self.log(i, kind).read_text().strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def result(self, i: int) -> dict[str, Any]:
        out = self.work / f"{self.names[i]}.json"
        p = self.trainers.get(i)
        if p is None or p.returncode != 0 or not out.exists():
            code = None if p is None else p.returncode
            raise NodeError(f"trainer {self.names[i]} failed (exit {code}): "
                            f"{self.tail(i, 'trainer')}; log {self.log(i, 'trainer')}")
        return json.loads(out.read_text())

    def close(self) -> None:
        procs = list(self.trainers.values()) + list(self.nodes.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a paused one must be able to stop
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.chain.stop()
