"""Every rule of SwarmTraining.sol (one training on its consortium's SwarmRegistry), on the
in-process tester, a real anvil and a real Hardhat node. Refusals are asserted by the decoded
custom error's name, arguments and SwarmError class, never by message text."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pytest
from chain_support import refused
from web3 import Web3

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import ABI, BYTECODE, SwarmContract, SwarmRegistry, TxResult
from swarmnode.chain.models import RoundStatus
from swarmnode.chain.reverts import Revert
from swarmnode.chain.tx import TxSender
from swarmnode.errors import BadArgument, ConfigError, ContractReverted, NotNow, NotPermitted

if TYPE_CHECKING:
    from conftest import Backend, Swarm

MakeSwarm = Callable[..., "Swarm"]
DIGEST = bytes(range(32))


def tx_events(swarm: Swarm, result: TxResult) -> list[tuple[str, dict]]:
    """(name, args) of the events one transaction emitted (the training's and its registry's),
    in order."""
    events = swarm.admin.events(from_block=result.block, to_block=result.block)
    return [(e.name, e.args) for e in events if e.tx_hash == result.tx_hash]


def names(swarm: Swarm, result: TxResult) -> list[str]:
    return [name for name, _ in tx_events(swarm, result)]


def expected_pick(w3: Web3, block: int, round: int, candidates: Sequence[str],
                  attempt: int = 1) -> str:
    """The contract's draw, recomputed: keccak256(blockhash(block), round, attempt) % n, where
    ``block`` is the block of the transaction that closed the round (or re-elected)."""
    closing = bytes(w3.eth.get_block(block)["hash"])
    data = closing + round.to_bytes(32, "big") + attempt.to_bytes(32, "big")
    return candidates[int.from_bytes(Web3.keccak(data), "big") % len(candidates)]


def drawn(swarm: Swarm, round: int, by: SwarmContract | None = None) -> TxResult:
    """Pin the round's leader (a transaction in a later block than the close)."""
    return (by or swarm.nodes[0]).draw(round)


def checkin_all(swarm: Swarm, round: int, weights: Sequence[int] | None = None) -> TxResult:
    result = None
    for i, node in enumerate(swarm.nodes):
        result = node.checkin(round, weights[i] if weights else 10 * (i + 1))
    assert result is not None
    return result


def close_round(swarm: Swarm, round: int, nodes: Sequence[SwarmContract]) -> None:
    """``nodes`` check in for ``round``; elect it (grace path) if needed, and commit it."""
    for i, node in enumerate(nodes):
        node.checkin(round, 10 + i)
    if swarm.admin.round(round).status is RoundStatus.OPEN:
        swarm.backend.advance(swarm.admin.settings().grace_s)
        nodes[0].elect(round)
    parts = swarm.admin.round(round).participants
    swarm.leader(round).commit_merge(round, DIGEST, parts)
    assert swarm.admin.current_round() == round + 1


def now(swarm: Swarm) -> int:
    """The timestamp the next call or transaction sees: the tester runs calls on its pending
    block; anvil and Hardhat on the latest."""
    if swarm.backend.node:
        return swarm.backend.now()
    tester = swarm.backend.w3.provider.ethereum_tester  # type: ignore[attr-defined]
    return int(tester.get_block_by_number("pending")["timestamp"])


# ------------------------------------------------------------------ deployment and joining


def test_deploy_pins_spec_and_settings(make_swarm: MakeSwarm, spec_json: str) -> None:
    swarm = make_swarm(enroll=False, min_peers=3, grace=7, deadline=42)
    s = swarm.admin.settings()
    assert (s.min_peers, s.grace_s, s.deadline_s) == (3, 7, 42)
    assert s.admin == dev_account(0).address
    assert swarm.admin.spec_json() == spec_json
    (published,) = swarm.admin.events(names={"SpecPublished"})
    assert published.args["specHash"] == s.spec_hash
    assert swarm.admin.current_round() == 1
    assert swarm.admin.final_round() is None
    assert not swarm.admin.training_finished()
    assert swarm.admin.active_count() == 0
    # deployed on a registry of its own (none was given), which lists it
    registry = swarm.admin.registry
    assert registry.admin() == dev_account(0).address
    assert registry.trainings() == [swarm.admin.address]


def test_constructor_checks_spec_hash_and_settings(backend: Backend, spec_json: str) -> None:
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    with refused(BadArgument, "ZeroSetting", which=0):
        SwarmContract.deploy(backend.w3, dev_account(0), spec_json, 0, 5, 60, registry=registry)
    with refused(BadArgument, "ZeroSetting", which=1):
        SwarmContract.deploy(backend.w3, dev_account(0), spec_json, 1, 5, 0, registry=registry)
    factory = backend.w3.eth.contract(abi=ABI, bytecode=BYTECODE)
    sender = TxSender(backend.w3, dev_account(0))

    def deploy_raw(data: str) -> None:
        sender.send({"data": data}, "deploy",
                    lambda r: (r.row.cls if isinstance(r, Revert) else ContractReverted)(
                        r, reason=r))

    actual = hashlib.sha256(spec_json.encode()).digest()
    wrong = factory.constructor(registry.address, b"\x01" * 32, spec_json, 1, 0, 10, 5, False)
    with refused(BadArgument, "SpecHashMismatch", given="0x" + "01" * 32,
                 actual="0x" + actual.hex()):
        deploy_raw(wrong.data_in_transaction)
    no_weight = factory.constructor(registry.address, actual, spec_json, 1, 0, 10, 0, False)
    with refused(BadArgument, "ZeroSetting", which=2):
        deploy_raw(no_weight.data_in_transaction)
    assert registry.trainings() == []


def test_join_needs_the_registry(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=2, enroll=False)
    node, other = swarm.nodes
    addr = node.account_address
    info = swarm.admin.node(addr)
    assert info.authorized and not info.enrolled and info.state == "authorized"
    with refused(NotPermitted, "NotEnrolled", node=addr):
        node.join()  # authorised, not enrolled in the registry
    with refused(NotPermitted, "NotJoined", node=addr):
        node.checkin(1, 1)
    result = node.enroll("10.0.0.5:7100")  # the registry's enrolment, then this training's join
    assert tx_events(swarm, result) == [("Joined", {"node": addr, "endpoint": ""})]
    (enrolled,) = swarm.admin.registry.events(names={"Enrolled"})
    assert enrolled.args == {"site": addr, "endpoint": "10.0.0.5:7100",
                             "fingerprint": swarm.fingerprint_of(addr)}
    info = swarm.admin.node(addr)
    assert (info.enrolled, info.endpoint, info.state) == (True, "10.0.0.5:7100", "active")
    assert info.fingerprint == swarm.fingerprint_of(addr)
    assert info.last_seen == swarm.backend.w3.eth.get_block(result.block)["timestamp"]
    assert (info.enrolled_round, info.last_checkin_round) == (1, 0)
    assert swarm.admin.active_count() == 1
    assert [n.address for n in swarm.admin.nodes()] == [addr]
    with refused(NotNow, "AlreadyJoined", node=addr):
        node.join()
    with refused(NotNow, "AlreadyJoined", node=addr):
        node.enroll("10.0.0.5:7100")  # enrolled in the registry: only the join is left to do
    with refused(NotNow, "SiteAlreadyEnrolled", site=addr):
        node.registry.enroll("10.0.0.5:7100")
    with refused(NotPermitted, "SiteNotAuthorized", site=swarm.stranger.account_address):
        swarm.stranger.enroll("127.0.0.1:7000")
    with refused(BadArgument, "EmptyEndpoint"):
        other.enroll("")

    # a site enrolled in the registry joins with an endpoint of its own for this training
    other.registry.enroll("10.0.0.6:7100")
    result = other.join("10.0.0.6:7999")
    assert tx_events(swarm, result) == [
        ("Joined", {"node": other.account_address, "endpoint": "10.0.0.6:7999"})]
    assert swarm.admin.node(other.account_address).endpoint == "10.0.0.6:7999"
    assert swarm.admin.registry.site(other.account_address).endpoint == "10.0.0.6:7100"


def test_update_endpoint_and_rotate(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=2)
    node = swarm.nodes[0]
    addr = node.account_address
    result = node.update_endpoint("10.0.0.5:7200")  # this training's endpoint
    assert tx_events(swarm, result) == [
        ("EndpointUpdated", {"node": addr, "endpoint": "10.0.0.5:7200"})]
    assert swarm.admin.node(addr).endpoint == "10.0.0.5:7200"
    with refused(BadArgument, "EmptyEndpoint"):
        node.update_endpoint("")
    with refused(NotPermitted, "NotJoined", node=swarm.stranger.account_address):
        swarm.stranger.update_endpoint("10.0.0.9:1")
    other = swarm.nodes[1]
    result = other.registry.update_endpoint("10.0.0.6:7300")  # the registry's, for every training
    assert tx_events(swarm, result) == [
        ("EndpointUpdated", {"site": other.account_address, "endpoint": "10.0.0.6:7300"})]
    assert swarm.admin.node(other.account_address).endpoint == "10.0.0.6:7300"

    rotated = bytes(32 * [7])
    result = swarm.admin.authorize(addr, rotated)
    assert tx_events(swarm, result) == [("Authorized", {"site": addr, "fingerprint": rotated})]
    assert swarm.admin.node(addr).fingerprint == rotated
    assert swarm.admin.node(addr).enrolled


# ------------------------------------------------------------------ check-in and election


def test_checkin_rules_and_weights(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3)
    a, b, _ = swarm.nodes
    with refused(NotPermitted, "NotJoined", node=swarm.stranger.account_address):
        swarm.stranger.checkin(1, 5)
    with refused(NotNow, "RoundNotOpen", round=2, currentRound=1):
        a.checkin(2, 5)
    result = a.checkin(1, 123)
    assert tx_events(swarm, result) == [
        ("CheckedIn", {"round": 1, "node": a.account_address, "weight": 123})
    ]
    with refused(NotNow, "AlreadyCheckedIn", node=a.account_address, round=1):
        a.checkin(1, 5)
    b.checkin(1, 0)
    info = swarm.admin.round(1)
    assert info.status is RoundStatus.OPEN and info.leader is None
    assert info.participants == (a.account_address, b.account_address)
    assert info.first_checkin_at == swarm.backend.w3.eth.get_block(result.block)["timestamp"]
    assert swarm.admin.checkin_weight(1, a.account_address) == 123
    assert swarm.admin.checkin_weight(1, b.account_address) == 0
    assert swarm.admin.checkin_weight(1, swarm.nodes[2].account_address) is None
    assert swarm.admin.node(a.account_address).last_checkin_round == 1
    with pytest.raises(ConfigError, match="round 0 does not exist"):
        swarm.admin.round(0)
    with refused(BadArgument, "WeightOverMax", weight=2**96, maxWeight=2**96 - 1):
        swarm.nodes[2].checkin(1, 2**96)


def test_all_active_checkin_elects_deterministically(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=3)
    last = checkin_all(swarm, 1, [5, 6, 7])
    events = tx_events(swarm, last)
    assert events[1] == ("RoundClosed", {"round": 1, "attempt": 1, "participantCount": 3,
                                         "drawBlock": last.block})
    info = swarm.admin.round(1)
    assert info.status is RoundStatus.ELECTED
    expected = expected_pick(swarm.backend.w3, last.block, 1, info.participants)
    if swarm.backend.node:  # calls run in the latest block: the closing one
        assert info.leader is None  # its hash is not known inside it
        with refused(NotNow, "LeaderNotDrawn", round=1, drawBlock=last.block):
            swarm.handle(expected).commit_merge(1, DIGEST, info.participants)
    pinned = drawn(swarm, 1)
    assert tx_events(swarm, pinned) == [
        ("LeaderElected", {"round": 1, "leader": expected, "attempt": 1, "participantCount": 3})
    ]
    with refused(NotNow, "LeaderAlreadyDrawn", round=1, leader=expected):
        drawn(swarm, 1)
    info = swarm.admin.round(1)
    assert (info.leader, info.attempt) == (expected, 1)
    assert info.elected_at == swarm.backend.w3.eth.get_block(last.block)["timestamp"]
    assert not swarm.admin.election_due(1)
    with refused(NotNow, "LeaderAlreadyDrawn", round=1, leader=expected):
        swarm.stranger.draw(1)  # anyone may draw: the draw block's hash fixes the leader
    with refused(NotNow, "RoundNotElected", round=2, status=int(RoundStatus.OPEN)):
        drawn(swarm, 2)


def test_all_active_path_waits_until_min_peers_are_enrolled(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=2, min_peers=3, spare=1)
    a, b = swarm.nodes
    a.checkin(1, 1)
    last = b.checkin(1, 2)  # every joined node is in, but 2 < min_peers
    assert names(swarm, last) == ["CheckedIn"]
    assert swarm.admin.round(1).status is RoundStatus.OPEN
    swarm.backend.advance(1000)
    with refused(NotNow, "TooFewCheckedIn", round=1, checkedIn=2, minPeers=3):
        a.elect(1)
    (c,) = swarm.spare
    c.enroll("127.0.0.1:7199")  # joins mid-round
    result = c.checkin(1, 3)
    assert names(swarm, result) == ["CheckedIn", "RoundClosed"]


def test_the_event_log_is_read_from_the_deployment_block_in_ranges(
    make_swarm: MakeSwarm, backend: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a long chain, reading from block 0 is slow and public RPC providers refuse wide log
    queries: events are read from the block the contract was deployed in, a range at a time."""
    import swarmnode.chain.client as client

    for _ in range(3):
        backend.mine()  # earlier blocks that hold nothing of this contract
    swarm = make_swarm(nodes=2, min_peers=2)
    w3 = swarm.backend.w3
    spec_events = swarm.admin.events(from_block=0, names={"SpecPublished"})
    assert swarm.admin.settings().deployed_block == spec_events[0].block > 1
    everything = swarm.admin.events(from_block=0)
    assert everything[0].name == "SpecPublished"  # the registry's constructor emits nothing
    assert swarm.admin.events() == everything
    monkeypatch.setattr(client, "LOG_RANGE", 2)
    assert swarm.admin.events() == everything  # the same, asked for two blocks at a time
    assert everything[-1].block == w3.eth.block_number


def test_the_last_node_to_check_in_cannot_choose_to_lead(make_swarm: MakeSwarm) -> None:
    """The attack on a draw from the previous block's hash: the last node to check in knows that
    hash before it sends, so it waits (here: has blocks mined) until the hash makes it leader,
    then checks in. It won every round. Drawn from the hash of the block its check-in lands in,
    it wins a fair share (1/3 per round here; all 8 rounds by chance: p = 0.00015)."""
    swarm = make_swarm(nodes=3, min_peers=3)
    a, b, attacker = swarm.nodes
    w3 = swarm.backend.w3
    wins = 0
    for r in range(1, 9):
        a.checkin(r, 1)
        b.checkin(r, 1)
        for _ in range(100):  # wait for a block whose hash would make it leader
            seen = bytes(w3.eth.get_block("latest")["hash"])
            if int.from_bytes(Web3.keccak(seen + r.to_bytes(32, "big")), "big") % 3 == 2:
                break
            swarm.backend.mine()
        attacker.checkin(r, 1)
        leader = swarm.leader(r)
        wins += leader is attacker
        leader.commit_merge(r, DIGEST, swarm.admin.round(r).participants)
    assert wins < 8, "the last node to check in chose to lead every round"


def test_quorum_and_grace_path(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, grace=1000)
    a, b, c = swarm.nodes
    first = a.checkin(1, 1)
    t0 = swarm.backend.w3.eth.get_block(first.block)["timestamp"]
    with refused(NotNow, "TooFewCheckedIn", round=1, checkedIn=1, minPeers=2):
        c.elect(1)
    assert not swarm.admin.election_due(1)
    b.checkin(1, 2)
    assert not swarm.admin.election_due(1)
    with refused(NotNow, "GraceNotOver", round=1, readyAt=t0 + 1000):
        c.elect(1)
    with refused(NotPermitted, "NotJoined", node=swarm.stranger.account_address):
        swarm.stranger.elect(1)
    swarm.backend.advance(1000)
    assert swarm.admin.election_due(1)
    result = c.elect(1)  # any joined node may elect, not only participants
    info = swarm.admin.round(1)
    assert info.participants == (a.account_address, b.account_address)
    expected = expected_pick(swarm.backend.w3, result.block, 1, info.participants)
    assert tx_events(swarm, result) == [
        ("RoundClosed", {"round": 1, "attempt": 1, "participantCount": 2,
                         "drawBlock": result.block})
    ]
    assert tx_events(swarm, drawn(swarm, 1, by=c)) == [
        ("LeaderElected", {"round": 1, "leader": expected, "attempt": 1, "participantCount": 2})
    ]
    with refused(NotNow, "RoundAlreadyElected", round=1, leader=expected):
        c.checkin(1, 3)
    with refused(NotNow, "RoundAlreadyElected", round=1, leader=expected):
        a.elect(1)
    with refused(NotNow, "RoundNotOpen", round=2, currentRound=1):
        a.elect(2)


# ------------------------------------------------------------------ merge commit


def test_commit_rules_and_success(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, spare=1)
    checkin_all(swarm, 1)
    leader = swarm.leader(1)
    lead = leader.account_address
    others = [n for n in swarm.nodes if n is not leader]
    parts = list(swarm.admin.round(1).participants)
    with refused(NotPermitted, "NotLeader", round=1, leader=lead,
                 caller=others[0].account_address):
        others[0].commit_merge(1, DIGEST, parts)
    spare = swarm.spare[0].account_address
    with refused(BadArgument, "MemberNotCheckedIn", round=1, member=spare):
        leader.commit_merge(1, DIGEST, [lead, spare])
    with refused(BadArgument, "MemberListedTwice", round=1, member=others[0].account_address):
        leader.commit_merge(1, DIGEST, [others[0].account_address, lead,
                                        others[0].account_address])
    with refused(BadArgument, "TooFewMembers", round=1, given=1, needed=2):
        leader.commit_merge(1, DIGEST, [lead])
    with refused(BadArgument, "TooFewMembers", round=1, given=0, needed=2):
        leader.commit_merge(1, DIGEST, [])
    with refused(BadArgument, "ZeroDigest"):
        leader.commit_merge(1, bytes(32), parts)

    members = [lead, others[1].account_address]  # a subset is fine
    result = leader.commit_merge(1, DIGEST, members)
    assert tx_events(swarm, result) == [
        ("MergeCommitted", {"round": 1, "leader": lead, "digest": DIGEST, "members": members})
    ]
    info = swarm.admin.round(1)
    assert (info.status, info.digest) == (RoundStatus.COMMITTED, DIGEST)
    assert swarm.admin.current_round() == 2
    assert swarm.admin.round(2).status is RoundStatus.OPEN
    with refused(NotNow, "RoundNotElected", round=1, status=int(RoundStatus.COMMITTED)):
        leader.commit_merge(1, DIGEST, members)
    with refused(NotNow, "RoundNotElected", round=2, status=int(RoundStatus.OPEN)):
        leader.commit_merge(2, DIGEST, members)
    with refused(NotNow, "RoundNotOpen", round=1, currentRound=2):
        others[0].checkin(1, 1)


def test_commit_refuses_a_revoked_member(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    checkin_all(swarm, 1)
    leader = swarm.leader(1)
    victim = next(n for n in swarm.nodes if n is not leader)
    result = swarm.admin.revoke(victim.account_address)  # in the registry: expelled here too
    assert tx_events(swarm, result) == [("Revoked", {"site": victim.account_address}),
                                        ("NodeRevoked", {"node": victim.account_address})]
    with refused(BadArgument, "MemberRevoked", round=1, member=victim.account_address):
        leader.commit_merge(1, DIGEST, [leader.account_address, victim.account_address])
    rest = [n.account_address for n in swarm.nodes if n is not victim]
    assert names(swarm, leader.commit_merge(1, DIGEST, rest)) == ["MergeCommitted"]


# ------------------------------------------------------------------ re-election


def test_reelect_replaces_the_leader_and_abandons_when_none_is_left(
    make_swarm: MakeSwarm,
) -> None:
    swarm = make_swarm(nodes=4, min_peers=2, grace=0, deadline=300)
    a, b, c, _ = swarm.nodes
    a.checkin(1, 1)
    b.checkin(1, 1)
    elected = c.elect(1)
    t_elected = swarm.backend.w3.eth.get_block(elected.block)["timestamp"]
    first = swarm.leader(1)
    survivor = b if first is a else a
    with refused(NotPermitted, "NotParticipant", round=1, node=c.account_address):
        c.reelect(1)
    with refused(NotNow, "DeadlineNotPassed", round=1, leader=first.account_address,
                 due=t_elected + 300):
        survivor.reelect(1)

    swarm.backend.advance(300)
    result = survivor.reelect(1)
    expected = expected_pick(swarm.backend.w3, result.block, 1, [survivor.account_address], 2)
    assert tx_events(swarm, result) == [
        ("LeaderFailed", {"round": 1, "leader": first.account_address}),
        ("NodeAbsent", {"node": first.account_address, "lastCheckinRound": 1}),
        ("RoundClosed", {"round": 1, "attempt": 2, "participantCount": 2,
                         "drawBlock": result.block}),
    ]
    assert tx_events(swarm, drawn(swarm, 1, by=survivor)) == [
        ("LeaderElected", {"round": 1, "leader": expected, "attempt": 2, "participantCount": 2}),
    ]
    assert expected == survivor.account_address
    info = swarm.admin.round(1)
    assert (info.leader, info.attempt, info.status) == (expected, 2, RoundStatus.ELECTED)
    with refused(NotPermitted, "NotLeader", round=1, leader=expected,
                 caller=first.account_address):
        first.commit_merge(1, DIGEST, [a.account_address, b.account_address])

    swarm.backend.advance(300)
    result = first.reelect(1)  # a failed leader is still a participant
    assert tx_events(swarm, result) == [
        ("LeaderFailed", {"round": 1, "leader": survivor.account_address}),
        ("NodeAbsent", {"node": survivor.account_address, "lastCheckinRound": 1}),
        ("RoundAbandoned", {"round": 1}),
    ]
    info = swarm.admin.round(1)
    assert (info.status, info.leader, info.digest) == (RoundStatus.ABANDONED, None, None)
    assert swarm.admin.current_round() == 2
    with refused(NotNow, "RoundNotElected", round=1, status=int(RoundStatus.ABANDONED)):
        survivor.reelect(1)
    # an abandoned round has no merged model: no metrics for it
    with refused(BadArgument, "MetricsNotEligible", round=1, node=survivor.account_address,
                 lastCheckinRound=1):
        survivor.checkin(2, 1, metrics=(1, 0.5, 0.5))
    checkin_all(swarm, 2)  # the swarm goes on with the next round
    assert swarm.admin.round(2).status is RoundStatus.ELECTED


def test_reelected_leader_excludes_failed_one_and_commits(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=4, min_peers=2, deadline=60)
    checkin_all(swarm, 1)
    parts = swarm.admin.round(1).participants
    first = swarm.leader(1)
    caller = next(n for n in swarm.nodes if n is not first)
    swarm.backend.advance(60)
    result = caller.reelect(1)
    candidates = [p for p in parts if p != first.account_address]
    expected = expected_pick(swarm.backend.w3, result.block, 1, candidates, 2)
    assert expected != first.account_address
    second = swarm.handle(expected)
    # no draw transaction: the leader's commit pins the draw (any later block reveals it)
    swarm.backend.advance(1)
    assert swarm.admin.round(1).leader == expected
    commit = second.commit_merge(1, DIGEST, [p for p in parts if p != first.account_address])
    assert names(swarm, commit) == ["LeaderElected", "MergeCommitted"]
    info = swarm.admin.round(1)
    assert (info.status, info.attempt, info.leader) == (RoundStatus.COMMITTED, 2, expected)


# ------------------------------------------------------------------ revocation


def test_revoked_node_can_do_nothing(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    addr = a.account_address
    a.checkin(1, 1)
    result = swarm.admin.revoke(addr)  # in the registry, which expels it from its trainings
    assert tx_events(swarm, result) == [("Revoked", {"site": addr}),
                                        ("NodeRevoked", {"node": addr})]
    assert swarm.admin.node(addr).state == "revoked"
    assert swarm.admin.registry.site(addr).revoked
    assert swarm.admin.active_count() == 2
    assert swarm.admin.round(1).participants == ()  # it left the open round
    assert swarm.admin.absent_candidates() == []
    # every call it makes reverts at once, in the training and in the registry
    for call in (lambda: a.checkin(1, 1), lambda: a.finish(), lambda: a.update_endpoint("x:2"),
                 lambda: a.elect(1), lambda: a.reelect(1),
                 lambda: a.mark_absent(b.account_address), lambda: a.join(),
                 lambda: a.enroll("x:1"), lambda: a.finish(metrics=(1, 0.1, 0.2))):
        with refused(NotPermitted, "Revoked", node=addr):
            call()
    for call in (lambda: a.registry.enroll("x:1"), lambda: a.registry.update_endpoint("x:2"),
                 lambda: a.registry.set_public_key(b"\x01" * 32)):
        with refused(NotPermitted, "SiteRevoked", site=addr):
            call()
    with refused(NotPermitted, "SiteRevoked", site=addr):
        swarm.admin.authorize(addr, swarm.fingerprint_of("new"))
    with refused(NotNow, "SiteAlreadyRevoked", site=addr):
        swarm.admin.revoke(addr)
    with refused(NotPermitted, "SiteNotAuthorized", site=swarm.stranger.account_address):
        swarm.admin.revoke(swarm.stranger.account_address)
    with refused(NotPermitted, "Revoked", node=addr):
        c.mark_absent(addr)  # set aside once
    b.checkin(1, 1)
    last = c.checkin(1, 1)  # the two remaining active nodes complete the round
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    assert swarm.admin.round(1).participants == (b.account_address, c.account_address)


def test_revoking_the_missing_node_elects(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    a.checkin(1, 1)
    b.checkin(1, 1)
    assert swarm.admin.waiting_for(1) == [c.account_address]
    result = swarm.admin.revoke(c.account_address)
    assert names(swarm, result) == ["Revoked", "NodeRevoked", "RoundClosed"]
    assert swarm.admin.waiting_for(1) == []
    assert swarm.leader(1).account_address in (a.account_address, b.account_address)


def test_revoking_the_last_active_node_fixes_the_final_round(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    a.finish()
    b.finish()
    result = swarm.admin.revoke(c.account_address)
    assert names(swarm, result) == ["Revoked", "NodeRevoked", "FinalRound"]
    assert swarm.admin.final_round() == 1
    a.checkin(1, 1)
    assert names(swarm, b.checkin(1, 1)) == ["CheckedIn", "RoundClosed"]
    swarm.leader(1).commit_merge(1, DIGEST, [a.account_address, b.account_address])
    assert swarm.admin.training_finished()


# ------------------------------------------------------------------ end of training


def test_finish_fixes_the_final_round_that_every_node_joins(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    checkin_all(swarm, 1)
    swarm.leader(1).commit_merge(1, DIGEST, swarm.admin.round(1).participants)

    assert names(swarm, a.finish()) == ["NodeFinished"]
    assert swarm.admin.node(a.account_address).state == "finished"
    assert swarm.admin.active_count() == 2
    with refused(NotNow, "AlreadyFinished", node=a.account_address):
        a.finish()
    b.checkin(2, 1)
    last = c.checkin(2, 1)  # a finished node is not required outside the final round
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    swarm.leader(2).commit_merge(2, DIGEST, [b.account_address, c.account_address])

    b.finish()
    result = c.finish()
    assert tx_events(swarm, result) == [("NodeFinished", {"node": c.account_address}),
                                        ("FinalRound", {"round": 3})]
    assert swarm.admin.final_round() == 3 and swarm.admin.active_count() == 0
    with refused(BadArgument, "MetricsNotEligible", round=3, node=a.account_address,
                 lastCheckinRound=0):
        a.report_final_metrics(0.1, 0.9)  # not before the training finished
    a.checkin(3, 0)
    b.checkin(3, 4)
    assert swarm.admin.round(3).status is RoundStatus.OPEN  # the final round waits for all
    assert swarm.admin.round(3).is_final
    last = c.checkin(3, 4)
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    final_digest = bytes(32 * [9])
    parts = list(swarm.admin.round(3).participants)
    result = swarm.leader(3).commit_merge(3, final_digest, parts)
    assert [e for e in tx_events(swarm, result) if e[0] == "TrainingFinished"] == [
        ("TrainingFinished", {"round": 3, "digest": final_digest})
    ]
    assert swarm.admin.training_finished()
    assert swarm.admin.round(3).status is RoundStatus.COMMITTED
    with refused(NotNow, "TrainingOver", finalRound=3):
        a.checkin(4, 1)
    for call in (lambda: a.finish(), lambda: a.elect(4), lambda: a.update_endpoint("x:3"),
                 lambda: a.mark_absent(b.account_address), lambda: a.reelect(3)):
        with refused(NotNow, "TrainingOver", finalRound=3):
            call()
    # the registry outlives the training: the admin still authorises sites (for the next one)
    swarm.admin.authorize(swarm.stranger.account_address, swarm.fingerprint_of("late"))
    # the final model's evaluation has a transaction of its own
    result = a.report_final_metrics(0.1, 0.9)
    assert tx_events(swarm, result) == [
        ("MetricsReported", {"round": 3, "node": a.account_address, "loss": 100_000,
                             "metric": 900_000})]
    with refused(NotPermitted, "NotJoined", node=swarm.stranger.account_address):
        swarm.stranger.report_final_metrics(0.1, 0.9)
    # a site revoked after the end (expel does nothing in a finished training) reports nothing
    swarm.admin.revoke(b.account_address)
    with refused(NotPermitted, "Revoked", node=b.account_address):
        b.report_final_metrics(0.1, 0.9)


def test_finishing_node_completes_the_quorum(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    a.checkin(1, 1)
    b.checkin(1, 1)
    result = c.finish()
    assert names(swarm, result) == ["NodeFinished", "RoundClosed"]
    info = swarm.admin.round(1)
    assert info.participants == (a.account_address, b.account_address)
    assert swarm.leader(1).account_address == expected_pick(swarm.backend.w3, result.block, 1,
                                                            info.participants)


def test_final_round_follows_an_elected_round_and_closes_joining(
    make_swarm: MakeSwarm,
) -> None:
    swarm = make_swarm(nodes=2, min_peers=2, spare=1)
    a, b = swarm.nodes
    checkin_all(swarm, 1)
    a.finish()
    result = b.finish()
    assert ("FinalRound", {"round": 2}) in tx_events(swarm, result)
    assert swarm.admin.round(1).status is RoundStatus.ELECTED
    spare = swarm.spare[0]
    with refused(NotNow, "JoinClosed", finalRound=2):
        spare.enroll("127.0.0.1:7300")  # enrols in the registry; this training is closed to it
    assert swarm.admin.registry.site(spare.account_address).enrolled
    swarm.leader(1).commit_merge(1, DIGEST, [a.account_address, b.account_address])
    a.checkin(2, 1)
    b.checkin(2, 1)
    swarm.leader(2).commit_merge(2, DIGEST, [a.account_address, b.account_address])
    assert swarm.admin.training_finished()
    with refused(NotNow, "TrainingOver", finalRound=2):
        spare.join()


# ------------------------------------------------------------------ absent nodes


def test_a_site_silent_for_several_deadlines_can_be_set_aside_without_missed_rounds(
    make_swarm: MakeSwarm,
) -> None:
    """Rounds stop moving on when every live site finished and only a dead one is left: then
    silence alone (ABSENT_AFTER_ROUNDS + 1 deadlines) lets it go, and the final round is fixed."""
    swarm = make_swarm(nodes=3, min_peers=2, grace=0, deadline=100)
    a, b, dead = swarm.nodes
    close_round(swarm, 1, [a, b, dead])  # the dead site took part in round 1, then died
    a.finish()
    b.finish()  # round 2 is open and nobody will check in: it never ends
    seen = swarm.admin.node(dead.account_address).last_seen
    with refused(NotNow, "AbsentTooEarly", node=dead.account_address, fromRound=3,
                 currentRound=2, silentUntil=seen + 300):
        a.mark_absent(dead.account_address)
    swarm.backend.advance(300)
    assert swarm.admin.absent_candidates() == [dead.account_address]
    result = a.mark_absent(dead.account_address)
    assert names(swarm, result) == ["NodeAbsent", "FinalRound"]
    assert swarm.admin.final_round() == 2


def test_mark_absent_rules_and_success(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=5, min_peers=2, grace=0, spare=1)
    a, b, dead, done, gone = swarm.nodes
    addr = dead.account_address
    swarm.admin.revoke(gone.account_address)
    done.finish()
    assert swarm.admin.settings().absent_after_rounds == 2
    seen = swarm.admin.node(addr).last_seen
    with refused(NotNow, "AbsentTooEarly", node=addr, fromRound=3, currentRound=1,
                 silentUntil=seen + 3000):
        a.mark_absent(addr)
    close_round(swarm, 1, [a, b])
    close_round(swarm, 2, [a, b])
    # two rounds missed, but not yet silent for the round deadline (1000 s): a slow live site
    assert swarm.admin.absent_candidates() == []
    with refused(NotNow, "SeenRecently", node=addr, quietUntil=seen + 1000):
        a.mark_absent(addr)
    swarm.backend.advance(1000)
    assert swarm.admin.absent_candidates() == [addr]
    with refused(NotNow, "AbsentTooEarly", node=a.account_address, fromRound=4,
                 currentRound=3):
        b.mark_absent(a.account_address)
    with refused(NotPermitted, "NotJoined", node=swarm.stranger.account_address):
        swarm.stranger.mark_absent(addr)
    with refused(NotPermitted, "Revoked", node=gone.account_address):
        gone.mark_absent(addr)
    with refused(NotPermitted, "Revoked", node=gone.account_address):
        a.mark_absent(gone.account_address)  # expelled when the registry revoked it
    with refused(NotNow, "FinishedNotAbsent", node=done.account_address):
        a.mark_absent(done.account_address)
    with refused(NotPermitted, "NotJoined", node=swarm.spare[0].account_address):
        a.mark_absent(swarm.spare[0].account_address)

    assert swarm.admin.active_count() == 3
    result = done.mark_absent(addr)  # a finished node may mark too
    assert tx_events(swarm, result) == [("NodeAbsent", {"node": addr, "lastCheckinRound": 0})]
    info = swarm.admin.node(addr)
    assert (info.absent, info.state, info.last_checkin_round, info.enrolled_round) == (
        True, "absent", 0, 1)
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (2, 1)
    assert swarm.admin.absent_candidates() == []
    with refused(NotNow, "AlreadyAbsent", node=addr):
        b.mark_absent(addr)
    a.checkin(3, 1)
    with refused(NotNow, "CheckedInCurrentRound", node=a.account_address, round=3):
        b.mark_absent(a.account_address)
    last = b.checkin(3, 1)  # every active node is in: no grace wait for the absent one
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    result = swarm.admin.revoke(addr)  # revoking an absent node leaves the counts consistent
    assert names(swarm, result) == ["Revoked", "NodeRevoked"]
    assert swarm.admin.node(addr).state == "revoked"
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (2, 0)


def test_mark_absent_unblocks_the_last_active_node(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, grace=1000)
    a, b, dead = swarm.nodes
    close_round(swarm, 1, [a, b, dead])
    close_round(swarm, 2, [a, b])  # the dead node is gone since round 2
    b.finish()
    a.checkin(3, 1)  # 1 of 2 min peers, and the dead node never checks in: the swarm hangs
    swarm.backend.advance(1000)
    with refused(NotNow, "TooFewCheckedIn", round=3, checkedIn=1, minPeers=2):
        a.elect(3)
    assert swarm.admin.round(3).status is RoundStatus.OPEN

    result = b.mark_absent(dead.account_address)
    assert tx_events(swarm, result) == [
        ("NodeAbsent", {"node": dead.account_address, "lastCheckinRound": 1}),
        ("RoundClosed", {"round": 3, "attempt": 1, "participantCount": 1,
                         "drawBlock": result.block}),
    ]
    swarm.leader(3).commit_merge(3, DIGEST, [a.account_address])
    result = a.finish()
    assert tx_events(swarm, result) == [("NodeFinished", {"node": a.account_address}),
                                        ("FinalRound", {"round": 4})]
    a.checkin(4, 1)
    last = b.checkin(4, 1)  # the final round does not wait for the absent node
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    swarm.leader(4).commit_merge(4, DIGEST, [a.account_address, b.account_address])
    assert swarm.admin.training_finished()
    # only the final round's participants report the final model's metrics
    with refused(BadArgument, "MetricsNotEligible", round=4, node=dead.account_address,
                 lastCheckinRound=1):
        dead.report_final_metrics(0.2, 0.8)
    assert names(swarm, b.report_final_metrics(0.2, 0.8)) == ["MetricsReported"]


def test_marking_the_last_active_node_fixes_a_final_round_without_it(
    make_swarm: MakeSwarm,
) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, grace=0)
    a, b, dead = swarm.nodes
    close_round(swarm, 1, [a, b, dead])
    a.finish()
    b.finish()
    close_round(swarm, 2, [a, b])  # only finished nodes left: no final round while dead is active
    assert swarm.admin.final_round() is None
    swarm.backend.advance(1000)
    result = a.mark_absent(dead.account_address)
    assert tx_events(swarm, result) == [
        ("NodeAbsent", {"node": dead.account_address, "lastCheckinRound": 1}),
        ("FinalRound", {"round": 3}),
    ]
    a.checkin(3, 1)
    last = b.checkin(3, 1)
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    swarm.leader(3).commit_merge(3, DIGEST, [a.account_address, b.account_address])
    assert swarm.admin.training_finished()


def test_failed_leader_is_marked_absent_and_returns_by_checking_in(
    make_swarm: MakeSwarm,
) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, deadline=60)
    checkin_all(swarm, 1)
    failed = swarm.leader(1)
    others = [n for n in swarm.nodes if n is not failed]
    swarm.backend.advance(60)
    result = others[0].reelect(1)
    assert names(swarm, result) == ["LeaderFailed", "NodeAbsent", "RoundClosed"]
    assert tx_events(swarm, result)[1] == (
        "NodeAbsent", {"node": failed.account_address, "lastCheckinRound": 1})
    assert swarm.admin.node(failed.account_address).state == "absent"
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (2, 1)
    swarm.leader(1).commit_merge(1, DIGEST, [n.account_address for n in others])
    others[0].checkin(2, 1)
    last = others[1].checkin(2, 1)  # round 2 no longer waits for the failed leader
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    swarm.leader(2).commit_merge(2, DIGEST, [n.account_address for n in others])

    result = failed.checkin(3, 7)
    assert tx_events(swarm, result) == [
        ("NodeReturned", {"node": failed.account_address}),
        ("CheckedIn", {"round": 3, "node": failed.account_address, "weight": 7}),
    ]
    info = swarm.admin.node(failed.account_address)
    assert (info.absent, info.state, info.last_checkin_round) == (False, "active", 3)
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (3, 0)
    others[0].checkin(3, 1)
    assert swarm.admin.round(3).status is RoundStatus.OPEN  # it is required again
    last = others[1].checkin(3, 1)
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]


def test_failed_leader_that_finished_is_not_marked_absent(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, deadline=60)
    checkin_all(swarm, 1)
    failed = swarm.leader(1)
    caller = next(n for n in swarm.nodes if n is not failed)
    failed.finish()
    swarm.backend.advance(60)
    assert names(swarm, caller.reelect(1)) == ["LeaderFailed", "RoundClosed"]
    assert swarm.admin.node(failed.account_address).state == "finished"
    assert swarm.admin.absent_count() == 0


def test_a_round_whose_every_leader_failed_does_not_end_the_training(
    make_swarm: MakeSwarm,
) -> None:
    """A chain stall makes every leader of a round miss its deadline at once. The round is
    abandoned, but the last site not set aside stays active and no final round is fixed (before,
    every site ended absent, the final round came next and one check-in closed it: the training
    stopped early everywhere)."""
    swarm = make_swarm(nodes=3, min_peers=2, deadline=60)
    checkin_all(swarm, 1)
    failed = []
    for attempt in (1, 2, 3):
        leader = swarm.leader(1)
        assert leader not in failed
        failed.append(leader)
        swarm.backend.advance(60)
        caller = next(n for n in swarm.nodes if n is not leader)
        result = caller.reelect(1)
        expected = ["LeaderFailed", "NodeAbsent", "RoundClosed"] if attempt < 3 else [
            "LeaderFailed", "RoundAbandoned"]
        assert names(swarm, result) == expected, attempt
        # a node that re-elects is not silent: its last-seen time is the re-election's
        when = swarm.backend.w3.eth.get_block(result.block)["timestamp"]
        assert swarm.admin.node(caller.account_address).last_seen == when
    assert swarm.admin.final_round() is None
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (1, 2)
    assert swarm.admin.node(failed[2].account_address).state == "active"
    assert swarm.admin.current_round() == 2
    # the two set aside come back by checking in; the round waits for the third one too
    failed[0].checkin(2, 1)
    failed[1].checkin(2, 1)
    assert swarm.admin.round(2).status is RoundStatus.OPEN
    assert names(swarm, failed[2].checkin(2, 1)) == ["CheckedIn", "RoundClosed"]
    assert list(swarm.admin.round(2).participants) == [n.account_address for n in failed]


def test_failed_last_active_leader_fixes_the_final_round(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, deadline=60)
    checkin_all(swarm, 1)
    failed = swarm.leader(1)
    others = [n for n in swarm.nodes if n is not failed]
    for n in others:
        n.finish()
    swarm.backend.advance(60)
    result = others[0].reelect(1)
    assert names(swarm, result) == ["LeaderFailed", "NodeAbsent", "FinalRound", "RoundClosed"]
    assert swarm.admin.final_round() == 2
    swarm.leader(1).commit_merge(1, DIGEST, [n.account_address for n in others])
    others[0].checkin(2, 1)
    last = others[1].checkin(2, 1)  # the final round without the absent leader
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]


def test_absent_node_that_finishes_returns_first(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, grace=0)
    a, b, dead = swarm.nodes
    close_round(swarm, 1, [a, b])
    close_round(swarm, 2, [a, b])
    swarm.backend.advance(1000)
    a.mark_absent(dead.account_address)
    assert swarm.admin.active_count() == 2
    result = dead.finish()
    assert names(swarm, result) == ["NodeReturned", "NodeFinished"]
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (2, 0)
    assert swarm.admin.node(dead.account_address).state == "finished"


# ------------------------------------------------------------------ metrics


def test_metrics_ride_on_the_next_checkin_and_on_finish(make_swarm: MakeSwarm) -> None:
    """Metrics are recorded for the committed round the sender last checked in for, carried by
    its next check-in (or its finish): no transaction of their own."""
    swarm = make_swarm(nodes=3, min_peers=2, grace=1000)
    node, other, outsider = swarm.nodes
    with refused(BadArgument, "MetricsNotEligible", round=1, node=node.account_address,
                 lastCheckinRound=0):
        node.finish(metrics=(1, 0.25, -1.5))  # a round it never took part in
    node.checkin(1, 1)
    other.checkin(1, 1)
    swarm.backend.advance(1000)
    outsider.elect(1)
    swarm.leader(1).commit_merge(1, DIGEST, [node.account_address, other.account_address])
    with refused(BadArgument, "MetricsNotEligible", round=1, node=outsider.account_address,
                 lastCheckinRound=0):
        outsider.checkin(2, 1, metrics=(1, 0.25, -1.5))  # did not take part in round 1
    result = other.checkin(2, 3, metrics=(1, 0.5, 0.5))
    assert tx_events(swarm, result) == [
        ("MetricsReported", {"round": 1, "node": other.account_address, "loss": 500_000,
                             "metric": 500_000}),
        ("CheckedIn", {"round": 2, "node": other.account_address, "weight": 3}),
    ]
    # round 2 is not committed: its metrics come with the check-in after its commit
    with refused(BadArgument, "MetricsNotEligible", round=2, node=node.account_address,
                 lastCheckinRound=1):
        node.checkin(2, 1, metrics=(2, 0.1, 0.1))
    with refused(NotPermitted, "NotJoined", node=swarm.stranger.account_address):
        swarm.stranger.checkin(2, 1, metrics=(1, 0.1, 0.1))
    with pytest.raises(ConfigError, match="metrics round 0 must be a round number from 1 on"):
        node.checkin(2, 1, metrics=(0, 0.1, 0.1))
    with pytest.raises(ConfigError, match="not a finite number"):
        node.checkin(2, 1, metrics=(1, float("nan"), 0.1))
    # a refused check-in records nothing: the node reports round 1 with its finish instead
    result = node.finish(metrics=(1, 0.25, -1.5))
    assert tx_events(swarm, result) == [
        ("MetricsReported", {"round": 1, "node": node.account_address, "loss": 250_000,
                             "metric": -1_500_000}),
        ("NodeFinished", {"node": node.account_address}),
    ]
    assert swarm.admin.checkin_weight(2, node.account_address) is None
    # once it checked in for a later round, an earlier round's metrics are refused
    outsider.checkin(2, 1)
    assert swarm.admin.round(2).status is RoundStatus.ELECTED
    swarm.leader(2).commit_merge(2, DIGEST, [other.account_address, outsider.account_address])
    other.checkin(3, 1)
    with refused(BadArgument, "MetricsNotEligible", round=1, node=other.account_address,
                 lastCheckinRound=3):
        other.finish(metrics=(1, 0.1, 0.1))
    with refused(BadArgument, "MetricsNotEligible", round=2, node=other.account_address,
                 lastCheckinRound=3):
        other.finish(metrics=(2, 0.1, 0.1))
    reported = swarm.admin.events(names={"MetricsReported"})
    assert [(e.args["round"], e.args["node"]) for e in reported] == [
        (1, other.account_address), (1, node.account_address)]


def test_a_dp_sites_privacy_rides_with_its_metrics_and_reads_back_exactly(
        make_swarm: MakeSwarm) -> None:
    """A DP site's epsilon at its delta rides with its metrics (check-in, finish, final metrics)
    as one word and is logged as PrivacyReported beside MetricsReported; a plain site's report
    logs no privacy. It reads back as sent, at the chain's precision (epsilon 1e-6, delta 1e-18);
    an infinite epsilon (no noise) is recorded as such. A word with delta outside (0, 1) is refused
    by the contract; malformed values are refused by the client before anything is sent."""
    swarm = make_swarm(nodes=3, min_peers=3, grace=1000)
    dp, plain, other = swarm.nodes
    for n in swarm.nodes:
        n.checkin(1, 1)
    swarm.leader(1).commit_merge(1, DIGEST, [n.account_address for n in swarm.nodes])
    result = dp.checkin(2, 1, metrics=(1, 0.5, 0.75, (7.98345678, 1e-5)))
    assert tx_events(swarm, result) == [
        ("MetricsReported", {"round": 1, "node": dp.account_address, "loss": 500_000,
                             "metric": 750_000}),
        ("PrivacyReported", {"round": 1, "node": dp.account_address, "epsilonE6": 7_983_457,
                             "deltaE18": 10**13}),
        ("CheckedIn", {"round": 2, "node": dp.account_address, "weight": 1}),
    ]
    assert names(swarm, plain.checkin(2, 1, metrics=(1, 0.5, 0.75, None))) == [
        "MetricsReported", "CheckedIn"]
    # the client refuses a malformed privacy before sending anything (the chain is unchanged)
    block = swarm.backend.w3.eth.block_number
    for bad, said in (((math.nan, 1e-5), "epsilon must be a number >= 0"),
                      ((-0.5, 1e-5), "epsilon must be a number >= 0"),
                      ((1.0, 0.0), r"delta must be a number in \(0, 1\)"),
                      ((1.0, 1.0), r"delta must be a number in \(0, 1\)"),
                      ((1.0, math.nan), r"delta must be a number in \(0, 1\)"),
                      ((1.0, 1e-19), "below 1e-18"),
                      ((1.0,), r"must be \(epsilon, delta\)")):
        with pytest.raises(ConfigError, match="privacy"):
            other.checkin(2, 1, metrics=(1, 0.5, 0.75, bad))
        with pytest.raises(ConfigError, match=said):
            other.finish(metrics=(1, 0.5, 0.75, bad))
    assert swarm.backend.w3.eth.block_number == block
    # the contract refuses a word whose delta is 0 or not below 1 (a client that does not pack)
    for word, delta in ((8_000_000, 0), (8_000_000 | 10**18 << 128, 10**18)):
        with refused(BadArgument, "BadPrivacy", epsilonE6=8_000_000, deltaE18=delta):
            other._transact("checkin", (2, 1, 1, 0, 0, word, bytes(32)), "checkin")
    result = other.finish(metrics=(1, 0.25, 0.5, (math.inf, 1 / 60_000)))
    assert tx_events(swarm, result)[1] == (
        "PrivacyReported", {"round": 1, "node": other.account_address,
                            "epsilonE6": 2**128 - 1, "deltaE18": 16_666_666_666_667})
    # other's finish closed round 2 (dp and plain are in); their finish carries its metrics
    members = [dp.account_address, plain.account_address]
    swarm.leader(2).commit_merge(2, DIGEST, members)
    assert names(swarm, dp.finish(metrics=(2, 0.3, 0.8, (7.99, 1e-5))))[:2] == [
        "MetricsReported", "PrivacyReported"]
    plain.finish(metrics=(2, 0.3, 0.7))
    for n in swarm.nodes:  # the final round, 3: every live site takes part
        n.checkin(3, 1)
    swarm.leader(3).commit_merge(3, DIGEST, [n.account_address for n in swarm.nodes])
    assert swarm.admin.training_finished()
    assert names(swarm, dp.report_final_metrics(0.25, 0.8, privacy=(8.0, 1e-5))) == [
        "MetricsReported", "PrivacyReported"]
    assert names(swarm, plain.report_final_metrics(0.3, 0.7)) == ["MetricsReported"]
    assert swarm.admin.privacy_reports() == {
        (1, dp.account_address): (7.983457, 1e-5),
        (1, other.account_address): (math.inf, 16_666_666_666_667 / 10**18),
        (2, dp.account_address): (7.99, 1e-5),
        (3, dp.account_address): (8.0, 1e-5),
    }


def test_the_specs_max_weight_caps_every_checkin(backend: Backend) -> None:
    """A member that declares an enormous weight cannot set the merged model alone: the spec's
    max_weight is pinned in the contract at deployment and a heavier check-in is refused."""
    spec = '{"max_weight": 100, "merge_method": "mean", "min_peers": 1, "sync_frequency": 8}'
    admin = SwarmContract.deploy(backend.w3, dev_account(0), spec, 1, 1000, 1000)
    assert admin.settings().max_weight == 100
    node = admin.with_account(dev_account(1))
    admin.authorize(node.account_address, hashlib.sha256(b"cert of the node").digest())
    node.enroll("127.0.0.1:7100")
    with refused(BadArgument, "WeightOverMax", weight=101, maxWeight=100):
        node.checkin(1, 101)
    node.checkin(1, 100)
    assert admin.checkin_weight(1, node.account_address) == 100
    with pytest.raises(ConfigError, match="max_weight 0 must be a whole number in 1..2"):
        SwarmContract.deploy(backend.w3, dev_account(0), spec.replace("100", "0"), 1, 1000, 1000)
    uncapped = SwarmContract.deploy(backend.w3, dev_account(0), '{"a": 1}', 1, 1000, 1000)
    assert uncapped.settings().max_weight == 2**96 - 1


# ------------------------------------------------------------------ views for the nodes


def accepted(call: Callable[[], TxResult]) -> bool:
    """Whether the transaction went through (True) or the contract refused it (False)."""
    try:
        call()
    except ContractReverted as exc:
        assert isinstance(exc.reason, Revert), str(exc)
        return False
    return True


def test_absent_candidates_are_what_mark_absent_accepts(make_swarm: MakeSwarm) -> None:
    """absentCandidates() is markAbsent's own rule on chain time: every site it lists is
    accepted, every other joined site refused, as chain time moves on."""
    swarm = make_swarm(nodes=4, min_peers=2, grace=0, deadline=100)
    a, b, slow, dead = swarm.nodes
    close_round(swarm, 1, [a, b, slow, dead])
    close_round(swarm, 2, [a, b, slow])
    close_round(swarm, 3, [a, b])
    slow.checkin(4, 1)  # missed round 3, but checked in for the current round
    a.finish()

    def check(expected: list[str]) -> None:
        candidates = swarm.admin.absent_candidates()
        assert candidates == expected
        for node in swarm.nodes:  # refused ones first: an accepted one changes the state
            if node.account_address not in candidates:
                assert not accepted(lambda n=node: slow.mark_absent(n.account_address)), node
        for address in candidates:
            assert accepted(lambda x=address: slow.mark_absent(x)), address
        assert swarm.admin.absent_candidates() == []

    # dead missed rounds 2 and 3 but was seen within the round deadline
    check([])
    swarm.backend.advance(40)
    check([])
    swarm.backend.advance(70)  # a deadline after dead's last call
    check([dead.account_address])
    swarm.backend.advance(300)  # b silent for three deadlines, without missed rounds
    check([b.account_address])
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (1, 2)


def test_waiting_for_and_election_due_agree_with_elect(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=4, min_peers=2, grace=1000)
    a, b, c, d = swarm.nodes
    everyone = [n.account_address for n in swarm.nodes]
    assert swarm.admin.waiting_for(1) == everyone
    assert not swarm.admin.election_due(1)
    a.checkin(1, 1)
    assert swarm.admin.waiting_for(1) == everyone[1:]
    assert not swarm.admin.election_due(1)
    assert not accepted(lambda: d.elect(1))  # TooFewCheckedIn
    b.checkin(1, 1)
    swarm.backend.advance(400)
    assert not swarm.admin.election_due(1)
    assert not accepted(lambda: d.elect(1))  # GraceNotOver
    c.finish()  # a finished site is not waited for outside the final round
    assert swarm.admin.waiting_for(1) == [d.account_address]
    swarm.backend.advance(700)
    assert swarm.admin.election_due(1)
    assert swarm.admin.waiting_for(1) == [d.account_address]
    assert names(swarm, d.elect(1)) == ["RoundClosed"]
    assert swarm.admin.waiting_for(1) == []  # not open any more
    assert not swarm.admin.election_due(1)
    assert swarm.admin.waiting_for(2) == []  # not open yet
    swarm.leader(1).commit_merge(1, DIGEST, [a.account_address, b.account_address])
    # the final round waits for every live site not set aside, finished ones included
    a.finish()
    b.finish()
    result = d.finish()
    assert ("FinalRound", {"round": 2}) in tx_events(swarm, result)
    assert swarm.admin.waiting_for(2) == everyone
    for n in (a, b, c):
        n.checkin(2, 1)
        assert not swarm.admin.election_due(2)  # grace not over
    assert swarm.admin.waiting_for(2) == [d.account_address]
    assert names(swarm, d.checkin(2, 1)) == ["CheckedIn", "RoundClosed"]  # all in: no grace


def test_waiting_for_leaves_out_absent_and_revoked_sites(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=4, min_peers=2, grace=1000)
    a, b, dead, gone = swarm.nodes
    assert gone.account_address in swarm.admin.waiting_for(1)
    swarm.admin.revoke(gone.account_address)
    assert swarm.admin.waiting_for(1) == [a.account_address, b.account_address,
                                          dead.account_address]
    swarm.backend.advance(3000)  # silent for three deadlines
    a.mark_absent(dead.account_address)
    assert swarm.admin.waiting_for(1) == [a.account_address, b.account_address]
    a.checkin(1, 1)
    assert swarm.admin.waiting_for(1) == [b.account_address]
    assert names(swarm, b.checkin(1, 1)) == ["CheckedIn", "RoundClosed"]


def test_reelect_due_agrees_with_reelect(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, deadline=600)
    assert not swarm.admin.reelect_due(1)  # open
    checkin_all(swarm, 1)
    first = swarm.leader(1)
    caller = next(n for n in swarm.nodes if n is not first)
    assert not swarm.admin.reelect_due(1)
    swarm.backend.advance(300)
    assert not swarm.admin.reelect_due(1)
    assert not accepted(lambda: caller.reelect(1))  # DeadlineNotPassed
    swarm.backend.advance(300)
    assert swarm.admin.reelect_due(1)
    assert names(swarm, caller.reelect(1))[0] == "LeaderFailed"
    assert not swarm.admin.reelect_due(1)  # a new attempt: a new deadline
    assert not accepted(lambda: caller.reelect(1))
    swarm.backend.advance(600)
    assert swarm.admin.reelect_due(1)
    second = swarm.leader(1)
    parts = [p for p in swarm.admin.round(1).participants if p != first.account_address]
    second.commit_merge(1, DIGEST, parts)
    assert not swarm.admin.reelect_due(1)  # committed
    assert not swarm.admin.reelect_due(2)


# ------------------------------------------------------------------ rounds before the previous one


def test_older_rounds_are_read_from_the_events(make_swarm: MakeSwarm) -> None:
    """The contract keeps participants and leader for the current and the previous round only;
    ``round(r)`` of an older round reads them from the events."""
    swarm = make_swarm(nodes=3, min_peers=2, grace=0, deadline=60)
    a, b, c = swarm.nodes
    checkin_all(swarm, 1, [4, 5, 6])
    first = swarm.leader(1)
    swarm.backend.advance(60)
    next(n for n in swarm.nodes if n is not first).reelect(1)
    second = swarm.leader(1)
    parts1 = swarm.admin.round(1).participants
    second.commit_merge(1, DIGEST, [p for p in parts1 if p != first.account_address])
    first.checkin(2, 1)  # back from absent
    close_round(swarm, 2, [n for n in swarm.nodes if n is not first])
    parts2 = swarm.admin.round(2).participants
    leader2 = swarm.admin.round(2).leader
    close_round(swarm, 3, [b, c])
    close_round(swarm, 4, [a, c])
    assert swarm.admin.current_round() == 5

    reader = SwarmContract(swarm.backend.w3, swarm.admin.address)  # no cached rounds
    old = reader.round(1)
    assert (old.status, old.digest, old.attempt) == (RoundStatus.COMMITTED, DIGEST, 2)
    assert old.participants == parts1
    assert old.leader == second.account_address
    old = reader.round(2)
    assert (old.participants, old.leader, old.attempt) == (parts2, leader2, 1)
    assert reader.round(3).participants == (b.account_address, c.account_address)
    assert reader.round(4).participants == (a.account_address, c.account_address)
    # the contract itself refuses the per-round views of a pruned round
    with refused(BadArgument, "RoundPruned", round=2, oldestKept=4):
        reader.checkin_weight(2, a.account_address)
    assert reader.checkin_weight(4, c.account_address) == 11


def test_an_older_round_read_from_events_leaves_out_a_site_expelled_while_it_was_open(
        make_swarm: MakeSwarm) -> None:
    """A site revoked after its check-in leaves the open round (its slot taken by the last
    entry): the events of a pruned round give the participants the contract elected with, in
    its order, not every check-in."""
    swarm = make_swarm(nodes=4, min_peers=2, grace=600)
    a, b, c, d = swarm.nodes
    for node in (a, b, c):
        node.checkin(1, 10)
    swarm.admin.revoke(b.account_address)  # expels b from the open round: [a, c]
    d.checkin(1, 10)  # every active site is in: elected
    live = swarm.admin.round(1).participants
    assert live == (a.account_address, c.account_address, d.account_address)
    swarm.leader(1).commit_merge(1, DIGEST, live)
    close_round(swarm, 2, [a, c, d])
    close_round(swarm, 3, [a, c, d])
    reader = SwarmContract(swarm.backend.w3, swarm.admin.address)  # no cached rounds
    assert reader.round(1).participants == live


def test_a_refused_view_says_what_to_do(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=2, min_peers=2, grace=0)
    for r in (1, 2, 3):
        close_round(swarm, r, swarm.nodes)
    with refused(BadArgument, "RoundPruned") as exc:
        swarm.admin.checkin_weight(1, swarm.nodes[0].account_address)
    assert exc.value.reason.row.hint in str(exc.value)
