"""Sites on shaped links: one network namespace per site, joined by a bridge, bandwidth-limited.

    with ShapedNetwork(4, rate_mbit=200) as net:
        net.run(0, ["python", "-m", "swarmnode", "run", ...])  # inside site 0's namespace
        net.address(0)          # 10.213.X.10: the site's address, reachable from every site
        net.gateway             # 10.213.X.1: the bridge's, for a chain in the root namespace
        net.goodput(0, 1)       # measured Mbit/s of one TCP stream from site 0 to site 1
        net.counters(0)         # bytes the site sent and received so far

Each site is a namespace ``<base>-<i>`` with a veth pair: one end inside (the site's address,
default route via the bridge), the other on a bridge in the root namespace that holds the
``.1`` address of the subnet. A ``tbf`` qdisc on *both* ends of each veth limits the site's upload
(the namespace end) and its download (the bridge end) to ``rate_mbit``: a link between hospitals,
full duplex. The root namespace reaches the sites over that bridge only, never out of the machine.

Everything is removed on ``close()`` (also from ``atexit`` and, in ``python -m`` tools, on
SIGINT/SIGTERM); names carry the creating process's id, so :func:`remove_stale` deletes what a
killed run left behind. Needs root and ``ip``/``tc`` (iproute2); :func:`unavailable` says why not.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmnode.errors import ConfigError

_NAME = re.compile(r"^sn([0-9a-f]+)([0-9a-f])(?:-\d+)?$")  # sn<pid hex><k hex>[-<site>]
_SUBNETS = "10.213.{}.0/24"
_counter = 0
_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (the command and its output say why)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _cmd(["ip", *args], check=check)


def _cmd(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()}")
    return p


def unavailable() -> str | None:
    """Why shaped links cannot be built here (None: they can): root, ``ip netns``, ``tc tbf``."""
    if os.geteuid() != 0:
        return "shaped links need root (network namespaces, veth pairs, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"sn{os.getpid():x}f-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces and bridges that a run which no longer exists left behind (by the pid in
    their names). Returns what it removed."""
    removed = []
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
             if line.strip()]
    links = [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)[:@]",
                                                _ip("-o", "link", "show", check=False).stdout,
                                                re.M)]
    for name in names:
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1), 16)):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    if shutil.which("iptables") is not None:  # forwarding rules of bridges now gone
        for rule in _cmd(["iptables", "-S", "FORWARD"], check=False).stdout.splitlines():
            m = re.match(r"^-A FORWARD -i (snb([0-9a-f]+)[0-9a-f]) -o snb[0-9a-f]+ -j ACCEPT$",
                         rule.strip())
            if m and not _alive(int(m.group(2), 16)):
                _cmd(["iptables", "-D", *rule.split()[1:]], check=False)
                removed.append(f"iptables: {rule.strip()}")
    for link in links:
        m = re.match(r"^snb([0-9a-f]+)([0-9a-f])$", link)
        if m and not _alive(int(m.group(1), 16)):
            _ip("link", "del", link, check=False)
            removed.append(link)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip("-4", "-o", "addr", "show", check=False).stdout
    for x in range(1, 255):
        net = ipaddress.ip_network(_SUBNETS.format(x))
        if f" 10.213.{x}." not in used:
            return net  # type: ignore[return-value]
    raise NetnsError("no free 10.213.x.0/24 subnet for the shaped network")


@dataclass(frozen=True)
class Counters:
    sent: int  # bytes the site put on its link (its upload)
    received: int  # bytes its link delivered to it (its download)


class ShapedNetwork:
    """``n`` sites, each in its own namespace, on links of ``rate_mbit`` (None: unshaped)."""

    def __init__(self, n: int, rate_mbit: float | None = None) -> None:
        global _counter
        if not 1 <= n <= 200:
            raise ConfigError(f"a shaped network has 1..200 sites, not {n}")
        if rate_mbit is not None and not 0.1 <= rate_mbit <= 100_000:
            raise ConfigError(f"rate_mbit must be within 0.1..100000 Mbit/s, not {rate_mbit}")
        why = unavailable()
        if why is not None:
            raise NetnsError(why)
        with _lock:
            k = _counter % 16
            _counter += 1
        self.n = n
        self.rate_mbit = rate_mbit
        self.base = f"sn{os.getpid():x}{k:x}"
        self.bridge = f"snb{os.getpid():x}{k:x}"
        self._made: list[str] = []  # namespaces made, for close()
        self._bridge_made = False
        self._forwarding = False
        self.closed = False
        atexit.register(self.close)
        try:
            self.subnet = _free_subnet()
            hosts = list(self.subnet.hosts())
            self.gateway = str(hosts[0])
            self._addresses = [str(hosts[9 + i]) for i in range(n)]
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------------------
    def namespace(self, i: int) -> str:
        return f"{self.base}-{i}"

    def _host_end(self, i: int) -> str:
        return f"{self.base}h{i}"

    def _site_end(self, i: int) -> str:
        return f"{self.base}n{i}"

    def _setup(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        self._allow_forwarding()
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, host, site = self.namespace(i), self._host_end(i), self._site_end(i)
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "add", host, "type", "veth", "peer", "name", site)
            _ip("link", "set", site, "netns", ns)
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            _ip("-n", ns, "addr", "add", f"{self._addresses[i]}/{prefix}", "dev", site)
            _ip("-n", ns, "link", "set", site, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.gateway)
            if self.rate_mbit is not None:
                self._shape(["tc"], host)  # the site's download
                self._shape(["ip", "netns", "exec", ns, "tc"], site)  # its upload

    def _forward_rule(self) -> list[str]:
        return ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]

    def _allow_forwarding(self) -> None:
        """Frames between two sites cross the bridge, and with br_netfilter loaded (a Docker
        engine loads it and sets the FORWARD policy to DROP) they meet the root namespace's
        iptables FORWARD chain: accept what stays on this bridge (removed on close)."""
        if shutil.which("iptables") is None:
            return
        _cmd(["iptables", "-I", *self._forward_rule()])
        self._forwarding = True

    def _shape(self, tc: list[str], dev: str) -> None:
        rate_bytes = self.rate_mbit * 1e6 / 8  # type: ignore[operator]
        # a burst of 10 ms of traffic (at least one 64 KiB GSO segment), a queue of 50 ms
        burst = max(64 * 1024 + 4096, int(rate_bytes / 100))
        _cmd([*tc, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.rate_mbit}mbit",
              "burst", str(burst), "latency", "50ms"])

    # -- use --------------------------------------------------------------------------------------
    def address(self, i: int) -> str:
        return self._addresses[i]

    def wrap(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` run inside site ``i``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(i), *cmd]

    def run(self, i: int, cmd: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.wrap(i, cmd), **popen)

    def counters(self, i: int) -> Counters:
        """Bytes site ``i`` sent and received on its link so far (the bridge end's counters)."""
        stats = Path("/sys/class/net") / self._host_end(i) / "statistics"
        return Counters(sent=int((stats / "rx_bytes").read_text()),
                        received=int((stats / "tx_bytes").read_text()))

    def goodput(self, src: int, dst: int, seconds: float = 2.0) -> float:
        """Mbit/s of one TCP stream from site ``src`` to site ``dst`` over ``seconds`` (a
        receiver in ``dst``'s namespace, a sender in ``src``'s: the links as the sites see them)."""
        port = 5201
        recv = self.run(dst, [sys.executable, "-m", "swarmnode.testing.netns", "recv",
                              self.address(dst), str(port)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            send = subprocess.run(
                self.wrap(src, [sys.executable, "-m", "swarmnode.testing.netns", "send",
                                self.address(dst), str(port), str(seconds)]),
                capture_output=True, text=True, timeout=seconds + 60)
            if send.returncode != 0:
                raise NetnsError(f"goodput sender failed: {send.stderr.strip()}")
            out, err = recv.communicate(timeout=60)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        if recv.returncode != 0:
            raise NetnsError(f"goodput receiver failed: {err.decode().strip()}")
        nbytes, took = out.decode().split()
        return int(nbytes) * 8 / float(took) / 1e6

    # -- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ns in self._made:
            # processes still inside would keep the namespace's links: end them first
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        if self._forwarding:
            _cmd(["iptables", "-D", *self._forward_rule()], check=False)
        if self._bridge_made:
            _ip("link", "del", self.bridge, check=False)
        atexit.unregister(self.close)

    def __enter__(self) -> ShapedNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the goodput probe's two ends (run inside the namespaces) ----------------------------------
def _recv(host: str, port: int) -> None:
    srv = socket.create_server((host, port))
    print("ready", file=sys.stderr, flush=True)
    conn, _ = srv.accept()
    buf = bytearray(1 << 20)
    total, first = 0, None
    while True:
        got = conn.recv_into(buf)
        if not got:
            break
        if first is None:
            first = time.perf_counter()
        total += got
    took = time.perf_counter() - (first or time.perf_counter())
    print(total, max(took, 1e-9))


def _send(host: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    data = bytes(1 << 20)
    end = time.monotonic() + seconds
    with conn:
        while time.monotonic() < end:
            conn.sendall(data)


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        _recv(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "send":
        _send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1] == "clean":
        print("\n".join(remove_stale()) or "nothing stale")
