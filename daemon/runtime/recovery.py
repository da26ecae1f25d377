"""Recovery and leases: rebuild the book from the spool after any stop (kill -9 included), adopt the spools
of daemons that stopped heartbeating, and step back when this daemon was itself presumed dead.

A recovery can be long (a spool of thousands of records on a network share). While it runs it reports
progress to the heartbeat for every record, so the lease is kept however long it takes (a stuck one is
not, daemon.runtime.heartbeat); ``status.recovery`` says how far it got (health file, STATUS line), and at
start-up, before READY=1, systemd's start timeout is extended as it goes (``EXTEND_TIMEOUT_USEC``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from daemon.config import ConfigError, Settings
from daemon.errors import Category, JobError
from daemon.jobs import JobRecord, JobState
from daemon.runtime.book import JobBook
from daemon.runtime.leases import Lease
from daemon.runtime.outbox import Outbox
from daemon.runtime.placement import Placement
from daemon.runtime.recovery_figures import StepTimer, grace_advice, record_figures
from daemon.runtime.spool import Spool
from daemon.runtime.status import Status

# While recovering: how often the health file, the STATUS line and (at start-up) the start timeout are
# refreshed, and by how much each refresh extends systemd's start timeout, counted from then.
REPORT_EVERY_SECONDS = 5.0
START_TIMEOUT_MARGIN_SECONDS = 60.0


class Recovery:
    def __init__(
        self,
        settings: Settings,
        book: JobBook,
        placement: Placement,
        spool: Spool,
        lease: Lease,
        outbox: Outbox,
        *,
        take_in: Callable[[Path], None],
        forget_intake_retries: Callable[[], None],
        clock: Callable[[], float],
        status: Status,
        progress: Callable[[], object] = lambda: None,
        per_record: Callable[[], None] | None = None,
        report_every: float = REPORT_EVERY_SECONDS,
    ) -> None:
        """``progress``: tells the heartbeat that recovery is moving (called for every record and file).
        ``per_record``: a seam for tests (a slow spool), called for every record read; None in production."""
        self.settings = settings
        self.book = book
        self.placement = placement
        self.spool = spool
        self.lease = lease
        self.outbox = outbox
        self.take_in = take_in
        self.forget_intake_retries = forget_intake_retries
        self.clock = clock
        self.status = status
        self.progress = progress
        self.per_record = per_record
        self.report_every = report_every
        self._last_takeover_check = float("-inf")
        self._no_takeovers_until = float("-inf")  # for one grace after this daemon lost its lease
        self._last_report = float("-inf")

    def check_same_filesystem(self) -> None:
        inbox, state = self.settings.paths.inbox, self.settings.paths.state
        state.mkdir(parents=True, exist_ok=True)
        if inbox.stat().st_dev != state.stat().st_dev:
            raise ConfigError(
                f"paths.state ({state}) must be on the same filesystem as the inbox ({inbox}): "
                "claiming a job is an atomic rename between them"
            )

    def recover(self) -> None:
        """Rebuild the daemon's view from the spool alone (after a crash, kill -9 or a clean stop)."""
        self.outbox.clean_temps()
        for folder in self.lease.my_takeovers():  # a merge that a crash interrupted
            self.spool.adopt(folder)
        self.recover_spool("the daemon stopped while this job was running", starting=True)

    def recover_spool(self, crash_reason: str, *, starting: bool = False) -> None:
        """Add the spool's records that the book lacks; a RUNNING one is done if published, else retried.
        ``starting``: before READY=1 (systemd's start timeout is extended while it runs)."""
        book = self.book
        began = time.monotonic()
        timer = StepTimer()

        def step() -> None:
            self.progress()
            timer.step()

        total = self._count_records()
        running: list[JobRecord] = []
        read = 0
        try:
            # Every record first, then the RUNNING ones: a failure releases its source file once all of that
            # file's jobs are finished, which can only be judged with all of them in the book.
            for rec in self.spool.iter_records():
                read += 1
                step()
                if self.per_record is not None:
                    self.per_record()
                self._report(read, max(total, read), starting)
                if rec.id in book.records:
                    continue
                book.add(rec)
                if rec.state is JobState.RUNNING:
                    running.append(rec)
            for rec in running:
                step()
                if not book.done_if_published(rec, "found published after a restart"):
                    book.fail_or_retry(rec, JobError(Category.WORKER_CRASHED, crash_reason))
            book.ensure_downloads()
            for claimed in self.spool.claimed_files():
                step()
                if not book.fully_taken_in(claimed.name):
                    self.take_in(claimed)
            for source in {r.source for r in book.records.values()}:
                step()
                book.release_if_finished(source)
        finally:
            self.status.recovery = None
        seconds = time.monotonic() - began
        self._record_figures(timer, read)
        logger.info(
            "daemon.recovered queued={} records={} read={} seconds={:.2f} jobs_per_second={:.1f}",
            book.count(JobState.QUEUED),
            len(book.records),
            read,
            seconds,
            read / seconds if seconds > 0 else 0.0,
        )

    def _record_figures(self, timer: StepTimer, read: int) -> None:
        """Keep what this recovery measured; warn when the grace is short for the worst one measured."""
        try:
            worst = record_figures(self.settings.paths.state, timer.figures(read))
        except OSError as exc:
            logger.warning("recovery.figures_unsaved error={}", exc)
            return
        advice = grace_advice(self.settings.instance.lease_grace_seconds, worst)
        if advice is not None:
            logger.warning("config.lease_grace_short: {}", advice)

    def _count_records(self) -> int:
        """How many job folders the spool holds (a listing, no record read): the N of "recovering n/N"."""
        try:
            with os.scandir(self.spool.jobs) as entries:
                return sum(1 for e in entries if not e.name.startswith("."))
        except FileNotFoundError:
            return 0

    def _report(self, done: int, total: int, starting: bool) -> None:
        """``status.recovery`` always; the health file and STATUS line (and, at start-up, a longer start
        timeout) at most every ``report_every`` seconds, and for the first record."""
        self.status.recovery = (done, total)
        now = time.monotonic()
        if now - self._last_report < self.report_every:
            return
        self._last_report = now
        if starting:
            self.status.notifier.extend_timeout(START_TIMEOUT_MARGIN_SECONDS)
        self.status.write(force=True)  # the health file, the watchdog ping and STATUS=recovering n/N

    def take_over_the_dead(self) -> None:
        """Adopt the spools of daemons whose lease expired (several daemons sharing one inbox)."""
        now = self.clock()
        if now - self._last_takeover_check < self.settings.instance.takeover_check_seconds:
            return
        if now < self._no_takeovers_until:
            # We just lost our lease: our view of the others may be as stale as theirs was of us (a freeze, a
            # partition, cached attributes). Whoever took us over is alive; give it a grace to show it.
            return
        self._last_takeover_check = now
        for dead in self.lease.expired_owners():
            self.lease.take_over(dead)  # None: another daemon won it
        for folder in self.lease.my_takeovers():  # includes merges a crash or a lost lease interrupted
            files_before = len(self.spool.claimed_files())
            adopted = self.spool.adopt(folder)
            if not adopted and len(self.spool.claimed_files()) == files_before:
                continue
            dead = folder.name.split("~")[1]
            logger.warning("lease.adopted from={} jobs={}", dead, len(adopted))
            self.recover_spool(f"daemon {dead!r} stopped heartbeating while this job was running")

    def lease_lost(self) -> None:
        """Another daemon took our spool while we were unresponsive: everything we held is theirs now. Drop
        it without publishing anything, and start again with an empty spool."""
        logger.error(
            "lease.lost owner={}: another daemon took over our jobs; dropping {} records without publishing",
            self.settings.owner,
            len(self.book.records),
        )
        # No takeover check for one grace: whoever took us over is alive (see take_over_the_dead).
        self._no_takeovers_until = self.clock() + self.settings.instance.lease_grace_seconds
        self.placement.drop_all()
        self.book.drop_all()
        self.forget_intake_retries()
        self.lease.renew_after_loss()
        self.spool.ensure()
        self.recover_spool("the daemon lost its lease while this job was running")  # anything left is ours
