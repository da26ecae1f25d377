"""Which queued job runs next. Pure: no torch, no I/O; the daemon hands it records and the time.

Highest priority first, FIFO (intake order) within a priority; a job waiting out a retry backoff
(``not_before`` in the future) is skipped until its time comes.
"""

from __future__ import annotations

from typing import Iterable

from .jobs import JobRecord, JobState


def order_key(record: JobRecord) -> tuple[int, int]:
    return (-record.priority, record.seq)


def pick_next(queued: Iterable[JobRecord], now: float) -> JobRecord | None:
    ready = [r for r in queued if r.state is JobState.QUEUED and r.not_before <= now]
    return min(ready, key=order_key, default=None)


def next_wakeup(queued: Iterable[JobRecord], now: float) -> float | None:
    """When the earliest job still in backoff becomes ready (None if none waits)."""
    later = [r.not_before for r in queued if r.state is JobState.QUEUED and r.not_before > now]
    return min(later, default=None)
