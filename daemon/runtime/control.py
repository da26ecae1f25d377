"""Operator control: what ``wan-daemon pause|resume|priority`` leave in the state folder (daemon.control),
applied by every daemon on the inbox on its one decision thread, once per round of the loop (Daemon.tick).
Cancels stay the job book's (JobBook.take_cancels).

- **pause** (``<state>/control/pause.json``, level-triggered: there = paused, for a daemon that starts later
  too): nothing new is dispatched; intake, claims, takeovers and downloads go on, so new jobs are queued and
  show in the queue. ``mode: drain``: running jobs finish. ``mode: now``: jobs on a device are interrupted at
  their next step and go back to the queue with the attempt given back (one being encoded finishes).
  ``free_vram``: each worker with no job is *parked*: its process (or Ray actor) is stopped, freeing its warm
  pipelines and CUDA context, and not respawned until the pause is lifted. A changed pause is applied as it
  now reads. The file gone: resumed, parked workers start again (cold: the next job loads its model).
- **priority** (``<state>/control/priority/<id>``): whichever daemon holds the job sets the new priority on its
  record (persisted without a change of state, JobBook.amend; a queued job is re-ranked at once, a running
  one keeps it for a requeue) and removes the file; a value outside PRIORITY_MIN..PRIORITY_MAX is refused.

Each request applied is logged and recorded in the history's ``operations`` (who asked, when, what). Cheap when
nothing changed: one stat of the pause file (read again only when its inode, mtime or size changed) and one
listing of the priority folder per round.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from loguru import logger

from daemon.config import Settings
from daemon.control import (
    PauseRequest,
    epoch,
    pause_path,
    predates,
    priority_dir,
    read_pause,
    read_request,
    read_resume,
)
from daemon.jobs import JobRecord
from daemon.ranking import PRIORITY_MAX, PRIORITY_MIN
from daemon.runtime.book import JobBook
from daemon.runtime.placement import Placement
from daemon.runtime.status import Status


class OperatorControl:
    def __init__(
        self, settings: Settings, book: JobBook, placement: Placement, *, status: Status, clock: Callable[[], float]
    ) -> None:
        self.state_dir = settings.paths.state
        self.book = book
        self.placement = placement
        self.status = status
        self.clock = clock
        self.pause: PauseRequest | None = None
        self.since: float | None = None  # when this daemon first saw the pause in force
        self._seen: tuple[int, int, int] | None = None  # the pause file's (inode, mtime, size) when last read

    @property
    def paused(self) -> bool:
        return self.pause is not None

    @property
    def reason(self) -> str | None:
        """The pause described for people (PauseRequest.describe), None when not paused."""
        return self.pause.describe() if self.pause is not None else None

    def view(self) -> dict[str, Any] | None:
        """The pause in force for the health file (``operator_pause``): the request plus ``since``."""
        if self.pause is None:
            return None
        return {**self.pause.to_dict(), "since": self.pause.at or self.since}

    def tick(self) -> None:
        """One round: the pause (read again when its file changed) and what it asks of running jobs and idle
        workers, then the priority requests."""
        self.check_pause()
        if self.pause is not None:
            self._hold(self.pause)
        self.apply_priorities()

    # ---- pause ---------------------------------------------------------------------------------

    def check_pause(self) -> None:
        try:
            st = os.stat(pause_path(self.state_dir))
        except FileNotFoundError:
            if self.pause is not None and not self.state_dir.is_dir():
                return  # the state folder is gone (an unmounted share: the disk guard pauses), not the pause
            seen = None
        except OSError:  # the state folder unreadable: the disk guard pauses; keep what we knew
            return
        else:
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        try:
            request = read_pause(self.state_dir) if seen is not None else None
        except OSError:  # EIO, ESTALE on a share: read again next round (the signature is not taken as seen)
            return
        self._seen = seen
        if request == self.pause:
            return  # touched, or rewritten the same
        if request is None:
            self._resume()
        else:
            self._paused(request)

    def _paused(self, request: PauseRequest) -> None:
        first = self.pause is None
        self.pause = request
        if first:
            self.since = self.clock()
        by = request.by or "?"
        logger.info(
            "daemon.paused by={} mode={} free_vram={}{}{}",
            by,
            request.mode,
            request.free_vram,
            "" if first else " (changed)",
            f" reason={request.reason}" if request.reason else "",
        )
        detail = {"mode": request.mode, "free_vram": request.free_vram, "reason": request.reason}
        self.book.record_operation("pause", by, None, **detail, requested_at=request.at, changed=not first)
        self.status.changed()

    def _resume(self) -> None:
        was, self.pause, self.since = self.pause, None, None
        assert was is not None
        note = read_resume(self.state_dir)
        by = str(note.get("by") or "?") if (epoch(note.get("at")) or 0.0) >= was.at else "?"
        logger.info("daemon.resumed by={} (paused by {})", by, was.by or "?")
        self.book.record_operation("resume", by, None, paused_by=was.by, paused_at=was.at)
        for worker in self.placement.workers.values():
            worker.unpark()
        self.status.state = "busy" if self.placement.running else "idle"  # dispatch says more this round
        self.status.changed()

    def _hold(self, pause: PauseRequest) -> None:
        """What the pause asks of this round: running jobs off their device (``now``), idle workers parked
        (``free_vram``); the daemon's state says whether jobs still drain."""
        if pause.mode == "now":
            note = f"paused by {pause.by or 'an operator'}"
            for job_id, job in list(self.placement.running.items()):
                # Once each: a job interrupted with a note keeps it until it stops (Placement.interrupt, on_event).
                if job.on_device and job_id not in self.book.interrupt_notes:
                    self.placement.interrupt(job_id, note)
        if pause.free_vram:
            for name in self.placement.idle_workers():
                if self.placement.workers[name].status.state != "parked":
                    self.placement.workers[name].park()
        else:  # changed to a pause that keeps the GPUs: workers parked by the one before start again
            for worker in self.placement.workers.values():
                worker.unpark()
        state = "pausing" if self.placement.running else "paused"
        if self.status.state != state:
            self.status.state = state
            self.status.changed()

    # ---- priorities ----------------------------------------------------------------------------

    def apply_priorities(self) -> None:
        folder = priority_dir(self.state_dir)
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        for job_id in names:
            rec = self.book.records.get(job_id)
            if rec is None:
                continue  # another daemon's job (or a temp file being written): not ours to touch
            # Taken out of the folder before it is read: a newer request renamed into place meanwhile stays for
            # the next round instead of being deleted unread.
            path, taken = folder / job_id, folder / f".taking-{job_id}"
            try:
                os.rename(path, taken)
            except OSError:
                continue
            try:
                self._set_priority(rec, read_request(taken))
            except OSError as exc:  # the record could not be written: the request goes back, tried next round
                self.book.on_write_error(exc)
                with contextlib.suppress(OSError):
                    if not path.exists():
                        os.rename(taken, path)
            with contextlib.suppress(FileNotFoundError):
                taken.unlink()

    def _set_priority(self, rec: JobRecord, request: dict[str, Any]) -> None:
        value, by = request.get("priority"), str(request.get("by") or "?")
        error = None
        if isinstance(value, bool) or not isinstance(value, int):
            error = f"the priority must be a whole number, not {value!r}"
        elif not PRIORITY_MIN <= value <= PRIORITY_MAX:
            error = f"the priority {value} is outside {PRIORITY_MIN}..{PRIORITY_MAX}"
        elif rec.state is None or rec.state.terminal:
            error = f"the job has ended ({rec.state.value if rec.state else 'new'})"
        elif predates(request, rec.received_at):
            error = "the request predates this job (left for an earlier job of this id)"
        asked = {"requested_at": request.get("requested_at"), "state": rec.state.value if rec.state else None}
        if error is not None:
            logger.bind(job=rec.id).warning("job.priority_refused id={} by={} error={}", rec.id, by, error)
            self.book.record_operation("priority", by, rec.id, applied=False, priority=value, error=error, **asked)
            return
        assert isinstance(value, int)
        old = rec.priority
        if value != old:
            self.book.amend(rec, f"priority {old} -> {value} by {by}", priority=value)
        logger.bind(job=rec.id).info("job.priority id={} priority={} was={} by={}", rec.id, value, old, by)
        self.book.record_operation("priority", by, rec.id, applied=True, priority=value, was=old, **asked)
