"""The folders the daemon writes, and what stops it: pause instead of failing when one is full, unwritable or gone.

A pause has a kind, and says which folder and why (health file ``pause``/``paused``, ``status``,
``check-health``, metrics, the systemd STATUS line):

- ``disk_full``: the outbox or state filesystem has less than ``limits.min_free_mb`` free, or a write
  failed with ENOSPC/EDQUOT;
- ``unwritable``: a read-only mount (EROFS), or a write refused (EACCES/EPERM: permissions lost on a share);
- ``folder_missing``: the inbox, outbox or state folder is gone (an unmounted share, a deleted folder).

While paused, nothing new is claimed or started (daemon.runtime.daemon). Every ``CHECK_INTERVAL_SECONDS``
the folders are looked at without writing (present? a read-only mount? low space?) and, after a write
failed, probed with a real write: the pause ends once they all pass. A job whose failure :meth:`screen`
finds to be the folders' fault goes back to the queue with its attempt given back (daemon.policy retries
``disk_full`` and ``unwritable`` without counting them): the job was not at fault, and the failure record
could not have been written anyway.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.errors import Category, JobError
from daemon.fsutil import folder_problem, probe_write

CHECK_INTERVAL_SECONDS = 1.0

DISK_FULL, UNWRITABLE, FOLDER_MISSING = "disk_full", "unwritable", "folder_missing"
PAUSE_KINDS = (DISK_FULL, UNWRITABLE, FOLDER_MISSING)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})


@dataclass(frozen=True)
class Pause:
    """Why intake and dispatch are paused."""

    kind: str  # one of PAUSE_KINDS
    folder: str | None
    reason: str  # a sentence for people: what, where, what happens meanwhile
    since: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": self.folder, "reason": self.reason, "since": self.since}


def kind_of(exc: OSError) -> str:
    if exc.errno in FULL_ERRNOS:
        return DISK_FULL
    if exc.errno in MISSING_ERRNOS:
        return FOLDER_MISSING
    return UNWRITABLE


def describe(kind: str, folder: Path | str | None, detail: str) -> str:
    where = f" {folder}" if folder else ""
    if kind == DISK_FULL:
        what = f"disk full:{where} {detail}"
    elif kind == FOLDER_MISSING:
        what = f"folder missing:{where} is gone ({detail}; an unmounted share or a deleted folder?)"
    else:
        what = f"folder unwritable:{where} refuses writes ({detail})"
    return f"{what}; intake and new jobs are paused until it is back"


class DiskGuard:
    """``folders``: where the daemon writes (outbox, state): watched for space, read-only mounts and failed
    writes. ``present``: folders that must also exist (the inbox)."""

    def __init__(
        self,
        folders: Sequence[Path],
        *,
        min_free_mb: int,
        clock: Callable[[], float] = time.time,
        present: Sequence[Path] = (),
    ) -> None:
        self.folders = [Path(f) for f in folders]
        self.present = [Path(f) for f in present]
        self.min_free = min_free_mb * (1 << 20)
        self.clock = clock
        self.pause: Pause | None = None
        self.rechecked = False  # the last paused() looked at the folders again (rather than answer from memory)
        self._write_failed = False  # a write failed: probe with real writes until one passes everywhere
        self._last_check = float("-inf")

    @property
    def reason(self) -> str | None:
        return self.pause.reason if self.pause else None

    @property
    def kind(self) -> str | None:
        return self.pause.kind if self.pause else None

    # ---- what the daemon reports -----------------------------------------------------------------

    def report_full(self, detail: str) -> None:
        """A write failed with ENOSPC/EDQUOT: pause until space is back and a probe write succeeds."""
        self._enter(DISK_FULL, None, detail)

    def screen(self, err: JobError) -> JobError:
        """A job failed with ``err`` (or its result could not be recorded): when the folders are at fault (full,
        unwritable, gone: found by looking at them and trying a write now, whatever the error says, since
        ffmpeg on a read-only outbox fails with a message, not an errno), pause, and return the error as
        ``disk_full`` or ``unwritable``, which are retried without counting, with the job's own error kept in
        its message. Anything else is returned as it is. A cancellation is never turned into a retry; an
        error already screened is not screened again (it is reused when its record is written late)."""
        if err.category is Category.CANCELLED or "pause" in err.details:
            return err
        if err.category is Category.DISK_FULL:
            self.report_full(err.message)
            return JobError(err.category, err.message, err.suggestions, {**err.details, "pause": DISK_FULL})
        problem = self._seen_without_writing() or self._probe()
        if problem is None:
            return err
        kind, folder, detail = problem
        self._enter(kind, folder, detail)
        category = Category.DISK_FULL if kind == DISK_FULL else Category.UNWRITABLE
        assert self.pause is not None
        return JobError(
            category,
            f"{self.pause.reason} (the job met: {err})",
            err.suggestions,
            {**err.details, "pause": kind, "cause": err.category.value},
        )

    def _enter(self, kind: str, folder: Path | None, detail: str) -> None:
        """A write failed: paused, and probed with real writes until they pass."""
        self._write_failed = True
        self._last_check = self.clock()  # the folders were just looked at: the next look is an interval away
        self._set(kind, folder, detail)

    def _set(self, kind: str, folder: Path | None, detail: str) -> None:
        where = str(folder) if folder else None
        if self.pause is None or (self.pause.kind, self.pause.folder) != (kind, where):
            self.pause = Pause(kind, where, describe(kind, folder, detail), self.clock())
            logger.error("disk.paused kind={} reason={}", kind, self.pause.reason)

    # ---- the loop's question ---------------------------------------------------------------------

    def paused(self) -> bool:
        """Whether intake and dispatch pause now; the folders are looked at again every CHECK_INTERVAL_SECONDS."""
        now = self.clock()
        self.rechecked = now - self._last_check >= CHECK_INTERVAL_SECONDS
        if not self.rechecked:
            return self.pause is not None
        self._last_check = now
        problem = self._seen_without_writing() or self._low_space() or (self._probe() if self._write_failed else None)
        if problem is None:
            if self.pause is not None:
                logger.info("disk.resumed (was: {})", self.pause.reason)
            self.pause = None
            self._write_failed = False
            return False
        self._set(*problem)
        return True

    def folder_gone(self, folder: Path) -> bool:
        """Paused because ``folder`` (or a folder above it) is missing."""
        if self.pause is None or self.pause.kind != FOLDER_MISSING or self.pause.folder is None:
            return False
        gone = Path(self.pause.folder)
        return gone == folder or gone in Path(folder).parents

    # ---- looking at the folders ------------------------------------------------------------------

    def _seen_without_writing(self) -> tuple[str, Path | None, str] | None:
        for folder in [*self.present, *self.folders]:
            exc = folder_problem(folder)
            if exc is not None:
                return kind_of(exc), folder, exc.strerror or str(exc)
        return None

    def _low_space(self) -> tuple[str, Path | None, str] | None:
        for folder in self.folders:
            try:
                free = shutil.disk_usage(folder).free
            except OSError:
                continue
            if free < self.min_free:
                return (
                    DISK_FULL,
                    folder,
                    f"has {free / (1 << 20):.1f} MiB free, less than limits.min_free_mb ({self.min_free >> 20} MiB)",
                )
        return None

    def _probe(self) -> tuple[str, Path | None, str] | None:
        for folder in self.folders:
            exc = probe_write(folder)
            if exc is not None:
                return kind_of(exc), folder, f"a test write failed: {exc.strerror or exc}"
        return None
