"""What a trainer's sync or final metrics may say of its privacy (lifecycle.Privacy): nothing (an
older callback, or a site without DP), or an epsilon >= 0 with a delta in (0, 1). The real swarm
with a DP site is tests/integrations/test_opacus.py."""

from __future__ import annotations

import math
import re

import pytest

from swarmnode.errors import ConfigError
from swarmnode.node.lifecycle import Privacy


def test_absent_means_not_dp_and_valid_values_pass() -> None:
    assert Privacy.from_args({"loss": 0.5, "metric": 0.9}, "sync") is None
    assert Privacy.from_args({"epsilon": 2.5, "delta": 1e-5}, "sync") == Privacy(2.5, 1e-5)
    assert Privacy.from_args({"epsilon": 0, "delta": 1e-6}, "sync") == Privacy(0.0, 1e-6)
    infinite = Privacy.from_args({"epsilon": math.inf, "delta": 1e-5}, "final_metrics")
    assert infinite is not None and math.isinf(infinite.epsilon)  # no noise: said, not hidden


@pytest.mark.parametrize(("args", "said"), [
    ({"epsilon": 1.0}, "delta must be a number in (0, 1)"),
    ({"delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": -1.0, "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": math.nan, "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": "8", "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": True, "delta": 1e-5}, "epsilon must be a number >= 0"),
    ({"epsilon": 1.0, "delta": 1.0}, "delta must be a number in (0, 1)"),
    ({"epsilon": 1.0, "delta": 0}, "delta must be a number in (0, 1)"),
])
def test_bad_values_are_refused_saying_what_to_send(args: dict, said: str) -> None:
    with pytest.raises(ConfigError, match="^sync: " + re.escape(said)):
        Privacy.from_args(args, "sync")
