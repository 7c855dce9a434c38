"""Every rule of SwarmLearning.sol, on the in-process tester and on a real anvil."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pytest
from web3 import Web3

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import ABI, BYTECODE, SwarmContract, TxResult
from swarmnode.chain.models import RoundStatus
from swarmnode.chain.tx import TxSender
from swarmnode.errors import ConfigError, ContractReverted

if TYPE_CHECKING:
    from conftest import Backend, Swarm

MakeSwarm = Callable[..., "Swarm"]
DIGEST = bytes(range(32))


def tx_events(swarm: Swarm, result: TxResult) -> list[tuple[str, dict]]:
    """(name, args) of the events emitted by one transaction, in order."""
    events = swarm.admin.events(from_block=result.block, to_block=result.block)
    return [(e.name, e.args) for e in events if e.tx_hash == result.tx_hash]


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


def refused(reason_part: str) -> pytest.RaisesExc:
    return pytest.raises(ContractReverted, match=reason_part)


def checkin_all(swarm: Swarm, round: int, weights: Sequence[int] | None = None) -> TxResult:
    result = None
    for i, node in enumerate(swarm.nodes):
        result = node.checkin(round, weights[i] if weights else 10 * (i + 1))
    assert result is not None
    return result


# ------------------------------------------------------------------ deployment and enrolment


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


def test_constructor_checks_spec_hash_and_settings(backend: Backend, spec_json: str) -> None:
    with refused("minPeers is 0") as exc:
        SwarmContract.deploy(backend.w3, dev_account(0), spec_json, 0, 5, 60)
    assert exc.value.reason == "minPeers is 0; it must be at least 1"
    with refused("roundDeadlineSeconds is 0"):
        SwarmContract.deploy(backend.w3, dev_account(0), spec_json, 1, 5, 0)
    factory = backend.w3.eth.contract(abi=ABI, bytecode=BYTECODE)
    wrong = factory.constructor(b"\x01" * 32, spec_json, 1, 0, 10, 5).data_in_transaction
    sender = TxSender(backend.w3, dev_account(0))
    with refused("is not the SHA-256 of specJson"):
        sender.send({"data": wrong}, "deploy", lambda r: ContractReverted(r, reason=r))
    no_weight = factory.constructor(
        hashlib.sha256(spec_json.encode()).digest(), spec_json, 1, 0, 10, 0
    ).data_in_transaction
    with refused("maxWeight is 0; it must be at least 1"):
        sender.send({"data": no_weight}, "deploy", lambda r: ContractReverted(r, reason=r))


def test_authorize_enroll_update_and_rotate(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=2, enroll=False)
    node = swarm.nodes[0]
    addr = node.account_address
    info = swarm.admin.node(addr)
    assert info.authorized and not info.enrolled and info.state == "authorized"
    result = node.enroll("10.0.0.5:7100")
    assert tx_events(swarm, result) == [
        ("Enrolled", {"node": addr, "endpoint": "10.0.0.5:7100",
                      "fingerprint": swarm.fingerprint_of(addr)})
    ]
    info = swarm.admin.node(addr)
    assert (info.enrolled, info.endpoint, info.state) == (True, "10.0.0.5:7100", "active")
    assert info.last_seen == swarm.backend.w3.eth.get_block(result.block)["timestamp"]
    assert swarm.admin.active_count() == 1
    assert [n.address for n in swarm.admin.nodes()] == [addr]

    result = node.update_endpoint("10.0.0.5:7200")
    assert tx_events(swarm, result) == [
        ("EndpointUpdated", {"node": addr, "endpoint": "10.0.0.5:7200"})
    ]
    assert swarm.admin.node(addr).endpoint == "10.0.0.5:7200"

    rotated = bytes(32 * [7])
    result = swarm.admin.authorize(addr, rotated)
    assert tx_events(swarm, result) == [("Authorized", {"node": addr, "fingerprint": rotated})]
    assert swarm.admin.node(addr).fingerprint == rotated
    assert swarm.admin.node(addr).enrolled


def test_only_admin_authorizes_and_revokes(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=1)
    with refused("only the admin .* may authorize"):
        swarm.stranger.authorize(swarm.stranger.account_address, swarm.fingerprint_of("x"))
    with refused("only the admin .* may revoke"):
        swarm.nodes[0].revoke(swarm.nodes[0].account_address)
    with refused("certificate fingerprint is zero"):
        swarm.admin.authorize(swarm.stranger.account_address, bytes(32))


def test_enrolment_rules(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=1)
    with refused("is not authorised; ask the admin") as exc:
        swarm.stranger.enroll("127.0.0.1:7000")
    assert swarm.stranger.account_address in exc.value.reason
    with refused("already enrolled"):
        swarm.nodes[0].enroll("127.0.0.1:7001")
    swarm.admin.authorize(swarm.stranger.account_address, swarm.fingerprint_of("s"))
    with refused("endpoint is empty"):
        swarm.stranger.enroll("")


# ------------------------------------------------------------------ check-in and election


def test_checkin_rules_and_weights(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3)
    a, b, _ = swarm.nodes
    with refused(f"node {swarm.stranger.account_address} is not enrolled"):
        swarm.stranger.checkin(1, 5)
    with refused("round 2 is not open for check-in; the current round is 1"):
        a.checkin(2, 5)
    result = a.checkin(1, 123)
    assert tx_events(swarm, result) == [
        ("CheckedIn", {"round": 1, "node": a.account_address, "weight": 123})
    ]
    with refused(f"node {a.account_address} already checked in for round 1"):
        a.checkin(1, 5)
    b.checkin(1, 0)
    info = swarm.admin.round(1)
    assert info.status is RoundStatus.OPEN and info.leader is None
    assert info.participants == (a.account_address, b.account_address)
    assert info.first_checkin_at == swarm.backend.w3.eth.get_block(result.block)["timestamp"]
    assert swarm.admin.checkin_weight(1, a.account_address) == 123
    assert swarm.admin.checkin_weight(1, b.account_address) == 0
    assert swarm.admin.checkin_weight(1, swarm.nodes[2].account_address) is None
    with pytest.raises(ConfigError, match="round 0 does not exist"):
        swarm.admin.round(0)
    with refused("is over this training's maximum weight"):
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
    if swarm.backend.name == "anvil":  # calls run in the latest block: the closing one
        assert info.leader is None  # its hash is not known inside it
        with refused(f"round 1: its leader is drawn from the hash of block {last.block}, not"):
            swarm.handle(expected).commit_merge(1, DIGEST, info.participants)
    pinned = drawn(swarm, 1)
    assert tx_events(swarm, pinned) == [
        ("LeaderElected", {"round": 1, "leader": expected, "attempt": 1, "participantCount": 3})
    ]
    with refused(f"round 1: leader {expected} is already drawn"):
        drawn(swarm, 1)
    info = swarm.admin.round(1)
    assert (info.leader, info.attempt) == (expected, 1)
    assert info.elected_at == swarm.backend.w3.eth.get_block(last.block)["timestamp"]
    assert swarm.admin.elect_ready_at(1) is None


def test_all_active_path_waits_until_min_peers_are_enrolled(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=2, min_peers=3, spare=1)
    a, b = swarm.nodes
    a.checkin(1, 1)
    last = b.checkin(1, 2)  # every enrolled node is in, but 2 < min_peers
    assert [name for name, _ in tx_events(swarm, last)] == ["CheckedIn"]
    assert swarm.admin.round(1).status is RoundStatus.OPEN
    swarm.backend.advance(1000)
    with refused("round 1: 2 of 3 min peers checked in"):
        a.elect(1)
    (c,) = swarm.spare
    c.enroll("127.0.0.1:7199")
    result = c.checkin(1, 3)
    assert [name for name, _ in tx_events(swarm, result)] == ["CheckedIn", "RoundClosed"]


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
    with refused("round 1: 1 of 2 min peers checked in"):
        c.elect(1)
    assert swarm.admin.elect_ready_at(1) is None
    b.checkin(1, 2)
    assert swarm.admin.elect_ready_at(1) == t0 + 1000
    with refused(f"round 1: grace period ends at {t0 + 1000} "):
        c.elect(1)
    with refused("not enrolled"):
        swarm.stranger.elect(1)
    swarm.backend.advance(1000)
    result = c.elect(1)  # any enrolled node may elect, not only participants
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
    with refused("round 1 is already elected"):
        c.checkin(1, 3)
    with refused("round 1 is already elected"):
        a.elect(1)


# ------------------------------------------------------------------ merge commit


def test_commit_rules_and_success(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, spare=1)
    checkin_all(swarm, 1)
    leader = swarm.leader(1)
    others = [n for n in swarm.nodes if n is not leader]
    parts = list(swarm.admin.round(1).participants)
    with refused(f"round 1: only its leader {leader.account_address} .attempt 1. may commit"):
        others[0].commit_merge(1, DIGEST, parts)
    with refused(f"member {swarm.spare[0].account_address} did not check in"):
        leader.commit_merge(1, DIGEST, [leader.account_address, swarm.spare[0].account_address])
    with refused(f"member {others[0].account_address} is listed twice"):
        leader.commit_merge(1, DIGEST, [others[0].account_address, leader.account_address,
                                        others[0].account_address])
    with refused("round 1: 1 members given, at least 2 needed"):
        leader.commit_merge(1, DIGEST, [leader.account_address])
    with refused("round 1: 0 members given"):
        leader.commit_merge(1, DIGEST, [])
    with refused("digest is zero"):
        leader.commit_merge(1, bytes(32), parts)

    members = [leader.account_address, others[1].account_address]  # a subset is fine
    result = leader.commit_merge(1, DIGEST, members)
    assert tx_events(swarm, result) == [
        ("MergeCommitted", {"round": 1, "leader": leader.account_address, "digest": DIGEST,
                            "members": members})
    ]
    info = swarm.admin.round(1)
    assert (info.status, info.digest) == (RoundStatus.COMMITTED, DIGEST)
    assert swarm.admin.current_round() == 2
    assert swarm.admin.round(2).status is RoundStatus.OPEN
    with refused("round 1 is already committed"):
        leader.commit_merge(1, DIGEST, members)
    with refused("round 2 is open .no leader yet."):
        leader.commit_merge(2, DIGEST, members)
    with refused("round 1 is not open for check-in; the current round is 2"):
        others[0].checkin(1, 1)


def test_commit_refuses_a_revoked_member(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    checkin_all(swarm, 1)
    leader = swarm.leader(1)
    victim = next(n for n in swarm.nodes if n is not leader)
    swarm.admin.revoke(victim.account_address)
    with refused(f"member {victim.account_address} is revoked"):
        leader.commit_merge(1, DIGEST, [leader.account_address, victim.account_address])


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
    with refused(f"only its participants may re-elect; {c.account_address} did not check in"):
        c.reelect(1)
    with refused(f"leader {first.account_address} has until {t_elected + 300} to commit"):
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
    with refused("only its leader"):
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
    with refused("round 1 is abandoned"):
        survivor.reelect(1)
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
    assert [n for n, _ in tx_events(swarm, commit)] == ["LeaderElected", "MergeCommitted"]
    info = swarm.admin.round(1)
    assert (info.status, info.attempt, info.leader) == (RoundStatus.COMMITTED, 2, expected)


# ------------------------------------------------------------------ revocation


def test_revoked_node_can_do_nothing(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    a.checkin(1, 1)
    result = swarm.admin.revoke(a.account_address)
    assert tx_events(swarm, result) == [("Revoked", {"node": a.account_address})]
    assert swarm.admin.node(a.account_address).state == "revoked"
    assert swarm.admin.active_count() == 2
    assert swarm.admin.round(1).participants == ()  # it left the open round
    for call in (lambda: a.checkin(1, 1), lambda: a.enroll("x:1"), lambda: a.finish(),
                 lambda: a.update_endpoint("x:2"), lambda: a.report_metrics(1, 0.1, 0.2),
                 lambda: a.elect(1), lambda: a.reelect(1)):
        with refused(f"node {a.account_address} is revoked"):
            call()
    with refused("was revoked and cannot be authorised again"):
        swarm.admin.authorize(a.account_address, swarm.fingerprint_of("new"))
    with refused("is already revoked"):
        swarm.admin.revoke(a.account_address)
    with refused("is not authorised"):
        swarm.admin.revoke(swarm.stranger.account_address)
    b.checkin(1, 1)
    last = c.checkin(1, 1)  # the two remaining active nodes complete the round
    assert [n for n, _ in tx_events(swarm, last)] == ["CheckedIn", "RoundClosed"]
    assert swarm.admin.round(1).participants == (b.account_address, c.account_address)


def test_revoking_the_missing_node_elects(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    a.checkin(1, 1)
    b.checkin(1, 1)
    result = swarm.admin.revoke(c.account_address)
    assert [n for n, _ in tx_events(swarm, result)] == ["Revoked", "RoundClosed"]
    assert swarm.leader(1).account_address in (a.account_address, b.account_address)


# ------------------------------------------------------------------ end of training


def test_finish_fixes_the_final_round_that_every_node_joins(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    checkin_all(swarm, 1)
    swarm.leader(1).commit_merge(1, DIGEST, swarm.admin.round(1).participants)

    assert [n for n, _ in tx_events(swarm, a.finish())] == ["NodeFinished"]
    assert swarm.admin.node(a.account_address).state == "finished"
    assert swarm.admin.active_count() == 2
    with refused("already finished"):
        a.finish()
    b.checkin(2, 1)
    last = c.checkin(2, 1)  # a finished node is not required outside the final round
    assert [n for n, _ in tx_events(swarm, last)] == ["CheckedIn", "RoundClosed"]
    swarm.leader(2).commit_merge(2, DIGEST, [b.account_address, c.account_address])

    b.finish()
    result = c.finish()
    assert tx_events(swarm, result) == [("NodeFinished", {"node": c.account_address}),
                                        ("FinalRound", {"round": 3})]
    assert swarm.admin.final_round() == 3 and swarm.admin.active_count() == 0
    a.checkin(3, 0)
    b.checkin(3, 4)
    assert swarm.admin.round(3).status is RoundStatus.OPEN  # the final round waits for all
    assert swarm.admin.round(3).is_final
    last = c.checkin(3, 4)
    assert [n for n, _ in tx_events(swarm, last)] == ["CheckedIn", "RoundClosed"]
    final_digest = bytes(32 * [9])
    parts = list(swarm.admin.round(3).participants)
    result = swarm.leader(3).commit_merge(3, final_digest, parts)
    assert [e for e in tx_events(swarm, result) if e[0] == "TrainingFinished"] == [
        ("TrainingFinished", {"round": 3, "digest": final_digest})
    ]
    assert swarm.admin.training_finished()
    assert swarm.admin.round(3).status is RoundStatus.COMMITTED
    with refused("the training finished with round 3; nothing more is accepted"):
        a.checkin(4, 1)
    with refused("the training finished"):
        swarm.admin.authorize(swarm.stranger.account_address, swarm.fingerprint_of("late"))
    swarm.nodes[0].report_metrics(3, 0.1, 0.9)  # the final model's evaluation is still recorded


def test_finishing_node_completes_the_quorum(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2)
    a, b, c = swarm.nodes
    a.checkin(1, 1)
    b.checkin(1, 1)
    result = c.finish()
    assert [n for n, _ in tx_events(swarm, result)] == ["NodeFinished", "RoundClosed"]
    info = swarm.admin.round(1)
    assert info.participants == (a.account_address, b.account_address)
    assert swarm.leader(1).account_address == expected_pick(swarm.backend.w3, result.block, 1,
                                                            info.participants)


def test_final_round_follows_an_elected_round_and_closes_enrolment(
    make_swarm: MakeSwarm,
) -> None:
    swarm = make_swarm(nodes=2, min_peers=2, spare=1)
    a, b = swarm.nodes
    checkin_all(swarm, 1)
    a.finish()
    result = b.finish()
    assert ("FinalRound", {"round": 2}) in tx_events(swarm, result)
    assert swarm.admin.round(1).status is RoundStatus.ELECTED
    with refused("enrolment is closed: the final round 2 is fixed"):
        swarm.spare[0].enroll("127.0.0.1:7300")
    swarm.leader(1).commit_merge(1, DIGEST, [a.account_address, b.account_address])
    a.checkin(2, 1)
    b.checkin(2, 1)
    swarm.leader(2).commit_merge(2, DIGEST, [a.account_address, b.account_address])
    assert swarm.admin.training_finished()


# ------------------------------------------------------------------ absent nodes


def names(swarm: Swarm, result: TxResult) -> list[str]:
    return [name for name, _ in tx_events(swarm, result)]


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
    with refused(f"it can be marked absent from round 3 .the current round is 2., or once "
                 f"silent until {seen + 300}"):
        a.mark_absent(dead.account_address)
    swarm.backend.advance(300)
    assert swarm.admin.absent_candidates() == [dead.account_address]
    result = a.mark_absent(dead.account_address)
    assert [n for n, _ in tx_events(swarm, result)] == ["NodeAbsent", "FinalRound"]
    assert swarm.admin.final_round() == 2


def test_mark_absent_rules_and_success(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=5, min_peers=2, grace=0, spare=1)
    a, b, dead, done, gone = swarm.nodes
    addr = dead.account_address
    swarm.admin.revoke(gone.account_address)
    done.finish()
    assert swarm.admin.settings().absent_after_rounds == 2
    with refused(f"node {addr} enrolled in round 1; it can be marked absent from round 3 "
                 r"\(the current round is 1\)"):
        a.mark_absent(addr)
    close_round(swarm, 1, [a, b])
    close_round(swarm, 2, [a, b])
    # two rounds missed, but not yet silent for the round deadline (1000 s): a slow live site
    assert swarm.admin.absent_candidates() == []
    with refused(f"node {addr} was last seen at .*; it can be marked absent from "):
        a.mark_absent(addr)
    swarm.backend.advance(1000)
    assert swarm.admin.absent_candidates() == [addr]
    with refused(f"node {a.account_address} last checked in for round 2; it can be marked absent "
                 r"from round 4 \(the current round is 3\)"):
        b.mark_absent(a.account_address)
    with refused(f"node {swarm.stranger.account_address} is not enrolled"):
        swarm.stranger.mark_absent(addr)
    with refused(f"node {gone.account_address} is revoked; it can take no further part"):
        gone.mark_absent(addr)
    with refused(f"node {gone.account_address} is revoked"):
        a.mark_absent(gone.account_address)
    with refused(f"node {done.account_address} finished; it cannot be marked absent"):
        a.mark_absent(done.account_address)
    with refused(f"node {swarm.spare[0].account_address} is not enrolled"):
        a.mark_absent(swarm.spare[0].account_address)

    assert swarm.admin.active_count() == 3
    result = done.mark_absent(addr)  # a finished node may mark too
    assert tx_events(swarm, result) == [("NodeAbsent", {"node": addr, "lastCheckinRound": 0})]
    info = swarm.admin.node(addr)
    assert (info.absent, info.state, info.last_checkin_round, info.enrolled_round) == (
        True, "absent", 0, 1)
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (2, 1)
    assert swarm.admin.absent_candidates() == []
    with refused(f"node {addr} is already absent"):
        b.mark_absent(addr)
    a.checkin(3, 1)
    last = b.checkin(3, 1)  # every active node is in: no grace wait for the absent one
    assert names(swarm, last) == ["CheckedIn", "RoundClosed"]
    swarm.admin.revoke(addr)  # revoking an absent node leaves the counts consistent
    assert (swarm.admin.active_count(), swarm.admin.absent_count()) == (2, 0)
    assert swarm.admin.node(addr).state == "revoked"


def test_mark_absent_unblocks_the_last_active_node(make_swarm: MakeSwarm) -> None:
    swarm = make_swarm(nodes=3, min_peers=2, grace=1000)
    a, b, dead = swarm.nodes
    close_round(swarm, 1, [a, b, dead])
    close_round(swarm, 2, [a, b])  # the dead node is gone since round 2
    b.finish()
    a.checkin(3, 1)  # 1 of 2 min peers, and the dead node never checks in: the swarm hangs
    swarm.backend.advance(1000)
    with refused("round 3: 1 of 2 min peers checked in"):
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


def test_report_metrics(make_swarm: MakeSwarm) -> None:
    """Metrics are recorded for played (committed) rounds, by their participants only."""
    swarm = make_swarm(nodes=3, min_peers=2, grace=1000)
    node, other, outsider = swarm.nodes
    with refused("round 1 has no merged model on chain .not played"):
        node.report_metrics(1, 0.25, -1.5)  # a round that never happened
    node.checkin(1, 1)
    other.checkin(1, 1)
    with refused("round 1 has no merged model on chain"):
        node.report_metrics(1, 0.25, -1.5)  # not committed yet
    swarm.backend.advance(1000)
    outsider.elect(1)
    swarm.leader(1).commit_merge(1, DIGEST, [node.account_address, other.account_address])
    with refused(f"node {outsider.account_address} did not take part in round 1"):
        outsider.report_metrics(1, 0.25, -1.5)
    other.checkin(2, 1)  # checked in since: membership is read from the round itself
    other.report_metrics(1, 0.5, 0.5)
    result = node.report_metrics(1, 0.25, -1.5)
    assert tx_events(swarm, result) == [
        ("MetricsReported", {"round": 1, "node": node.account_address, "loss": 250_000,
                             "metric": -1_500_000})
    ]
    with refused("not enrolled"):
        swarm.stranger.report_metrics(1, 0.1, 0.1)
    with refused("round 0 does not exist"):
        node.report_metrics(0, 0.1, 0.1)
    with pytest.raises(ConfigError, match="not a finite number"):
        node.report_metrics(1, float("nan"), 0.1)


def test_the_specs_max_weight_caps_every_checkin(backend: Backend) -> None:
    """A member that declares an enormous weight cannot set the merged model alone: the spec's
    max_weight is pinned in the contract at deployment and a heavier check-in is refused."""
    spec = '{"max_weight": 100, "merge_method": "mean", "min_peers": 1, "sync_frequency": 8}'
    admin = SwarmContract.deploy(backend.w3, dev_account(0), spec, 1, 1000, 1000)
    assert admin.settings().max_weight == 100
    node = admin.with_account(dev_account(1))
    admin.authorize(node.account_address, hashlib.sha256(b"cert of the node").digest())
    node.enroll("127.0.0.1:7100")
    with refused("weight 101 is over this training's maximum weight 100 .the spec's max_weight."):
        node.checkin(1, 101)
    node.checkin(1, 100)
    assert admin.checkin_weight(1, node.account_address) == 100
    with pytest.raises(ConfigError, match="max_weight 0 must be a whole number in 1..2"):
        SwarmContract.deploy(backend.w3, dev_account(0), spec.replace("100", "0"), 1, 1000, 1000)
    uncapped = SwarmContract.deploy(backend.w3, dev_account(0), '{"a": 1}', 1, 1000, 1000)
    assert uncapped.settings().max_weight == 2**96 - 1
