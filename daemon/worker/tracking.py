"""What an executor knows of its worker from the events it relays (daemon side, shared by the local process and
the Ray actor executors): its state, the job on its device, the jobs still being encoded, and the memory and warm
pipelines it reported."""

from __future__ import annotations

from collections.abc import Callable

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
    """Mixed into an executor, which sets ``config``, ``status``, ``warm``, ``finishing`` and ``clock``."""

    config: WorkerConfig
    status: WorkerStatus
    warm: list[str]
    finishing: dict[str, float]  # job id -> when its device part ended (it is being encoded)
    clock: Callable[[], float]

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
