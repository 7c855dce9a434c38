"""A consortium as containers on a real Docker engine, brought up with the compose file each
hospital runs: three hospitals (ml + node each) and the sentinel's chain train the bundled example
to the end; one hospital's node container is killed mid-training and started again through the
Docker SDK, then one still training is cut off the consortium network for 15 s (a partition) and
reconnected; every hospital's final model file, read from the containers' own volumes, has the
digest on chain. Then everything is torn down, leaving no container, network or volume."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import pytest
from conftest import record

from swarmnode.containers.consortium import ContainerConsortium
from swarmnode.demo.swarm import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a fresh image build included


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    wait_until(check, timeout, what, poll=0.5)


def _wait_or(what: str, check: Callable[[], bool], seconds: float) -> bool:
    """Wait until ``check()`` or ``seconds`` pass (an outage's length); True if it happened."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def _leftovers(c: ContainerConsortium) -> list[str]:
    names = [p for i in range(c.n) for p in (c.project(i),)]
    left = []
    for project in names:
        flt = {"label": f"com.docker.compose.project={project}"}
        left += [f"container {x.name}" for x in c.docker.containers.list(all=True, filters=flt)]
        left += [f"volume {v.name}" for v in c.docker.volumes.list(filters=flt)]
        left += [f"network {n.name}" for n in c.docker.networks.list(filters=flt)]
    left += [f"network {n.name}" for n in c.docker.networks.list(names=[c.network])]
    return left


def test_consortium_trains_to_the_end_and_survives_a_killed_node(images, workdir) -> None:
    c = ContainerConsortium(workdir, 3, prefix=f"swt{os.getpid()}")
    # a network of this consortium left by a killed run: two of one name stop compose cold
    stale = c.docker.networks.create(c.network, driver="bridge",
                                     labels={"org.swarmnode.consortium": c.prefix})
    t0 = time.monotonic()
    with c:
        c.up()
        assert stale.id not in {n.id for n in c.docker.networks.list(names=[c.network])}
        up_s = time.monotonic() - t0
        assert c.contract.settings().min_peers == 2
        # every node enrolled the endpoint its peers dial (never 0.0.0.0)
        for i, acct in enumerate(c.accounts):
            assert c.contract.node(acct.address).endpoint == f"{c.names[i]}:7441"

        _wait("round 3", lambda: c.contract.current_round() > 3, 300)
        c.kill_node(1)
        killed_at = c.contract.current_round()
        node = c.container(1, "node")
        node.reload()
        assert node.status != "running"
        # The outage: until the others have played two rounds without it, or 30 s (if the
        # killed node was the round's leader and had committed, it holds the only copy of that
        # round's merged model, and the others wait for it to come back).
        _wait_or("two rounds without hospital-2",
                 lambda: c.contract.current_round() >= killed_at + 2, 30)
        c.start_node(1)
        _wait("hospital-2's node healthy again", lambda: c.health(1) == "healthy", 180)
        restarted_at = c.contract.current_round()

        # A network partition: a hospital still training (the one with the least data first:
        # it is the one that finishes first) has its node cut off the consortium network (its
        # peers and the chain) for 15 s, more than two round deadlines, then reconnected.
        training = [i for i in (2, 0) if not c.contract.node(c.accounts[i].address).finished]
        cut = training[0] if training else 2
        c.disconnect(cut)
        cut_at = c.contract.current_round()
        time.sleep(15)
        c.reconnect(cut)
        reconnected = time.monotonic()
        back_at = c.contract.current_round()
        me = c.accounts[cut].address

        def merged_again() -> bool:
            return any(me in ev.args["members"] and ev.args["round"] > back_at
                       for ev in c.contract.events(names={"MergeCommitted"}))

        # a site whose trainer had not finished when it was cut off (it cannot have finished
        # while cut off: its trainer waits on its node) rejoins the rounds, unless the others
        # set it aside as absent and finished the training meanwhile; then it takes the final
        # model (checked below for every site)
        still_training = not c.contract.node(me).finished
        if still_training:
            _wait(f"{c.names[cut]} merged again after the partition (or the training ended)",
                  lambda: merged_again() or c.contract.training_finished(), 120)
        rejoined = merged_again()
        rejoined_s = time.monotonic() - reconnected
        c.wait_trainers(timeout=900)
        total_s = time.monotonic() - t0

        finished = c.contract.events(names={"TrainingFinished"})
        assert finished, "the chain records no TrainingFinished"
        final = finished[-1].args["digest"]
        for i in range(c.n):
            from_ml = c.read_file(i, "ml", "/workspace/out/final.safetensors")
            from_node = c.read_file(i, "node", "/var/lib/swarmnode/latest.safetensors")
            assert hashlib.sha256(from_ml).digest() == final, c.names[i]
            assert hashlib.sha256(from_node).digest() == final, c.names[i]
            assert c.result(i)["final_digest"] == final.hex()
        # the restarted hospital took part again after its restart
        joined = [ev.args["round"] for ev in c.contract.events(names={"MergeCommitted"})
                  if c.accounts[1].address in ev.args["members"]]
        assert any(r >= restarted_at for r in joined), (restarted_at, joined)
        record("consortium_e2e", {"up_s": round(up_s, 1), "total_s": round(total_s, 1),
                                  "rounds": finished[-1].args["round"],
                                  "killed_node_at_round": killed_at,
                                  "restarted_at_round": restarted_at,
                                  "partitioned": c.names[cut],
                                  "partitioned_while_training": still_training,
                                  "merged_again_after_partition": rejoined,
                                  "partitioned_at_round": cut_at,
                                  "reconnected_at_round": back_at,
                                  "partition_s": 15,
                                  "merged_again_after_s": round(rejoined_s, 1)})
    assert _leftovers(c) == []
