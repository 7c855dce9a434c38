"""The callback's swarm lines reach the trainer's log in a script that configures no logging
(HPE's scripts configure none), and appear once when the script does configure logging, before
or after it builds the callback. Each case is a real Python process, as a trainer runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import logging
import torch
from swarmnode.pyt import SwarmCallback
{before}
cb = SwarmCallback(syncFrequency=4, minPeers=2, model=torch.nn.Linear(2, 1),
                   totalEpochs=3, local_api="unix://{sock}")
{after}
cb.on_epoch_end(1)
cb.logger.debug("a debug line")
"""


@pytest.mark.parametrize(("before", "after", "shown_in"), [
    ("", "", "stderr"),  # HPE's scripts: no logging configured at all
    ("logging.basicConfig(level=logging.INFO, format='APP %(message)s')", "", "stderr"),
    ("", "logging.basicConfig(level=logging.INFO, format='APP %(message)s')", "stderr"),
    ("", "cb.logger.setLevel(logging.WARNING)", None),  # the script turned them down
])
def test_the_callbacks_lines_reach_the_trainers_log_once(
    tmp_path: Path, before: str, after: str, shown_in: str | None,
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(before=before, after=after, sock=tmp_path / "node.sock"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    line = "epoch 1/3 done, 0 merges so far (round 0)"
    if shown_in is None:
        assert line not in done.stderr + done.stdout
        return
    assert done.stderr.count(line) == 1, done.stderr
    assert "a debug line" not in done.stderr
    if "basicConfig" in before + after:  # through the script's own handler, its format
        assert f"APP {line}" in done.stderr
