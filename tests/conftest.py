"""Shared fixtures.

Chain: a session-scoped real anvil (``anvil``), a session-scoped Hardhat node (``hardhat``), a
session-scoped in-process eth-tester chain, a ``backend`` fixture parametrised over the three, time
travel on each, and ``make_swarm`` which deploys a fresh contract with authorised and enrolled
nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from web3 import EthereumTesterProvider, Web3

from swarmnode.chain import launcher
from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, connect
from swarmnode.chain.launcher import DevChain
from swarmnode.cli.common import console, err_console
from swarmnode.errors import ConfigError

DEV_ACCOUNTS = 10  # anvil prefunds dev accounts 0..9
SPEC_JSON = '{"merge_method": "mean", "min_peers": 2, "sync_frequency": 8}'
CONSOLE_WIDTH = 400


@pytest.fixture(autouse=True)
def _wide_consoles() -> Iterator[None]:
    """Tests read what CLI commands print: give the shared consoles a fixed, wide width. Rich
    sizes a console that writes to no terminal once, at creation (``COLUMNS`` or 80), so a long
    temporary path (pytest-xdist's ``popen-gwN`` folders) would wrap or truncate a line a test
    looks for, depending on where the test runs."""
    saved = [(c, c._width) for c in (console, err_console)]
    for c, _ in saved:
        c.width = CONSOLE_WIDTH
    yield
    for c, width in saved:
        c._width = width


@dataclass
class Backend:
    """A chain to run contract tests on, with a way to move its clock forward."""

    name: str  # "tester" (in-process), or a DevChain kind: "anvil", "hardhat"
    w3: Web3

    @property
    def node(self) -> bool:
        """A real node (anvil, Hardhat): calls run on the latest block, not a pending one."""
        return self.name != "tester"

    def advance(self, seconds: int) -> None:
        """Move block time forward by ``seconds`` and mine a block."""
        if self.node:
            launcher.advance_time(self.w3, seconds)
        else:
            tester = self.w3.provider.ethereum_tester  # type: ignore[attr-defined]
            pending = tester.get_block_by_number("pending")["timestamp"]
            tester.time_travel(pending + seconds)

    def mine(self) -> None:
        """Mine one empty block."""
        if self.node:
            launcher.mine(self.w3)
        else:
            self.w3.provider.ethereum_tester.mine_blocks(1)  # type: ignore[attr-defined]

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])


@pytest.fixture(scope="session")
def anvil() -> Iterator[DevChain]:
    """A real anvil dev chain on a free port for the whole session."""
    with DevChain() as chain:
        yield chain


@pytest.fixture(scope="session")
def anvil_w3(anvil: DevChain) -> Web3:
    return connect(anvil.url)


@pytest.fixture(scope="session")
def hardhat() -> Iterator[DevChain]:
    """A real Hardhat node (automine) on a free port for the whole session; `make test`
    installs it (``npm ci``), so its absence fails the tests that need it."""
    try:
        launcher.hardhat_binary()
    except ConfigError as exc:
        pytest.fail(f"Hardhat's node is not installed ({exc}); `make test` installs it "
                    "(npm ci): run the suite through it")
    with DevChain(kind="hardhat") as chain:
        yield chain


@pytest.fixture(scope="session")
def hardhat_w3(hardhat: DevChain) -> Web3:
    return connect(hardhat.url)


@pytest.fixture(scope="session")
def tester_w3() -> Web3:
    """An in-process eth-tester chain whose dev accounts are funded like anvil's."""
    w3 = Web3(EthereumTesterProvider())
    funder = w3.eth.accounts[0]
    for i in range(DEV_ACCOUNTS):
        w3.eth.send_transaction(
            {"from": funder, "to": dev_account(i).address, "value": 1000 * 10**18}
        )
    return w3


@pytest.fixture(
    params=[pytest.param("tester"), pytest.param("anvil", marks=pytest.mark.anvil),
            pytest.param("hardhat", marks=pytest.mark.anvil)],
)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each contract test runs on the in-process tester, a real anvil and a real Hardhat node
    (``-m "not anvil"``: the in-process one only)."""
    w3 = request.getfixturevalue(f"{request.param}_w3")
    return Backend(request.param, w3)


def fingerprint_of(address: str) -> bytes:
    """A stand-in certificate fingerprint, distinct per address."""
    return hashlib.sha256(f"cert of {address}".encode()).digest()


@pytest.fixture
def spec_json() -> str:
    """The training spec ``make_swarm`` pins."""
    return SPEC_JSON


@dataclass
class Swarm:
    """A freshly deployed contract, the admin's handle and one handle per node."""

    backend: Backend
    admin: SwarmContract
    nodes: list[SwarmContract]
    stranger: SwarmContract  # a funded account that is not authorised
    spare: list[SwarmContract] = field(default_factory=list)  # authorised, not enrolled

    fingerprint_of = staticmethod(fingerprint_of)

    def handle(self, address: str) -> SwarmContract:
        for c in [*self.nodes, *self.spare]:
            if c.account_address == address:
                return c
        raise KeyError(address)

    def leader(self, round: int) -> SwarmContract:
        """The round's leader, drawn (pinned by a draw transaction) if it is not yet."""
        info = self.admin.round(round)
        if info.leader is None:
            self.nodes[0].draw(round)
            info = self.admin.round(round)
        assert info.leader is not None, f"round {round} has no leader"
        return self.handle(info.leader)


@pytest.fixture
def make_swarm(backend: Backend) -> Callable[..., Swarm]:
    """``make_swarm(nodes=3, min_peers=2, grace=1000, deadline=1000, enroll=True)``."""

    def make(
        nodes: int = 3,
        min_peers: int = 2,
        grace: int = 1000,
        deadline: int = 1000,
        enroll: bool = True,
        spare: int = 0,
    ) -> Swarm:
        assert nodes + spare <= DEV_ACCOUNTS - 2
        admin = SwarmContract.deploy(backend.w3, dev_account(0), SPEC_JSON, min_peers, grace,
                                     deadline)
        handles = [admin.with_account(dev_account(i)) for i in range(1, nodes + spare + 1)]
        for h in handles:
            admin.authorize(h.account_address, fingerprint_of(h.account_address))
        if enroll:
            for i, h in enumerate(handles[:nodes]):
                h.enroll(f"127.0.0.1:{7100 + i}")
        return Swarm(
            backend=backend,
            admin=admin,
            nodes=handles[:nodes],
            stranger=admin.with_account(dev_account(DEV_ACCOUNTS - 1)),
            spare=handles[nodes:],
        )

    return make


# `make test` runs the suite on several workers (pytest-xdist, ``--dist loadgroup``): most of its
# time is spent waiting on blocks, deadlines and child processes, not computing. Tests that share
# one machine-wide resource run on one worker, one after another: the Docker engine and its images
# (tests/containers) and network namespaces with shaped links (tests/wan, whose timings are the
# point of the test). Both in ONE group: on a fresh machine the container tests install Docker
# (and with it iptables) and start its engine, which loads br_netfilter and sets the FORWARD
# policy to DROP; a shaped-link test running beside them on the other worker had found no
# iptables, added no ACCEPT rule for its bridge, and its sites lost each other mid-run (a 300 s
# timeout, seen in a full run on a fresh machine).
_SERIAL_GROUPS = {"containers": "machine", "wan": "machine"}


# tryfirst: before xdist's worker turns the marks into groups (nodeid@group). Pinned to pytest 8:
# pytest 9 keeps the nodeid elsewhere, so xdist 3.8's groups silently did nothing and the
# container tests ran on both workers at once (two swarms on one engine and one network name).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.parts
        if "tests" in parts:
            top = parts[parts.index("tests") + 1]
            if top in _SERIAL_GROUPS:
                item.add_marker(pytest.mark.xdist_group(_SERIAL_GROUPS[top]))
    # The dashboard's browser test runs last: in-process swarm tests with 1-4 s deadlines that
    # ran after it in the same process missed their deadlines (3 of 13 runs; never alone). Not
    # understood yet: no thread, process or CPU use is left behind that we could find.
    last = [i for i in items if i.path.name == "test_dashboard_browser.py"]
    items[:] = [i for i in items if i.path.name != "test_dashboard_browser.py"] + last
