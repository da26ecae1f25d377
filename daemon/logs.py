"""Logging: readable single lines on stderr (journald adds its own metadata), one per lifecycle event."""

from __future__ import annotations

import sys

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"


def setup(level: str = "INFO") -> None:
    logger.remove()
    logger.add(sys.stderr, level=level, format=FORMAT, backtrace=False, diagnose=False)
