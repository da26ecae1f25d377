"""Recovery and leases: rebuild the book from the spool after any stop (kill -9 included), adopt the spools
of daemons that stopped heartbeating, and step back when this daemon was itself presumed dead."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loguru import logger

from daemon.config import ConfigError, Settings
from daemon.errors import Category, JobError
from daemon.jobs import JobState
from daemon.runtime.book import JobBook
from daemon.runtime.leases import Lease
from daemon.runtime.outbox import Outbox
from daemon.runtime.placement import Placement
from daemon.runtime.spool import Spool


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
    ) -> None:
        self.settings = settings
        self.book = book
        self.placement = placement
        self.spool = spool
        self.lease = lease
        self.outbox = outbox
        self.take_in = take_in
        self.forget_intake_retries = forget_intake_retries
        self.clock = clock
        self._last_takeover_check = float("-inf")

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
        self.recover_spool("the daemon stopped while this job was running")

    def recover_spool(self, crash_reason: str) -> None:
        book = self.book
        for rec in list(self.spool.iter_records()):
            if rec.id in book.records:
                continue
            book.add(rec)
            if rec.state is JobState.RUNNING and not book.done_if_published(rec, "found published after a restart"):
                book.fail_or_retry(rec, JobError(Category.WORKER_CRASHED, crash_reason))
        book.ensure_downloads()
        for claimed in self.spool.claimed_files():
            self.take_in(claimed)
        for source in {r.source for r in book.records.values()}:
            book.release_if_finished(source)
        logger.info("daemon.recovered queued={} records={}", len(book.in_state(JobState.QUEUED)), len(book.records))

    def take_over_the_dead(self) -> None:
        """Adopt the spools of daemons whose lease expired (several daemons sharing one inbox)."""
        now = self.clock()
        if now - self._last_takeover_check < self.settings.instance.takeover_check_seconds:
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
        self.placement.drop_all()
        self.book.records.clear()
        self.forget_intake_retries()
        self.lease.renew_after_loss()
        self.spool.ensure()
        self.recover_spool("the daemon lost its lease while this job was running")  # anything left is ours
