"""Logging: readable single lines on stderr (journald adds its own metadata), one per lifecycle event."""

from __future__ import annotations

import logging
import sys

from loguru import logger


class _DropStopRace(logging.Filter):
    """watchdog logs this when its inotify thread is stopped while reading: harmless, and alarming in a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"


def setup(level: str = "INFO") -> None:
    logger.remove()
    logger.add(sys.stderr, level=level, format=FORMAT, backtrace=False, diagnose=False)
    logging.getLogger("watchdog.observers.inotify").addFilter(_DropStopRace())
