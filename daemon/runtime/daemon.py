"""The daemon: wires watch -> claims/intake -> job book -> placement (scheduler, workers) -> publishing, with
recovery, leases and status around them, and runs the loop.

One thread makes every decision. ``tick()`` does one round (progress for the heartbeat, a lost lease,
takeovers, schedules, claim ready files, cancels, downloads, worker events, reconcile, an operator's pause and
priorities (daemon.runtime.control), dispatch unless paused, health);
``run()`` repeats it until ``request_stop()`` or, with ``until_idle``, until nothing is left to do;
``shutdown()`` drains. A second thread only beats the lease (daemon.runtime.heartbeat), while the loop
reports progress.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from daemon import __version__
from daemon.config import Settings
from daemon.jobs import JobRecord, JobState
from daemon.memory import PeakBook
from daemon.models import default_model
from daemon.ops.history import History, HistoryError
from daemon.ops.inventory import GpuInventory, StaticInventory
from daemon.runtime.autodownload import ModelDownloads
from daemon.runtime.book import JobBook
from daemon.runtime.claims import Claims
from daemon.runtime.control import OperatorControl
from daemon.runtime.disk import DISK_FULL, FOLDER_MISSING, DiskGuard
from daemon.runtime.heartbeat import Heartbeat, stuck_after_for
from daemon.runtime.intake import Intake
from daemon.runtime.leases import Lease
from daemon.runtime.notify import SystemdNotifier
from daemon.runtime.outbox import Outbox
from daemon.runtime.placement import Placement, RunningJob, make_workers
from daemon.runtime.publishing import Publisher
from daemon.runtime.recovery import Recovery
from daemon.runtime.reload import ReloadPlan, reload_daemon
from daemon.runtime.schedules import CronSubmitter
from daemon.runtime.spool import Spool
from daemon.runtime.status import Status
from daemon.runtime.watch import InboxWatcher


@dataclass(frozen=True)
class Seams:
    """Slow or stuck steps injected by tests (never from a config), at the points where a real daemon stalls:
    ``before_tick`` at the top of every tick (a hung loop: it reports no progress meanwhile);
    ``per_recovered_record`` for every record a recovery reads (a slow spool: progress is reported);
    ``before_publish(record, video_tmp)`` between the lease check and the outbox's first link (a freeze);
    ``after_claim(claimed)`` right after a file's rename into the spool, before the folders are synced and
    anything is taken in (a freeze during the claim);
    ``before_take_in(claimed)`` before each claimed file of a round is taken in (a freeze during intake)."""

    before_tick: Callable[[], None] | None = None
    per_recovered_record: Callable[[], None] | None = None
    before_publish: Callable[[JobRecord, Path], None] | None = None
    after_claim: Callable[[Path], None] | None = None
    before_take_in: Callable[[Path], None] | None = None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        cuda_available: bool = False,
        rng: random.Random | None = None,
        backend: str | None = None,
        notifier: SystemdNotifier | None = None,
        inventory: GpuInventory | None = None,
        seams: Seams | None = None,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        """``backend``: "module:Factory" of a stand-in generation backend (daemon.testing), for tests and
        benchmarks only; None is the real diffusers backend. Users cannot configure it. ``seams``: see Seams.
        ``reload_settings``: reads the configuration again (the CLI's sources) when a reload is requested."""
        self.settings = settings
        self.reload_settings = reload_settings
        self._reload = threading.Event()
        self.clock = clock
        self._cuda_available = cuda_available
        self._default_model: str | None = None
        paths, inst = settings.paths, settings.instance
        paths.inbox.mkdir(parents=True, exist_ok=True)
        self.notifier = notifier or SystemdNotifier(None)
        self.lease = Lease(
            paths.state,
            settings.owner,
            grace_seconds=inst.lease_grace_seconds,
            heartbeat_seconds=inst.heartbeat_seconds,
            clock=clock,
        )
        self.seams = seams or Seams()
        self.heartbeat = Heartbeat(self.lease, interval=inst.heartbeat_seconds, stuck_after=stuck_after_for(inst))
        self.spool = Spool(self.lease.mine, settings.owner, clock=clock)
        self.disk = DiskGuard(
            [paths.outbox, paths.state],
            min_free_mb=settings.limits.min_free_mb,
            clock=clock,
            present=[paths.inbox],
        )
        self.downloads = ModelDownloads(min_free_mb=settings.limits.min_free_mb)
        self.cron = CronSubmitter(list(settings.schedules), state_dir=paths.state, inbox=paths.inbox, clock=clock)
        self._last_cron_tick = float("-inf")
        self.outbox = Outbox(paths.outbox, owner=settings.owner, abandoned_after=inst.lease_grace_seconds)
        self.watcher = InboxWatcher(paths.inbox, settings.watch, clock=clock)
        self.inventory = inventory or StaticInventory([])
        gpus = [] if settings.worker.device == "cpu" else self.inventory.gpus()
        self.history = self._open_history()
        self.peaks = PeakBook(paths.state / "peaks" / f"{settings.owner}.json")
        self.status = Status(settings, clock=clock, notifier=self.notifier, inventory=self.inventory)
        self.book = JobBook(
            settings,
            self.spool,
            self.outbox,
            status=self.status,
            history=self.history,
            disk=self.disk,
            downloads=self.downloads,
            clock=clock,
            rng=rng or random.Random(),
            on_change=self.status.changed,
            lease_held=lambda: self.lease.held(),
            on_lease_lost=lambda: self.recovery.lease_lost(),
            device_of=lambda rec: self.placement.device_of(rec),
        )
        self.publisher = Publisher(
            settings,
            self.book,
            self.outbox,
            self.lease,
            self.peaks,
            status=self.status,
            clock=clock,
            on_lease_lost=lambda: self.recovery.lease_lost(),
            before_publish=self.seams.before_publish,
        )
        self.placement = Placement(
            settings,
            self.book,
            self.publisher,
            self.outbox,
            workers=make_workers(settings, gpus, clock=clock, backend=backend),
            gpus=gpus,
            inventory=self.inventory,
            peaks=self.peaks,
            status=self.status,
            clock=clock,
        )
        self.intake = Intake(
            settings,
            self.spool,
            self.outbox,
            default_model=self.default_model,
            is_active_id=self.book.is_active_id,
            is_active_basename=self.book.is_active_basename,
            has_records_from=self.book.has_records_from,
            lease_held=lambda: self.lease.held(),
            clock=clock,
        )
        self.claims = Claims(
            settings,
            self.intake,
            self.book,
            self.spool,
            self.outbox,
            status=self.status,
            history=self.history,
            clock=clock,
            progress=lambda: self.heartbeat.progress(),
            lease_held=lambda: self.lease.held(),
            on_lease_lost=lambda: self.recovery.lease_lost(),
            after_claim=self.seams.after_claim,
            before_take_in=self.seams.before_take_in,
        )
        self.recovery = Recovery(
            settings,
            self.book,
            self.placement,
            self.spool,
            self.lease,
            self.outbox,
            take_in=self.claims.take_in,
            forget_intake_retries=self.claims.retry.clear,
            clock=clock,
            status=self.status,
            progress=self.heartbeat.progress,
            per_record=self.seams.per_recovered_record,
        )
        self.control = OperatorControl(settings, self.book, self.placement, status=self.status, clock=clock)
        self.status.book, self.status.placement, self.status.disk = self.book, self.placement, self.disk
        self.status.control = self.control
        self.status.watcher, self.status.downloads = self.watcher, self.downloads
        self._stop = threading.Event()
        self._started = False
        self.worker_unavailable: str | None = None

    # ---- views for the CLI and tests -----------------------------------------------------------

    @property
    def records(self) -> dict[str, JobRecord]:
        return self.book.records

    @property
    def running(self) -> dict[str, RunningJob]:
        return self.placement.running

    @property
    def workers(self) -> dict[str, Any]:
        return self.placement.workers

    @property
    def done(self) -> int:
        return self.status.done

    @property
    def failed(self) -> int:
        return self.status.failed

    @property
    def results(self) -> list[dict[str, Any]]:
        """The most recent jobs this run finished (bounded), for the CLI's summary."""
        return list(self.status.results)

    def progress(self, job_id: str) -> RunningJob | None:
        return self.placement.running.get(job_id)

    def workers_ready(self) -> bool:
        return self.placement.workers_ready()

    def is_idle(self) -> bool:
        return (
            not self.placement.running
            and self.watcher.pending == 0
            and not self.claims.retry
            and not self.book.has_waiting_work()
        )

    def _idle_while_paused(self) -> bool:
        """Paused by an operator with nothing running and the inbox taken in: all there is to do until a resume."""
        return (
            self.control.paused and not self.placement.running and self.watcher.pending == 0 and not self.claims.retry
        )

    def default_model(self) -> str:
        if self._default_model is None:
            self._default_model = default_model(self.settings.models.default, cuda_available=self._cuda_available)
            logger.info("models.default name={}", self._default_model)
        return self._default_model

    def _open_history(self) -> History | None:
        if not self.settings.history.enabled:
            return None
        try:
            return History(self.settings.history.path)
        except HistoryError as exc:  # the history is a record, not a dependency: run without it
            logger.error("history.unavailable path={} error={}", self.settings.history.path, exc)
            return None

    # ---- start, loop, stop ---------------------------------------------------------------------

    def start(self) -> None:
        paths = self.settings.paths
        logger.info(
            "daemon.starting version={} inbox={} outbox={} state={}",
            __version__,
            paths.inbox,
            paths.outbox,
            paths.state,
        )
        self.recovery.check_same_filesystem()
        self.lease.acquire()
        self.heartbeat.start()  # before the recovery, however long that takes: it reports progress
        try:
            self.status.write(force=True)
            # The workers start first: they import their libraries (seconds) while the spool is recovered.
            for worker in self.placement.workers.values():
                worker.start()
            self.recovery.recover()
            self.watcher.start()
            self.watcher.scan()
        except BaseException:
            self.heartbeat.stop()
            for worker in self.placement.workers.values():
                worker.stop()
            raise
        self.status.state = "idle"
        self.control.tick()  # a pause already there holds from the start
        self._started = True
        self.status.write(force=True)
        self.notifier.ready(self.status.status_line())

    def tick(self) -> None:
        if self.seams.before_tick is not None:
            self.seams.before_tick()
        self._keep_lease()
        if self._reload.is_set():
            self._reload.clear()
            self.reload()
        # Paused (daemon.runtime.disk: a folder full, unwritable or gone): nothing new is claimed, adopted or
        # started; what runs finishes; records that could not be written are tried again once per check.
        was_paused = self.disk.pause is not None
        paused = self.disk.paused()
        if was_paused and not paused:
            self.watcher.scan()  # an inbox that was gone is watched afresh, and its files are seen now
            if not self.placement.running:
                self.outbox.clean_temps()  # what a read-only outbox refused to let us remove
        if not paused:
            self.recovery.take_over_the_dead()
        if self.disk.kind != FOLDER_MISSING:
            self._fire_schedules()
        if paused and self.disk.kind == DISK_FULL and self.disk.rechecked and not self.placement.running:
            self.outbox.clean_temps()
        if not paused:
            self.claims.claim_ready(self.watcher)
            self.claims.retry_due()
        for job_id in self.book.take_cancels():
            self.placement.interrupt(job_id)
        self.book.models_arrived()
        self.placement.poll()
        if not paused or self.disk.rechecked:
            self.book.reconcile(set(self.placement.running))
        self.control.tick()  # an operator's pause (nothing new starts), priorities (daemon.runtime.control)
        if self.disk.pause is None and not self.control.paused:  # a failure this round may have paused the disk
            self.placement.dispatch()
        self.placement.wait_for_something(self.watcher)
        self.status.write()

    def _keep_lease(self) -> None:
        """Report progress to the heartbeat thread, and step back if the lease was lost: found by a beat, or,
        when the loop comes back from a stall (no beats meanwhile), checked here before anything is done."""
        stalled = self.heartbeat.progress()
        if self.heartbeat.lost or (stalled and not self.lease.held()):
            self.recovery.lease_lost()

    def _drain_progress(self) -> None:
        self.heartbeat.progress()
        self.status.write()

    def _fire_schedules(self) -> None:
        if not self.cron.schedules or self.clock() - self._last_cron_tick < 1.0:
            return
        self._last_cron_tick = self.clock()
        try:
            self.cron.tick()
        except OSError as exc:  # e.g. a full disk: the fire stays recorded as submitting and is finished later
            self.book.on_write_error(exc)

    def run(self, *, until_idle: bool = False) -> None:
        if not self._started:
            self.start()
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except OSError as exc:  # a full or failing disk must not stop the daemon: pause and go on
                    self.book.on_write_error(exc)
                    self._stop.wait(0.5)
                if until_idle and self.is_idle():
                    logger.info("daemon.idle: nothing left to do (--until-idle)")
                    break
                if until_idle and self._idle_while_paused():
                    logger.info(
                        "daemon.idle: {} (--until-idle); {} queued jobs stay in the spool",
                        self.control.reason,
                        self.book.count(JobState.QUEUED) + self.book.count(JobState.WAITING_FOR_MODEL),
                    )
                    break
                if until_idle and self.placement.all_failing_to_start():
                    self.worker_unavailable = self.placement.last_fatal() or "the worker keeps dying at start-up"
                    logger.error(
                        "daemon.giving_up: {} (--until-idle; queued jobs stay in the spool)", self.worker_unavailable
                    )
                    break
        finally:
            self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """From a signal handler (SIGHUP): the next round of the loop reloads the configuration."""
        self._reload.set()

    def reload(self) -> ReloadPlan | None:
        """Read the configuration again and apply it (daemon.runtime.reload); a bad one is refused."""
        return reload_daemon(self)

    def kill_workers(self) -> None:
        """The second signal: leave now. The spool still holds every job."""
        for worker in self.placement.workers.values():
            worker.kill()

    def shutdown(self) -> None:
        """Stop intake; interrupt running jobs at their next step and put them back in the queue (jobs being
        encoded are published); stop the workers. Bounded by shutdown.timeout_seconds, after which the
        workers are killed. Nothing is lost."""
        timeout = self.settings.shutdown.timeout_seconds
        self.status.state = "draining"
        self.status.write(force=True)
        self.notifier.stopping()
        self.notifier.extend_timeout(timeout + 15)  # how long the drain may take, beyond TimeoutStopSec
        self.watcher.stop()
        self.placement.drain(self.clock() + timeout, self.watcher, heartbeat=self._drain_progress)
        for worker in self.placement.workers.values():
            worker.stop()
        self.status.state = "stopped"
        self.status.write(force=True)
        self.heartbeat.stop()
        self.lease.release()
        if self.history is not None:
            self.history.close()
        logger.info("daemon.stopped done={} failed={}", self.status.done, self.status.failed)
