"""A node that starts after its training finished, on the in-process swarm (real node services,
the real contracts on eth-tester, the in-memory transport running the receiver's checks): it
takes the final model from a site that holds it, verified against the chain's digest, and ends
like a node that took part; a revoked or never-authorised site is refused, naming why. Beside it,
the peers' rule for who may pull what once the training finished, and the bound on how often a
round is read for callers it does not name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.models import RoundStatus
from swarmnode.config import NodeConfig
from swarmnode.errors import IdentityError
from swarmnode.identity import describe, issue_node_cert
from swarmnode.node.peers import ChainAuthority
from swarmnode.node.service import NodeService
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm, MemoryPeerPool
from swarmnode.transport import serde

INITIAL = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
ROUNDS = 2


def _step(site, k, model):  # type: ignore[no-untyped-def]
    if k >= ROUNDS:
        return None
    base = model if model is not None else INITIAL
    return {n: t + 0.1 * (site.index + 1) for n, t in base.items()}, 10 * (site.index + 1)


def _late_node(swarm: InProcessSwarm, index: int, *, authorise: bool = True,
               endpoint: str | None = None, data: str | None = None) -> NodeService:
    """Site ``index`` (dev account ``index + 1``)'s node service, started as a node process
    starts (its own certificate, enrolment at start), on the running swarm's chain and network.
    ``authorise``: the admin authorised it first (before the training started, say)."""
    name = f"site-{index + 1}"
    account = dev_account(index + 1)
    work = swarm.workdir
    cert, key = work / name / f"{name}.pem", work / name / f"{name}.key"
    if not cert.exists():  # a site new to the swarm (else: the certificate it ran with)
        swarm.w3.eth.send_transaction({"from": swarm.w3.eth.accounts[0], "to": account.address,
                                       "value": 10**20})
        cert, key = issue_node_cert(work / "ca" / "ca.pem", work / "ca" / "ca.key", work / name,
                                    name, dns=[f"{name}.inproc"], ips=[])
    if authorise and not swarm.admin.node(account.address).authorized:
        swarm.admin.authorize(account.address, describe(cert).fingerprint)
    config = NodeConfig(
        name=name, rpc_url="in-process", contract=swarm.admin.address, key_index=index + 1,
        peer_listen="127.0.0.1:0", peer_endpoint=endpoint or f"{name}.inproc:7441", cert=cert,
        key=key, trust=work / "trust.pem", data_dir=work / (data or name) / "data",
        poll_s=0.05, round_timeout_s=120.0, start_timeout_s=5.0)
    service = NodeService(config, chain=swarm.admin.with_account(account),
                          peers=MemoryPeerPool.factory(swarm.network))
    swarm.network.attach(service.me, service, Path(cert).read_bytes())
    try:
        service._enroll(7441)  # what start() does once its servers listen (none in process)
    except BaseException:
        swarm.network.detach(service.me)
        service.stop()
        raise
    return service


def _trains_to_the_end(swarm: InProcessSwarm, service: NodeService, final: bytes) -> None:
    """What a trainer does with a node whose training is over: hello hands it the final model
    (its training loop stops at once), a sync and the finish return the same model."""
    info, held = service.hello(swarm.spec)
    assert info["training_finished"] is True and held is not None
    assert serde.digest(held) == final and info["digest"] == final.hex()
    assert service.store.latest() is not None and service.store.latest().digest == final
    mine = serde.encode({n: t + 5 for n, t in INITIAL.items()})
    synced = service.sync(mine, 10, None, None)
    assert synced.digest == final and synced.data is not None
    done = service.finish(mine, 10, "inactive")
    assert done.digest == final and serde.digest(done.data) == final
    assert service.progress.finished and service.stage == "done"


def _finished_swarm() -> InProcessSwarm:
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    swarm = InProcessSwarm(2, spec, min_peers=2, grace_s=2, deadline_s=8)
    try:
        swarm.run(_step, timeout=180)
    except BaseException:
        swarm.close()
        raise
    assert swarm.admin.training_finished()
    return swarm


def test_a_site_whose_node_starts_after_the_finish_takes_the_final_model() -> None:
    """Two sites train to the end; the third, authorised in the consortium, brings its node up
    only then (its compose project was slower): before the fix its start-up joined the training
    and the contract refused it (TrainingOver: the node exited). Now it takes the final model
    from a site that holds it, and every call of its trainer gets that model. A site that
    restarts on another endpoint after the finish (it took part) does too, and so does one whose
    stored models are gone. The peers serve such a site the final round only."""
    with _finished_swarm() as swarm:
        final = swarm.final_digest()
        final_round = swarm.final_round()
        assert final is not None and final_round is not None
        late = _late_node(swarm, 2)
        try:
            assert not swarm.admin.node(late.me).enrolled  # it did not join (no transaction)
            _trains_to_the_end(swarm, late, final)
            assert late.report_final_metrics(0.5, 0.9) is False  # no final-round participant
            # the peers' rule: the final round, and no earlier committed round
            peer = swarm.sites[0].service.authority
            earlier = next(r for r in range(1, final_round)
                           if swarm.admin.round(r).status is RoundStatus.COMMITTED)
            assert peer.is_participant(final_round, late.me)
            assert not peer.is_participant(earlier, late.me)
        finally:
            swarm.network.detach(late.me)
            late.stop()
        # a site that took part, started again on another endpoint with no stored models
        old = swarm.sites[1]
        swarm.network.detach(old.address)
        old.service.stop()
        again = _late_node(swarm, 1, endpoint="site-2.inproc:7551", data="site-2-again")
        try:
            assert swarm.admin.node(again.me).endpoint == "site-2.inproc:7441"  # no update
            _trains_to_the_end(swarm, again, final)
        finally:
            swarm.network.detach(again.me)
            again.stop()


def test_a_revoked_or_unauthorised_site_started_after_the_finish_is_refused() -> None:
    with _finished_swarm() as swarm:
        revoked = swarm.sites[1].address
        swarm.admin.registry.with_account(dev_account(0)).revoke(revoked)
        with pytest.raises(IdentityError, match="was revoked"):
            _late_node(swarm, 1, data="site-2-revoked")
        with pytest.raises(IdentityError, match="not authorised .* training has finished"):
            _late_node(swarm, 3, authorise=False)
        # and the peers refuse the revoked site's pulls (its identity is not bound)
        peer = swarm.sites[0].service.authority
        peer.forget(revoked)
        assert peer.fingerprint_of(revoked) is None


def test_a_site_that_did_not_join_is_served_nothing_while_the_training_runs() -> None:
    """The peers' identity rule before the finish: an authorised site that did not join has no
    identity on the peer API (nothing to pull); after the finish, the final model only."""
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    with InProcessSwarm(2, spec, min_peers=2, grace_s=2, deadline_s=8) as swarm:
        outsider = dev_account(3).address
        swarm.admin.authorize(outsider, bytes(range(32)))
        authority = ChainAuthority(swarm.admin, ttl=0.0)
        assert authority.fingerprint_of(outsider) is None
        swarm.run(_step, timeout=180)
        assert authority.fingerprint_of(outsider) == bytes(range(32))


def test_a_sync_that_begins_as_the_final_round_commits_hands_over_the_final_model() -> None:
    """A node read "not finished" (its per-block answer, or just before the final commit was
    mined) and then checked in for the round after the final one: the contract refuses that
    (TrainingOver), and the trainer gets the final model instead of an error (a restarted
    hospital's trainer failed this way in the container consortium test)."""
    spec = TrainingSpec.from_state(INITIAL, sync_frequency=1, min_peers=2, merge_method="mean")
    with InProcessSwarm(2, spec, grace_s=2, deadline_s=20) as swarm:
        swarm.run(_step, timeout=120)
        final = swarm.final_digest()
        service = swarm.sites[0].service
        service.training_finished = lambda: False  # type: ignore[method-assign]  # the stale read
        outcome = service.sync(serde.encode({n: t + 1 for n, t in INITIAL.items()}), 10, None,
                               None)
    assert final is not None and outcome.digest == final and outcome.data is not None
