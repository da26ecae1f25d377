"""The daemon's side of a worker that is a Ray actor (daemon.worker.protocol.ExecutorProtocol), for
``worker.executor: ray``. Like LocalProcessExecutor it forwards and watches and decides nothing about jobs:
the spool, scheduler, retry policy and outbox stay on the daemon's host, and the actor
(daemon.worker.ray_actor.WorkerActor) runs the same serve loop and backend as a local worker process.

- One actor per worker (``num_gpus=1``: Ray places it on a free GPU and sets its CUDA_VISIBLE_DEVICES), with
  ``max_restarts=0``: a dead actor is not restarted by Ray but respawned here, with the same backoff as a local
  worker, as a fresh actor that Ray places on any free GPU.
- One streaming call per job. A thread per call only moves its items into this executor's inbox (writing the
  finished video and poster bytes to the outbox's temp paths on the way) and wakes the daemon through
  ``event_handle``; ``poll`` on the daemon's thread does everything else.
- Liveness: a stream or the actor's ``lifetime`` call raising RayActorError / ActorDiedError (the actor or its
  node died) -> worker_crashed; silence past the job's limit -> timeout, and the actor is killed; not placed
  and ready within ``ray.start_timeout_seconds`` -> timeout, and an actor that no node placed is
  ``failing_to_start`` at once (never a hang).
- VRAM admission stays in the daemon's scheduler: ``gpu`` is the actor's GPU as NVML on its node reported it
  at Ready and at the end of each job's device part (its index is ``RAY_GPU_INDEX + n``, never a local one).
Ray (an optional extra) is imported only inside methods: with ``worker.executor: local`` it never is.
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.config import RayConfig
from daemon.errors import Category, JobError, classify_exception
from daemon.fsutil import fsync_file
from daemon.ops.inventory import GpuInfo
from daemon.worker.protocol import (
    Done,
    ErrorInfo,
    Failed,
    Fatal,
    Interrupted,
    JobPayload,
    Ready,
    WorkerConfig,
    WorkerEvent,
    WorkerStatus,
    event_from_wire,
    to_wire,
)
from daemon.worker.tracking import EventTracking

#: GpuInfo.index of the n-th Ray worker: out of the range of this host's own CUDA indices, which the
#: placement's inventory reads by index.
RAY_GPU_INDEX = 1000
_ACTOR_CONCURRENCY = 8  # lifetime + ready + two jobs' streams (overlap) + interrupt + stop, with room


def _ray() -> Any:
    import ray

    return ray


class RayExecutor(EventTracking):
    """One worker as a Ray actor."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        ray_config: RayConfig,
        clock: Callable[[], float],
        stall_timeout_seconds: float,
        num_gpus: float = 1,
        index: int = 0,
        owner: str = "wan-daemon",
    ) -> None:
        self.config = config
        self.name = config.worker_name
        self.ray_config = ray_config
        self.clock = clock
        self.stall_timeout_seconds = stall_timeout_seconds
        self.start_timeout_seconds = ray_config.start_timeout_seconds
        self.num_gpus = num_gpus
        self.index = index
        self.owner = owner
        self.gpu: GpuInfo | None = None  # the actor's GPU as its node's NVML last reported it
        self.status = WorkerStatus()
        self.warm: list[str] = []
        self.finishing: dict[str, float] = {}
        self.placed: Any = None  # ray_actor.Placed, once the actor answered where()
        self._silence_limit = stall_timeout_seconds
        self._actor: Any = None
        self._where: Any = None
        self._ready: Any = None
        self._life: Any = None
        self._generation = 0  # items of an actor that was given up are dropped
        self._inbox: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pumps: list[threading.Thread] = []
        self._sent_loras: set[str] = set()
        self._killed = False
        self._unplaced = False
        self._started_at = 0.0
        self._last_heard = 0.0
        self._respawn_at = 0.0
        self._failures_in_a_row = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        from daemon.worker.ray_actor import WorkerActor

        ray = _ray()
        needs = {"num_gpus": self.num_gpus, "resources": dict(self.ray_config.resources) or None}
        self._generation += 1
        self._actor = (
            ray.remote(WorkerActor)
            .options(
                name=f"wan-{self.owner}-{self.name}-{secrets.token_hex(3)}",
                namespace=self.ray_config.namespace,
                max_restarts=0,
                max_task_retries=0,
                max_concurrency=_ACTOR_CONCURRENCY,
                **needs,
            )
            .remote(to_wire(self.config))
        )
        self._where, self._ready, self._life = (
            self._actor.where.remote(),
            self._actor.ready.remote(),
            self._actor.lifetime.remote(),
        )
        self._killed = False  # _unplaced stays until an actor is ready: a retry is no less unplaceable
        self._sent_loras = set()
        self.placed = None
        self.status.state, self.status.pid, self.status.job_id = "starting", None, None
        self._started_at = self._last_heard = self.clock()
        logger.info("worker.actor_requested name={} needs={}", self.name, self._needs())

    def _needs(self) -> dict[str, float]:
        return {"GPU": self.num_gpus, **self.ray_config.resources}

    def stop(self, timeout: float = 10.0) -> None:
        if self._actor is None:
            return
        if self.status.state == "ready":  # idle: let it finish an encode and remove its temp folder
            try:
                _ray().get(self._actor.stop.remote(timeout), timeout=timeout)
            except Exception as exc:  # dead or stuck already: killed below either way
                logger.debug("worker.actor_stop_failed name={} error={}", self.name, exc)
        self._close()
        self.finishing = {}
        self.status.state = "stopped"

    def park(self, timeout: float = 5.0) -> None:
        super().park(timeout)
        self.placed = None  # a new actor is placed afresh when unparked

    def interrupt(self) -> None:
        """Ask the actor to stop the job on its device at the next denoising step (the actor stays warm)."""
        if self._actor is not None and self.status.job_id is not None:
            self._actor.interrupt.remote(self.status.job_id)

    def kill(self) -> None:
        if self._actor is not None:
            _ray().kill(self._actor, no_restart=True)
            self._killed = True

    def _close(self, join: bool = True) -> None:
        """Kill the actor (a pending one is never placed); its stream threads end as their streams raise."""
        if self._actor is not None:
            try:
                _ray().kill(self._actor, no_restart=True)
            except Exception as exc:
                logger.debug("worker.actor_kill_failed name={} error={}", self.name, exc)
        self._generation += 1
        self._actor = self._where = self._ready = self._life = None
        for pump in self._pumps if join else ():
            pump.join(10)
        self._pumps = [p for p in self._pumps if p.is_alive()]

    @property
    def failing_to_start(self) -> bool:
        """Died before becoming ready several times in a row, or no node could place the actor at all."""
        failing = self._failures_in_a_row >= 3 or self._unplaced
        return failing and self.status.job_id is None and self.status.state not in ("ready", "parked")

    @property
    def ready(self) -> bool:
        return self.status.state == "ready"

    @property
    def event_handle(self) -> Any:
        """A socket that turns readable when a stream thread has put an event in the inbox."""
        return self._wake_r if self._actor is not None else None

    # ---- work ----------------------------------------------------------------------------------

    def submit(self, payload: JobPayload, silence_limit: float | None = None) -> None:
        """Hand a job over: its own streaming call, read by a thread of its own."""
        assert self.ready, "submit only to a ready worker"
        stall = self.stall_timeout_seconds
        self._silence_limit = min(stall, silence_limit or stall)
        self.status.state, self.status.job_id = "busy", payload.id
        self._last_heard = self.clock()
        try:
            files = self._files(payload)
        except OSError as exc:  # the spool's copy of an input went away: the job fails, the actor is fine
            self._put(self._generation, Failed(payload.id, ErrorInfo.of(classify_exception(exc))), None)
            return
        stream = self._actor.run.options(num_returns="streaming").remote(to_wire(payload), files)
        pump = threading.Thread(
            target=self._pump, args=(stream, payload, self._generation), name=f"ray-stream-{self.name}", daemon=True
        )
        self._pumps = [p for p in self._pumps if p.is_alive()] + [pump]
        pump.start()

    def _files(self, payload: JobPayload) -> Any:
        from daemon.worker.ray_actor import JobFiles

        image = None
        if payload.input_image is not None:
            image = (Path(payload.input_image).name, Path(payload.input_image).read_bytes())
        loras = {}
        for entry in payload.params.loras:
            if entry["sha256"] not in self._sent_loras:
                loras[entry["sha256"]] = Path(entry["path"]).read_bytes()
        self._sent_loras |= loras.keys()
        return JobFiles(image=image, loras=loras)

    def _put(self, generation: int, item: Any, gpu: Any) -> None:
        self._inbox.put((generation, (item, gpu)))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # full: the daemon has a wake-up pending already

    def _pump(self, stream: Any, payload: JobPayload, generation: int) -> None:
        """A job's stream into the inbox (on its own thread). The finished video and poster go to the outbox's
        temp paths here, off the daemon's thread; a broken stream becomes the reason the worker is lost."""
        ray = _ray()
        ended = False
        try:
            for ref in stream:
                item = ray.get(ref)
                event = event_from_wire(item.event)
                if isinstance(event, Done):
                    event = self._write_outputs(event, item, payload, generation)
                ended = isinstance(event, (Done, Failed, Interrupted))
                self._put(generation, event, item.gpu)
        except ray.exceptions.RayError as exc:
            where = f" on {self.placed.host}" if self.placed else ""
            reason = JobError(
                Category.WORKER_CRASHED,
                f"the Ray actor{where} was lost while running the job ({type(exc).__name__})",
                details={"error": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__},
            )
            self._put(generation, reason, None)
            return
        except OSError as exc:  # writing the outputs here: disk full, outbox gone
            self._put(generation, Failed(payload.id, ErrorInfo.of(classify_exception(exc))), None)
            return
        if not ended:
            self._put(
                generation, JobError(Category.WORKER_CRASHED, "the actor's stream ended without an outcome"), None
            )

    def _write_outputs(self, event: Done, item: Any, payload: JobPayload, generation: int) -> Done:
        video_tmp, poster_tmp = Path(payload.video_tmp), Path(payload.poster_tmp)
        if generation != self._generation:
            return event  # the worker was given up meanwhile: its job is lost, write nothing into the outbox
        written: list[str | None] = []
        for data, path in ((item.video, video_tmp), (item.poster, poster_tmp)):
            if data is not None:
                with open(path, "wb") as fh:
                    fh.write(memoryview(data))  # in place from the object store (a numpy array: no copy)
                fsync_file(path)
            written.append(str(path) if data is not None else None)
        result = dataclasses.replace(event.result, video_tmp=written[0], poster_tmp=written[1])
        return dataclasses.replace(event, result=result)

    def poll(self) -> list[WorkerEvent]:
        """Events from the actor, plus synthetic Failed events when it died, stalled or never started."""
        now = self.clock()
        if self._actor is None:
            if self.status.state in ("stopped", "backoff") and now >= self._respawn_at:
                self.start()
            return []
        self._drain_wake()
        out: list[WorkerEvent] = []
        reason: JobError | None = None
        if self.status.state == "starting":
            reason = self._check_start(now, out)
        while True:
            try:
                generation, (item, gpu) = self._inbox.get_nowait()
            except queue.Empty:
                break
            if generation != self._generation:
                continue
            if isinstance(item, JobError):
                reason = reason or item
                continue
            self._note_gpu(gpu)
            self._on_event(item)
            out.append(item)
        if out:
            self._last_heard = self.clock()
        reason = reason or self._check_liveness(now)
        if reason is not None:
            out.extend(self._lose(reason, now))
        return out

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _check_start(self, now: float, out: list[WorkerEvent]) -> JobError | None:
        ray = _ray()
        if self.placed is None and ray.wait([self._where], timeout=0)[0]:
            try:
                self.placed = ray.get(self._where)
                self.status.pid = self.placed.pid
            except ray.exceptions.RayError as exc:
                return JobError(Category.WORKER_CRASHED, f"the Ray actor died while starting: {type(exc).__name__}")
        if ray.wait([self._ready], timeout=0)[0]:
            try:
                item = ray.get(self._ready)
            except ray.exceptions.RayError as exc:
                return JobError(Category.WORKER_CRASHED, f"the Ray actor died while starting: {type(exc).__name__}")
            event = event_from_wire(item.event)
            self._note_gpu(item.gpu, event.info if isinstance(event, Ready) else None)
            self._on_event(event)
            out.append(event)
            if isinstance(event, Fatal):
                return event.error.to_error()
            return None
        if now - self._started_at <= self.start_timeout_seconds:
            return None
        if self.placed is None:
            self._unplaced = True
            self.status.last_fatal = (
                f"no Ray node could place the actor (it needs {self._needs()}) within ray.start_timeout_seconds "
                f"({self.start_timeout_seconds:g}s); cluster resources: {ray.cluster_resources()}"
            )
            return JobError(Category.TIMEOUT, self.status.last_fatal)
        return JobError(Category.TIMEOUT, f"the Ray actor on {self.placed.host} did not start in time")

    def _note_gpu(self, gpu: Any, info: Any = None) -> None:
        """The actor's GPU as NVML on its node reported it (or its backend did, at Ready, without NVML)."""
        if gpu is not None:
            self.gpu = GpuInfo(
                RAY_GPU_INDEX + self.index, gpu.name, gpu.total_mb, gpu.used_mb, gpu.free_mb, uuid=gpu.uuid
            )
        elif info is not None and info.vram_total_mb is not None and info.vram_free_mb is not None:
            used = info.vram_total_mb - info.vram_free_mb
            self.gpu = GpuInfo(
                RAY_GPU_INDEX + self.index, info.device_name or "GPU", info.vram_total_mb, used, info.vram_free_mb
            )

    def _on_event(self, ev: WorkerEvent) -> None:
        self._track(ev)
        if isinstance(ev, Ready):
            self._failures_in_a_row, self._unplaced = 0, False
            logger.info(
                "worker.actor_ready name={} host={} actor={} pid={}", self.name, ev.info.host, ev.info.actor, ev.pid
            )
        elif isinstance(ev, Done):
            ev.result.resources["ray"] = self.where()
        elif isinstance(ev, Fatal):
            self.status.last_fatal = ev.error.message
            logger.error("worker.fatal name={} error={}", self.name, ev.error.message)

    def where(self) -> dict[str, Any]:
        """Where this worker runs, for the sidecar (``resources.ray``) and the log."""
        fields = ("host", "node_id", "actor_id")
        return {**{f: getattr(self.placed, f, None) for f in fields}, "restarts": self.status.restarts}

    def _check_liveness(self, now: float) -> JobError | None:
        ray = _ray()
        stall = self.stall_timeout_seconds
        where = f" on {self.placed.host}" if self.placed else ""
        if self._killed:
            return JobError(Category.WORKER_CRASHED, f"the Ray actor{where} was killed while running the job")
        if ray.wait([self._life], timeout=0)[0]:
            try:
                ray.get(self._life)
                message = f"the Ray actor{where} ended its serve loop"
            except ray.exceptions.RayError as exc:
                message = f"the Ray actor{where} died ({type(exc).__name__})"
            return JobError(Category.WORKER_CRASHED, message)
        if self.status.state == "busy" and now - self._last_heard > self._silence_limit:
            return JobError(
                Category.TIMEOUT,
                f"the worker sent no progress for {now - self._last_heard:.0f}s "
                f"(limit {self._silence_limit:g}s: the job's timeout or "
                f"worker.stall_timeout_seconds); its Ray actor{where} was killed",
            )
        if self.finishing and now - min(self.finishing.values()) > stall:
            return JobError(
                Category.TIMEOUT,
                f"encoding a finished video took more than worker.stall_timeout_seconds ({stall:g}s); "
                f"its Ray actor{where} was killed",
            )
        return None

    def _lose(self, reason: JobError, now: float) -> list[WorkerEvent]:
        job_id = self.status.job_id
        lost = [*self.finishing, *([job_id] if job_id is not None else [])]
        self.finishing = {}
        logger.error("worker.lost name={} where={} reason={} jobs={}", self.name, self.where(), reason.message, lost)
        self._close(join=False)  # the daemon's thread does not wait for them; stop() does
        self._failures_in_a_row += 1
        self.warm = []  # a new actor starts cold
        self._respawn_at = now + min(60.0, 0.5 * 2 ** (self._failures_in_a_row - 1))
        self.status = WorkerStatus(
            state="backoff", restarts=self.status.restarts + 1, last_fatal=self.status.last_fatal
        )
        return [Failed(lost_id, ErrorInfo.of(reason), synthetic=True) for lost_id in lost]
