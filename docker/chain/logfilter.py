"""The dev chain's log, as an operator needs it: runs anvil (its arguments after this script's)
and passes on its output without the line anvil prints for every JSON-RPC call it answers
(``eth_call``, ``eth_getBlockByNumber``, ...: 99% of the log with a few nodes polling it) and
without the three lines it prints for every block (one a second here, most of them empty).
What stays: the start-up banner (accounts, listening address), each transaction with its gas and
any contract it created, warnings and errors. SIGTERM and SIGINT are passed to anvil (it saves
its state on the way out); the exit status is anvil's. Standard library only (the chain image)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator

RPC_CALL = re.compile(r"^[a-z0-9]+_[A-Za-z0-9_]+$")  # "eth_call", "anvil_mine", ...
BLOCK_LINE = re.compile(r"^\s*Block (Number|Hash|Time): ")


def operator_lines(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` (anvil's output, newlines kept) without RPC-call and block lines, and without
    the blank lines they leave behind (never two in a row)."""
    blank = False
    for line in lines:
        text = line.strip()
        if RPC_CALL.match(text) or BLOCK_LINE.match(line):
            continue
        if not text:
            if blank:
                continue
            blank = True
        else:
            blank = False
        yield line


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: logfilter.py anvil [ARGS...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    assert child.stdout is not None
    for line in operator_lines(child.stdout):
        sys.stdout.write(line)
        sys.stdout.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
