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

An exit fault fires once per data folder: before the process dies it writes the fault to
``fault-exit.fired`` there (:meth:`Faults.once_in`), and a node started again on that folder (a
container's restart policy, a test starting it again) runs without it; otherwise
"POINT:ROUND+" would end a restarted node again at every later round.

Values and decisions (and that one record); the driver performs what they say.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

__all__ = ["EXIT_POINTS", "FIRED_FILE", "NO_FAULTS", "ExitAt", "Faults", "Stall"]

EXIT_POINTS = ("before-checkin", "before-push", "after-push", "after-commit")
FIRED_FILE = "fault-exit.fired"  # in the node's data folder: the exit fault that fired there


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

    def __str__(self) -> str:
        """As the config writes it: POINT:ROUND or POINT:ROUND+."""
        return f"{self.point}:{self.round}{'+' if self.or_later else ''}"


@dataclass(frozen=True)
class Faults:
    stalls: tuple[Stall, ...] = ()
    exit: ExitAt | None = None
    record: Path | None = None  # where the exit fault is noted as it fires (once_in)

    def stall(self, round: int, attempt: int) -> Stall | None:
        """The hang this node's leader does before committing ``round`` at ``attempt``."""
        return next((s for s in self.stalls if (s.round, s.attempt) == (round, attempt)), None)

    def exits(self, point: str, round: int) -> bool:
        """Whether the process dies at ``point`` of ``round``; if so, and the plan has a
        record file (:meth:`once_in`), the fault is written there first."""
        e = self.exit
        hit = (e is not None and e.point == point
               and (round == e.round or (e.or_later and round > e.round)))
        if hit and self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(f"{e}\n")
        return hit

    def once_in(self, data_dir: Path) -> Faults:
        """This plan for a node whose data folder is ``data_dir``: without the exit fault if
        that fault already fired there (its FIRED_FILE names it), else noting it there as it
        fires. A different exit fault in the config fires again (once)."""
        if self.exit is None:
            return self
        record = Path(data_dir) / FIRED_FILE
        try:
            fired = record.read_text().strip()
        except OSError:  # not there (or unreadable): it has not fired
            fired = ""
        if fired == str(self.exit):
            return replace(self, exit=None, record=None)
        return replace(self, record=record)

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
