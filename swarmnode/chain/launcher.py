"""A local anvil dev chain as a context manager.

The only module that knows anvil: everything else talks standard ``eth_*`` JSON-RPC, so a geth
node works the same. anvil comes from the npm package ``@foundry-rs/anvil-linux-amd64`` installed
under the repository's ``node_modules`` (``make setup``); ``SWARMNODE_ANVIL`` overrides the path.
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

from swarmnode.errors import ChainUnavailable, ConfigError

__all__ = ["DEV_CHAIN_ID", "DevChain", "anvil_binary"]

DEV_CHAIN_ID = 31337
REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"Listening on ([\w.\-\[\]:]+):(\d+)")


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


class DevChain:
    """An anvil process: ``with DevChain() as chain: connect(chain.url)``.

    ``port=0`` lets anvil pick a free port (read back from its output). ``state_file`` keeps the
    chain across restarts (saved every second and on stop). ``block_time`` adds an empty block
    every so many seconds while transactions are still mined at once (mixed mining), so that
    ``block.timestamp`` advances with the wall clock as on a real chain. ``instant=False`` (with
    ``block_time``): transactions wait for the next block, as on geth or a PoA network.
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
        start_timeout: float = 20.0,
    ) -> None:
        self.host = host
        self.port = port
        self.state_file = Path(state_file) if state_file is not None else None
        self.block_time = block_time
        self.instant = instant
        self.mnemonic = mnemonic
        self.chain_id = chain_id
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._output: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The JSON-RPC URL (known once started when anvil picks the port)."""
        if self.port == 0:
            raise ChainUnavailable("the dev chain is not started; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
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
        return cmd

    def start(self) -> DevChain:
        """Start anvil and wait until it answers ``eth_chainId``."""
        if self.running:
            return self
        self._output.clear()
        self._listening.clear()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not anvil directly
        )
        self._reader = threading.Thread(target=self._drain, name="anvil-output", daemon=True)
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
        """Stop anvil: SIGTERM (it saves its state), then SIGKILL if it hangs."""
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
        """Block until anvil exits; its exit code."""
        if self._proc is None:
            return 0
        return self._proc.wait()

    def output(self) -> str:
        """The last lines anvil printed."""
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
                match = _LISTENING.search(line)
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
        return f"anvil {what}: {said} (command: {' '.join(self.command())})"

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
