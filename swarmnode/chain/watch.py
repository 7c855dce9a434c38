"""New blocks as events: a round waits for the next block instead of sleeping on fixed intervals.

Everything a round waits for on chain (an election, a commit, the end of a grace period or a
deadline in chain time) arrives with a new block, so a node re-reads the contract once per block
at most, and wakes as soon as the block that matters is there. :class:`BlockWatcher` learns of new
blocks over a websocket ``eth_subscribe("newHeads")`` where the chain's RPC offers one on the same
address (anvil does; geth with ``--ws``), and otherwise by asking for the latest block every
``poll_s``. It also keeps chain time (:meth:`BlockWatcher.now`), which the round compares with
the contract's grace periods and deadlines instead of the host's clock. Other wake-ups (an update
arriving at the leader) go through :meth:`BlockWatcher.notify`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

__all__ = ["BlockWatcher"]

log = logging.getLogger("swarmnode.chain")


class BlockWatcher:
    """A background thread that knows the latest block number and wakes waiting threads."""

    def __init__(self, rpc_url: str, latest: Callable[[], tuple[int, int]],
                 poll_s: float = 0.05, *, websocket: bool = True,
                 log_filter: dict | None = None) -> None:
        """``latest()``: the latest block's (number, timestamp). ``log_filter``: contract logs
        (``{"address", "topics"}``) that are *signals*: over a websocket they are subscribed to,
        and :meth:`wait_signal` wakes on them (and on :meth:`notify`) rather than on every
        block, so a node waiting for an election or a commit reads the chain once per event
        instead of once per block (a block per check-in makes that N reads per node per round)."""
        self._url = rpc_url
        self._log_filter = log_filter
        self._signals = 0  # bumped by every signal log and every notify()
        self.signals_live = False  # a logs subscription is active
        self._latest = latest
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._block = -1
        self._block_time = 0.0  # the latest block's timestamp (chain time)
        self._seen_at = 0.0  # time.monotonic() when that block was seen
        self._events = 0  # bumped by every new block and every notify()
        self._stop = threading.Event()
        self.mode = "starting"
        self._thread = threading.Thread(target=self._run, name="block-watcher", daemon=True)
        # the chain gateway (https, mutual TLS) serves no websocket: poll it from the start
        self._use_ws = websocket and urlparse(rpc_url).scheme != "https"
        self._thread.start()

    @property
    def block(self) -> int:
        return self._block

    def now(self) -> float:
        """Chain time: the latest block's timestamp plus the time since it arrived. Grace periods
        and deadlines are the contract's, in chain time, so a host whose clock is off still
        waits exactly as long as the contract does. Host time until the first block is seen."""
        with self._cond:
            if self._block < 0:
                return time.time()
            return self._block_time + (time.monotonic() - self._seen_at)

    def mark(self) -> int:
        """A token for :meth:`wait`: wake on anything that happens after this call."""
        with self._cond:
            return self._events

    def notify(self) -> None:
        """Wake waiting threads (something other than a block happened: an update arrived)."""
        with self._cond:
            self._events += 1
            self._signals += 1
            self._cond.notify_all()

    def signal_mark(self) -> int:
        """A token for :meth:`wait_signal`."""
        with self._cond:
            return self._signals

    def wait_signal(self, mark: int, timeout: float) -> bool:
        """Block until a signal log or :meth:`notify` after ``mark``, or ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._signals != mark or self._stop.is_set(),
                                       timeout=max(0.0, timeout))

    def wait(self, mark: int, timeout: float) -> bool:
        """Block until a new block or :meth:`notify` after ``mark``, or ``timeout``; True if
        something happened."""
        with self._cond:
            return self._cond.wait_for(lambda: self._events != mark or self._stop.is_set(),
                                       timeout=max(0.0, timeout))

    def close(self) -> None:
        self._stop.set()
        self.notify()
        self._thread.join(timeout=5)

    # -- the thread -------------------------------------------------------------------------------
    def _saw(self, number: int, timestamp: int) -> None:
        with self._cond:
            if number != self._block:
                self._block, self._block_time = number, float(timestamp)
                self._seen_at = time.monotonic()
                self._events += 1
                self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._use_ws:
                try:
                    self._subscribe()
                except Exception as exc:  # noqa: BLE001 - no websocket here: poll instead
                    if self.mode == "websocket":
                        log.info("block subscription ended (%s); polling", exc)
                    else:
                        log.debug("no websocket at %s (%s); polling eth_blockNumber", self._url,
                                  exc)
            self._poll(until=time.monotonic() + 30.0 if self._use_ws else float("inf"))

    def _ws_url(self) -> str:
        u = urlparse(self._url)
        return u._replace(scheme="wss" if u.scheme == "https" else "ws").geturl()

    def _subscribe(self) -> None:
        from websockets.sync.client import connect

        with connect(self._ws_url(), open_timeout=3, close_timeout=1) as ws:
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe",
                                "params": ["newHeads"]}))
            reply = json.loads(ws.recv(timeout=3))
            if "result" not in reply:
                raise ConnectionError(f"eth_subscribe refused: {reply.get('error')}")
            heads = reply["result"]
            logs = None
            if self._log_filter is not None:
                ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "eth_subscribe",
                                    "params": ["logs", self._log_filter]}))
                answer = json.loads(ws.recv(timeout=3))
                logs = answer.get("result")
            self.mode = "websocket"
            with self._cond:
                self.signals_live = logs is not None
                self._signals += 1  # whatever happened before the subscription: look again
                self._cond.notify_all()
            self._saw(*self._latest())  # blocks mined before the subscription
            try:
                while not self._stop.is_set():
                    try:
                        msg = json.loads(ws.recv(timeout=1.0))
                    except TimeoutError:
                        continue
                    params = msg.get("params", {})
                    if logs is not None and params.get("subscription") == logs:
                        with self._cond:
                            self._signals += 1
                            self._events += 1
                            self._cond.notify_all()
                        continue
                    head = params.get("result", {})
                    if params.get("subscription", heads) == heads and "number" in head \
                            and "timestamp" in head:
                        self._saw(int(head["number"], 16), int(head["timestamp"], 16))
            finally:
                with self._cond:
                    self.signals_live = False
                    self._signals += 1
                    self._cond.notify_all()

    def _poll(self, until: float) -> None:
        self.mode = "polling"
        while not self._stop.is_set() and time.monotonic() < until:
            try:
                self._saw(*self._latest())
            except Exception as exc:  # noqa: BLE001 - the chain is away: keep trying
                log.debug("reading the latest block failed: %s", exc)
            self._stop.wait(self.poll_s)
