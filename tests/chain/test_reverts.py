"""Every custom error of both contracts decodes, by its selector, into its SwarmError subclass
with a message built from its typed arguments and a hint (swarmnode.chain.reverts.TABLE)."""

from __future__ import annotations

from typing import Any

import pytest
from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from swarmnode.chain import reverts
from swarmnode.chain.compile import CONTRACT_NAMES, load_artifact
from swarmnode.chain.reverts import TABLE, Revert, decode_revert
from swarmnode.errors import BadArgument, ContractReverted, NotNow, NotPermitted

ERRORS: dict[str, dict[str, Any]] = {}
for _name in CONTRACT_NAMES:
    for _entry in load_artifact(_name)["abi"]:
        if _entry["type"] == "error":
            ERRORS.setdefault(_entry["name"], _entry)


def types_of(entry: dict[str, Any]) -> list[str]:
    return [i["type"] for i in entry["inputs"]]


def selector(entry: dict[str, Any]) -> bytes:
    return function_signature_to_4byte_selector(f"{entry['name']}({','.join(types_of(entry))})")


def sample(abi_type: str, k: int) -> tuple[Any, str | None]:
    """A value of ``abi_type`` distinct per argument ``k``, and how the message shows it (None:
    as a word, not the number)."""
    if abi_type == "address":
        value = to_checksum_address(bytes([0xA0 + k]) * 20)
        return value, value
    if abi_type == "bytes32":
        value = bytes([0x10 + k]) * 32
        return value, "0x" + value.hex()
    if abi_type == "uint8":  # an enum or an index, shown as a word
        return 1, None
    assert abi_type == "uint256", abi_type
    value = 1_234_500 + 7 * k
    return value, str(value)


def test_the_abis_hold_errors_of_both_contracts() -> None:
    per_contract = {name: {e["name"] for e in load_artifact(name)["abi"] if e["type"] == "error"}
                    for name in CONTRACT_NAMES}
    assert {"NotAdmin", "SiteRevoked", "NotATraining"} <= per_contract["SwarmRegistry"]
    assert {"RoundNotOpen", "Revoked", "MetricsNotEligible", "RoundPruned"} <= per_contract[
        "SwarmTraining"]
    # an error both contracts declare has one signature, hence one selector and one row
    for name in per_contract["SwarmRegistry"] & per_contract["SwarmTraining"]:
        sigs = {tuple(types_of(e)) for c in CONTRACT_NAMES for e in load_artifact(c)["abi"]
                if e["type"] == "error" and e["name"] == name}
        assert len(sigs) == 1, name
    assert len(reverts.error_abis()) == len(ERRORS)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_error_has_a_row(name: str) -> None:
    row = TABLE.get(name)
    assert row is not None, f"{name} has no row in swarmnode.chain.reverts.TABLE"
    assert issubclass(row.cls, ContractReverted)
    assert row.cls in (NotPermitted, NotNow, BadArgument)
    assert row.hint.strip(), f"{name}: empty hint"


def test_every_row_names_an_existing_error() -> None:
    assert sorted(set(TABLE) - set(ERRORS)) == []


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_synthesized_revert_data_decodes(name: str) -> None:
    entry = ERRORS[name]
    types = types_of(entry)
    values, shown = zip(*(sample(t, k) for k, t in enumerate(types)), strict=True) if types \
        else ((), ())
    data = selector(entry) + encode(types, list(values))
    for raw in (data, "0x" + data.hex(), data.hex()):
        decoded = decode_revert(raw)
        assert isinstance(decoded, Revert) and isinstance(decoded, str)
        assert decoded.name == name
        assert decoded.row is TABLE[name]
        assert set(decoded.args) == {i["name"] for i in entry["inputs"]}
        assert str(decoded).startswith(f"{name}: ")
        for text in shown:
            if text is not None:
                assert text in decoded, (name, text, str(decoded))
    # the exception the client raises for it: the row's class, carrying the decoded reason
    exc = decoded.row.cls(f"call refused: {decoded}. Next: {decoded.row.hint}", reason=decoded)
    assert isinstance(exc, ContractReverted) and exc.reason.name == name
    assert not isinstance(exc, OSError) or isinstance(exc, NotPermitted)


@pytest.mark.parametrize("name", [n for n in sorted(ERRORS)
                                  if "uint8" in types_of(ERRORS[n])])
def test_small_enum_arguments_are_shown_as_words(name: str) -> None:
    entry = ERRORS[name]
    types = types_of(entry)
    messages = set()
    for word in range(4):
        values = [word if t == "uint8" else sample(t, k)[0] for k, t in enumerate(types)]
        decoded = decode_revert(selector(entry) + encode(types, values))
        assert decoded is not None and decoded.name == name
        messages.add(str(decoded))
    assert len(messages) >= 3, messages  # ZeroSetting: 3 settings; RoundNotElected: 4 states


def test_data_that_is_not_one_of_ours_is_not_decoded() -> None:
    string_error = bytes.fromhex("08c379a0") + encode(["string"], ["nope"])
    panic = bytes.fromhex("4e487b71") + encode(["uint256"], [0x11])
    entry = ERRORS["RoundNotOpen"]
    truncated = selector(entry) + encode(["uint256"], [1])  # one of its two arguments
    for data in (None, b"", "0x", "not hex", string_error, panic, b"\xde\xad\xbe\xef",
                 truncated):
        assert decode_revert(data) is None, data
