"""Admission: what each free worker can take (its slot), and which jobs no worker here could ever run.

The memory side of placement (daemon.runtime.placement): it reads the GPU inventory and the workers' own
accounts of their devices, plans with the memory model (daemon.memory) and fails, at once and with the numbers,
the jobs that no configured worker could run in any offload mode, queued or still waiting for a download (which
is then never started).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from daemon.config import Settings
from daemon.errors import Category, JobError
from daemon.jobs import JobRecord, JobState
from daemon.memory import MODE_ALIASES, JobDemand, PeakBook, Plan, WarmMode, plan_for, strongest_estimate_mb
from daemon.ops.inventory import GpuInfo, GpuInventory
from daemon.runtime.book import JobBook
from daemon.scheduler import Slot, fits_nowhere, insufficient_vram_message
from daemon.worker.protocol import ExecutorProtocol


class Admission:
    def __init__(
        self, settings: Settings, book: JobBook, *, gpus: list[GpuInfo], inventory: GpuInventory, peaks: PeakBook
    ) -> None:
        self.settings = settings
        self.book = book
        self.gpus = gpus
        # Ray actors (worker.executor: ray) run on other hosts' GPUs, known once each actor is Ready: placement
        # sets this to read them from the workers (None while none has said). Local workers: the inventory's.
        self.worker_gpus: Callable[[], list[GpuInfo] | None] | None = None
        self.inventory = inventory
        self.peaks = peaks
        # Jobs waiting for their model's download -> why no worker here could run them (None: one could).
        self._runnable: dict[str, str | None] = {}
        book.downloads.wanted = self.download_wanted

    def demand(self, rec: JobRecord) -> JobDemand:
        return JobDemand.from_record(rec)

    def plan(self, demand: JobDemand, free_mb: int, *, warm: WarmMode | None = None) -> Plan | None:
        m = self.settings.models
        return plan_for(demand, free_mb, override=m.offload, allow_lossy=m.allow_lossy, book=self.peaks, warm=warm)

    def slots(self, workers: Mapping[str, ExecutorProtocol], busy: Collection[str]) -> list[Slot]:
        """The ready workers not in ``busy`` (a job on their device). A GPU worker's free memory is NVML's free
        figure plus what the worker itself holds there (its warm pipelines, its allocator's reserve): NVML
        counts that as used, but the worker gives it back to its next job (daemon.worker.protocol.DeviceMemory),
        so the second job of a queue is planned like the first and finds its pipeline warm in the same mode."""
        now = {g.index: g for g in self.inventory.gpus()} if self.gpus else {}
        slots = []
        for name, worker in workers.items():
            if name in busy or not worker.ready:
                continue
            gpu = worker.gpu
            if gpu is None:
                slots.append(Slot(name, None, None, frozenset(worker.warm)))
                continue
            seen = now.get(gpu.index, gpu)
            memory = worker.status.memory
            held = memory.held_mb if memory is not None else 0
            modes = (
                {w.model: WarmMode(MODE_ALIASES.get(w.offload, w.offload), w.fp8) for w in memory.warm}
                if memory
                else {}
            )
            free = min(seen.total_mb, seen.free_mb + held)
            slots.append(Slot(name, gpu.index, free, frozenset(worker.warm), seen.total_mb, modes))
        return slots

    # ---- jobs no worker here could run -----------------------------------------------------------

    def why_not_runnable(self, rec: JobRecord) -> str | None:
        """None when some configured worker could run the job in some offload mode (a GPU that could hold it
        empty, or a CPU worker allowed real models); otherwise why not, with the numbers."""
        gpus = self._gpus()
        if gpus is None:
            return None  # the workers' GPUs are not known yet: no verdict
        demand = self.demand(rec)
        totals = [g.total_mb for g in gpus]
        if totals:
            if not fits_nowhere(demand, totals, self.plan):
                return None
            return insufficient_vram_message(demand, totals, strongest_estimate_mb(demand))
        if rec.model.tiny or self.settings.worker.allow_cpu_for_real_models:
            return None
        need = strongest_estimate_mb(demand)
        return (
            f"{demand.architecture} at {demand.width}x{demand.height}, {demand.frames} frames needs a CUDA GPU with "
            f"about {need} MiB ({need / 1024:.1f} GiB) even with the strongest offload, and this host has none "
            "(its workers run on the CPU, where real models are refused: worker.allow_cpu_for_real_models is off)"
        )

    def _gpus(self) -> list[GpuInfo] | None:
        return self.gpus if self.worker_gpus is None else self.worker_gpus()

    def _verdict(self, rec: JobRecord) -> str | None:
        if self._gpus() is None:
            return None  # not known yet, and not remembered: asked again once it is
        if rec.id not in self._runnable:
            self._runnable[rec.id] = self.why_not_runnable(rec)
        return self._runnable[rec.id]

    def download_wanted(self, repo_id: str) -> bool:
        """Whether some job waiting for ``repo_id`` could run here (asked before a download is started)."""
        return any(
            self._verdict(rec) is None
            for rec in self.book.in_state(JobState.WAITING_FOR_MODEL)
            if rec.model.repo_id == repo_id
        )

    def fail_what_no_worker_could_run(self) -> None:
        """Jobs waiting for a download that no worker here could run fail at once (insufficient_vram, with the
        numbers); nothing is fetched for them. Then jobs newly queued that fit no GPU here even empty."""
        waiting = self.book.in_state(JobState.WAITING_FOR_MODEL)
        for rec in waiting:
            why = self._verdict(rec)
            if why is not None:
                self.book.fail_or_retry(rec, JobError(Category.INSUFFICIENT_VRAM, f"{why}; it was not downloaded"))
        live = {rec.id for rec in waiting}
        self._runnable = {k: v for k, v in self._runnable.items() if k in live and v is None}
        self._fail_what_fits_nowhere()

    def _fail_what_fits_nowhere(self) -> None:
        """A job that no GPU here could hold, even empty and with the strongest offload, fails as soon as it is
        queued. Each job is checked once per time it enters the queue, not at every decision."""
        gpus = self._gpus()
        if gpus is None:
            return  # checked once the workers' GPUs are known (the jobs stay in newly_queued until then)
        fresh, self.book.newly_queued = self.book.newly_queued, []
        if not gpus:
            return
        totals = [g.total_mb for g in gpus]
        for rec in fresh:
            if self.book.records.get(rec.id) is not rec:
                continue  # moved on since (started, cancelled, dropped)
            demand = self.demand(rec)
            if fits_nowhere(demand, totals, self.plan):
                msg = insufficient_vram_message(demand, totals, strongest_estimate_mb(demand))
                self.book.fail_or_retry(rec, JobError(Category.INSUFFICIENT_VRAM, msg))
