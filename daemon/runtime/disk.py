"""Free space on the outbox and spool filesystems: pause instead of failing when the disk is full.

A job that met a full disk is retried later, never failed for good; intake and dispatch pause while
any watched filesystem has less than ``limits.min_free_mb`` free, or after an ENOSPC until a probe
write succeeds again. The health file says why.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from daemon.fsutil import probe_write

CHECK_INTERVAL_SECONDS = 1.0


class DiskGuard:
    def __init__(self, folders: list[Path], *, min_free_mb: int, clock: Callable[[], float] = time.time) -> None:
        self.folders = [Path(f) for f in folders]
        self.min_free = min_free_mb * (1 << 20)
        self.clock = clock
        self.reason: str | None = None
        self._full_reported = False
        self._last_check = float("-inf")

    def report_full(self, detail: str) -> None:
        """A write failed with ENOSPC/EDQUOT: pause until space is back and a probe write succeeds."""
        self._full_reported = True
        self._last_check = float("-inf")
        if not self.reason:
            self.reason = f"disk full: {detail}"
            logger.error("disk.paused reason={}", self.reason)

    def paused(self) -> bool:
        now = self.clock()
        if now - self._last_check < CHECK_INTERVAL_SECONDS:
            return self.reason is not None
        self._last_check = now
        reason = self._low_space() or (self._probe_fails() if self._full_reported else None)
        if reason is None and self.reason is not None:
            logger.info("disk.resumed (was: {})", self.reason)
            self._full_reported = False
        elif reason is not None and reason != self.reason:
            logger.error("disk.paused reason={}", reason)
        self.reason = reason
        return reason is not None

    def _low_space(self) -> str | None:
        for folder in self.folders:
            try:
                free = shutil.disk_usage(folder).free
            except FileNotFoundError:
                continue
            if free < self.min_free:
                return (
                    f"disk full: {folder} has {free / (1 << 20):.1f} MiB free, less than "
                    f"limits.min_free_mb ({self.min_free >> 20} MiB); intake and new jobs are paused"
                )
        return None

    def _probe_fails(self) -> str | None:
        for folder in self.folders:
            exc = probe_write(folder)
            if exc is not None:
                return f"disk full: cannot write to {folder} ({exc.strerror}); intake and new jobs are paused"
        return None
