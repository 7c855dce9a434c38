"""The in-process chain (swarmnode.testing.inproc, eth-tester) reports a contract's refusal as
a real chain does, whatever the custom error's arguments. web3's eth-tester provider reads every
revert's data as Error(string); for NotLeader(round, leader, sender) at round 48 the "string"
offset (48) lands on an address, read as the string's length, and web3 raised an OverflowError
(not the DecodingError it handles) that escaped the chain client and killed the in-process
trainer (seen in benchmarks/quality.py's secure digits swarm). Checked with a contract that
reverts with whatever data it is called with, on the in-process chain's own provider."""

from __future__ import annotations

import pytest
import torch
from eth_abi import encode
from eth_utils import keccak

from swarmnode.chain.rpc import revert_reason
from swarmnode.spec import TrainingSpec
from swarmnode.testing.inproc import InProcessSwarm

# runtime: CALLDATACOPY(0, 0, CALLDATASIZE); REVERT(0, CALLDATASIZE); init code returns it
_ECHO_RUNTIME = bytes.fromhex("3660006000373660" "00fd")
_ECHO_INIT = bytes.fromhex("600a600c600039600a6000f3") + _ECHO_RUNTIME
A, B = "0x" + "ab" * 20, "0x" + "cd" * 20


@pytest.mark.parametrize("round", [1, 32, 48, 2**40])
def test_not_leader_is_decoded_at_any_round(round: int) -> None:
    spec = TrainingSpec.from_state({"w": torch.zeros(2)}, sync_frequency=1, min_peers=2,
                                   merge_method="mean")
    with InProcessSwarm(2, spec) as swarm:
        w3 = swarm.w3
        sender = w3.eth.accounts[0]
        tx = w3.eth.send_transaction({"from": sender, "data": _ECHO_INIT, "gas": 100_000})
        echo = w3.eth.get_transaction_receipt(tx)["contractAddress"]
        assert bytes(w3.eth.get_code(echo)) == _ECHO_RUNTIME
        data = keccak(text="NotLeader(uint256,address,address)")[:4] + encode(
            ["uint256", "address", "address"], [round, A, B])
        for call in (w3.eth.call, w3.eth.estimate_gas):
            with pytest.raises(Exception) as got:
                call({"from": sender, "to": echo, "data": data})
            assert not isinstance(got.value, OverflowError), got.value
            reason = revert_reason(got.value)
            assert getattr(reason, "name", None) == "NotLeader", reason
            assert reason.args["round"] == round  # type: ignore[union-attr]
