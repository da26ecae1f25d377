"""Claims: job files the watcher reports are renamed into the spool, then taken in (daemon.runtime.intake) as
queued records in the book or as failure records. A file whose intake failed on the disk stays claimed and is
taken in again at the next rescan. Every job taken in has its history row from then on, written a round of claims
at a time (History.record_many: one transaction per HISTORY_BATCH jobs, not one per job)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from daemon.config import Settings
from daemon.jobs import JobRecord
from daemon.ops.history import History
from daemon.runtime.book import JobBook
from daemon.runtime.intake import Intake, LeaseLost
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool
from daemon.runtime.status import Status
from daemon.runtime.watch import InboxWatcher

CLAIM_GROUP = 8  # files claimed per folder sync
HISTORY_BATCH = 512  # jobs taken in per history transaction (at least one per round of claims)


class Claims:
    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        book: JobBook,
        spool: Spool,
        outbox: Outbox,
        *,
        status: Status,
        history: History | None,
        clock: Callable[[], float],
        progress: Callable[[], object] = lambda: None,
        lease_held: Callable[[], bool] = lambda: True,
        on_lease_lost: Callable[[], None] = lambda: None,
        after_claim: Callable[[Path], None] | None = None,
        before_take_in: Callable[[Path], None] | None = None,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.book = book
        self.spool = spool
        self.outbox = outbox
        self.status = status
        self.history = history
        self.clock = clock
        self.progress = progress  # the loop is alive (daemon.runtime.heartbeat): called per file taken in
        self.lease_held = lease_held
        self.on_lease_lost = on_lease_lost
        self.after_claim = after_claim  # test seams (daemon.runtime.daemon.Seams)
        self.before_take_in = before_take_in
        self.retry: set[Path] = set()
        self._last_retry = clock()

    def claim_ready(self, watcher: InboxWatcher) -> None:
        """Claim the ready files a few at a time (renames, then one fsync of the two folders), taking each group
        in before the next: one folder sync serves a group, and daemons sharing the inbox still share its files
        (a daemon that renamed every ready file before taking any in would leave its peers idle)."""
        ready = watcher.ready_files()
        taken: list[JobRecord] = []
        for start in range(0, len(ready), CLAIM_GROUP):
            claimed = []
            for path in ready[start : start + CLAIM_GROUP]:
                watcher.forget(path)
                dest = self.spool.claim(path, sync=False)
                if dest is not None:
                    logger.info("job.claimed file={}", path.name)
                    claimed.append(dest)
                    if self.after_claim is not None:
                        self.after_claim(dest)
            if claimed:
                try:
                    self.spool.sync_claims(self.settings.paths.inbox)
                except FileNotFoundError:
                    if self.lease_held():
                        raise
                    # Frozen mid-claim and taken over meanwhile: our spool folder, with the files just renamed
                    # into it, is the taker's now. Not a write error: step back, take nothing in.
                    logger.error("claims.stopped: the spool was taken over during the claim; stepping back")
                    self.on_lease_lost()
                    return
            for dest in claimed:
                if self.before_take_in is not None:
                    self.before_take_in(dest)
                taken += self._take_in(dest)
                self.progress()
            if len(taken) >= HISTORY_BATCH:
                self._record(taken)
                taken = []
        self._record(taken)

    def retry_due(self) -> None:
        if self.retry and self.clock() - self._last_retry >= self.settings.watch.rescan_interval_seconds:
            self._last_retry = self.clock()
            for claimed in sorted(self.retry):
                self.take_in(claimed)

    def take_in(self, claimed: Path) -> None:
        """Take one claimed file in (a retry, a recovery), its jobs recorded in the history."""
        self._record(self._take_in(claimed))

    def _record(self, taken: list[JobRecord]) -> None:
        if self.history is not None and taken:
            self.history.record_many([rec.summary() for rec in taken])

    def _take_in(self, claimed: Path) -> list[JobRecord]:
        """The file's jobs into the book; returns them (for the history)."""
        try:
            result = self.intake.process(claimed)
        except LeaseLost as exc:
            logger.error("intake.stopped file={}: {}", claimed.name, exc)
            self.on_lease_lost()  # steps back now: drops every record, writes nothing
            return []
        except Exception as exc:  # e.g. a full disk while writing a record: the file stays spooled
            logger.exception("intake.error file={} error={}; retried at the next rescan", claimed.name, exc)
            self.retry.add(claimed)
            return []
        self.retry.discard(claimed)
        for rec in result.queued:
            self.book.add(rec)
        for rejection in result.rejections:
            job_id, category, failure = rejection.id, rejection.category, rejection.record
            self.status.job_failed(job_id, category, str(failure))
            if self.history is not None:
                record = {}
                with contextlib.suppress(OSError, ValueError):
                    record = json.loads(failure.read_text())
                self.history.record(
                    {
                        "token": f"rejected:{claimed.name}:{job_id}",
                        "id": job_id,
                        "file": record.get("file"),
                        "status": "failed",
                        "attempts": 0,
                        "queued_at": self.clock(),
                        "finished_at": self.clock(),
                        "error_category": category,
                        "error_message": record.get("message"),
                        "recovery_suggestions": record.get("recovery_suggestions"),
                        "failure_record": str(failure),
                        "instance": self.settings.owner,
                    }
                )
        self.book.release_if_finished(claimed.name)
        if result.queued or result.rejected:
            self.status.changed()  # new jobs show in this round's health file, like every other change
        return result.queued
