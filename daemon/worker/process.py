"""The daemon's side of a local worker process (daemon.worker.protocol.ExecutorProtocol): start it, hand it
typed jobs, collect its typed events, and kill and respawn it when it dies or goes silent. It forwards; it
decides nothing about jobs.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon.errors import Category, JobError
from daemon.ops.inventory import GpuInfo
from daemon.worker.main import worker_main
from daemon.worker.protocol import (
    ErrorInfo,
    Failed,
    Fatal,
    JobPayload,
    Ready,
    WorkerConfig,
    WorkerEvent,
    WorkerStatus,
    event_from_wire,
    to_wire,
)
from daemon.worker.tracking import EventTracking

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event


class LocalProcessExecutor(EventTracking):
    """One worker as a local ``spawn`` process, fed through multiprocessing queues."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        clock: Callable[[], float],
        stall_timeout_seconds: float,
        start_timeout_seconds: float,
        gpu: GpuInfo | None = None,
    ) -> None:
        self.config = config
        self.name = config.worker_name
        self.gpu = gpu
        self.stall_timeout_seconds = stall_timeout_seconds
        self.start_timeout_seconds = start_timeout_seconds
        self.warm: list[str] = []  # models this worker has loaded, least recently used first
        # Jobs whose device work is done and whose video the worker is still encoding -> since when.
        self.finishing: dict[str, float] = {}
        self._silence_limit = stall_timeout_seconds
        self.clock = clock
        self.ctx = mp.get_context("spawn")
        self.status = WorkerStatus()
        # Set by start(), cleared together by _close(): all four, or none.
        self._proc: SpawnProcess | None = None
        self._jobs: Queue[Any] | None = None
        self._events: Queue[Any] | None = None
        self._interrupt: Event | None = None
        self._last_heard = 0.0
        self._respawn_at = 0.0
        self._failures_in_a_row = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._jobs = self.ctx.Queue()
        self._events = self.ctx.Queue()
        self._interrupt = self.ctx.Event()
        self._proc = self.ctx.Process(
            target=worker_main,
            args=(to_wire(self.config), self._jobs, self._events, self._interrupt),
            name="wan-worker",
        )
        self._proc.start()
        self.status.state, self.status.pid, self.status.job_id = "starting", self._proc.pid, None
        self._last_heard = self.clock()
        logger.info("worker.spawned name={} pid={}", self.name, self._proc.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        assert self._jobs is not None  # set together with _proc
        if self._proc.is_alive() and self.status.state != "ready":
            self._proc.kill()  # still importing or busy: nothing in it is worth waiting for
            self._proc.join(5)
        if self._proc.is_alive():
            try:
                self._jobs.put(None)
            except (OSError, ValueError):
                pass
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._close()
        self.finishing = {}
        self.status.state = "stopped"

    def interrupt(self) -> None:
        """Ask the worker to stop its job at the next denoising step (it answers ``interrupted``)."""
        if self._interrupt is not None:
            self._interrupt.set()

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _close(self) -> None:
        for q in (self._jobs, self._events):
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self._proc = self._jobs = self._events = self._interrupt = None

    @property
    def failing_to_start(self) -> bool:
        """The worker died before becoming ready several times in a row (e.g. no CUDA when device: cuda)."""
        failing = self._failures_in_a_row >= 3 and self.status.job_id is None
        return failing and self.status.state not in ("ready", "parked")

    @property
    def ready(self) -> bool:
        return self.status.state == "ready"

    @property
    def event_handle(self):
        """The connection this worker's events arrive on, for multiprocessing.connection.wait (None when
        it has no process)."""
        return getattr(self._events, "_reader", None) if self._events is not None else None

    @property
    def worker_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ---- work ----------------------------------------------------------------------------------

    def submit(self, payload: JobPayload, silence_limit: float | None = None) -> None:
        """Hand a job over. ``silence_limit``: the job's own timeout for going without progress."""
        assert self.ready, "submit only to a ready worker"
        assert self._jobs is not None and self._interrupt is not None  # a ready worker has been started
        stall = self.stall_timeout_seconds
        self._silence_limit = min(stall, silence_limit or stall)
        self._interrupt.clear()
        self._jobs.put(to_wire(payload))
        self.status.state, self.status.job_id = "busy", payload.id
        self._last_heard = self.clock()

    def poll(self) -> list[WorkerEvent]:
        """Events from the worker, plus synthetic Failed events when it died or stalled."""
        now = self.clock()
        if self._proc is None:
            if self.status.state in ("stopped", "backoff") and now >= self._respawn_at:
                self.start()
            return []
        assert self._events is not None  # set together with _proc
        raw: list[dict] = []
        try:
            while True:
                raw.append(self._events.get_nowait())
        except (queue.Empty, OSError, EOFError, ValueError):
            pass
        out: list[WorkerEvent] = [event_from_wire(data) for data in raw]
        for ev in out:
            self._on_event(ev)
        if out:
            self._last_heard = self.clock()
        out.extend(self._check_liveness())
        return out

    def _on_event(self, ev: WorkerEvent) -> None:
        self._track(ev)
        if isinstance(ev, Ready):
            self._failures_in_a_row = 0
        elif isinstance(ev, Fatal):
            self.status.last_fatal = ev.error.message
            logger.error("worker.fatal error={}", ev.error.message)

    def _check_liveness(self) -> list[WorkerEvent]:
        assert self._proc is not None  # poll() checks a worker only while it has a process
        now = self.clock()
        stall = self.stall_timeout_seconds
        reason: JobError | None = None
        if not self._proc.is_alive():
            code = self._proc.exitcode
            reason = JobError(
                Category.WORKER_CRASHED,
                f"the worker process exited with code {code} while running the job",
                details={"exitcode": code},
            )
        elif self.status.state == "busy" and now - self._last_heard > self._silence_limit:
            reason = JobError(
                Category.TIMEOUT,
                f"the worker sent no progress for {now - self._last_heard:.0f}s "
                f"(limit {self._silence_limit:g}s: the job's timeout or "
                f"worker.stall_timeout_seconds); it was killed",
            )
        elif self.status.state == "starting" and now - self._last_heard > self.start_timeout_seconds:
            reason = JobError(Category.TIMEOUT, "the worker did not start in time")
        elif self.finishing and now - min(self.finishing.values()) > stall:
            reason = JobError(
                Category.TIMEOUT,
                f"encoding a finished video took more than "
                f"worker.stall_timeout_seconds ({stall:g}s); the worker was killed",
            )
        if reason is None:
            return []
        job_id = self.status.job_id
        lost = [*self.finishing, *([job_id] if job_id is not None else [])]
        self.finishing = {}
        logger.error("worker.lost pid={} reason={} jobs={}", self.status.pid, reason.message, lost)
        self.kill()
        self._close()
        self._failures_in_a_row += 1
        self.warm = []  # a new process starts cold
        delay = min(60.0, 0.5 * 2 ** (self._failures_in_a_row - 1))
        self._respawn_at = now + delay
        self.status = WorkerStatus(
            state="backoff", restarts=self.status.restarts + 1, last_fatal=self.status.last_fatal
        )
        return [Failed(lost_id, ErrorInfo.of(reason), synthetic=True) for lost_id in lost]
