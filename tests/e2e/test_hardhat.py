"""The whole swarm on a second Ethereum implementation: Hardhat's node with automine off and a
block every 2 s (interval mining), so every transaction waits for the next block, as on geth or a
PoA network. Real node services, trainers and mTLS, as in the anvil tests; nothing in swarmnode
knows which chain it talks to (only the launcher does)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarmnode.chain.launcher import DevChain, hardhat_binary
from swarmnode.demo.swarm import LocalSwarm
from swarmnode.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.anvil]

BLOCK_TIME = 2


@pytest.fixture(autouse=True)
def _needs_hardhat() -> None:
    try:
        hardhat_binary()
    except ConfigError as exc:
        pytest.fail(f"Hardhat's node is not installed ({exc}); `make test` installs it "
                    "(npm ci): run the suite through it")


def test_a_swarm_trains_to_the_end_on_hardhat_with_2_s_blocks_and_automine_off(
        tmp_path: Path) -> None:
    swarm = LocalSwarm(tmp_path / "swarm", 3, min_peers=2, grace_s=3, deadline_s=30, epochs=1,
                       sync_frequency=16)  # a quarter of the default's rounds: several still
    swarm.chain = DevChain(kind="hardhat", block_time=BLOCK_TIME, instant=False)
    with swarm:
        w3 = swarm.w3
        assert w3.client_version.startswith("HardhatNetwork"), w3.client_version
        started = time.monotonic()
        for i in range(3):
            swarm.start_node(i)
        swarm.wait_enrolled([0, 1, 2], timeout=120)
        for i in range(3):
            swarm.start_trainer(i)
        swarm.wait_until(lambda: all(swarm.trainers[i].poll() is not None for i in range(3)),
                         420, "the trainers")
        final = swarm.contract.events(names={"TrainingFinished"})[-1].args["digest"].hex()
        assert {swarm.result(i)["final_digest"] for i in range(3)} == {final}
        rounds = swarm.contract.current_round()
        took = time.monotonic() - started
        print(f"\nHardhat, {BLOCK_TIME} s blocks, automine off: {rounds} rounds in {took:.0f} s")
        assert rounds >= 2

        # The chain really mined on its interval only: blocks 2 s apart, each holding whatever
        # waited for it (several sites' transactions share a block), and every transaction of
        # type 2 (Hardhat has base fees).
        head = w3.eth.block_number
        blocks = [w3.eth.get_block(n, full_transactions=True) for n in range(1, head + 1)]
        gaps = {b["timestamp"] - a["timestamp"] for a, b in zip(blocks, blocks[1:], strict=False)}
        assert gaps <= {BLOCK_TIME, BLOCK_TIME + 1}, gaps  # +1: an interval that began late
        txs = [tx for b in blocks for tx in b["transactions"]]
        assert len(txs) > 3 * rounds
        assert {int(tx["type"]) for tx in txs} == {2}
        assert max(len(b["transactions"]) for b in blocks) > 1
