"""Several trainings of one consortium on its registry, with real node processes (`swarmnode run`)
and trainers on a real anvil: the sites are authorised once, then take part in two trainings at
the same time and in a third after them, with no authorisation in between; a revocation in the
registry stops the revoked site in both running trainings while the others finish them.

(The containers test, tests/containers/test_provision.py, runs a next training after the first
through the kits; the overlap runs here: two trainings at once on one host need two node
containers per site, each dialled under its own name.)"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract
from swarmnode.demo.swarm import LocalSwarm, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class _Training:
    """One more training's node services and trainers beside a LocalSwarm's own."""

    def __init__(self, swarm: LocalSwarm, tag: str, node_settings: dict[str, Any],
                 sync_frequency: int) -> None:
        self.swarm, self.tag, self.settings = swarm, tag, node_settings
        self.sync_frequency = sync_frequency
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.trainers: dict[int, subprocess.Popen[bytes]] = {}

    def folder(self, i: int) -> Path:
        return self.swarm.work / self.tag / self.swarm.names[i]

    def log(self, i: int, kind: str) -> Path:
        return self.swarm.work / "logs" / f"{self.tag}-{self.swarm.names[i]}-{kind}.log"

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.swarm.env, start_new_session=True)

    def start_node(self, i: int) -> subprocess.Popen[bytes]:
        s, folder = self.swarm, self.folder(i)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"name": s.names[i], "rpc_url": s.rpc_url, "key_index": i + 1,
               "peer_listen": "127.0.0.1:0", "cert": str(s.certs[i][0]),
               "key": str(s.certs[i][1]), "trust": str(s.trust),
               "data_dir": str(folder / "data"), **self.settings}
        (folder / "node.yaml").write_text(yaml.safe_dump(cfg))
        self.nodes[i] = self._spawn([sys.executable, "-m", "swarmnode", "run", "--config",
                                     str(folder / "node.yaml")], self.log(i, "node"))
        return self.nodes[i]

    def start_trainer(self, i: int, epochs: int) -> None:
        s, name = self.swarm, self.swarm.names[i]
        self.trainers[i] = self._spawn([
            sys.executable, "-m", "swarmnode.demo.trainer", "--name", name,
            "--shard", str(s.work / f"{name}.npz"), "--test", str(s.work / "test.npz"),
            "--out", str(self.folder(i) / "result.json"),
            "--local-api", f"unix://{self.folder(i) / 'data' / 'node.sock'}",
            "--sync-frequency", str(self.sync_frequency), "--min-peers", str(s.min_peers),
            "--seed", str(s.seed), "--epochs", str(epochs)], self.log(i, "trainer"))

    def tail(self, i: int, kind: str) -> str:
        try:
            return " | ".join(self.log(i, kind).read_text().strip().splitlines()[-4:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        procs = [*self.trainers.values(), *self.nodes.values()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _deploy(swarm: LocalSwarm, sync_frequency: int) -> SwarmContract:
    """A next training on the swarm's registry, as its admin: nothing else (no authorisation)."""
    spec = swarm.spec.__class__(params=swarm.spec.params, sync_frequency=sync_frequency,
                                min_peers=swarm.min_peers, merge_method=swarm.merge)
    return SwarmContract.deploy(swarm.w3, dev_account(0), spec.to_json(), swarm.min_peers,
                                swarm.grace_s, swarm.deadline_s, registry=swarm.contract.registry)


def _trainers_done(procs: dict[int, subprocess.Popen[bytes]], sites: list[int],
                   describe: Any) -> bool:
    for i in sites:
        code = procs[i].poll()
        if code not in (None, 0):
            raise AssertionError(f"a trainer of site {i} failed ({code}): {describe(i)}")
    return all(procs[i].poll() == 0 for i in sites)


def _final(training: SwarmContract) -> bytes:
    finished = training.events(names={"TrainingFinished"})
    assert finished, f"training {training.address} recorded no TrainingFinished"
    return bytes(finished[-1].args["digest"])


def test_trainings_overlap_and_follow_on_one_registry_and_a_revocation_stops_both(
    tmp_path: Path,
) -> None:
    with LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=1, deadline_s=5) as swarm:
        a = swarm.contract
        registry = a.registry
        authorised = len(registry.events(names={"Authorized"}))
        assert authorised == 3
        for i in range(3):
            swarm.start_node(i)
        swarm.wait_enrolled([0, 1, 2], timeout=120)
        for i in range(3):  # A trains slowly (~45 s of batch delays): B starts and runs beside it
            swarm.start_trainer(i, epochs=6, batch_delay=0.5)
        swarm.wait_until(lambda: a.current_round() >= 2, 180, "training A's round 2")

        # Training B, deployed while A runs; each site's second node names the registry and B
        b = _deploy(swarm, sync_frequency=2)
        second = _Training(swarm, "b", {"registry": registry.address, "contract": b.address}, 2)
        try:
            for i in range(3):
                second.start_node(i)
            wait_until(lambda: all(b.node(acct.address).enrolled for acct in swarm.accounts),
                       120, "every site joined training B", describe=lambda: "\n".join(
                           second.tail(i, "node") for i in range(3)))
            for i in range(3):
                second.start_trainer(i, epochs=3)
            wait_until(lambda: b.current_round() >= 2, 180, "training B's round 2",
                       describe=lambda: second.tail(0, "node"))
            assert not a.training_finished() and not b.training_finished(), "not overlapping"
            # no authorisation between them: the three of the registry, once
            assert len(registry.events(names={"Authorized"})) == authorised

            # revoke hospital-3 in the registry: it is set aside in both trainings at once
            revoked = swarm.accounts[2].address
            at = registry.with_account(dev_account(0)).revoke(revoked).block
            for t in (a, b):
                assert t.node(revoked).state == "revoked", t.address
                assert [e.args["node"] for e in t.events(names={"NodeRevoked"})] == [revoked]
            # the other two finish both trainings, with the final model of each
            wait_until(lambda: _trainers_done(swarm.trainers, [0, 1], swarm.trainer_failure)
                       and _trainers_done(second.trainers, [0, 1],
                                          lambda i: second.tail(i, "trainer")),
                       300, "hospital-1 and -2 to finish both trainings")
            for t, result in ((a, swarm.result), (b, lambda i: _json(second, i))):
                final = _final(t)
                assert {result(i)["final_digest"] for i in (0, 1)} == {final.hex()}, t.address
                late = [e for e in t.events(names={"MergeCommitted"})
                        if e.block > at and revoked in e.args["members"]]
                assert late == [], f"{t.address} merged hospital-3 after its revocation"
            assert _final(a) != _final(b)  # two trainings, not one twice
        finally:
            second.stop()

        # Training C, after both: the nodes name the registry alone (its one running training)
        c = _deploy(swarm, sync_frequency=4)
        third = _Training(swarm, "c", {"registry": registry.address}, 4)
        try:
            for i in range(3):
                third.start_node(i)
            wait_until(lambda: all(c.node(swarm.accounts[i].address).enrolled for i in (0, 1)),
                       120, "hospital-1 and -2 joined training C", describe=lambda: "\n".join(
                           third.tail(i, "node") for i in range(3)))
            # the revoked site's node refuses to start, saying why
            assert third.nodes[2].wait(120) != 0
            assert "was revoked" in third.log(2, "node").read_text()
            for i in (0, 1):
                third.start_trainer(i, epochs=1)
            wait_until(lambda: _trainers_done(third.trainers, [0, 1],
                                              lambda i: third.tail(i, "trainer")),
                       300, "hospital-1 and -2 to finish training C")
            assert {_json(third, i)["final_digest"] for i in (0, 1)} == {_final(c).hex()}
        finally:
            third.stop()
        assert registry.trainings() == [a.address, b.address, c.address]
        assert len(registry.events(names={"Authorized"})) == authorised


def _json(training: _Training, i: int) -> dict[str, Any]:
    import json

    return json.loads((training.folder(i) / "result.json").read_text())

