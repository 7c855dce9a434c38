"""The contracts' custom errors, decoded by selector into the SwarmError tree.

Each error the contracts can revert with (``error Name(type arg, ...)`` in ``contracts/``) has one
row in :data:`TABLE`: the :class:`~swarmnode.errors.ContractReverted` subclass it raises, a message
built from its typed arguments and a hint saying what to do. A test walks both ABIs and fails on an
error without a row (or a row without an error), so a new revert cannot lose its hint. No message
is matched by substring anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from eth_abi import decode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from swarmnode.chain.compile import CONTRACT_NAMES, load_artifact
from swarmnode.errors import BadArgument, ContractReverted, NotNow, NotPermitted

__all__ = ["TABLE", "Revert", "decode_revert", "error_abis"]

_STATUS = ("open (no leader yet)", "elected", "already committed", "abandoned")
_SETTING = ("min_peers", "the round deadline", "max_weight")


@dataclass(frozen=True)
class Row:
    cls: type[ContractReverted]
    message: Callable[[Mapping[str, Any]], str]
    hint: str


def _r(cls: type[ContractReverted], message: Callable[[Mapping[str, Any]], str], hint: str) -> Row:
    return Row(cls, message, hint)


_STATUS_HINT = "read the round with `swarmnode status` and act on its state"
_ENROLL_HINT = ("the site enrols once per consortium with `swarmnode enroll` (its kit's node "
                "does it at start)")

TABLE: dict[str, Row] = {
    # ---------------------------------------------------------------- the registry
    "NotAdmin": _r(NotPermitted, lambda a: f"only the registry's admin {a['admin']} may do this; "
                   f"{a['caller']} is not", "sign with the consortium admin's key"),
    "ZeroAddress": _r(BadArgument, lambda a: "the site address is zero",
                      "pass the site's chain address (0x and 40 hex digits)"),
    "ZeroFingerprint": _r(BadArgument, lambda a: "the certificate fingerprint is zero",
                          "pass the SHA-256 of the site's certificate (`--cert node.pem`)"),
    "SiteRevoked": _r(NotPermitted, lambda a: f"site {a['site']} is revoked for good",
                      "give the site a new key pair (a new chain address) and authorise that"),
    "SiteNotAuthorized": _r(NotPermitted, lambda a: f"site {a['site']} is not authorised",
                            "ask the consortium admin to run `swarmnode authorize <address> "
                            "--cert <node.pem>`"),
    "SiteAlreadyRevoked": _r(NotNow, lambda a: f"site {a['site']} is already revoked",
                             "nothing to do"),
    "SiteAlreadyEnrolled": _r(NotNow, lambda a: f"site {a['site']} is already enrolled",
                              "nothing to do; a new endpoint goes through updateEndpoint"),
    "SiteNotEnrolled": _r(NotPermitted, lambda a: f"site {a['site']} is not enrolled",
                          _ENROLL_HINT),
    "EmptyEndpoint": _r(BadArgument, lambda a: "the endpoint is empty",
                        "pass the peer API's host:port"),
    "RegistryFull": _r(NotNow, lambda a: f"the registry holds {a['sites']} sites, its maximum",
                       "deploy a new registry for more sites"),
    "NotATraining": _r(BadArgument, lambda a: f"{a['training']} is not a SwarmTraining of this "
                       "registry", "deploy the training with `swarmnode training deploy`"),
    "NotEnoughGasToExpel": _r(BadArgument, lambda a: f"not enough gas to expel the site from "
                              f"{a['trainingsLeft']} more trainings ({a['gasEach']} each)",
                              "send the revocation with more gas (estimate it first)"),
    "TrainingAlreadyAdded": _r(NotNow, lambda a: f"training {a['training']} is already listed",
                               "nothing to do"),
    # ---------------------------------------------------------------- a training: deployment
    "SpecHashMismatch": _r(BadArgument, lambda a: f"specHash {a['given']} is not the SHA-256 of "
                           f"specJson ({a['actual']})", "pass sha256 of the UTF-8 spec JSON"),
    "ZeroSetting": _r(BadArgument, lambda a: f"{_SETTING[min(int(a['which']), 2)]} is 0",
                      "it must be at least 1: fix the training spec"),
    "NotRegistryAdmin": _r(NotPermitted, lambda a: f"only the registry's admin {a['admin']} may "
                           f"deploy its trainings; {a['caller']} is not",
                           "deploy with the consortium admin's key"),
    # ---------------------------------------------------------------- a training: sites
    "TrainingOver": _r(NotNow, lambda a: f"the training finished with round {a['finalRound']}; "
                       "nothing more is accepted", "take the final model (`swarmnode status`)"),
    "NotEnrolled": _r(NotPermitted, lambda a: f"site {a['node']} is not enrolled in the "
                      "consortium's registry", _ENROLL_HINT),
    "Revoked": _r(NotPermitted, lambda a: f"site {a['node']} is revoked; it can take no further "
                  "part", "the consortium admin revoked it in the registry: ask them why"),
    "NotJoined": _r(NotPermitted, lambda a: f"site {a['node']} has not joined this training",
                    "start its node with this training's contract (it joins at start)"),
    "AlreadyJoined": _r(NotNow, lambda a: f"site {a['node']} already joined this training",
                        "nothing to do; a new endpoint goes through updateEndpoint"),
    "JoinClosed": _r(NotNow, lambda a: f"joining is closed: the final round {a['finalRound']} is "
                     "fixed", "join the consortium's next training"),
    "NoMaskKey": _r(NotNow, lambda a: f"site {a['node']} has no key in the registry and this "
                    "training uses secure aggregation (a site joins with its key)",
                    "start the site's node for this training: it posts its secure-aggregation key "
                    "(SwarmRegistry.setPublicKey), then joins"),
    "LowOrderMaskKey": _r(NotNow, lambda a: f"site {a['node']}'s key in the registry "
                          f"({a['key']}) is a low-order X25519 point (no pair key "
                          "can be made with it) and this training uses secure aggregation",
                          "start the site's node for this training: it posts its own "
                          "secure-aggregation key (secagg.key, SwarmRegistry.setPublicKey), then "
                          "joins"),
    "TrainingFull": _r(NotNow, lambda a: f"the training holds {a['members']} sites, its maximum",
                       "deploy another training"),
    # ---------------------------------------------------------------- a training: rounds
    "RoundZero": _r(BadArgument, lambda a: "round 0 does not exist; rounds are numbered from 1",
                    "pass a round from 1 on"),
    "RoundNotOpen": _r(NotNow, lambda a: f"round {a['round']} is not open; the current round is "
                       f"{a['currentRound']}", _STATUS_HINT),
    "RoundAlreadyElected": _r(NotNow, lambda a: f"round {a['round']} is already elected (leader "
                              f"{a['leader']})", "take the round's merged model and check in "
                              "for the next round"),
    "AlreadyCheckedIn": _r(NotNow, lambda a: f"site {a['node']} already checked in for round "
                           f"{a['round']}", "wait for the round's election"),
    "WeightOverMax": _r(BadArgument, lambda a: f"weight {a['weight']} is over this training's "
                        f"maximum weight {a['maxWeight']} (the spec's max_weight)",
                        "lower num_samples or node_weight, or train with a larger max_weight"),
    "TooFewCheckedIn": _r(NotNow, lambda a: f"round {a['round']}: {a['checkedIn']} of "
                          f"{a['minPeers']} min peers checked in",
                          "wait for more sites to check in, then elect again"),
    "GraceNotOver": _r(NotNow, lambda a: f"round {a['round']}: the grace period ends at "
                       f"{a['readyAt']} (chain time now {a['now_']})",
                       "call elect again after that time"),
    "RoundNotElected": _r(NotNow, lambda a: f"round {a['round']} is "
                          f"{_STATUS[min(int(a['status']), 3)]}; this needs an elected, "
                          "uncommitted round", _STATUS_HINT),
    "LeaderNotDrawn": _r(NotNow, lambda a: f"round {a['round']}: its leader is drawn from the hash "
                         f"of block {a['drawBlock']}, not known yet",
                         "try again from a later block"),
    "LeaderAlreadyDrawn": _r(NotNow, lambda a: f"round {a['round']}: leader {a['leader']} is "
                             "already drawn", "nothing to do"),
    "NotLeader": _r(NotPermitted, lambda a: f"round {a['round']}: only its leader {a['leader']} "
                    f"may commit; {a['caller']} is not",
                    "only the elected leader commits; the others pull its merged model"),
    "ZeroDigest": _r(BadArgument, lambda a: "the digest is zero",
                     "pass the merged model's digest"),
    "TooFewMembers": _r(BadArgument, lambda a: f"round {a['round']}: {a['given']} members given, "
                        f"at least {a['needed']} needed (min of min_peers and the participants)",
                        "merge the updates of more participants"),
    "MemberNotCheckedIn": _r(BadArgument, lambda a: f"round {a['round']}: member {a['member']} "
                             "did not check in for this round", "list only the round's "
                             "participants"),
    "MemberRevoked": _r(BadArgument, lambda a: f"round {a['round']}: member {a['member']} is "
                        "revoked", "merge without the revoked site's update"),
    "MemberListedTwice": _r(BadArgument, lambda a: f"round {a['round']}: member {a['member']} is "
                            "listed twice", "list each member once"),
    "NotParticipant": _r(NotPermitted, lambda a: f"round {a['round']}: only its participants "
                         f"may re-elect; {a['node']} did not check in",
                         "wait for the next round"),
    "DeadlineNotPassed": _r(NotNow, lambda a: f"round {a['round']}: leader {a['leader']} has "
                            f"until {a['due']} to commit (chain time now {a['now_']})",
                            "wait for the round deadline, then re-elect"),
    "AlreadyFinished": _r(NotNow, lambda a: f"site {a['node']} already finished",
                          "nothing to do; it takes the final model"),
    "FinishedNotAbsent": _r(NotNow, lambda a: f"site {a['node']} finished; it cannot be marked "
                            "absent", "only a site that neither finished nor was revoked can be"),
    "AlreadyAbsent": _r(NotNow, lambda a: f"site {a['node']} is already absent",
                        "nothing to do; a check-in by that site brings it back"),
    "CheckedInCurrentRound": _r(NotNow, lambda a: f"site {a['node']} checked in for the current "
                                f"round {a['round']}", "it is not absent"),
    "AbsentTooEarly": _r(NotNow, lambda a: f"site {a['node']} can be marked absent from round "
                         f"{a['fromRound']} (the current round is {a['currentRound']}), or once "
                         f"silent until {a['silentUntil']}",
                         "wait until then; the site may still come back"),
    "SeenRecently": _r(NotNow, lambda a: f"site {a['node']} was seen recently; it can be marked "
                       f"absent from {a['quietUntil']} (chain time now {a['now_']})",
                       "wait until then; the site may still come back"),
    "MetricsNotEligible": _r(BadArgument, lambda a: f"metrics of round {a['round']} from "
                             f"{a['node']} refused: a site reports only the committed round it "
                             f"last checked in for ({a['lastCheckinRound']})",
                             "report the metrics of that round, with the next check-in"),
    "BadPrivacy": _r(BadArgument, lambda a: f"privacy refused: epsilon x1e6 {a['epsilonE6']} "
                     f"at delta x1e18 {a['deltaE18']} (delta must be in (0, 1))",
                     "send (epsilon, delta) through the chain client, which packs it "
                     "(swarmnode.chain.epsilon.pack), or 0 for a site without DP"),
    "NotRevoked": _r(BadArgument, lambda a: f"site {a['node']} is not revoked in the registry",
                     "only the registry's revoked sites are expelled from a training"),
    "NotListed": _r(NotNow, lambda a: f"training {a['training']} is not listed in its registry "
                    "yet", "the registry's admin lists it (`swarmnode training deploy` does)"),
    "RoundPruned": _r(BadArgument, lambda a: f"round {a['round']}'s participants are no longer "
                      f"held in storage (rounds from {a['oldestKept']} are)",
                      "read the round's CheckedIn and MergeCommitted events"),
}


def error_abis() -> dict[bytes, dict[str, Any]]:
    """Every custom error of the contracts, by its 4-byte selector."""
    out: dict[bytes, dict[str, Any]] = {}
    for name in CONTRACT_NAMES:
        for entry in load_artifact(name)["abi"]:
            if entry["type"] == "error":
                types = ",".join(i["type"] for i in entry["inputs"])
                out[function_signature_to_4byte_selector(f"{entry['name']}({types})")] = entry
    return out


_BY_SELECTOR = error_abis()


class Revert(str):
    """A decoded revert: the message as a string, plus the error's name, arguments and row."""

    name: str
    args: dict[str, Any]
    row: Row

    def __new__(cls, name: str, args: dict[str, Any], row: Row) -> Revert:
        self = super().__new__(cls, f"{name}: {row.message(args)}")
        self.name, self.args, self.row = name, args, row
        return self


def _plain(value: Any, abi_type: str) -> Any:
    if abi_type == "address":
        return to_checksum_address(value)
    if abi_type.startswith("bytes"):
        return "0x" + bytes(value).hex()
    return value


def decode_revert(data: bytes | str | None) -> Revert | None:
    """The contracts' custom error in revert ``data`` (bytes or 0x-hex), or None when the data is
    not one of theirs (a string reason, a panic, nothing)."""
    if data is None:
        return None
    if isinstance(data, str):
        text = data[2:] if data.startswith("0x") else data
        try:
            data = bytes.fromhex(text)
        except ValueError:
            return None
    entry = _BY_SELECTOR.get(bytes(data[:4]))
    if entry is None:
        return None
    types = [i["type"] for i in entry["inputs"]]
    try:
        values = decode(types, bytes(data[4:]))
    except Exception:  # noqa: BLE001 - malformed data is simply not one of ours
        return None
    args = {i["name"]: _plain(v, i["type"]) for i, v in zip(entry["inputs"], values, strict=True)}
    row = TABLE.get(entry["name"])
    if row is None:  # the ABI test keeps this from happening; say so rather than guess
        row = Row(ContractReverted, lambda a: f"{entry['name']}{a}", "see `swarmnode status`")
    return Revert(entry["name"], args, row)
