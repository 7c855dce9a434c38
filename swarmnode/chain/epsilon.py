"""A DP site's privacy spent (epsilon at its delta) as the chain records it.

A site that trains with differential privacy sends its epsilon and delta with its metrics
(``checkin``, ``finish``, ``reportFinalMetrics``) as one word: epsilon x1e6 in the low 128 bits
(``2^128-1``: infinite, a privacy engine that adds no noise), delta x1e18 in the high 128 bits;
0 is a site without DP. The contract emits ``PrivacyReported(round, node, epsilonE6, deltaE18)``
beside ``MetricsReported``. :func:`problem` is the rule for what a site may report (the node's
local API and the chain client both apply it); :func:`pack` and :func:`from_event` convert.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

from swarmnode.errors import ConfigError

__all__ = ["DELTA_SCALE", "EPSILON_INFINITE", "EPSILON_SCALE", "from_event", "label", "pack",
           "problem"]

EPSILON_SCALE = 1_000_000  # epsilon x1e6, as the metrics' fixed point
DELTA_SCALE = 10**18  # delta x1e18: 1e-18 is the smallest delta the chain records
EPSILON_INFINITE = 2**128 - 1  # epsilon inf (and anything past 3.4e32): no privacy to speak of


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def problem(epsilon: Any, delta: Any) -> str | None:
    """What is wrong with a reported (epsilon, delta), None if nothing: epsilon a number >= 0
    (``inf``: no noise), delta a number in (0, 1) the chain can hold (at least 1e-18)."""
    if not _number(epsilon) or math.isnan(epsilon) or epsilon < 0:
        return f"epsilon must be a number >= 0 (the trainer's privacy spent), got {epsilon!r}"
    if not _number(delta) or not 0 < delta < 1:
        return f"delta must be a number in (0, 1) beside epsilon, got {delta!r}"
    if builtins.round(delta * DELTA_SCALE) < 1:
        return f"delta {delta!r} is below 1e-18, the smallest the chain records; set a larger one"
    return None


def pack(epsilon: float, delta: float) -> int:
    """The ``privacy`` word a check-in, ``finish`` or ``reportFinalMetrics`` carries; ConfigError
    naming what is wrong (nothing is sent then)."""
    why = problem(epsilon, delta)
    if why is not None:
        raise ConfigError(f"privacy not sent: {why}")
    d = min(builtins.round(delta * DELTA_SCALE), DELTA_SCALE - 1)
    e = EPSILON_INFINITE if math.isinf(epsilon) else builtins.round(epsilon * EPSILON_SCALE)
    return min(e, EPSILON_INFINITE) | d << 128


def from_event(args: dict[str, Any]) -> tuple[float, float]:
    """(epsilon, delta) of a ``PrivacyReported`` event's arguments (epsilon ``inf`` for the
    infinite mark)."""
    e, d = int(args["epsilonE6"]), int(args["deltaE18"])
    return (math.inf if e == EPSILON_INFINITE else e / EPSILON_SCALE), d / DELTA_SCALE


def label(epsilon: float | None, delta: float | None) -> str:
    """How ``status`` and ``report`` show a site's privacy: ``7.983 (δ 1e-05)``; ``-`` for a site
    without DP."""
    if epsilon is None or delta is None:
        return "-"
    return f"{epsilon:.4g} (δ {delta:g})"
