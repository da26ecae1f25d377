"""What the daemon says about itself: counters, the health file, the Prometheus text file, sd_notify STATUS.

Everything here is derived from the job book and the placement at the moment it is written; only the
counters of this process's life (done, failed by category, durations) are kept here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon import __version__
from daemon.config import Settings
from daemon.control import OPERATOR_PAUSE
from daemon.jobs import JobState
from daemon.ops.inventory import GpuInventory
from daemon.runtime.health import HealthWriter, iso
from daemon.runtime.metrics import DurationHistograms, MetricsWriter, read_gpus
from daemon.runtime.notify import SystemdNotifier

if TYPE_CHECKING:
    from daemon.runtime.autodownload import ModelDownloads
    from daemon.runtime.book import JobBook
    from daemon.runtime.control import OperatorControl
    from daemon.runtime.disk import DiskGuard
    from daemon.runtime.placement import Placement
    from daemon.runtime.watch import InboxWatcher

# Bounded: a daemon runs for months. The CLI's --until-idle summary reads the last ones.
RECENT_RESULTS = 10_000


class Status:
    def __init__(
        self, settings: Settings, *, clock: Callable[[], float], notifier: SystemdNotifier, inventory: GpuInventory
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.notifier = notifier
        self.inventory = inventory
        self.health = HealthWriter(settings.health_path, interval=settings.health.interval_seconds, clock=clock)
        self.metrics = MetricsWriter(settings.metrics.textfile) if settings.metrics.textfile else None
        self.state = "starting"
        self.started_at = clock()
        self.done = 0
        self.failed = 0
        self.failed_by_category: dict[str, int] = {}
        self.histograms = DurationHistograms()  # every job of this process's life, for the metrics
        self.results: deque[dict[str, Any]] = deque(maxlen=RECENT_RESULTS)  # for the CLI's summary
        self._last_metrics = float("-inf")
        self._notified_status = ""
        self._write_errors: dict[str, str] = {}  # file -> the error last logged for it (logged once, not per round)
        self._changed = False  # a job changed state since the health file was last written
        # While the spool is being recovered: (records read, records in all), for health, status and systemd.
        self.recovery: tuple[int, int] | None = None
        # Set by the Daemon once everything is wired.
        self.book: JobBook | None = None
        self.placement: Placement | None = None
        self.disk: DiskGuard | None = None
        self.watcher: InboxWatcher | None = None
        self.downloads: ModelDownloads | None = None
        self.control: OperatorControl | None = None

    # ---- counters ------------------------------------------------------------------------------

    def job_done(self, job_id: str, model: str, seconds: float, outputs: dict[str, str]) -> None:
        self.done += 1
        self.histograms.observe(model, seconds)
        self.results.append({"id": job_id, "status": "done", **outputs})

    def job_failed(self, job_id: str, category: str, failure: str | None = None) -> None:
        self.failed += 1
        self.failed_by_category[category] = self.failed_by_category.get(category, 0) + 1
        self.results.append({"id": job_id, "status": "failed", **({"failure": failure} if failure else {})})

    # ---- documents -----------------------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        assert self.book is not None and self.placement is not None and self.disk is not None
        by_priority = {str(p): n for p, n in sorted(self.book.queued_by_priority().items())}
        workers = self.placement.workers
        first = next(iter(workers.values()))
        st = first.status
        jobs = [job.view() for job in self.placement.running.values()]
        operator = self.control.view() if self.control is not None else None
        return {
            "version": __version__,
            "state": self.state,
            "recovering": {"done": self.recovery[0], "total": self.recovery[1]} if self.recovery else None,
            "instance": self.settings.owner,
            **self._pause(operator),
            "operator_pause": operator,
            "started_at": self.started_at,
            "started_at_iso": iso(self.started_at),
            "inbox": str(self.settings.paths.inbox),
            "outbox": str(self.settings.paths.outbox),
            "queue_depth": self.book.count(JobState.QUEUED),
            "queue_by_priority": by_priority,
            "waiting_for_model": self.book.count(JobState.WAITING_FOR_MODEL),
            "downloads": dict(self.downloads.progress) if self.downloads else {},
            "inbox_pending": self.watcher.pending if self.watcher else 0,
            "running": jobs[0] if jobs else None,  # the first running job (one per worker in running_jobs)
            "running_jobs": jobs,
            "done": self.done,
            "failed": self.failed,
            "device": {
                "state": st.state,
                "pid": st.pid,
                "restarts": st.restarts,
                "last_fatal": st.last_fatal,
                "device": st.info.device if st.info else None,
                "device_name": st.info.device_name if st.info else None,
                "vram_total_mb": st.info.vram_total_mb if st.info else None,
            },
            "workers": {
                name: {
                    "state": w.status.state,
                    "pid": w.status.pid,
                    "restarts": w.status.restarts,
                    "gpu": w.gpu.index if w.gpu else None,
                    "device": w.status.info.device if w.status.info else None,
                    "host": w.status.info.host if w.status.info else None,  # a Ray actor's node, else null
                    "actor": w.status.info.actor if w.status.info else None,
                    "warm_models": list(w.warm),
                    "last_fatal": w.status.last_fatal,
                }
                for name, w in workers.items()
            },
        }

    def _pause(self, operator: dict[str, Any] | None) -> dict[str, Any]:
        """``pause`` (its kind, folder, reason, since) and ``paused`` (the reason): the disk guard's pause
        (daemon.runtime.disk), else an operator's (daemon.runtime.control), else None."""
        assert self.disk is not None
        if self.disk.pause is not None:
            return {"paused": self.disk.reason, "pause": self.disk.pause.to_dict()}
        if operator is None or self.control is None:
            return {"paused": None, "pause": None}
        reason = self.control.reason
        pause = {"kind": OPERATOR_PAUSE, "folder": None, "reason": reason, "since": operator["since"]}
        pause.update({k: operator[k] for k in ("by", "mode", "free_vram")})
        return {"paused": reason, "pause": pause}

    def status_line(self) -> str:
        assert self.book is not None and self.placement is not None and self.disk is not None
        queued = self.book.count(JobState.QUEUED)
        doing = (
            ", ".join(f"running {j.id} {j.phase} {j.step}/{j.total}" for j in self.placement.running.values())
            or self.state
        )
        reason = self.disk.reason or (self.control.reason if self.control is not None else None)
        paused = f"; PAUSED: {reason}" if reason else ""
        if self.recovery:
            doing = f"recovering {self.recovery[0]}/{self.recovery[1]}"
        return f"{doing}; {queued} queued; {self.done} done, {self.failed} failed{paused}"

    def changed(self) -> None:
        """A job changed state: the health file is rewritten at the end of this round of the loop (once, however
        many jobs changed in it: a batch of thousands is one write, not thousands)."""
        self._changed = True

    def write(self, force: bool = False) -> None:
        """The health file (forced after a change of state), the metrics file at its interval, the systemd
        watchdog ping and STATUS line."""
        force = force or self._changed
        self._changed = False
        payload = self.payload()
        try:
            written = self.health.maybe_write(payload, force=force)
        except OSError as exc:  # a full, read-only or vanished folder must not stop the daemon; the next write tries
            self._write_failed("health", exc)
            written = False
        else:
            self._write_succeeded("health", written)
        self._write_metrics(payload, force)
        # The watchdog ping comes from the main loop on purpose: a hung loop stops pinging and systemd acts.
        self.notifier.maybe_watchdog(self.clock())
        if written and self.notifier.enabled:
            line = self.status_line()
            if line != self._notified_status:
                self._notified_status = line
                self.notifier.status(line)

    def _write_metrics(self, payload: dict[str, Any], force: bool = False) -> None:
        if self.metrics is None:
            return
        now = self.clock()
        if not force and now - self._last_metrics < self.settings.metrics.interval_seconds:
            return
        self._last_metrics = now
        try:
            self.metrics.write(
                payload,
                {"done_total": self.done, "failed_total_by_category": self.failed_by_category},
                self.histograms,
                read_gpus(self.inventory),
            )
        except OSError as exc:
            self._write_failed("metrics", exc)
        else:
            self._write_succeeded("metrics", True)

    def _write_failed(self, what: str, exc: OSError) -> None:
        """Logged when it starts failing or fails differently, not at every round of the loop while it lasts."""
        if self._write_errors.get(what) != str(exc):
            self._write_errors[what] = str(exc)
            logger.warning("{}.write_failed error={}", what, exc)

    def _write_succeeded(self, what: str, written: bool) -> None:
        if written and self._write_errors.pop(what, None) is not None:
            logger.info("{}.write_resumed", what)
