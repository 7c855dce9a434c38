"""Fault injection for the failure tests: an object the node service is given, never read from
the environment by production code.

A node gets its faults from the ``faults:`` section of its ``node.yaml`` (test-only; see
:class:`swarmnode.config.FaultSettings`); without one it has none (:data:`NO_FAULTS`). The two
kinds the end-to-end tests need:

- ``stall_commit``: "ROUND:ATTEMPT[:SECONDS]", several separated by commas: as that round's
  leader at that attempt, hang before committing (HPE's "stuck at Merging..."), for good or for
  SECONDS.
- ``exit``: "POINT:ROUND" or "POINT:ROUND+": the process dies (exit 137, no clean-up) at that
  point of that round (with "+": of that round or the first later one that gets there). Points:
  ``before-checkin`` (any site), ``before-push``, ``after-push`` (a member), ``after-commit``
  (the leader).

Pure values and decisions; the driver performs what they say.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXIT_POINTS", "NO_FAULTS", "ExitAt", "Faults", "Stall"]

EXIT_POINTS = ("before-checkin", "before-push", "after-push", "after-commit")


@dataclass(frozen=True)
class Stall:
    round: int
    attempt: int
    seconds: float | None  # None: for good


@dataclass(frozen=True)
class ExitAt:
    point: str
    round: int
    or_later: bool = False


@dataclass(frozen=True)
class Faults:
    stalls: tuple[Stall, ...] = ()
    exit: ExitAt | None = None

    def stall(self, round: int, attempt: int) -> Stall | None:
        """The hang this node's leader does before committing ``round`` at ``attempt``."""
        return next((s for s in self.stalls if (s.round, s.attempt) == (round, attempt)), None)

    def exits(self, point: str, round: int) -> bool:
        """Whether the process dies at ``point`` of ``round``."""
        e = self.exit
        return (e is not None and e.point == point
                and (round == e.round or (e.or_later and round > e.round)))

    @classmethod
    def parse(cls, stall_commit: str = "", exit: str = "") -> Faults:
        """From the strings of the module docstring; ValueError names what is wrong."""
        stalls = []
        for item in (x.strip() for x in stall_commit.split(",")):
            if not item:
                continue
            parts = item.split(":")
            try:
                if len(parts) not in (2, 3):
                    raise ValueError
                seconds = float(parts[2]) if len(parts) == 3 else None
                stalls.append(Stall(int(parts[0]), int(parts[1]), seconds))
            except ValueError:
                raise ValueError(
                    f"stall_commit {item!r}: expected ROUND:ATTEMPT or ROUND:ATTEMPT:SECONDS"
                ) from None
        at = None
        if exit.strip():
            point, _, rest = exit.strip().partition(":")
            if point not in EXIT_POINTS:
                raise ValueError(f"exit {exit!r}: the point must be one of "
                                 f"{', '.join(EXIT_POINTS)}")
            try:
                at = ExitAt(point, int(rest.rstrip("+")), rest.endswith("+"))
            except ValueError:
                raise ValueError(f"exit {exit!r}: expected POINT:ROUND or POINT:ROUND+") from None
        return cls(tuple(stalls), at)


NO_FAULTS = Faults()
