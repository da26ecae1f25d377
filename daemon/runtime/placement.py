"""Placement: which worker runs which job, with which memory plan, and what the workers say back.

The scheduler (daemon.scheduler) decides and the memory model (daemon.memory) plans, both pure; this module
feeds them the slots (ready workers, their GPU's free memory, their warm models), starts the jobs they pick
and turns the workers' typed events into the job book's transitions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.config import Settings
from daemon.errors import Category, JobError
from daemon.jobs import JobRecord, JobState
from daemon.memory import JobDemand, PeakBook, Plan, WarmMode, optimizations
from daemon.ops.inventory import GpuInfo, GpuInventory
from daemon.policy import OFFLOAD_LADDER
from daemon.runtime.admission import Admission
from daemon.runtime.book import JobBook
from daemon.runtime.outbox import Outbox
from daemon.runtime.publishing import Publisher
from daemon.runtime.status import Status
from daemon.runtime.watch import InboxWatcher
from daemon.scheduler import Assignment, Slot, assign_from
from daemon.worker.process import LocalProcessExecutor
from daemon.worker.protocol import (
    DeviceFree,
    Done,
    ExecutorProtocol,
    Failed,
    Fatal,
    Interrupted,
    JobPayload,
    Phase,
    Progress,
    Ready,
    Started,
    WorkerConfig,
    WorkerEvent,
)


@dataclass
class RunningJob:
    """A job handed to a worker: on its device, or (``on_device`` False) being encoded after it."""

    id: str
    worker: str
    model: str
    attempt: int
    started_at: float
    total: int
    video_tmp: str
    on_device: bool = True
    phase: str = "queued_in_worker"
    step: int = 0
    estimate_mb: int | None = None
    plan: list[str] = field(default_factory=list)
    # The memory model learns only from runs configured exactly as it estimated them.
    plan_matches_run: bool = False
    run_offload: str = "none"
    run_tiling: bool = False

    def view(self) -> dict[str, Any]:
        """As the health file shows it."""
        return {
            "id": self.id,
            "worker": self.worker,
            "on_device": self.on_device,
            "model": self.model,
            "phase": self.phase,
            "step": self.step,
            "total": self.total,
            "attempt": self.attempt,
            "started_at": self.started_at,
            "estimate_mb": self.estimate_mb,
            "plan": self.plan,
        }


def make_workers(
    settings: Settings, gpus: list[GpuInfo], *, clock: Callable[[], float], backend: str | None
) -> dict[str, ExecutorProtocol]:
    """One long-lived worker per GPU (a CPU-only host, or worker.device: cpu, gets one CPU worker). A worker
    that ends up computing on the CPU gets an equal share of the cores. With worker.executor: ray, one Ray
    actor per GPU of the cluster instead (daemon.worker.ray_cluster; ray is imported only then)."""
    w = settings.worker
    if w.executor == "ray":
        from daemon.worker.ray_cluster import ray_workers

        return ray_workers(settings, clock=clock, backend=backend)
    share = max(1, (os.cpu_count() or 1) // max(1, len(gpus)))

    def one(name: str, gpu: GpuInfo | None) -> ExecutorProtocol:
        visible = None
        if gpu is not None:
            visible = gpu.uuid or (str(gpu.physical_index) if gpu.physical_index >= 0 else None)
        config = WorkerConfig(
            worker_name=name,
            device=w.device,
            models_dir=str(settings.paths.models),
            allow_cpu_for_real_models=w.allow_cpu_for_real_models,
            max_cached_pipelines=w.max_cached_pipelines,
            cache_budget_mb=w.cache_budget_mb,
            cpu_threads=w.cpu_threads or share,
            overlap_encoding=w.overlap_encoding,
            log_level=settings.logging.level,
            log_format=settings.logging.format,
            backend=backend,
            visible_device=visible,
        )
        return LocalProcessExecutor(
            config,
            clock=clock,
            stall_timeout_seconds=w.stall_timeout_seconds,
            start_timeout_seconds=w.start_timeout_seconds,
            gpu=gpu,
        )

    workers = {f"gpu{g.index}": one(f"gpu{g.index}", g) for g in gpus}
    return workers or {"cpu": one("cpu", None)}


class Placement:
    def __init__(
        self,
        settings: Settings,
        book: JobBook,
        publisher: Publisher,
        outbox: Outbox,
        *,
        workers: dict[str, ExecutorProtocol],
        gpus: list[GpuInfo],
        inventory: GpuInventory,
        peaks: PeakBook,
        status: Status,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.book = book
        self.publisher = publisher
        self.outbox = outbox
        self.workers = workers
        self.gpus = gpus
        self.inventory = inventory
        self.peaks = peaks
        self.status = status
        self.clock = clock
        # Job id -> where it runs. A worker holds at most one job on its device and may still be encoding the
        # one before.
        self.running: dict[str, RunningJob] = {}
        self.admission = Admission(settings, book, gpus=gpus, inventory=inventory, peaks=peaks)
        if settings.worker.executor == "ray":  # the GPUs are the actors' (on other hosts), known once Ready
            self.admission.worker_gpus = self._worker_gpus

    def _worker_gpus(self) -> list[GpuInfo] | None:
        """The GPUs the workers reported (None until one has): what admission judges against under Ray."""
        if not any(w.status.info is not None for w in self.workers.values()):
            return None
        return [w.gpu for w in self.workers.values() if w.gpu is not None]

    # ---- reading -------------------------------------------------------------------------------

    def device_of(self, rec: JobRecord) -> str:
        worker = self.workers.get(rec.worker or "") or next(iter(self.workers.values()))
        return worker.status.info.device if worker.status.info else "cpu"

    def workers_ready(self) -> bool:
        return all(w.ready for w in self.workers.values())

    def all_failing_to_start(self) -> bool:
        return all(w.failing_to_start for w in self.workers.values())

    def last_fatal(self) -> str | None:
        return next((w.status.last_fatal for w in self.workers.values() if w.status.last_fatal), None)

    # ---- deciding ------------------------------------------------------------------------------

    def demand(self, rec: JobRecord) -> JobDemand:
        return self.admission.demand(rec)

    def plan(self, demand: JobDemand, free_mb: int, *, warm: WarmMode | None = None) -> Plan | None:
        return self.admission.plan(demand, free_mb, warm=warm)

    def slots(self) -> list[Slot]:
        """The ready workers without a job on their device (daemon.runtime.admission.Admission.slots)."""
        return self.admission.slots(self.workers, {job.worker for job in self.running.values() if job.on_device})

    def decide(self, slots: list[Slot], now: float) -> list[Assignment]:
        """What the scheduler would start now on these slots (nothing is started)."""
        return assign_from(
            self.book.queue,
            slots,
            now,
            aging_bound_seconds=self.settings.scheduler.aging_bound_seconds,
            demand=self.demand,
            plan=self.plan,
        )

    def dispatch(self) -> None:
        self.admission.fail_what_no_worker_could_run()
        slots = self.slots()
        queued = self.book.count(JobState.QUEUED)
        if not self.running:
            # Never "idle" while jobs wait: for a worker that is starting (or restarting), or for their turn
            # (a retry's delay, memory); start_job says "busy" when one starts.
            self.status.state = "idle" if not queued else "waiting_for_worker" if not slots else "waiting"
        if not slots or not queued:
            return
        now = self.clock()
        for assignment in self.decide(slots, now):
            self.start_job(assignment.record, assignment.slot.worker, assignment.plan, now)

    def start_job(self, rec: JobRecord, worker_name: str, plan: Plan | None, now: float) -> None:
        changed = self.book.spool.changed_since_read(rec.source)
        if changed is not None:  # its file was still being written when it was claimed: never run a stale copy
            self.book.fail_or_retry(rec, JobError(Category.INVALID_SPEC, changed))
            return
        worker = self.workers[worker_name]
        params = rec.params
        if plan is not None:
            # The planner's mode, unless an out-of-memory retry already asked for a stronger one. The plan is
            # for this attempt on this GPU: it travels in the payload; the record keeps the job's own
            # parameters (and the out-of-memory ladder's minimum), so a retry is planned afresh.
            offload = (
                plan.offload
                if OFFLOAD_LADDER.index(plan.offload) > OFFLOAD_LADDER.index(params.offload)
                else params.offload
            )
            params = params.model_copy(
                update={"offload": offload, "vae_tiling": params.vae_tiling or plan.vae_tiling, "fp8": plan.fp8}
            )
        try:
            rec = self.book.set(  # counted before the hand-over; not fsynced (see Spool.transition)
                rec, JobState.RUNNING, durable=False, attempts=rec.attempts + 1, started_at=now, worker=worker_name
            )
        except OSError as exc:
            self.book.on_write_error(exc)
            return
        payload = JobPayload(
            id=rec.id,
            token=rec.token,
            attempt=rec.attempts,
            model=rec.model,
            params=params,
            video_tmp=str(self.outbox.temp_video_path(rec.params.basename)),
            # The copy in the job's spool folder, wherever that folder is now: a job adopted from a dead daemon's
            # spool still names the folder it was taken in to.
            input_image=str(self.book.spool.job_dir(rec.id) / Path(rec.input_image).name) if rec.input_image else None,
            estimate_mb=plan.estimate_mb if plan else None,
        )
        self.running[rec.id] = RunningJob(
            id=rec.id,
            worker=worker_name,
            model=rec.model.name,
            attempt=rec.attempts,
            started_at=now,
            total=rec.params.steps,
            video_tmp=payload.video_tmp,
            estimate_mb=plan.estimate_mb if plan else None,
            plan=optimizations(plan) if plan else [],
            plan_matches_run=plan is not None
            and (plan.offload, plan.vae_tiling, plan.fp8) == (params.offload, params.vae_tiling, params.fp8),
            run_offload=params.offload,
            run_tiling=params.vae_tiling,
        )
        self.status.state = "busy"
        worker.submit(payload, silence_limit=rec.params.timeout_seconds)
        worker.note_warm(rec.model.name)
        logger.bind(job=rec.id).info(
            "job.dispatched id={} model={} attempt={} worker={}{}",
            rec.id,
            rec.model.name,
            rec.attempts,
            worker_name,
            f" plan={plan.mode}~{plan.estimate_mb}MiB" if plan else "",
        )

    # ---- listening -----------------------------------------------------------------------------

    def wait_for_something(self, watcher: InboxWatcher) -> None:
        """The loop's idle wait. While jobs run it wakes at their workers' first event, so a device that
        reports itself free gets its next job at once, not at the end of a sleep; otherwise it waits for the
        watcher's next hint."""
        active = {job.worker for job in self.running.values()}
        handles = [h for name in active if (h := self.workers[name].event_handle) is not None]
        if handles:
            wait(handles, timeout=0.02)
        else:
            watcher.wait_for_hint(0.02 if self.running or watcher.pending else 0.2)

    def poll(self) -> None:
        for name, worker in self.workers.items():
            for event in worker.poll():
                self.on_event(name, event)

    def interrupt(self, job_id: str, note: str | None = None) -> bool:
        """Stop a job at its next denoising step; one already being encoded is finished (too late): False.
        ``note``: why, for the record's event when the job goes back to the queue (default: a shutdown)."""
        job = self.running.get(job_id)
        if job is None or not job.on_device:
            return False
        logger.info("job.interrupting id={} worker={}{}", job_id, job.worker, f" note={note}" if note else "")
        if note is not None:
            self.book.interrupt_notes[job_id] = note
        self.workers[job.worker].interrupt()
        return True

    def idle_workers(self) -> list[str]:
        """Workers with no job: none on their device and none being encoded."""
        busy = {job.worker for job in self.running.values()}
        return [name for name, w in self.workers.items() if name not in busy and not w.finishing]

    def on_event(self, worker_name: str, ev: WorkerEvent) -> None:
        if isinstance(ev, (Ready, Fatal)):
            return  # the executor keeps these in its status
        job = self.running.get(ev.id)
        if job is None or job.worker != worker_name:
            logger.debug("worker.event_ignored type={} id={}", ev.type, ev.id)
            return
        if isinstance(ev, DeviceFree):
            # Its frames are off the device: the worker takes the next job while this one is encoded.
            job.on_device, job.phase = False, "encoding"
            return
        if isinstance(ev, Started):
            return
        if isinstance(ev, Phase):
            job.phase = ev.phase
            logger.bind(job=ev.id).info("job.phase id={} phase={}", ev.id, ev.phase)
            return
        if isinstance(ev, Progress):
            job.phase, job.step, job.total = ev.phase, ev.step, ev.total
            return
        rec = self.book.records[ev.id]
        cancelled = ev.id in self.book.cancel_requested
        try:
            if isinstance(ev, Done):
                if cancelled:  # finished before the cancel landed
                    self.book.forget_cancel(ev.id)
                status = self.workers[worker_name].status
                self.publisher.publish(rec, ev.result, job, status.info, status.pid)
            elif isinstance(ev, Interrupted | Failed):
                self.publisher.discard_temp(job)
                if cancelled:
                    self.book.cancel(rec, "while it was running")
                elif isinstance(ev, Interrupted):
                    self.book.requeue_interrupted(rec)
                else:
                    self.book.fail_or_retry(rec, ev.error.to_error())
        except OSError as exc:  # the record could not be written: the book's reconcile retries it
            self.book.on_write_error(exc)
        finally:
            self.running.pop(ev.id, None)
            self.book.interrupt_notes.pop(ev.id, None)

    # ---- stopping ------------------------------------------------------------------------------

    def drop_all(self) -> None:
        """Kill every worker with a job and forget the jobs (the lease was lost: they are someone else's)."""
        for job in list(self.running.values()):
            self.workers[job.worker].kill()
            self.publisher.discard_temp(job)
        self.running.clear()

    def drain(self, deadline: float, watcher: InboxWatcher, heartbeat: Callable[[], None]) -> None:
        """Shutdown: jobs on a device stop at their next step (back to the queue), jobs being encoded are
        finished and published. At the deadline the workers still busy are killed; nothing is lost."""
        if not self.running:
            return
        logger.info(
            "daemon.draining interrupting={} timeout={}s", sorted(self.running), self.settings.shutdown.timeout_seconds
        )
        for job in self.running.values():
            if job.on_device:
                self.workers[job.worker].interrupt()
        while self.running and self.clock() < deadline:
            self.wait_for_something(watcher)
            self.poll()
            heartbeat()
        for job in list(self.running.values()):
            logger.warning("daemon.drain_timeout job={}: killing the worker", job.id)
            self.workers[job.worker].kill()
            rec = self.book.records.get(job.id)
            if rec is not None and rec.state is JobState.RUNNING:
                self.book.requeue_interrupted(rec)
            self.publisher.discard_temp(job)
        self.running.clear()
