"""A local dev chain as a context manager: anvil (the default) or Hardhat's node.

The only module that knows either implementation: everything else talks standard ``eth_*``
JSON-RPC, so a geth node works the same. The dev-chain controls that tests and tools need (mine a
block, move the clock, switch automine, reorganise the chain) are the functions at the end of this
module, so no ``anvil_*``/``evm_*``/``hardhat_*`` method is called anywhere else.

anvil comes from the npm package ``@foundry-rs/anvil-linux-amd64`` and Hardhat from ``hardhat``,
both installed under the repository's ``node_modules`` (``make setup``); ``SWARMNODE_ANVIL`` and
``SWARMNODE_HARDHAT`` override the paths. Hardhat's network is configured by
``tools/hardhat/hardhat.config.js``, which takes its settings from the environment set here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from swarmnode.errors import ChainError, ChainUnavailable, ConfigError

if TYPE_CHECKING:
    from web3 import Web3

__all__ = [
    "CHAIN_KINDS",
    "DEV_CHAIN_ID",
    "DevChain",
    "advance_time",
    "anvil_binary",
    "hardhat_binary",
    "mine",
    "reorg",
    "set_automine",
]

DEV_CHAIN_ID = 31337
CHAIN_KINDS = ("anvil", "hardhat")
REPO_ROOT = Path(__file__).resolve().parents[2]
HARDHAT_CONFIG = REPO_ROOT / "tools" / "hardhat" / "hardhat.config.js"
_LISTENING = {
    "anvil": re.compile(r"Listening on ([\w.\-\[\]:]+):(\d+)"),
    "hardhat": re.compile(r"JSON-RPC server at https?://([\w.\-\[\]:]+):(\d+)"),
}


def anvil_binary() -> Path:
    """Path of the anvil executable (``SWARMNODE_ANVIL``, else ``node_modules/.bin/anvil``)."""
    override = os.environ.get("SWARMNODE_ANVIL")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"SWARMNODE_ANVIL={override} is not an executable file")
        return path
    path = REPO_ROOT / "node_modules" / ".bin" / "anvil"
    if path.exists():
        return path
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise ConfigError(
        f"anvil is not installed ({path} is missing); run `make setup` (npm ci) in {REPO_ROOT}, "
        "or set SWARMNODE_ANVIL to an anvil binary"
    )


def hardhat_binary() -> Path:
    """Path of Hardhat's CLI (``SWARMNODE_HARDHAT``, else ``node_modules/.bin/hardhat``)."""
    override = os.environ.get("SWARMNODE_HARDHAT")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"SWARMNODE_HARDHAT={override} is not an executable file")
        return path
    path = REPO_ROOT / "node_modules" / ".bin" / "hardhat"
    if path.exists():
        return path
    raise ConfigError(
        f"hardhat is not installed ({path} is missing); run `make setup` (npm ci) in {REPO_ROOT}, "
        "or set SWARMNODE_HARDHAT to Hardhat's CLI"
    )


class DevChain:
    """A dev chain process: ``with DevChain() as chain: connect(chain.url)``.

    ``kind``: ``"anvil"`` (default) or ``"hardhat"`` (Hardhat's node, configured by
    ``tools/hardhat/hardhat.config.js``: the same chain id, mnemonic and 100 funded accounts).
    ``port=0`` lets the chain pick a free port (read back from its output). ``state_file`` keeps
    the chain across restarts (saved every second and on stop; anvil only). ``block_time`` adds an
    empty block every so many seconds while transactions are still mined at once (mixed mining,
    automine plus interval mining on Hardhat), so that ``block.timestamp`` advances with the wall
    clock as on a real chain. ``instant=False`` (with ``block_time``): automine off, transactions
    wait for the next block, as on geth or a PoA network. ``hardfork``: the EVM rules (default:
    anvil's latest, ``prague`` on Hardhat, the contracts' EVM version); ``berlin`` or older makes
    a chain without base fees (legacy transactions). ``start_timeout``: seconds until the chain
    answers (default 20 for anvil, 90 for Hardhat, which loads its JavaScript first).
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        state_file: Path | None = None,
        block_time: float | None = None,
        chain_id: int = DEV_CHAIN_ID,
        instant: bool = True,
        mnemonic: str | None = None,
        start_timeout: float | None = None,
        *,
        kind: str = "anvil",
        hardfork: str | None = None,
    ) -> None:
        if kind not in CHAIN_KINDS:
            raise ConfigError(f"unknown dev chain kind {kind!r}; "
                              f"use one of {', '.join(CHAIN_KINDS)}")
        if kind == "hardhat" and state_file is not None:
            raise ConfigError("Hardhat's node keeps no state file; use kind='anvil' for one")
        self.kind = kind
        self.hardfork = hardfork
        self.host = host
        self.port = port
        self.state_file = Path(state_file) if state_file is not None else None
        self.block_time = block_time
        self.instant = instant
        self.mnemonic = mnemonic
        self.chain_id = chain_id
        # Hardhat's node loads a few hundred MB of JavaScript first: seconds, more on a busy host
        self.start_timeout = start_timeout or (90.0 if kind == "hardhat" else 20.0)
        self._proc: subprocess.Popen[str] | None = None
        self._output: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The JSON-RPC URL (known once started when the chain picks the port)."""
        if self.port == 0:
            raise ChainUnavailable("the dev chain is not started; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        if self.kind == "hardhat":
            return [str(hardhat_binary()), "--config", str(HARDHAT_CONFIG), "node",
                    "--hostname", self.host, "--port", str(self.port)]
        cmd = [str(anvil_binary()), "--host", self.host, "--port", str(self.port)]
        cmd += ["--chain-id", str(self.chain_id)]
        # Fund every dev account a node may use (swarmnode.chain.accounts: indexes 0..99), not
        # only anvil's default ten: swarms of 32 sites and more.
        cmd += ["--accounts", "100"]
        if self.mnemonic is not None:
            cmd += ["--mnemonic", self.mnemonic]
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--state", str(self.state_file), "--state-interval", "1"]
        if self.block_time is not None:
            # Mixed mining: a transaction is still mined at once, and an empty block every
            # block_time seconds moves block.timestamp on, as on a real chain, so time-based
            # rules (grace period, round deadline) can be met without other traffic.
            cmd += ["--block-time", f"{self.block_time:g}"]
            if self.instant:
                cmd.append("--mixed-mining")
        if self.hardfork is not None:
            cmd += ["--hardfork", self.hardfork]
        return cmd

    def environment(self) -> dict[str, str]:
        """The process environment: Hardhat's settings for ``tools/hardhat/hardhat.config.js``."""
        env = dict(os.environ)
        if self.kind == "hardhat":
            from swarmnode.chain.accounts import dev_mnemonic

            interval_ms = 0 if self.block_time is None else max(1, round(self.block_time * 1000))
            env.update({
                "SWARMNODE_HARDHAT_CHAIN_ID": str(self.chain_id),
                "SWARMNODE_HARDHAT_MNEMONIC": self.mnemonic or dev_mnemonic(),
                "SWARMNODE_HARDHAT_ACCOUNTS": "100",
                "SWARMNODE_HARDHAT_AUTOMINE": "1" if self.instant or not interval_ms else "0",
                "SWARMNODE_HARDHAT_INTERVAL_MS": str(interval_ms),
                "SWARMNODE_HARDHAT_HARDFORK": self.hardfork or "prague",
                # Hardhat's telemetry prompt and update check stay off: no network, no questions
                "HARDHAT_DISABLE_TELEMETRY_PROMPT": "true",
                "DO_NOT_TRACK": "1",
                "CI": "true",
            })
        return env

    def start(self) -> DevChain:
        """Start the chain and wait until it answers ``eth_chainId``."""
        if self.running:
            return self
        self._output.clear()
        self._listening.clear()
        self._proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            cwd=HARDHAT_CONFIG.parent if self.kind == "hardhat" else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not anvil directly
        )
        self._reader = threading.Thread(target=self._drain, name=f"{self.kind}-output", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.start_timeout
        try:
            while not self._listening.wait(0.02):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ChainUnavailable(self._failure("did not start listening"))
            while not self._answers():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise ChainUnavailable(self._failure("does not answer eth_chainId"))
                time.sleep(0.01)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the chain: SIGTERM (anvil saves its state), then SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()

    def wait(self) -> int:
        """Block until the chain exits; its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def output(self) -> str:
        """The last lines the chain printed."""
        return "".join(self._output)

    def __enter__(self) -> DevChain:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals

    def _drain(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            self._output.append(line)
            if not self._listening.is_set():
                match = _LISTENING[self.kind].search(line)
                if match:
                    self.port = int(match.group(2))
                    self._listening.set()

    def _check_alive(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            if self._reader is not None:
                self._reader.join(timeout=2)
            raise ChainUnavailable(self._failure(f"exited with code {proc.returncode}"))

    def _failure(self, what: str) -> str:
        lines = [line.strip() for line in list(self._output)[-5:] if line.strip()]
        said = " | ".join(lines) or "(no output)"
        return f"{self.kind} {what}: {said} (command: {' '.join(self.command())})"

    def _answers(self) -> bool:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        request = urllib.request.Request(
            f"http://{self.host}:{self.port}",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=1) as resp:
                return "result" in json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False


# -- dev-chain controls ------------------------------------------------------------------------
# The only calls of non-standard JSON-RPC methods in swarmnode: anvil and Hardhat's node both
# answer the ``evm_*`` ones; ``anvil_reorg`` is anvil's own. On geth or a consortium's chain there
# is no such thing, which is why nothing outside tests and dev tools uses them.


def _call(w3: Web3, method: str, params: list[Any]) -> Any:
    answer = w3.provider.make_request(method, params)  # type: ignore[arg-type]
    if "error" in answer:
        error = answer["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise ChainError(f"the dev chain refused {method}: {message}")
    return answer.get("result")


def mine(w3: Web3, blocks: int = 1) -> None:
    """Mine ``blocks`` blocks now (with whatever transactions are pending)."""
    for _ in range(blocks):
        _call(w3, "evm_mine", [])


def advance_time(w3: Web3, seconds: int) -> None:
    """Move the chain's clock forward by ``seconds`` and mine a block that shows it."""
    _call(w3, "evm_increaseTime", [int(seconds)])
    _call(w3, "evm_mine", [])


def set_automine(w3: Web3, enabled: bool) -> None:
    """Switch mining each transaction at once on or off (off: blocks come from :func:`mine` or
    the chain's block time)."""
    _call(w3, "evm_setAutomine", [bool(enabled)])


def reorg(w3: Web3, depth: int) -> None:
    """Replace the latest ``depth`` blocks by as many new, empty ones (anvil only): whatever
    those blocks held is no longer on the chain, and its receipts are gone."""
    _call(w3, "anvil_reorg", [int(depth), []])
