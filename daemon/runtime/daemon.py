"""The daemon: wires watch -> intake -> spool -> scheduler -> executor -> outbox, health and policy.

One thread makes every decision. ``tick()`` does one round (claim ready files, take in events from the
worker, dispatch the next job, write health); ``run()`` repeats it until ``request_stop()`` or, with
``until_idle``, until nothing is left to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from daemon import __version__
from daemon.config import Settings
from daemon.errors import Category, JobError
from daemon.worker.process import Executor
from daemon.runtime.health import HealthWriter, iso
from daemon.runtime.intake import Intake
from daemon.jobs import JobRecord, JobState
from daemon.runtime.leases import Lease
from daemon.models import default_model
from daemon.runtime.autodownload import ModelDownloads
from daemon.runtime.disk import DiskGuard
from daemon.runtime.metrics import MetricsWriter, read_gpus
from daemon.ops.inventory import GpuInventory, StaticInventory
from daemon.memory import JobDemand, PeakBook, book_key, optimizations, plan_for
from daemon.runtime.notify import SystemdNotifier
from daemon.runtime.outbox import Outbox
from daemon.policy import decide
from daemon.scheduler import Slot, assign, fits_nowhere, insufficient_vram_message
from daemon.runtime.schedules import CronSubmitter
from daemon.runtime.spool import Spool
from daemon.runtime.watch import InboxWatcher

TINY_NOTE = "tiny random-weight test model: this video is noise, made only to exercise the real pipeline"


class Daemon:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time,
                 cuda_available: bool = False, rng: random.Random | None = None, backend: str | None = None,
                 notifier: SystemdNotifier | None = None, inventory: GpuInventory | None = None) -> None:
        """``backend``: "module:Factory" of a stand-in generation backend, for tests and benchmarks only;
        None is the real diffusers backend. Users cannot configure it."""
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.notifier = notifier or SystemdNotifier(None)
        self._notified_status = ""
        paths = settings.paths
        paths.inbox.mkdir(parents=True, exist_ok=True)
        inst = settings.instance
        self.lease = Lease(paths.state, settings.owner, grace_seconds=inst.lease_grace_seconds,
                           heartbeat_seconds=inst.heartbeat_seconds, clock=clock)
        self.spool = Spool(self.lease.mine, settings.owner, clock=clock)
        self.disk = DiskGuard([paths.outbox, paths.state], min_free_mb=settings.limits.min_free_mb, clock=clock)
        self.metrics = MetricsWriter(settings.metrics.textfile) if settings.metrics.textfile else None
        self._last_metrics = float("-inf")
        self.failed_by_category: dict[str, int] = {}
        self.durations: list[tuple[str, float]] = []  # (model, seconds) of this process's finished jobs
        self.downloads = ModelDownloads(min_free_mb=settings.limits.min_free_mb)
        self.cron = CronSubmitter(list(settings.schedules), state_dir=paths.state, inbox=paths.inbox, clock=clock)
        self._last_cron_tick = float("-inf")
        self.outbox = Outbox(paths.outbox, owner=settings.owner)
        self.watcher = InboxWatcher(paths.inbox, settings.watch, clock=clock)
        self.inventory = inventory or StaticInventory([])
        self.gpus = [] if settings.worker.device == "cpu" else self.inventory.gpus()
        # One long-lived worker per GPU (a CPU-only host, or worker.device: cpu, gets one CPU worker).
        # A worker that ends up computing on the CPU gets an equal share of the cores.
        share = max(1, (os.cpu_count() or 1) // max(1, len(self.gpus)))
        self.workers: dict[str, Executor] = {
            f"gpu{g.index}": Executor(settings, clock=clock, backend=backend, name=f"gpu{g.index}", gpu=g,
                                      cpu_threads=share)
            for g in self.gpus
        } or {"cpu": Executor(settings, clock=clock, backend=backend, name="cpu", cpu_threads=share)}
        self.history = self._open_history()
        self.peaks = PeakBook(paths.state / "peaks" / f"{settings.owner}.json")
        self.cancel_dir = paths.state / "cancel"
        self._cancel_requested: set[str] = set()
        self._vram_checked: set[str] = set()
        self.health = HealthWriter(settings.health_path, interval=settings.health.interval_seconds, clock=clock)
        self._cuda_available = cuda_available
        self._default_model: str | None = None
        self.intake = Intake(settings, self.spool, self.outbox, default_model=self.default_model,
                             is_active_id=lambda job_id: job_id in self.records, clock=clock,
                             is_active_basename=lambda name: any(
                                 r.params.get("basename") == name and r.state is not None and not r.state.terminal
                                 for r in self.records.values()))
        # Every job with a folder in the spool (active, or terminal but its file not yet released).
        self.records: dict[str, JobRecord] = {}
        # Job id -> what it is doing and where. A worker holds at most one job on its device ("on_device")
        # and may still be encoding the one before.
        self.running: dict[str, dict[str, Any]] = {}
        self.done = 0
        self.failed = 0
        self.results: list[dict[str, Any]] = []  # what this run produced, for the CLI's summary
        self.state = "starting"
        self.started_at = clock()
        self._stop = threading.Event()
        self._started = False
        self.worker_unavailable: str | None = None
        self._intake_retry: set[Path] = set()
        self._last_intake_retry = clock()
        self._last_takeover_check = float("-inf")

    # ---- set-up and tear-down ------------------------------------------------------------------

    def default_model(self) -> str:
        if self._default_model is None:
            self._default_model = default_model(self.settings.models.default, cuda_available=self._cuda_available)
            logger.info("models.default name={}", self._default_model)
        return self._default_model

    def start(self) -> None:
        logger.info("daemon.starting version={} inbox={} outbox={} state={}", __version__, self.settings.paths.inbox,
                    self.settings.paths.outbox, self.settings.paths.state)
        self._check_same_filesystem()
        self.lease.acquire()
        self._write_health(force=True)
        self.recover()
        self.watcher.start()
        self.watcher.scan()
        for worker in self.workers.values():
            worker.start()
        self.state = "idle"
        self._started = True
        self._write_health(force=True)
        self.notifier.ready(self._status_line())

    def _check_same_filesystem(self) -> None:
        inbox, state = self.settings.paths.inbox, self.settings.paths.state
        state.mkdir(parents=True, exist_ok=True)
        if inbox.stat().st_dev != state.stat().st_dev:
            from daemon.config import ConfigError

            raise ConfigError(f"paths.state ({state}) must be on the same filesystem as the inbox ({inbox}): "
                              "claiming a job is an atomic rename between them")

    def recover(self) -> None:
        """Rebuild the daemon's view from the spool alone (after a crash, kill -9 or a clean stop)."""
        self.outbox.clean_temps()
        for folder in self.lease.my_takeovers():  # a merge that a crash interrupted
            self.spool.adopt(folder)
        self._recover_spool("the daemon stopped while this job was running")

    def _recover_spool(self, crash_reason: str) -> None:
        for rec in list(self.spool.iter_records()):
            if rec.id in self.records:
                continue
            self.records[rec.id] = rec
            if rec.state is JobState.WAITING_FOR_MODEL:
                self.downloads.ensure(rec.model["repo_id"], rec.model["architecture"])
            if rec.state is JobState.RUNNING and not self._done_if_published(rec, "found published after a restart"):
                self._fail_or_retry(rec, JobError(Category.WORKER_CRASHED, crash_reason))
        for claimed in self.spool.claimed_files():
            self._take_in(claimed)
        for source in {r.source for r in self.records.values()}:
            self._release_if_finished(source)
        queued = sum(1 for r in self.records.values() if r.state is JobState.QUEUED)
        logger.info("daemon.recovered queued={} records={}", queued, len(self.records))

    def _take_over_the_dead(self) -> None:
        """Adopt the spools of daemons whose lease expired (several daemons sharing one inbox)."""
        now = self.clock()
        if now - self._last_takeover_check < self.settings.instance.takeover_check_seconds:
            return
        self._last_takeover_check = now
        for dead in self.lease.expired_owners():
            if self.lease.take_over(dead) is None:
                continue  # another daemon won it
        for folder in self.lease.my_takeovers():  # includes merges a crash or a lost lease interrupted
            files_before = len(self.spool.claimed_files())
            adopted = self.spool.adopt(folder)
            if not adopted and len(self.spool.claimed_files()) == files_before:
                continue
            dead = folder.name.split("~")[1]
            logger.warning("lease.adopted from={} jobs={}", dead, len(adopted))
            self._recover_spool(f"daemon {dead!r} stopped heartbeating while this job was running")

    def _fire_schedules(self) -> None:
        if not self.cron.schedules or self.clock() - self._last_cron_tick < 1.0:
            return
        self._last_cron_tick = self.clock()
        try:
            self.cron.tick()
        except OSError as exc:  # e.g. a full disk: the fire stays recorded as submitting and is finished later
            self._on_write_error(exc)

    def _lease_lost(self) -> None:
        """Another daemon took our spool while we were unresponsive: everything we held is theirs now.
        Drop it without publishing anything, and start again with an empty spool."""
        logger.error("lease.lost owner={}: another daemon took over our jobs; dropping {} records without "
                     "publishing", self.settings.owner, len(self.records))
        for info in list(self.running.values()):
            self.workers[info["worker"]].kill()
            self._discard_temp(info)
        self.running.clear()
        self.records.clear()
        self._intake_retry.clear()
        self.lease.renew_after_loss()
        self.spool.ensure()
        self._recover_spool("the daemon lost its lease while this job was running")  # anything left is ours

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop intake; interrupt a running job at its next step and put it back in the queue; stop the
        worker. Bounded by shutdown.timeout_seconds, after which the worker is killed. Nothing is lost."""
        self.state = "draining"
        self._write_health(force=True)
        self.notifier.stopping()
        # Tell systemd how long the drain may take, beyond its own TimeoutStopSec.
        self.notifier.extend_timeout(self.settings.shutdown.timeout_seconds + 15)
        self.watcher.stop()
        if self.running:
            logger.info("daemon.draining interrupting={} timeout={}s", sorted(self.running),
                        self.settings.shutdown.timeout_seconds)
            # Jobs on a device stop at their next step; jobs being encoded are finished and published.
            for info in self.running.values():
                if info["on_device"]:
                    self.workers[info["worker"]].interrupt()
            deadline = self.clock() + self.settings.shutdown.timeout_seconds
            while self.running and self.clock() < deadline:
                self._wait_for_something()
                self._poll_workers()
                self._write_health()
                self.notifier.maybe_watchdog(self.clock())
            for info in list(self.running.values()):
                logger.warning("daemon.drain_timeout job={}: killing the worker", info["id"])
                self.workers[info["worker"]].kill()
                rec = self.records.get(info["id"])
                if rec is not None and rec.state is JobState.RUNNING:
                    self._requeue_interrupted(rec)
                self._discard_temp(info)
            self.running.clear()
        for worker in self.workers.values():
            worker.stop()
        self.state = "stopped"
        self._write_health(force=True)
        self.lease.release()
        if self.history is not None:
            self.history.close()
        logger.info("daemon.stopped done={} failed={}", self.done, self.failed)

    def _requeue_interrupted(self, rec: JobRecord) -> None:
        # Interrupted by us, not by the job: the attempt is given back.
        self._set(rec, JobState.QUEUED, note="interrupted by shutdown", attempts=max(0, rec.attempts - 1))

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, *, until_idle: bool = False) -> None:
        if not self._started:
            self.start()
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except OSError as exc:  # a full or failing disk must not stop the daemon: pause and go on
                    self._on_write_error(exc)
                    self._stop.wait(0.5)
                if until_idle and self.is_idle():
                    logger.info("daemon.idle: nothing left to do (--until-idle)")
                    break
                if until_idle and all(w.failing_to_start for w in self.workers.values()):
                    self.worker_unavailable = (self.executor.status.last_fatal
                                               or "the worker keeps dying at start-up")
                    logger.error("daemon.giving_up: {} (--until-idle; queued jobs stay in the spool)",
                                 self.worker_unavailable)
                    break
        finally:
            self.shutdown()

    def _reconcile(self) -> None:
        """A record left RUNNING with no job in the worker (a write failed mid-way, e.g. on a full disk)
        goes back through the retry policy, so that no job is ever stuck."""
        for rec in list(self.records.values()):
            if rec.state is JobState.RUNNING and rec.id not in self.running:
                try:
                    if self._done_if_published(rec, "published; recorded late"):  # only DONE was not recorded
                        self._release_if_finished(rec.source)
                        continue
                    category = Category.DISK_FULL if self.disk.reason else Category.IO_ERROR
                    self._fail_or_retry(rec, JobError(category, "the job's result could not be recorded"))
                except OSError as exc:
                    self._on_write_error(exc)
                    return

    def _done_if_published(self, rec: JobRecord, note: str) -> bool:
        """A RUNNING job whose sidecar (with its token) is in the outbox was published: record it DONE."""
        basename = rec.params["basename"]
        if self.outbox.published_token(basename) != rec.token:
            return False
        self._set(rec, JobState.DONE, note=note, finished_at=self.clock(), outputs=self._outputs(basename))
        return True

    def _on_write_error(self, exc: OSError) -> None:
        from daemon.errors import classify_exception

        err = classify_exception(exc)
        logger.error("daemon.write_failed category={} error={}", err.category.value, exc)
        if err.category is Category.DISK_FULL:
            self.disk.report_full(str(exc))

    def is_idle(self) -> bool:
        return (not self.running and self.watcher.pending == 0 and not self._intake_retry
                and not any(r.state in (JobState.QUEUED, JobState.WAITING_FOR_MODEL) for r in self.records.values()))

    def tick(self) -> None:
        if not self.lease.beat():
            self._lease_lost()
        self._take_over_the_dead()
        self._fire_schedules()
        paused = self.disk.paused()
        if paused and not self.running:
            self.outbox.clean_temps()
        for path in ([] if paused else self.watcher.ready_files()):
            self.watcher.forget(path)
            claimed = self.spool.claim(path)
            if claimed is not None:
                logger.info("job.claimed file={}", path.name)
                self._take_in(claimed)
        if self._intake_retry and self.clock() - self._last_intake_retry >= self.settings.watch.rescan_interval_seconds:
            self._last_intake_retry = self.clock()
            for claimed in sorted(self._intake_retry):
                self._take_in(claimed)
        self._process_cancels()
        self._models_arrived()
        self._poll_workers()
        self._reconcile()
        if not paused:
            self._dispatch()
        self._wait_for_something()
        self._write_health()

    # ---- steps ---------------------------------------------------------------------------------

    def _take_in(self, claimed: Path) -> None:
        try:
            result = self.intake.process(claimed)
        except Exception as exc:  # e.g. a full disk while writing a record: the file stays spooled
            logger.exception("intake.error file={} error={}; retried at the next rescan", claimed.name, exc)
            self._intake_retry.add(claimed)
            return
        self._intake_retry.discard(claimed)
        for rec in result.queued:
            self.records[rec.id] = rec
        self.failed += len(result.rejected)
        for job_id, category in zip(result.rejected, result.rejected_categories):
            self.failed_by_category[category] = self.failed_by_category.get(category, 0) + 1
            if self.history is not None:
                failure = self.outbox.failure_path(job_id)
                record = {}
                with contextlib.suppress(OSError, ValueError):
                    record = json.loads(failure.read_text())
                self.history.record({
                    "token": f"rejected:{claimed.name}:{job_id}", "id": job_id, "file": record.get("file"),
                    "status": "failed", "attempts": 0, "queued_at": self.clock(), "finished_at": self.clock(),
                    "error_category": category, "error_message": record.get("message"),
                    "recovery_suggestions": record.get("recovery_suggestions"), "failure_record": str(failure),
                    "instance": self.settings.owner})
        self.results.extend({"id": r, "status": "failed"} for r in result.rejected)
        self._release_if_finished(claimed.name)
        if result.queued or result.rejected:
            self._write_health(force=True)  # new jobs show at once, like every other change of state

    @property
    def executor(self) -> Executor:
        """The first worker (the only one on a single-GPU or CPU host)."""
        return next(iter(self.workers.values()))

    def workers_ready(self) -> bool:
        return all(w.ready for w in self.workers.values())

    def progress(self, job_id: str) -> dict[str, Any] | None:
        return self.running.get(job_id)

    def _demand(self, rec: JobRecord) -> JobDemand:
        p = rec.params
        return JobDemand(rec.model.get("architecture", ""), p["width"], p["height"], p["frames"],
                         tiny=bool(rec.model.get("tiny_random_weights")))

    def _plan(self, demand: JobDemand, free_mb: int):
        m = self.settings.models
        return plan_for(demand, free_mb, override=m.offload, allow_lossy=m.allow_lossy, book=self.peaks)

    def _slots(self) -> list[Slot]:
        free = {g.index: g.free_mb for g in self.inventory.gpus()} if self.gpus else {}
        busy = {info["worker"] for info in self.running.values() if info["on_device"]}
        slots = []
        for name, worker in self.workers.items():
            if name in busy or not worker.ready:
                continue
            gpu = worker.gpu
            slots.append(Slot(name, gpu.index if gpu else None, free.get(gpu.index, gpu.free_mb) if gpu else None,
                              frozenset(worker.warm), gpu.total_mb if gpu else None))
        return slots

    def _fail_if_it_fits_nowhere(self, queued: list[JobRecord]) -> list[JobRecord]:
        """A job that no GPU here could hold, even empty and with the strongest offload, fails at once."""
        if not self.gpus:
            return queued
        keep = []
        totals = [g.total_mb for g in self.gpus]
        for rec in queued:
            if rec.token not in self._vram_checked:
                self._vram_checked.add(rec.token)
                demand = self._demand(rec)
                if fits_nowhere(demand, totals, self._plan):
                    from daemon.memory import strongest_estimate_mb

                    msg = insufficient_vram_message(demand, totals, strongest_estimate_mb(demand))
                    self._fail_or_retry(rec, JobError(Category.INSUFFICIENT_VRAM, msg))
                    continue
            keep.append(rec)
        return keep

    def _dispatch(self) -> None:
        slots = self._slots()
        if not slots:
            return
        now = self.clock()
        queued = [r for r in self.records.values() if r.state is JobState.QUEUED]
        if not queued:
            if not self.running:
                self.state = "idle"
            return
        queued = self._fail_if_it_fits_nowhere(queued)
        for assignment in assign(queued, slots, now, aging_bound_seconds=self.settings.scheduler.aging_bound_seconds,
                                 demand=self._demand, plan=self._plan):
            self._start_job(assignment.record, assignment.slot.worker, assignment.plan, now)

    def _start_job(self, rec: JobRecord, worker_name: str, plan, now: float) -> None:
        worker = self.workers[worker_name]
        params = dict(rec.params)
        if plan is not None:
            # The planner's mode, unless an out-of-memory retry already asked for a stronger one.
            from daemon.policy import OFFLOAD_LADDER

            planned = plan.offload
            if OFFLOAD_LADDER.index(planned) > OFFLOAD_LADDER.index(params.get("offload", "none")):
                params["offload"] = planned
            params["vae_tiling"] = params.get("vae_tiling", False) or plan.vae_tiling
            params["fp8"] = plan.fp8
        try:
            # The plan is for this attempt on this GPU: it travels in the payload, the record keeps the job's own
            # parameters (and the out-of-memory ladder's minimum), so a retry is planned afresh.
            rec = self._set(rec, JobState.RUNNING, attempts=rec.attempts + 1, started_at=now, worker=worker_name)
        except OSError as exc:
            self._on_write_error(exc)
            return
        basename = rec.params["basename"]
        payload = {
            "id": rec.id, "token": rec.token, "attempt": rec.attempts, "model": rec.model,
            "params": params, "input_image": rec.input_image,
            "video_tmp": str(self.outbox.temp_video_path(basename)),
        }
        self.running[rec.id] = {
            "id": rec.id, "worker": worker_name, "on_device": True, "model": rec.model["name"],
            "phase": "queued_in_worker", "step": 0,
            "total": rec.params["steps"], "attempt": rec.attempts, "started_at": now,
            "video_tmp": payload["video_tmp"], "estimate_mb": plan.estimate_mb if plan else None,
            "plan": optimizations(plan) if plan else [],
            # The memory model learns only from runs configured exactly as it estimated them.
            "plan_matches_run": bool(plan) and (plan.offload, plan.vae_tiling, plan.fp8) == (
                params.get("offload", "none"), bool(params.get("vae_tiling")), bool(params.get("fp8"))),
            "run_offload": params.get("offload", "none"), "run_tiling": bool(params.get("vae_tiling")),
        }
        self.state = "busy"
        worker.submit(payload, silence_limit=rec.params.get("timeout_seconds"))
        worker.note_warm(rec.model["name"])
        logger.bind(job=rec.id).info("job.dispatched id={} model={} attempt={} worker={}{}", rec.id,
                                     rec.model["name"], rec.attempts, worker_name,
                                     f" plan={plan.mode}~{plan.estimate_mb}MiB" if plan else "")

    def _wait_for_something(self) -> None:
        """The loop's idle wait. While jobs run it wakes at their workers' first event, so a device that
        reports itself free gets its next job at once, not at the end of a sleep; otherwise it waits for
        the watcher's next hint."""
        from multiprocessing.connection import wait

        active = {info["worker"] for info in self.running.values()}
        handles = [h for name in active if (h := self.workers[name].event_handle) is not None]
        if handles:
            wait(handles, timeout=0.02)
        else:
            self.watcher.wait_for_hint(0.02 if self.running or self.watcher.pending else 0.2)

    def _poll_workers(self) -> None:
        for name, worker in self.workers.items():
            for event in worker.poll():
                self._on_event(name, event)

    def _on_event(self, worker_name: str, ev: dict[str, Any]) -> None:
        kind = ev["type"]
        job_id = ev.get("id")
        info = self.running.get(job_id or "")
        if info is None or info["worker"] != worker_name:
            if kind not in ("ready", "fatal"):
                logger.debug("worker.event_ignored type={} id={}", kind, job_id)
            return
        if kind == "device_free":
            # Its frames are off the device: the worker takes the next job while this one is encoded.
            info.update(on_device=False, phase="encoding")
            return
        if kind in ("phase", "progress", "started"):
            info.update({k: v for k, v in ev.items() if k in ("phase", "step", "total")})
            if kind == "phase":
                logger.bind(job=job_id).info("job.phase id={} phase={}", job_id, ev["phase"])
            return
        rec = self.records[job_id]
        try:
            if kind == "done":
                self._publish(rec, ev["result"], info)
            elif kind == "interrupted":
                self._discard_temp(info)
                if job_id in self._cancel_requested:
                    self._cancel(rec, "while it was running")
                else:
                    self._requeue_interrupted(rec)
            elif kind == "failed":
                self._discard_temp(info)
                if job_id in self._cancel_requested:
                    self._cancel(rec, "while it was running")
                else:
                    self._fail_or_retry(rec, JobError.from_dict(ev["error"]))
            if kind == "done" and job_id in self._cancel_requested:  # finished before the cancel landed
                self._cancel_requested.discard(job_id)
                with contextlib.suppress(FileNotFoundError):
                    (self.cancel_dir / job_id).unlink()
        except OSError as exc:  # the record could not be written: _reconcile retries it
            self._on_write_error(exc)
        finally:
            self.running.pop(job_id, None)

    # ---- models being downloaded --------------------------------------------------------------

    def _models_arrived(self) -> None:
        for repo, error in self.downloads.finished().items():
            waiting = [r for r in self.records.values()
                       if r.state is JobState.WAITING_FOR_MODEL and r.model.get("repo_id") == repo]
            for rec in waiting:
                if error is None:
                    from daemon.models import locate

                    try:
                        located = locate(rec.model["name"], models_dir=self.settings.paths.models,
                                         model_roots=self.settings.paths.model_roots)
                    except JobError as err:
                        self._fail_or_retry(rec, JobError(Category.MODEL_DOWNLOAD, f"downloaded, but: {err.message}"))
                        continue
                    self._set(rec, JobState.QUEUED, note=f"{repo} downloaded", model=located.to_dict())
                else:
                    suggestions = list(getattr(error, "suggestions", []))
                    self._fail_or_retry(rec, JobError(Category.MODEL_DOWNLOAD,
                                                      f"downloading {repo} failed: {error}", suggestions))
        for rec in self.records.values():  # jobs taken in since (or recovered): their download is under way
            if rec.state is JobState.WAITING_FOR_MODEL:
                self.downloads.ensure(rec.model["repo_id"], rec.model["architecture"])

    # ---- cancel --------------------------------------------------------------------------------

    def _process_cancels(self) -> None:
        """``wan-daemon cancel ID`` drops a request file; whichever daemon holds the job acts on it."""
        try:
            names = os.listdir(self.cancel_dir)
        except FileNotFoundError:
            return
        for job_id in names:
            rec = self.records.get(job_id)
            if rec is None or (job_id in self._cancel_requested and rec.state is JobState.RUNNING):
                continue
            if rec.state is JobState.QUEUED:
                self._cancel(rec, "before it started")
            elif rec.state is JobState.RUNNING:
                self._cancel_requested.add(job_id)
                info = self.running.get(job_id)
                if info is not None and info["on_device"]:  # one being encoded is finished: too late
                    logger.info("job.cancelling id={} worker={}", job_id, info["worker"])
                    self.workers[info["worker"]].interrupt()

    def _cancel(self, rec: JobRecord, when: str) -> None:
        self._cancel_requested.discard(rec.id)
        self._fail_or_retry(rec, JobError(Category.CANCELLED, f"cancelled by request {when}"))
        with contextlib.suppress(FileNotFoundError):
            (self.cancel_dir / rec.id).unlink()

    def _publish(self, rec: JobRecord, result: dict[str, Any], info: dict[str, Any]) -> None:
        basename = rec.params["basename"]
        now = self.clock()
        if not self.lease.held():
            # We were presumed dead and another daemon owns this job now: it publishes, we must not.
            self._discard_temp(info)
            self._lease_lost()
            return
        if result.get("peak_vram_usage_mb") and info.get("estimate_mb") and info.get("plan_matches_run"):
            # Estimates improve with use: the measured peak corrects this kind of job's next estimate.
            self.peaks.record(book_key(rec.model.get("architecture", ""), info["run_offload"],
                                       vae_tiling=info["run_tiling"], tiny=bool(rec.model.get("tiny_random_weights"))),
                              info["estimate_mb"], result["peak_vram_usage_mb"])
        sidecar = self._sidecar(rec, result, now)
        try:
            poster = Path(result["poster_tmp"]) if result.get("poster_tmp") else None
            published = self.outbox.publish_result(basename, Path(result["video_tmp"]), sidecar, poster)
        except OSError as exc:
            from daemon.errors import classify_exception

            self._discard_temp(info)
            err = classify_exception(exc)
            if err.category is Category.DISK_FULL:
                self.disk.report_full(str(exc))
            self._fail_or_retry(rec, err)
            return
        if not published and self.outbox.published_token(basename) != rec.token:
            self._fail_or_retry(rec, JobError(Category.DUPLICATE_JOB,
                                              f"{basename}.json appeared in the outbox while the job ran"))
            return
        self.outbox.remove_stale_failure(rec.id)
        done = self._set(rec, JobState.DONE, note=f"published {basename}.mp4", finished_at=now,
                         outputs=self._outputs(basename))
        self._record_history(done, sidecar)
        self.done += 1
        self.durations = [*self.durations[-9999:], (rec.model.get("name", "?"), now - (rec.started_at or now))]
        self.results.append({"id": rec.id, "status": "done", **self._outputs(basename)})
        logger.bind(job=rec.id).success("job.published id={} video={} seconds={:.2f}", rec.id,
                                        self.outbox.video_path(basename), now - (rec.started_at or now))
        self._release_if_finished(rec.source)

    def _fail_or_retry(self, rec: JobRecord, err: JobError) -> None:
        if err.category is Category.DISK_FULL:
            self.disk.report_full(err.message)
        w = self.settings.worker
        decision = decide(err, rec.attempts, params=rec.params, model=rec.model.get("name", ""),
                          fallback=list(rec.spec.get("fallback") or []),
                          device=self._worker_device(rec), max_attempts=w.max_attempts,
                          base_seconds=w.retry_base_seconds, cap_seconds=w.retry_cap_seconds, rng=self.rng,
                          multiple=rec.model.get("multiple"))
        errors = [*rec.errors, {**err.to_dict(), "attempt": rec.attempts, "at": self.clock()}]
        if decision.retry:
            changes: dict[str, Any] = {}
            if decision.changes:
                try:
                    changes = self._changed_params(rec, decision.changes)
                except JobError as change_err:
                    err, decision = change_err, decide(change_err, rec.attempts, max_attempts=0, base_seconds=0,
                                                       cap_seconds=0)
            if decision.retry:
                if decision.degradation:
                    changes["degradations"] = [*rec.degradations, decision.degradation]
                self._set(rec, JobState.QUEUED, note=decision.reason,
                          not_before=self.clock() + decision.delay_seconds, last_error=err.to_dict(), errors=errors,
                          **changes)
                return
        path = self.outbox.write_failure(
            rec.id, err, job_id=rec.id, source_name=rec.source_name, spec=rec.spec, attempts=rec.attempts,
            extra={"decision": decision.reason, "errors": errors, "model": rec.model, "parameters": rec.params},
        )
        self._set(rec, JobState.FAILED, note=f"{err.category.value}: {decision.reason}", finished_at=self.clock(),
                  last_error=err.to_dict(), errors=errors, outputs={"failure": str(path)})
        self.failed += 1
        self.failed_by_category[err.category.value] = self.failed_by_category.get(err.category.value, 0) + 1
        self.results.append({"id": rec.id, "status": "failed", "failure": str(path)})
        logger.bind(job=rec.id).error("job.failed id={} category={} error={}", rec.id, err.category.value,
                                      err.message)
        self._release_if_finished(rec.source)

    def _worker_device(self, rec: JobRecord) -> str:
        worker = self.workers.get(rec.worker or "") or self.executor
        return worker.status.info.get("device", "cpu")

    def _changed_params(self, rec: JobRecord, changes: dict[str, Any]) -> dict[str, Any]:
        """Record fields for the next attempt after a degrading retry (policy.Decision.changes)."""
        params = {**rec.params, **{k: v for k, v in changes.items() if k != "model"}}
        if "model" not in changes:
            return {"params": params}
        from daemon.models import locate
        from daemon.jobspec.params import resolve_params
        from daemon.jobspec.spec import JobSpec

        located = locate(changes["model"], models_dir=self.settings.paths.models,
                         model_roots=self.settings.paths.model_roots)
        spec = {**rec.spec, "id": rec.id, "model": changes["model"], "seed": params["seed"],
                "frames": params["frames"], "size": f"{params['width']}x{params['height']}"}
        for key in ("width", "height", "guidance_scale_2"):
            spec.pop(key, None)
        info = located.info
        spec["size"] = f"{max(info.multiple, params['width'] // info.multiple * info.multiple)}x" \
                       f"{max(info.multiple, params['height'] // info.multiple * info.multiple)}"
        lim = self.settings.limits
        new = resolve_params(JobSpec.model_validate(spec), info, max_side=lim.max_side, max_frames=lim.max_frames,
                             max_steps=lim.max_steps, vae_tiling=params["vae_tiling"],
                             speed=self.settings.speed).model_dump(mode="json")
        new.update(offload=params["offload"], seed_was_drawn=params["seed_was_drawn"])
        return {"params": new, "model": located.to_dict()}

    def _open_history(self):
        if not self.settings.history.enabled:
            return None
        from daemon.ops.history import History, HistoryError

        try:
            return History(self.settings.history.path)
        except HistoryError as exc:  # the history is a record, not a dependency: run without it
            logger.error("history.unavailable path={} error={}", self.settings.history.path, exc)
            return None

    def _record_history(self, rec: JobRecord, sidecar: dict[str, Any] | None = None) -> None:
        if self.history is not None:
            self.history.record(rec.model_dump(mode="json"), sidecar)

    def _set(self, rec: JobRecord, state: JobState, note: str = "", **changes: Any) -> JobRecord:
        updated = self.spool.transition(rec, state, note, **changes)
        self.records[updated.id] = updated
        self._record_history(updated)
        self._write_health(force=True)
        return updated

    def _release_if_finished(self, source: str) -> None:
        """Remove a claimed file once all its jobs are terminal, then their spool folders."""
        recs = [r for r in self.records.values() if r.source == source]
        if not recs or not all(r.state is not None and r.state.terminal for r in recs):
            return
        self.spool.remove_source(source)
        for r in recs:
            self.spool.remove_job_dir(r.id)
            del self.records[r.id]

    def _discard_temp(self, info: dict[str, Any] | None) -> None:
        if info and info.get("video_tmp"):
            video_tmp = Path(info["video_tmp"])
            for tmp in (video_tmp, video_tmp.with_name(video_tmp.stem + ".poster.jpg")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    # ---- reporting -----------------------------------------------------------------------------

    def _outputs(self, basename: str) -> dict[str, str]:
        return {"video": str(self.outbox.video_path(basename)), "sidecar": str(self.outbox.sidecar_path(basename))}

    def _sidecar(self, rec: JobRecord, result: dict[str, Any], now: float) -> dict[str, Any]:
        info = (self.workers.get(rec.worker or "") or self.executor).status.info
        started = rec.started_at or now
        timings = {"queue_wait": round(started - (rec.queued_at or started), 4), **result["timings"],
                   "total": round(now - started, 4)}
        sidecar = {
            "id": rec.id,
            "job_token": rec.token,
            "status": "done",
            "file": rec.source_name,
            "spec": rec.spec,
            "parameters": rec.params,
            "model_used": {**rec.model, "path": result["model_path"], "cache": result["model_cache"],
                           "evicted": result.get("models_evicted", []),
                           "load_seconds": result["timings"].get("model_load")},
            "device": {"type": result["device"], "name": info.get("device_name")},
            "timings": timings,
            "generation_time_seconds": round(now - started, 4),
            "peak_vram_usage_mb": result["peak_vram_usage_mb"],
            "peak_rss_mb": result["peak_rss_mb"],
            "resources": result.get("resources", {}),
            "optimizations_applied": result["optimizations_applied"],
            "degradations": rec.degradations,
            "attempts": rec.attempts,
            "video": {"file": f"{rec.params['basename']}.mp4", **result["video"]},
            "poster": f"{rec.params['basename']}.jpg" if result.get("poster_tmp") else None,
            "versions": {"wan_daemon": __version__, **info.get("versions", {})},
            "host": socket.gethostname(),
            "instance": self.settings.owner,
            "worker_pid": info.get("pid"),
            "worker": rec.worker,
            "timestamps": {"received_at": iso(rec.received_at), "queued_at": iso(rec.queued_at),
                           "started_at": iso(started), "finished_at": iso(now)},
        }
        if rec.model.get("tiny_random_weights"):
            sidecar["note"] = TINY_NOTE
        return sidecar

    def health_payload(self) -> dict[str, Any]:
        queued = [r for r in self.records.values() if r.state is JobState.QUEUED]
        by_priority: dict[str, int] = {}
        for r in queued:
            by_priority[str(r.priority)] = by_priority.get(str(r.priority), 0) + 1
        st = self.executor.status
        jobs = [{k: v for k, v in info.items() if k != "video_tmp"} for info in self.running.values()]
        return {
            "version": __version__,
            "state": self.state,
            "instance": self.settings.owner,
            "paused": self.disk.reason,
            "started_at": self.started_at,
            "started_at_iso": iso(self.started_at),
            "inbox": str(self.settings.paths.inbox),
            "outbox": str(self.settings.paths.outbox),
            "queue_depth": len(queued),
            "queue_by_priority": by_priority,
            "waiting_for_model": sum(1 for r in self.records.values() if r.state is JobState.WAITING_FOR_MODEL),
            "downloads": dict(self.downloads.progress),
            "inbox_pending": self.watcher.pending,
            "running": jobs[0] if jobs else None,  # the first running job (one per worker in running_jobs)
            "running_jobs": jobs,
            "done": self.done,
            "failed": self.failed,
            "device": {"state": st.state, "pid": st.pid, "restarts": st.restarts, "last_fatal": st.last_fatal,
                       "device": st.info.get("device"), "device_name": st.info.get("device_name"),
                       "vram_total_mb": st.info.get("vram_total_mb")},
            "workers": {name: {"state": w.status.state, "pid": w.status.pid, "restarts": w.status.restarts,
                               "gpu": w.gpu.index if w.gpu else None, "device": w.status.info.get("device"),
                               "warm_models": list(w.warm), "last_fatal": w.status.last_fatal}
                        for name, w in self.workers.items()},
        }

    def _write_metrics(self, force: bool = False) -> None:
        if self.metrics is None:
            return
        now = self.clock()
        if not force and now - self._last_metrics < self.settings.metrics.interval_seconds:
            return
        self._last_metrics = now
        try:
            self.metrics.write(self.health_payload(),
                               {"done_total": self.done, "failed_total_by_category": self.failed_by_category},
                               self.durations, read_gpus(self.inventory))
        except OSError as exc:
            logger.warning("metrics.write_failed error={}", exc)

    def _status_line(self) -> str:
        queued = sum(1 for r in self.records.values() if r.state is JobState.QUEUED)
        doing = ", ".join(f"running {r['id']} {r.get('phase')} {r.get('step')}/{r.get('total')}"
                          for r in self.running.values()) or self.state
        paused = f"; PAUSED: {self.disk.reason}" if self.disk.reason else ""
        return f"{doing}; {queued} queued; {self.done} done, {self.failed} failed{paused}"

    def _write_health(self, force: bool = False) -> None:
        try:
            written = self.health.maybe_write(self.health_payload(), force=force)
        except OSError as exc:  # a full disk must not stop the daemon; the next write tries again
            logger.warning("health.write_failed error={}", exc)
            written = False
        self._write_metrics(force)
        # The watchdog ping comes from this loop on purpose: a hung loop stops pinging and systemd acts.
        self.notifier.maybe_watchdog(self.clock())
        if written and self.notifier.enabled:
            line = self._status_line()
            if line != self._notified_status:
                self._notified_status = line
                self.notifier.status(line)
