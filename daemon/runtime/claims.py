"""Claims: job files the watcher reports are renamed into the spool, then taken in (daemon.runtime.intake) as
queued records in the book or as failure records. A file whose intake failed on the disk stays claimed and is
taken in again at the next rescan."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from daemon.config import Settings
from daemon.ops.history import History
from daemon.runtime.book import JobBook
from daemon.runtime.intake import Intake
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool
from daemon.runtime.status import Status
from daemon.runtime.watch import InboxWatcher


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
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.book = book
        self.spool = spool
        self.outbox = outbox
        self.status = status
        self.history = history
        self.clock = clock
        self.retry: set[Path] = set()
        self._last_retry = clock()

    def claim_ready(self, watcher: InboxWatcher) -> None:
        for path in watcher.ready_files():
            watcher.forget(path)
            claimed = self.spool.claim(path)
            if claimed is not None:
                logger.info("job.claimed file={}", path.name)
                self.take_in(claimed)

    def retry_due(self) -> None:
        if self.retry and self.clock() - self._last_retry >= self.settings.watch.rescan_interval_seconds:
            self._last_retry = self.clock()
            for claimed in sorted(self.retry):
                self.take_in(claimed)

    def take_in(self, claimed: Path) -> None:
        try:
            result = self.intake.process(claimed)
        except Exception as exc:  # e.g. a full disk while writing a record: the file stays spooled
            logger.exception("intake.error file={} error={}; retried at the next rescan", claimed.name, exc)
            self.retry.add(claimed)
            return
        self.retry.discard(claimed)
        for rec in result.queued:
            self.book.add(rec)
        for job_id, category in zip(result.rejected, result.rejected_categories, strict=True):
            failure = self.outbox.failure_path(job_id)
            self.status.job_failed(job_id, category)
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
            self.status.write(force=True)  # new jobs show at once, like every other change of state
