"""SwarmRegistry: one per consortium, outliving its trainings. Who may do what in it, the
public-key slot, the trainings it lists, and several trainings on one registry (back to back
and side by side) with a revocation that stops a site in all of them."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import pytest
from chain_support import refused

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import ABI, BYTECODE, SwarmContract, SwarmRegistry
from swarmnode.chain.models import RoundStatus
from swarmnode.chain.reverts import Revert
from swarmnode.chain.tx import TxSender
from swarmnode.errors import BadArgument, ContractReverted, NotNow, NotPermitted

if TYPE_CHECKING:
    from conftest import Backend

SPEC = '{"merge_method": "mean", "min_peers": 2, "sync_frequency": 8}'
DIGEST = bytes(range(32))
TINY_CONTRACT = "0x6001600c60003960016000f300"  # deploys one byte of code (STOP)


def fingerprint(address: str) -> bytes:
    return hashlib.sha256(f"cert of {address}".encode()).digest()


def send(w3: Any, account: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """A raw transaction, refused the way the client refuses (the decoded error's class)."""
    def refuse(r: str) -> ContractReverted:
        return (r.row.cls if isinstance(r, Revert) else ContractReverted)(r, reason=r)
    return TxSender(w3, account).send(fields, "raw", refuse)


def deploy_unlisted(w3: Any, registry: str, min_peers: int = 2) -> SwarmContract:
    """A training on ``registry`` that the registry does not list (no addTraining)."""
    factory = w3.eth.contract(abi=ABI, bytecode=BYTECODE)
    data = factory.constructor(registry, hashlib.sha256(SPEC.encode()).digest(), SPEC,
                               min_peers, 0, 1000, 2**96 - 1, False).data_in_transaction
    receipt = send(w3, dev_account(0), {"data": data})
    return SwarmContract(w3, receipt["contractAddress"], dev_account(0))


def expel(training: SwarmContract, account: Any, node: str) -> Any:
    data = training._contract.encode_abi("expel", args=[node])
    return send(training._w3, account, {"to": training.address, "data": data})


def play_round(training: SwarmContract, r: int, sites: list[SwarmContract]) -> None:
    """``sites`` (handles on ``training``) check in for round ``r``, which closes; its leader
    commits."""
    for site in sites:
        site.checkin(r, 1)
    info = training.round(r)
    assert info.status is RoundStatus.ELECTED, info
    if info.leader is None:
        sites[0].draw(r)
        info = training.round(r)
    leader = next(s for s in sites if s.account_address == info.leader)
    leader.commit_merge(r, DIGEST, info.participants)


def test_only_the_admin_authorises_revokes_and_lists_trainings(backend: Backend) -> None:
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    admin = dev_account(0).address
    assert registry.admin() == admin
    site = registry.with_account(dev_account(1))
    addr = site.account_address
    for call in (lambda: site.authorize(addr, fingerprint(addr)), lambda: site.revoke(addr),
                 lambda: site.add_training(registry.address)):
        with refused(NotPermitted, "NotAdmin", caller=addr, admin=admin):
            call()
    with refused(BadArgument, "ZeroFingerprint"):
        registry.authorize(addr, bytes(32))
    with refused(BadArgument, "ZeroAddress"):
        registry.authorize("0x" + "0" * 40, fingerprint("zero"))
    with refused(NotPermitted, "SiteNotAuthorized", site=addr):
        registry.revoke(addr)
    result = registry.authorize(addr, fingerprint(addr))
    (event,) = registry.events(from_block=result.block, to_block=result.block)
    assert (event.name, event.args) == ("Authorized", {"site": addr,
                                                        "fingerprint": fingerprint(addr)})
    info = registry.site(addr)
    assert (info.authorized, info.enrolled, info.revoked, info.enrolled_at) == (
        True, False, False, 0)
    assert registry.sites() == []  # the list holds enrolled sites
    result = site.enroll("10.0.0.1:7100")
    info = registry.site(addr)
    assert (info.enrolled, info.endpoint) == (True, "10.0.0.1:7100")
    assert info.enrolled_at == backend.w3.eth.get_block(result.block)["timestamp"]
    assert [s.address for s in registry.sites()] == [addr]


def test_a_training_is_deployed_by_the_registry_admin_only(backend: Backend) -> None:
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    with refused(NotPermitted, "NotRegistryAdmin", caller=dev_account(1).address,
                 admin=dev_account(0).address):
        SwarmContract.deploy(backend.w3, dev_account(1), SPEC, 2, 0, 60, registry=registry)
    training = SwarmContract.deploy(backend.w3, dev_account(0), SPEC, 2, 0, 60,
                                    registry=registry.address)
    assert training.registry.address == registry.address
    assert registry.trainings() == [training.address]
    (added,) = registry.events(names={"TrainingAdded"})
    assert added.args == {"training": training.address}


def test_add_training_refuses_anything_but_a_training_of_this_registry(backend: Backend) -> None:
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    listed = SwarmContract.deploy(backend.w3, dev_account(0), SPEC, 2, 0, 60, registry=registry)
    with refused(NotNow, "TrainingAlreadyAdded", training=listed.address):
        registry.add_training(listed.address)
    eoa = dev_account(5).address
    with refused(BadArgument, "NotATraining", training=eoa):
        registry.add_training(eoa)  # no code
    other = SwarmRegistry.deploy(backend.w3, dev_account(0))
    with refused(BadArgument, "NotATraining", training=other.address):
        registry.add_training(other.address)  # code without registry(): the call reverts
    foreign = SwarmContract.deploy(backend.w3, dev_account(0), SPEC, 2, 0, 60, registry=other)
    with refused(BadArgument, "NotATraining", training=foreign.address):
        registry.add_training(foreign.address)  # a training of another registry
    unlisted = deploy_unlisted(backend.w3, registry.address)
    registry.add_training(unlisted.address)
    assert registry.trainings() == [listed.address, unlisted.address]


def test_add_training_refuses_a_contract_that_returns_nothing(backend: Backend) -> None:
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    tiny = send(backend.w3, dev_account(0), {"data": TINY_CONTRACT})["contractAddress"]
    with refused(BadArgument, "NotATraining", training=tiny):
        registry.add_training(tiny)


def test_public_key_round_trip(backend: Backend) -> None:
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    site = registry.with_account(dev_account(1))
    addr = site.account_address
    key = hashlib.sha256(b"a site's key").digest()
    with refused(NotPermitted, "SiteNotEnrolled", site=addr):
        site.set_public_key(key)
    registry.authorize(addr, fingerprint(addr))
    with refused(NotPermitted, "SiteNotEnrolled", site=addr):
        site.set_public_key(key)  # authorised is not enough
    site.enroll("10.0.0.1:7100")
    assert registry.site(addr).public_key is None
    result = site.set_public_key(key)
    events = registry.events(from_block=result.block, to_block=result.block, names={"PublicKeySet"})
    assert [e.args for e in events] == [{"site": addr, "key": key}]
    assert registry.site(addr).public_key == key
    other = bytes(32 * [3])
    site.set_public_key(other)  # replaced
    assert registry.site(addr).public_key == other
    site.set_public_key(bytes(32))  # cleared
    assert registry.site(addr).public_key is None
    registry.revoke(addr)
    with refused(NotPermitted, "SiteRevoked", site=addr):
        site.set_public_key(key)


def test_trainings_back_to_back_and_side_by_side_on_one_registry(backend: Backend) -> None:
    """Sites authorised once take part in every training of the consortium, one after another
    and at the same time; a revocation in the registry stops a site in all of them at once."""
    w3 = backend.w3
    registry = SwarmRegistry.deploy(w3, dev_account(0))
    accounts = [dev_account(i) for i in (1, 2, 3)]
    for acct in accounts:
        registry.authorize(acct.address, fingerprint(acct.address))
    authorised_up_to = w3.eth.block_number

    def start(endpoint_base: int) -> tuple[SwarmContract, list[SwarmContract]]:
        training = SwarmContract.deploy(w3, dev_account(0), SPEC, 2, 0, 1000, registry=registry)
        sites = [training.with_account(a) for a in accounts]
        for i, s in enumerate(sites):
            s.enroll(f"127.0.0.1:{endpoint_base + i}")  # the first enrols, later ones only join
        return training, sites

    # back to back: the first training runs to its end, the second starts after it
    first, sites1 = start(7100)
    play_round(first, 1, sites1)
    for s in sites1:
        s.finish()
    play_round(first, 2, sites1)
    assert first.training_finished()
    second, sites2 = start(7100)
    assert [n.address for n in second.nodes()] == [a.address for a in accounts]
    play_round(second, 1, sites2)
    # side by side: a third one starts while the second is running; rounds interleave
    third, sites3 = start(7200)  # another endpoint: an override in this training
    assert second.node(accounts[0].address).endpoint == "127.0.0.1:7100"
    assert third.node(accounts[0].address).endpoint == "127.0.0.1:7200"
    play_round(third, 1, sites3)
    play_round(second, 2, sites2)
    play_round(third, 2, sites3)
    assert registry.trainings() == [first.address, second.address, third.address]
    assert len(registry.events(names={"Enrolled"})) == 3
    authorisations = registry.events(names={"Authorized"})
    assert len(authorisations) == 3 and all(e.block <= authorised_up_to for e in authorisations)

    # a revocation in the registry stops the site in both running trainings at once
    a, b, c = sites2
    sites2[0].checkin(3, 1)
    victim = c.account_address
    result = registry.revoke(victim)
    logs = w3.eth.get_transaction_receipt(result.tx_hash)["logs"]
    assert {str(lg["address"]) for lg in logs} == {registry.address, second.address,
                                                  third.address}  # the finished one: no event
    for training in (second, third):
        assert names_in(training, result) == ["NodeRevoked"]
        assert training.node(victim).state == "revoked"
        assert training.active_count() == 2
        assert training.absent_candidates() == []
        assert victim not in training.waiting_for(training.current_round())
    assert names_in(first, result) == []
    assert first.node(victim).state == "revoked"  # what the registry says, in every training
    for site, peer, training in ((sites2[2], sites2[0], second), (sites3[2], sites3[0], third)):
        cur = training.current_round()
        for call in (lambda s=site, r=cur: s.checkin(r, 1), lambda s=site: s.finish(),
                     lambda s=site, r=cur: s.elect(r), lambda s=site, r=cur: s.reelect(r),
                     lambda s=site: s.update_endpoint("10.9.9.9:1"),
                     lambda s=site: s.mark_absent(accounts[0].address), lambda s=site: s.join(),
                     lambda s=site: s.enroll("10.9.9.9:1")):
            with refused(NotPermitted, "Revoked", node=victim):
                call()
        with refused(NotPermitted, "Revoked", node=victim):
            peer.mark_absent(victim)  # set aside already, in each
    with refused(NotPermitted, "SiteRevoked", site=victim):
        c.registry.update_endpoint("10.9.9.9:1")
    # both go on without it
    b.checkin(3, 1)
    assert second.round(3).status is RoundStatus.ELECTED
    assert second.round(3).participants == (a.account_address, b.account_address)
    play_round(third, 3, sites3[:2])


def names_in(training: SwarmContract, result: Any) -> list[str]:
    events = training.events(from_block=result.block, to_block=result.block)
    return [e.name for e in events if e.tx_hash == result.tx_hash
            and e.name in {"NodeRevoked", "RoundClosed", "FinalRound", "NodeAbsent"}]


def test_sites_join_only_a_training_the_registry_lists(backend: Backend) -> None:
    """A revocation reaches every training a site is in: a site can join only a training its
    registry lists (the registry expels from exactly those). expel by anyone is refused for a
    site the registry has not revoked, and does nothing for one already set aside."""
    w3 = backend.w3
    registry = SwarmRegistry.deploy(w3, dev_account(0))
    accounts = [dev_account(i) for i in (1, 2, 3)]
    for acct in accounts:
        registry.authorize(acct.address, fingerprint(acct.address))
    training = deploy_unlisted(w3, registry.address)
    a, b, c = (training.with_account(acct) for acct in accounts)
    with refused(NotNow, "NotListed", training=training.address):
        a.enroll("127.0.0.1:7100")
    assert registry.site(a.account_address).enrolled  # in the registry, not in the training
    registry.add_training(training.address)
    for i, s in enumerate((a, b, c)):
        s.enroll(f"127.0.0.1:{7100 + i}")
    a.checkin(1, 1)
    c.checkin(1, 1)
    stranger = dev_account(9)
    with refused(BadArgument, "NotRevoked", node=a.account_address):
        expel(training, stranger, a.account_address)
    result = registry.revoke(c.account_address)
    assert names_in(training, result) == ["NodeRevoked"]
    assert training.round(1).participants == (a.account_address,)  # it left the open round
    assert training.absent_candidates() == []
    receipt = expel(training, stranger, c.account_address)  # again: nothing to do
    events = training.events(from_block=receipt["blockNumber"], to_block=receipt["blockNumber"])
    assert events == []
    b.checkin(1, 1)
    assert training.round(1).status is RoundStatus.ELECTED  # a and b: every active site


def test_a_revocation_short_of_gas_fails_whole_rather_than_skip_a_training(
    tester_w3: Any,
) -> None:
    """The registry reserves each training's expel gas up front: sent with too little gas the
    revocation reverts (nothing revoked), never revokes while skipping a training (gas
    arithmetic: in process)."""
    w3 = tester_w3
    registry = SwarmRegistry.deploy(w3, dev_account(0))
    trainings = [SwarmContract.deploy(w3, dev_account(0), SPEC, 2, 0, 1000,
                                      registry=registry) for _ in range(2)]
    site = dev_account(1)
    registry.authorize(site.address, fingerprint(site.address))
    for t in trainings:
        t.with_account(site).enroll("10.0.0.1:7100")
    data = registry._contract.encode_abi("revoke", args=[site.address])
    with pytest.raises(ContractReverted):  # mined with a fixed gas limit: it fails on chain
        TxSender(w3, dev_account(0)).send(
            {"to": registry.address, "data": data}, "revoke", lambda r: ContractReverted(r),
            gas=300_000)
    assert not registry.site(site.address).revoked
    result = registry.revoke(site.address)  # estimated: enough for both
    assert "ExpelFailed" not in result.events
    for t in trainings:
        assert t.node(site.address).state == "revoked"
