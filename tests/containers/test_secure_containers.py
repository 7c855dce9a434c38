"""Secure aggregation end to end in containers: five hospitals (ml + node each, compose/
hospital.yaml) and the sentinel's chain train the bundled example with ``secure_aggregation``
(min_peers 3, mean), through three faults injected at exact protocol points (the node's
test-only ``faults:`` node.yaml section, mounted by ContainerConsortium's ``faults`` option):

1. hospital-5's node dies before its check-in of round 4 (``exit: before-checkin:4+``: or of
   the first later round it checks in for): it is in that round's mask set, so the others
   reveal their round seeds with it and the round commits;
2. hospital-4's node dies after its check-in is mined, before pushing (``before-push:7+``: in
   round 7, or the first later round where it is a member, not the leader): no leader can remove
   its masks, so that round is abandoned (every leader fails it at its deadline, nothing
   revealed for it) and the next round commits;
3. round 12's leader holds its commit (``stall_commit: 12:1`` at every site: whoever is drawn)
   once every masked update is in; its container is then killed (docker kill). The members
   re-elect. The dead leader checked in and its own masked update lived only in it: like a
   member that never pushed (2.), every later leader lacks it, so round 12 is abandoned too and
   round 13 commits.

The trainers start together once every node is enrolled (``up(trainers_together=True)``): the
story's rounds then have all five hospitals, however far apart their containers came up.

Each killed node is started again (``start_node``) once the chain shows the fault's outcome, and
its trainer goes on (an exit fault fires once per data folder: a restarted node does not die
again). Every assertion on 1-3 reads the chain (round records, events); then every hospital's
final model file, read from its own volumes, has the digest on chain; every committed round's
members checked in with a masked update's hash (MaskedUpdate); no node log shows a plain update
sent or received. Everything is torn down, leaving no container, network or volume."""

from __future__ import annotations

import hashlib
import os
import re
import time

import pytest
from conftest import record
from test_consortium import _leftovers, _wait

from swarmnode.chain.models import RoundStatus
from swarmnode.containers.consortium import ContainerConsortium
from swarmnode.demo.swarm import wait_until
from swarmnode.privacy import roster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a fresh image build included

DROP, SILENT = 4, 3  # hospital-5 dies before a check-in, hospital-4 after one
R1, R2, R3 = 4, 7, 12  # the rounds of the three faults (1, 2: or the first later one)
STALL = {"stall_commit": f"{R3}:1"}  # round R3's first leader hangs before its commit


def _log(c: ContainerConsortium, i: int) -> str:
    return c.container(i, "node").logs().decode(errors="replace")


def _running(c: ContainerConsortium, i: int) -> bool:
    return bool(c.container(i, "node").status == "running")


def _revealed(c: ContainerConsortium, r: int, site: str) -> list[int]:
    """The hospitals whose node revealed its round-``r`` seeds with ``site`` (as a site that
    never checked in) to that round's leader, by their logs."""
    line = re.compile(rf"round {r}: revealed \d+ round seeds \(sites that never checked in: "
                      rf"[^)]*{site}", re.IGNORECASE)
    return [i for i in range(c.n) if line.search(_log(c, i))]


def _status(c: ContainerConsortium, r: int) -> RoundStatus:
    return c.contract.round(r).status


def _settled(c: ContainerConsortium, r: int) -> bool:
    return _status(c, r) in (RoundStatus.COMMITTED, RoundStatus.ABANDONED)


def _index(c: ContainerConsortium, address: str) -> int:
    return [a.address.lower() for a in c.accounts].index(address.lower())


def test_secure_aggregation_survives_a_dropout_a_silent_member_and_a_dead_leader(
        images, workdir) -> None:
    faults = {i: dict(STALL) for i in range(5)}
    faults[DROP] |= {"exit": f"before-checkin:{R1}+"}
    faults[SILENT] |= {"exit": f"before-push:{R2}+"}
    c = ContainerConsortium(workdir, 5, prefix=f"sws{os.getpid()}", min_peers=3,
                            secure_aggregation=True, faults=faults)
    t0 = time.monotonic()
    with c:
        c.up(trainers_together=True)
        up_s = time.monotonic() - t0
        chain = c.contract
        assert chain.settings().min_peers == 3
        addr = [a.address for a in c.accounts]

        # 1. hospital-5 dies before its check-in (round R1 or its first later one); that round
        # commits without it
        _wait("hospital-5's node down", lambda: not _running(c, DROP), 300)
        died = re.findall(r"round (\d+): test fault: the process dies before-checkin",
                          _log(c, DROP))
        assert len(died) == 1, died
        n1 = int(died[0])
        assert R1 <= n1 < R2, f"hospital-5 died in round {n1}"
        _wait(f"round {n1} settled", lambda: _settled(c, n1), 300)
        r1 = chain.round(n1)
        assert r1.status is RoundStatus.COMMITTED, r1
        assert addr[DROP] not in r1.participants
        members = [(n.address, n.enrolled_round, chain.mask_key(n.address))
                   for n in chain.nodes()]
        mask_set = roster.mask_set(members, n1, 3) or ()
        assert addr[DROP] in mask_set  # so its masks were in the others' and were revealed
        revealed = _revealed(c, n1, addr[DROP])
        assert len(revealed) >= len(r1.participants) - 1, (revealed, r1.participants)
        c.start_node(DROP)
        restarted = {DROP: chain.current_round()}

        # 2. hospital-4 checks in and dies before pushing: that round is abandoned, the next
        # commits (the round it died in: R2, or the first later one where it was no leader)
        _wait("hospital-4's node down", lambda: not _running(c, SILENT), 400)
        died = re.findall(r"round (\d+): test fault: the process dies before-push",
                          _log(c, SILENT))
        assert len(died) == 1, died
        r2 = int(died[0])
        assert R2 <= r2 and r2 + 1 < R3, f"hospital-4 died in round {r2}"
        assert addr[SILENT] in chain.round(r2).participants
        _wait(f"round {r2} settled", lambda: _settled(c, r2), 300)
        assert chain.masked_hashes(r2).keys() >= {addr[SILENT]}  # it checked in, hash on chain
        assert _status(c, r2) is RoundStatus.ABANDONED
        abandoned_r2 = [e.args["round"] for e in chain.events(names={"RoundAbandoned"})]
        assert r2 in abandoned_r2
        assert _revealed(c, r2, addr[SILENT]) == []  # nothing revealed for it
        c.start_node(SILENT)
        restarted[SILENT] = chain.current_round()
        _wait(f"round {r2 + 1} settled", lambda: _settled(c, r2 + 1), 300)
        assert _status(c, r2 + 1) is RoundStatus.COMMITTED

        # 3. round R3's leader holds its commit once every masked update is in; killed then
        def stalled() -> tuple[int] | None:
            info = chain.round(R3)
            if info.status is not RoundStatus.ELECTED or not info.leader:
                return None
            i = _index(c, info.leader)
            return (i,) if f"round {R3}: test fault: hanging before the commit" in _log(c, i) \
                else None

        (leader,) = wait_until(stalled, 400, f"round {R3}'s leader holding its commit", poll=0.5)
        c.kill_node(leader)
        at_kill = chain.round(R3)
        # killed before the members' re-election: its attempt, with every update pushed to it
        assert at_kill.attempt == 1 and at_kill.leader == addr[leader], at_kill
        pushed = {a.lower() for a in re.findall(
            rf"round {R3}: masked update from (0x[0-9a-fA-F]{{40}})", _log(c, leader))}
        assert len(pushed) >= 2, pushed
        assert pushed <= {a.lower() for a in at_kill.participants}, pushed
        _wait(f"round {R3} settled", lambda: _settled(c, R3), 400)
        failed = [e.args["leader"] for e in chain.events(names={"LeaderFailed"})
                  if e.args["round"] == R3]
        assert failed and failed[0] == addr[leader], failed
        elected = [(e.args["attempt"], e.args["leader"])
                   for e in chain.events(names={"LeaderElected"}) if e.args["round"] == R3]
        assert any(a > 1 and who != addr[leader] for a, who in elected), elected
        # the dead leader's masked update is gone with it: no later leader can sum the round
        r3_status = _status(c, R3)
        assert r3_status is RoundStatus.ABANDONED, r3_status
        c.start_node(leader)
        restarted[leader] = chain.current_round()
        _wait(f"round {R3 + 1} settled", lambda: _settled(c, R3 + 1), 300)
        assert _status(c, R3 + 1) is RoundStatus.COMMITTED

        # 4. every hospital ends with the final model on chain; the restarted ones took part
        c.wait_trainers(timeout=900)
        total_s = time.monotonic() - t0
        finished = chain.events(names={"TrainingFinished"})
        assert finished, "the chain records no TrainingFinished"
        final = finished[-1].args["digest"]
        for i in range(c.n):
            from_ml = c.read_file(i, "ml", "/workspace/out/final.safetensors")
            from_node = c.read_file(i, "node", "/var/lib/swarmnode/latest.safetensors")
            assert hashlib.sha256(from_ml).digest() == final, c.names[i]
            assert hashlib.sha256(from_node).digest() == final, c.names[i]
            assert c.result(i)["final_digest"] == final.hex()
        commits = {e.args["round"]: e.args["members"]
                   for e in chain.events(names={"MergeCommitted"})}
        for i, since in restarted.items():
            assert any(addr[i] in m for r, m in commits.items() if r >= since), (i, since)
        masked = {r: {a.lower() for a in chain.masked_hashes(r)} for r in commits}
        for r, m in commits.items():  # every committed member checked in with a masked hash
            assert {a.lower() for a in m} <= masked[r], (r, m)
        logs = "".join(_log(c, i) for i in range(5))
        plain = re.findall(r"round \d+: update (?:from|sent to leader) ", logs)
        assert plain == []
        masked_in = len(re.findall(r"round \d+: masked update from ", logs))
        sums = len(re.findall(r"round \d+: summed \d+ masked updates", logs))
        assert masked_in > 0 and sums > 0
        abandoned = sorted(e.args["round"] for e in chain.events(names={"RoundAbandoned"}))
        record("secure_containers_e2e", {
            "up_s": round(up_s, 1), "total_s": round(total_s, 1),
            "rounds": finished[-1].args["round"], "final_digest": final.hex(),
            "dropout_round": n1, "silent_member_round": r2, "dead_leader_round": R3,
            "dead_leader": c.names[leader], "abandoned": abandoned,
            "committed": len(commits), "masked_updates_received": masked_in,
            "rounds_summed": sums, "restarted_at": {c.names[i]: r for i, r in restarted.items()},
        })
    assert _leftovers(c) == []
