"""A real headless Chromium for the tests that look at a page (the dashboard's).

``ensure_chromium`` returns Debian's ``chromium``, installing the package when it is missing (as
root, with apt, the way :mod:`swarmnode.containers.engine` installs Docker): `make test` on a
fresh Debian machine needs nothing else. ``dump_dom`` and ``screenshot`` run it once per page,
each with a profile folder of its own (tests running at once share nothing), after the page's
script ran for ``budget_ms`` of virtual time (the time stands still while requests are pending).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from swarmnode.errors import NodeError

__all__ = ["BrowserUnavailable", "Element", "dump_dom", "ensure_chromium", "parse_dom",
           "screenshot"]

PACKAGE = "chromium"  # Debian's package and its command


class BrowserUnavailable(NodeError):
    """No Chromium here and none could be installed."""


def ensure_chromium() -> str:
    """The ``chromium`` command, installed with apt-get when missing (root only)."""
    found = shutil.which(PACKAGE)
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise BrowserUnavailable(f"{PACKAGE} is not installed; install it (Debian: `apt-get "
                                 f"install {PACKAGE}`) or run as root so the tests install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", PACKAGE]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise BrowserUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-400:]}; "
                                     f"install {PACKAGE} by hand")
    found = shutil.which(PACKAGE)
    if found is None:
        raise BrowserUnavailable(f"apt-get installed {PACKAGE} but no `{PACKAGE}` command is "
                                 "on PATH")
    return found


def _run(args: list[str], timeout: float) -> str:
    chromium = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="swarmnode-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars",
               "--disable-background-networking", f"--user-data-dir={profile}", *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, HOME=profile))
        except subprocess.TimeoutExpired:
            raise BrowserUnavailable(f"chromium did not finish within {timeout:.0f} s: "
                                     f"{' '.join(args)}") from None
    if done.returncode != 0:
        raise BrowserUnavailable(f"chromium exited {done.returncode}: "
                                 f"{done.stderr.strip()[-600:]}")
    return done.stdout


def dump_dom(url: str, budget_ms: int = 4000, timeout: float = 60.0) -> str:
    """The document at ``url`` as serialised after its scripts ran ``budget_ms``."""
    return _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)


def screenshot(url: str, path: Path, budget_ms: int = 4000, size: tuple[int, int] = (1400, 1300),
               timeout: float = 60.0) -> Path:
    """A PNG of ``url`` at ``path`` after its scripts ran ``budget_ms``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}",
          f"--screenshot={path}", url], timeout)
    if not path.is_file() or path.stat().st_size == 0:
        raise BrowserUnavailable(f"chromium wrote no screenshot at {path}")
    return path


# --------------------------------------------------------------------- reading a dumped document

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}


@dataclass
class Element:
    """An element of a dumped document: its tag, attributes and children (text as str)."""

    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)
    parent: Element | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """Its textContent (the characters a reader sees, entities decoded)."""
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self) -> Iterator[Element]:
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Descendants with ``tag`` (any: None) and these attribute values (``data_k`` for
        ``data-k``)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.iter() if e is not self and (tag is None or e.tag == tag)
                and all(e.attrs.get(k) == v for k, v in want.items())]

    def find(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find_all(tag, **attrs)
        if len(found) != 1:
            raise LookupError(f"{len(found)} elements {tag or '*'} {attrs}, wanted one")
        return found[0]


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Element("#document", {})

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Element(tag, {k: v or "" for k, v in attrs}, parent=self.cur)
        self.cur.children.append(node)
        if tag not in _VOID:
            self.cur = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.cur.children.append(Element(tag, {k: v or "" for k, v in attrs}, parent=self.cur))

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data: str) -> None:
        self.cur.children.append(data)


def parse_dom(html: str) -> Element:
    """The element tree of a document as ``dump_dom`` returns it."""
    tree = _Tree()
    tree.feed(html)
    tree.close()
    return tree.root
