"""Retry decisions: a pure function of (error, attempts so far, settings, random draw).

Transient categories are retried with exponential backoff and full jitter
(``sleep = uniform(0, min(cap, base * 2**attempt))``) until ``max_attempts`` attempts, counted on disk,
have been spent; everything else is final at once. No decision ever produces a placeholder video.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import JobError, Outcome


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_seconds: float = 0.0
    reason: str = ""


def decide(error: JobError, attempts: int, *, max_attempts: int, base_seconds: float, cap_seconds: float,
           rng: random.Random | None = None) -> Decision:
    if error.outcome is not Outcome.RETRY:
        return Decision(False, reason=f"{error.category.value} is not retryable")
    if attempts >= max_attempts:
        return Decision(False, reason=f"gave up after {attempts} attempts (worker.max_attempts={max_attempts})")
    draw = (rng or random).random()
    delay = draw * min(cap_seconds, base_seconds * (2 ** max(0, attempts - 1)))
    return Decision(True, delay, f"attempt {attempts} of {max_attempts} failed; retrying in {delay:.1f}s")
