"""What an executor knows of its worker from the events it relays (daemon side, shared by the local process and
the Ray actor executors): its state, the job on its device, the jobs still being encoded, and the memory and warm
pipelines it reported; and parking it (an operator's ``pause --free-vram``)."""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger

from daemon.worker.protocol import (
    DeviceFree,
    DeviceMemory,
    Done,
    Failed,
    Interrupted,
    Ready,
    WorkerConfig,
    WorkerEvent,
    WorkerStatus,
)


class EventTracking:
    """Mixed into an executor, which sets ``config``, ``name``, ``status``, ``warm``, ``finishing`` and ``clock``
    and has ``start`` and ``stop``."""

    config: WorkerConfig
    name: str
    _failures_in_a_row: int
    _respawn_at: float  # poll() starts a stopped worker once the clock reaches it
    status: WorkerStatus
    warm: list[str]
    finishing: dict[str, float]  # job id -> when its device part ended (it is being encoded)
    clock: Callable[[], float]

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    def park(self, timeout: float = 5.0) -> None:
        """Stop the worker (its process or actor exits: its pipelines and CUDA context are freed) and keep it
        stopped (``parked``) until :meth:`unpark`: poll() respawns only a ``stopped`` or ``backoff`` worker."""
        self.stop(timeout)
        self.warm = []
        self.status = WorkerStatus(
            state="parked", info=self.status.info, restarts=self.status.restarts, last_fatal=self.status.last_fatal
        )
        logger.info("worker.parked name={}", self.name)

    def unpark(self) -> None:
        """Let the worker start again: it is ``stopped`` with no delay, and the next poll() starts it through the
        same path as any respawn (a start that fails there backs off and is tried again, never left parked)."""
        if self.status.state == "parked":
            logger.info("worker.unparked name={}", self.name)
            self._failures_in_a_row = 0
            self._respawn_at = 0.0
            self.status.state = "stopped"

    def note_warm(self, model: str) -> None:
        """A job of ``model`` was handed over: it is the most recently used pipeline (until the worker says)."""
        if model in self.warm:
            self.warm.remove(model)
        self.warm = [*self.warm, model][-self.config.max_cached_pipelines :]

    def _track(self, ev: WorkerEvent) -> None:
        if isinstance(ev, Ready):
            self.status.state, self.status.info, self.status.pid = "ready", ev.info, ev.pid
            self._note_memory(ev.memory)
        elif isinstance(ev, DeviceFree):
            if ev.id == self.status.job_id:
                self.status.state, self.status.job_id = "ready", None
                self._note_memory(ev.memory)
            self.finishing[ev.id] = self.clock()
        elif isinstance(ev, Done | Failed | Interrupted):
            if ev.id == self.status.job_id:
                self.status.state, self.status.job_id = "ready", None
                self._note_memory(ev.memory)
            self.finishing.pop(ev.id, None)

    def _note_memory(self, memory: DeviceMemory | None) -> None:
        """The worker's own account of its device, as the job on it ended: what it holds, and which models it
        keeps warm (its truth replaces what note_warm assumed: a pipeline evicted to make room is gone)."""
        if memory is None:
            return
        self.status.memory = memory
        self.warm = list(reversed(dict.fromkeys(w.model for w in reversed(memory.warm))))
