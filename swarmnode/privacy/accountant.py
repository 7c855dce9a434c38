"""The swarm's epsilon under distributed noise: per round and composed over the rounds run.

Each summed round is one Gaussian mechanism on the sum of the adding sites' encoded updates
(:mod:`swarmnode.privacy.noise`): L2 sensitivity ``Delta = w_max C 2^f + sqrt(d)`` (w_max the
round's largest adding weight; add/remove one site's update), noise the shares that arrived.
Against whom: every participant of the round knows its own share, and the leader is one, so the
noise that protects a site's update from any single participant (the leader included) is the
other shares: ``k - 1`` of them (k the mask-set sites that checked in: weight-0 sites add a share
too), variance ``(k - 1) sigma^2 / n``. A reader of the model who took no part sees all k (the
``outsider`` epsilon). A dropout (n - k > 0) lowers the noise and raises epsilon.

Discrete Gaussian: the sum of k - 1 independent N_Z(0, s^2) shares is within Renyi divergence
``tau = 10 sum_{j<k-1} exp(-2 pi^2 s^2 j/(j+1))`` per coordinate of one N_Z (Kairouz, Liu, Steinke
2021, "The distributed discrete Gaussian mechanism", Thm. 1), and N_Z(0, S^2) is
(Delta^2 / 2S^2)-concentrated DP like a continuous Gaussian (Canonne, Kamath, Steinke 2020).
noise.check_ring keeps s >= 8 ring units (in practice s is ~2^30), so d tau < 1e-100: the round
is accounted as a Gaussian mechanism of noise multiplier ``sqrt(k - 1) s / Delta``, with
dp-accounting's RDP accountant (``GaussianDpEvent``; composition over rounds adds RDP curves),
epsilon at the spec's delta.

No sampling amplification: every site of the mask set takes part in every round (nothing is
subsampled), so none applies. Rounds that release nothing cost nothing: a round with fewer than 3
adding sites commits its starting model again (no sum is formed), and a re-elected attempt sums
the same vectors with the same noise (one masked vector per round). A round whose leader had 3+
adding sites checked in is counted even when it was abandoned (the chain cannot tell whether
that leader formed the sum). A round with no starting model carries no noise: not covered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from swarmnode.errors import ConfigError

__all__ = ["RoundNoise", "Summary", "epsilon", "summarise"]


@dataclass(frozen=True)
class RoundNoise:
    """What one round's sum carried."""

    round: int
    expected: int  # n: the mask set's size (shares planned)
    shares: int  # k: mask-set sites that checked in (each added a share)
    sensitivity: float  # Delta, ring units (the round's largest adding weight)
    share_sigma: float  # s = sigma / sqrt(n), ring units
    summed: bool = True  # False: fewer than 3 adding sites, no sum formed (nothing released)
    covered: bool = True  # False: no starting model, no noise (parameters summed whole)

    def noise_multiplier(self, outsider: bool = False) -> float:
        """The noise over the sensitivity: k - 1 shares (any one participant), k (outsider)."""
        known = self.shares if outsider else self.shares - 1
        return math.sqrt(max(known, 0)) * self.share_sigma / self.sensitivity

    @property
    def lowered(self) -> bool:
        """True when dropouts took shares with them."""
        return self.shares < self.expected


@dataclass(frozen=True)
class RoundEpsilon:
    round: int
    epsilon: float  # against any one participant (inf: not covered; 0: nothing released)
    outsider: float  # against a reader of the model who took no part
    shares: int
    expected: int
    noise_multiplier: float  # the effective one (k - 1 shares)
    covered: bool
    summed: bool

    def to_dict(self) -> dict[str, object]:
        return {"round": self.round, "epsilon": _num(self.epsilon),
                "epsilon_outsider": _num(self.outsider),
                "noise_shares": f"{self.shares} of {self.expected}",
                "noise_multiplier": round(self.noise_multiplier, 6),
                "covered": self.covered, "summed": self.summed}

    def line(self) -> str:
        """One line for a log: the round's epsilon and the shares its sum carried."""
        if not self.summed:
            return f"round {self.round}: no sum formed (fewer than 3 adding sites): epsilon 0"
        if not self.covered:
            return (f"round {self.round}: no starting model, the parameters were summed whole "
                    "without noise: not covered by the noise (epsilon unbounded)")
        lowered = (f"; {self.expected - self.shares} dropout(s) took their shares, lowering "
                   "the noise" if self.shares < self.expected else "")
        return (f"round {self.round}: noise shares {self.shares} of {self.expected}{lowered}; "
                f"epsilon {self.epsilon:.4g} against any one participant (outsider "
                f"{self.outsider:.4g})")


@dataclass(frozen=True)
class Summary:
    delta: float
    rounds: tuple[RoundEpsilon, ...]
    total: float  # composed over the covered rounds, against any one participant
    total_outsider: float
    uncovered: tuple[int, ...]  # rounds summed without noise (no starting model)

    def to_dict(self) -> dict[str, object]:
        return {"delta": self.delta, "epsilon_total": _num(self.total),
                "epsilon_total_outsider": _num(self.total_outsider),
                "not_covered": list(self.uncovered),
                "rounds": [r.to_dict() for r in self.rounds]}

    def line(self) -> str:
        """One line for a log or a report."""
        gap = (f"; round(s) {', '.join(map(str, self.uncovered))} summed the parameters whole "
               "without noise (no starting model): not covered") if self.uncovered else ""
        return (f"swarm epsilon {self.total:.4g} at delta {self.delta:g} over "
                f"{sum(1 for r in self.rounds if r.covered and r.summed)} noised rounds "
                f"(outsider {self.total_outsider:.4g}){gap}")


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _events(multipliers: Iterable[float]) -> list:
    import dp_accounting  # the node extra's: imported only where epsilon is asked for

    return [dp_accounting.GaussianDpEvent(z) for z in multipliers]


def epsilon(multipliers: Iterable[float], delta: float) -> float:
    """epsilon at ``delta`` of the Gaussian mechanisms of these noise multipliers, composed
    (RDP accountant; one mechanism: that one's epsilon). 0 for none; inf if one is 0."""
    zs = list(multipliers)
    if not 0 < delta < 1:
        raise ConfigError(f"the accountant's delta must be in (0, 1), got {delta!r}")
    if not zs:
        return 0.0
    if any(not z > 0 for z in zs):
        return math.inf
    from dp_accounting import rdp

    acc = rdp.RdpAccountant()
    for event in _events(zs):
        acc.compose(event)
    return float(acc.get_epsilon(delta))


def _round(r: RoundNoise, delta: float) -> RoundEpsilon:
    if not r.covered:
        return RoundEpsilon(r.round, math.inf, math.inf, r.shares, r.expected, 0.0, False,
                            r.summed)
    if not r.summed:
        return RoundEpsilon(r.round, 0.0, 0.0, r.shares, r.expected, 0.0, True, False)
    z, zo = r.noise_multiplier(), r.noise_multiplier(outsider=True)
    return RoundEpsilon(r.round, epsilon([z], delta), epsilon([zo], delta), r.shares,
                        r.expected, z, True, True)


def summarise(rounds: Iterable[RoundNoise], delta: float) -> Summary:
    """Each round's epsilon and the total over the covered rounds (see the module docstring)."""
    rs = sorted(rounds, key=lambda r: r.round)
    noised = [r for r in rs if r.covered and r.summed]
    return Summary(
        delta, tuple(_round(r, delta) for r in rs),
        epsilon([r.noise_multiplier() for r in noised], delta),
        epsilon([r.noise_multiplier(outsider=True) for r in noised], delta),
        tuple(r.round for r in rs if not r.covered and r.summed))
