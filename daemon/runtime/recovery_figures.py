"""What recoveries measured on this spool, kept in the state folder, and what that says of the lease grace.

The heartbeat thread keeps the lease through a recovery of any length as long as the recovery reports
progress (daemon.runtime.heartbeat); it stops beating once the loop reported nothing for half the grace. So
the grace must outlast, with a margin, the longest *step* between two progress reports: reading one record
or taking in one file, which on a slow network share can take seconds. Each recovery records its figures in
``<state>/recovery.json`` (the worst seen and the last); ``wan-daemon doctor`` and the daemon's start-up
compare the grace against the worst.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.fsutil import atomic_write_json, read_json

FIGURES_FILE = "recovery.json"
# The grace's half (when the heartbeat stops) must hold this many of the longest step measured.
STEP_MARGIN = 4.0


@dataclass(frozen=True)
class RecoveryFigures:
    records: int
    seconds: float
    longest_step_seconds: float
    at: float

    @property
    def jobs_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class StepTimer:
    """The longest gap between two calls of :meth:`step` (each progress report of a recovery)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.began = self.last = clock()
        self.longest = 0.0

    def step(self) -> None:
        now = self.clock()
        self.longest = max(self.longest, now - self.last)
        self.last = now

    def figures(self, records: int) -> RecoveryFigures:
        self.step()
        return RecoveryFigures(records, self.last - self.began, self.longest, time.time())


def read_figures(state: Path) -> dict[str, RecoveryFigures]:
    """``{"worst": …, "last": …}`` from the state folder; empty when none was recorded (or unreadable)."""
    try:
        data = read_json(state / FIGURES_FILE)
        return {k: RecoveryFigures(**data[k]) for k in ("worst", "last") if isinstance(data.get(k), dict)}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def record_figures(state: Path, figures: RecoveryFigures) -> RecoveryFigures:
    """Keep ``figures`` as the last recovery and, where it is worse (a longer step), as the worst; returns
    the worst. Not fsynced: a lost update loses a measurement, nothing else."""
    worst = read_figures(state).get("worst")
    if worst is None or figures.longest_step_seconds >= worst.longest_step_seconds:
        worst = figures
    doc: dict[str, Any] = {"worst": asdict(worst), "last": asdict(figures)}
    atomic_write_json(state / FIGURES_FILE, doc, durable=False)
    return worst


def grace_advice(grace_seconds: float, worst: RecoveryFigures | None) -> str | None:
    """None when the grace outlasts the worst measured step with the margin; else what to change, and why."""
    if worst is None:
        return None
    needed = 2 * STEP_MARGIN * worst.longest_step_seconds
    if grace_seconds >= needed:
        return None
    return (
        f"instance.lease_grace_seconds ({grace_seconds:g}) is short for this spool: the slowest recovery step "
        f"measured took {worst.longest_step_seconds:.2f} s (a recovery of {worst.records} records in "
        f"{worst.seconds:.1f} s); a daemon whose loop makes no progress for half the grace stops heartbeating "
        f"and is taken over by its peers. Set it to at least {needed:.0f} s."
    )
