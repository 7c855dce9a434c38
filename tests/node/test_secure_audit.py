"""Any member can check a committed secure round (issue 20): on the in-process swarm's real node
services and contracts, the leader keeps each summed round's evidence (masked updates, seed
reveals, its ring sum) and gives it to members; a member's node checks it against the hashes
the check-ins carry on chain and the committed digest. An honest run verifies; a leader that
changed one masked update, dropped one, used a wrong reveal or committed a model other than
the sum's mean is caught, each with an error naming the round and what differed."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from swarmnode.chain.accounts import dev_account
from swarmnode.cli import app
from swarmnode.demo.swarm import wait_until
from swarmnode.errors import AggregateRejected, PeerRefused, RoundError
from swarmnode.node.secaudit import check_round
from swarmnode.node.secure import KEEP_EVIDENCE
from swarmnode.node.service import _LocalApi
from swarmnode.privacy import ring
from swarmnode.privacy.audit import verify_sum
from swarmnode.privacy.evidence import Evidence
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, Site
from swarmnode.transport.local import LocalServer

INITIAL = {"w": torch.zeros(12, 8), "b": torch.zeros(8)}


def _spec() -> TrainingSpec:
    plain = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=3,
                                    merge_method="mean", merge_options={"clip_norm": 10.0})
    return dataclasses.replace(plain, max_weight=100, secure_aggregation=True)


def _step(site: Site, k: int, model: Mapping[str, torch.Tensor] | None):  # type: ignore[no-untyped-def]
    if k >= 3:
        return None
    base = model if model is not None else INITIAL
    gen = torch.Generator().manual_seed(100 * site.index + k)
    return ({n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()},
            5 + site.index)


def test_members_check_the_leaders_sum_and_catch_a_leader_that_tampered() -> None:
    started = time.monotonic()
    # site 4 dies before its round-2 check-in: round 2's sum needs the survivors' reveals
    # and every node checks each round it added to (secure_audit_every: 1) by itself
    with InProcessSwarm(4, _spec(), grace_s=2, deadline_s=20,
                        faults={3: {"exit": "before-checkin:2"}},
                        node_options={"secure_audit_every": 1}) as swarm:
        reads: list[tuple[str, int, int | None]] = []
        for site in swarm.sites:
            chain = site.service.chain
            real = chain.masked_hashes

            def counted(round, from_block=None, _real=real, _me=site.address):  # type: ignore[no-untyped-def]
                reads.append((_me, round, from_block))
                return _real(round, from_block=from_block)

            chain.masked_hashes = counted  # type: ignore[method-assign]
        sites = swarm.run(_step, timeout=240)
        assert sites[3].died == 2
        final = swarm.final_round()
        assert final is not None and final >= 3
        pushed_reads = list(reads)
        # a member's push takes its own hash from its check-in's receipt (no read) or reads it
        # from its check-in's block, never from the deployment on
        checkins = {(e.args["round"], str(e.args["node"]).lower()): e.block
                    for e in swarm.admin.events(names={"CheckedIn"})}
        for r in (1, 2, 3):  # the trainers' rounds (the final one keeps the model: no push)
            leader = swarm.admin.round(r).leader
            for s in sites[:3]:
                if s.address == leader or (r, s.address.lower()) not in checkins:
                    continue
                block = checkins[(r, s.address.lower())]
                own = [b for a, rr, b in pushed_reads if a == s.address and rr == r]
                assert all(b == block for b in own), (r, s.name, block, pushed_reads)
        deployed = swarm.admin.settings().deployed_block
        assert all(b is None or b > deployed for _, _, b in pushed_reads)

        # the automatic checks: every live site that added to a round it did not lead
        due = {(s.name, r) for r in (1, 2, 3) for s in sites[:3]
               if s.address != swarm.admin.round(r).leader}

        def checked() -> set[tuple[str, int]]:
            return {(s.name, r) for s in sites[:3] for r, v in s.service.audits.items()
                    if v == "ok"}

        wait_until(lambda: due <= checked(), 90, "every member's automatic check",
                   describe=lambda: str({s.name: s.service.audits for s in sites}))

        # every committed round checks out at a live member that did not lead it (round 2, with
        # its reveals, at both); the final round kept its starting model: no sum to check
        for r in range(1, final + 1):
            info = swarm.admin.round(r)
            for s in [x for x in sites[:3] if x.address != info.leader][:1 if r != 2 else 2]:
                got = s.service.audit_round(r)
                if r == final:
                    assert got["kept_starting_model"]
                    continue
                assert got["ok"] and got["digest"] == info.digest.hex()  # type: ignore[union-attr]
                if r == 2:
                    assert got["dropouts"] == [sites[3].address.lower()]
                    assert len(got["summed"]) == 3

        r = 2
        info = swarm.admin.round(r)
        leader = next(s for s in sites if s.address == info.leader)
        auditor = next(s for s in sites[:3] if s is not leader)
        other = next(s for s in sites[:3] if s not in (leader, auditor))
        secure = leader.service.secure
        assert secure is not None and secure.evidence_dir is not None
        path = secure.evidence_dir / f"round-{r}.safetensors"
        honest = path.read_bytes()
        ev = Evidence.from_bytes(honest, secure.size)
        assert len(ev.reveals) == 3 and {x.missing for x in ev.reveals} == {
            sites[3].address.lower()}

        def tampered(**change: object) -> None:
            path.write_bytes(dataclasses.replace(ev, **change).to_bytes())  # type: ignore[arg-type]

        def caught(match: str) -> None:
            with pytest.raises(AggregateRejected, match=match) as err:
                auditor.service.audit_round(r)
            assert f"round {r}" in str(err.value)

        # one masked update changed: its hash is not the one on chain
        changed = {k: v.copy() for k, v in ev.masked.items()}
        changed[other.address.lower()][0] += np.uint64(1)
        tampered(masked=changed)
        caught(f"{other.address.lower()}'s masked update does not match the hash")
        auditor.service._audit_later(r, tries=1)  # the automatic check records the failure
        assert auditor.service.audits[r].startswith("failed: round 2")
        assert "does not match the hash" in auditor.service.audits[r]
        # the same through `swarmnode audit --round N`, over the node's local API (unix socket)
        sock = swarm.workdir / "audit.sock"
        local = LocalServer(f"unix:{sock}", _LocalApi(auditor.service))
        local.start()
        try:
            runner = CliRunner()
            result = runner.invoke(app, ["audit", "--round", str(r), "--local-api",
                                         f"unix:{sock}"])
            assert result.exit_code == AggregateRejected.exit_code, result.output
            assert "does not match the hash" in " ".join(result.output.split())
            path.write_bytes(honest)
            result = runner.invoke(app, ["audit", "--round", str(r), "--local-api",
                                         f"unix:{sock}", "--format", "json"])
            assert result.exit_code == 0, result.output
            assert json.loads(result.output)["dropouts"] == [sites[3].address.lower()]
        finally:
            local.stop()
        # one dropped: the updates are not those of the sites that checked in
        tampered(masked={k: v for k, v in ev.masked.items() if k != other.address.lower()})
        caught("not those of the sites that checked in")
        # a wrong reveal (another survivor's seed): the updates less those masks decode to
        # another model (the evidence states no sum: the member recomputes it)
        assert ev.ring_sum is None
        wrong = [dataclasses.replace(x, seed=bytes(32)) if x.revealer == other.address.lower()
                 else x for x in ev.reveals]
        tampered(reveals=wrong)
        caught("decodes to a model with digest")
        # evidence that states its ring sum (older leaders wrote one) must state the real one
        _, hashes_ = auditor.service.secure.checkins(r)  # type: ignore[union-attr]
        roster_ = {p.lower() for p in secure.roster(r) or ()}
        # round r has a starting model: the narrow ring of its mask set
        plan = ring.round_plan(len(roster_), secure.weight_cap, secure.clip)
        assert plan.ring_bits == 32
        assert {v.dtype for v in ev.masked.values()} == {np.dtype(plan.dtype)}
        real = verify_sum(roster_, {s: hashes_[s] for s in ev.masked}, ev.masked, ev.reveals,
                          plan, None, r)
        tampered(ring_sum=real)
        assert auditor.service.audit_round(r)["ok"]
        tampered(ring_sum=real + plan.dtype(1))
        caught("the sum was not built from exactly the masked updates")
        # a reveal the auditor never gave
        mine = [dataclasses.replace(x, seed=bytes(32)) if x.revealer == auditor.address.lower()
                else x for x in ev.reveals]
        tampered(reveals=mine)
        caught("a reveal this site never gave")
        path.write_bytes(honest)
        assert auditor.service.audit_round(r)["ok"]
        # the evidence of another model: an honest leader's node refuses to give it; a
        # dishonest one's is caught by the member (its check, as the member's node runs it)
        tampered(digest=bytes(32))
        with pytest.raises(RoundError, match="is not the model committed"):
            auditor.service.audit_round(r)
        path.write_bytes(honest)

        # a leader whose committed model is not its sum's mean (its evidence otherwise honest)
        fake = bytes(range(32))
        lied = dataclasses.replace(info, digest=fake)
        start = swarm.admin.round(1).digest
        weights, hashes = auditor.service.secure.checkins(r)  # type: ignore[union-attr]
        with pytest.raises(AggregateRejected, match="the chain committed"):
            check_round(auditor.service.secure, info, weights, hashes,  # type: ignore[arg-type]
                        dataclasses.replace(ev, digest=fake).to_bytes(), start,
                        auditor.service.param_spec)
        with pytest.raises(AggregateRejected, match="not the committed"):
            check_round(auditor.service.secure, lied, weights, hashes,  # type: ignore[arg-type]
                        dataclasses.replace(ev, digest=fake).to_bytes(), start,
                        auditor.service.param_spec)
        # evidence whose starting model is not the one on chain
        tampered(model=bytes(ev.model[:-1]) + bytes([ev.model[-1] ^ 1]))
        caught("is not the round's starting model on chain")
        path.write_bytes(honest)

        # who gets the evidence: members, for committed rounds the node summed
        with pytest.raises(PeerRefused, match="not a member"):
            leader.service.secure_evidence(r, dev_account(7).address)
        with pytest.raises(RoundError, match="committed rounds only"):
            leader.service.secure_evidence(final + 5, auditor.address)
        with pytest.raises(RoundError, match="keeps no evidence"):
            auditor.service.secure_evidence(r, other.address)

        # a leader keeps the evidence of its newest KEEP_EVIDENCE summed rounds, no more
        for later in range(100, 100 + KEEP_EVIDENCE + 3):
            secure._summed[later] = (dict(ev.masked), list(ev.reveals), ev.ring_sum)
            secure.keep_evidence(later, ev.digest, ev.model, first=False)
        newest = [f"round-{n}.safetensors" for n in range(103, 111)]

        def kept() -> list[str]:
            return sorted(f.name for f in secure.evidence_dir.glob("*.safetensors"))  # type: ignore[union-attr]

        wait_until(lambda: kept() == sorted(newest), 60, "the newest 8 rounds' evidence kept",
                   describe=lambda: str(kept()))
    print(f"secure audit: {final} rounds checked, 7 tamperings caught in "
          f"{time.monotonic() - started:.1f} s")
