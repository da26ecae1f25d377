"""What crosses the boundary between the daemon and a worker: typed messages, and the two interfaces.

```
daemon (runtime/)                                   worker process (worker/main.py)
  ExecutorProtocol.submit(JobPayload)   ── jobs ──►   Backend.generate(payload, report, should_stop)
  ExecutorProtocol.poll() -> [WorkerEvent] ◄─ events ─ Ready | Fatal | Started | Phase | Progress
                                                     | DeviceFree | Done(JobResult) | Failed | Interrupted
```

Every message is a dataclass. At the pipe it is plain JSON (:func:`to_wire`) and it is parsed back in one
place (:func:`event_from_wire`, :func:`payload_from_wire`): nothing on the daemon side unpickles an object
that could make it import torch, and nothing reads a message through string keys.

This module imports no torch, no diffusers: the daemon process imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import Field, TypeAdapter
from pydantic.dataclasses import dataclass

from daemon.errors import Category, JobError
from daemon.jobspec.params import ResolvedParams
from daemon.models import LocatedModel
from daemon.ops.inventory import GpuInfo

# ---- configuration and jobs (daemon -> worker) -------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs to start, fixed for its life."""

    worker_name: str
    device: str  # auto | cuda | cpu
    models_dir: str
    allow_cpu_for_real_models: bool = False
    max_cached_pipelines: int = 2
    cache_budget_mb: float | None = None
    cpu_threads: int | None = None
    overlap_encoding: str = "auto"  # auto | on | off
    log_level: str = "INFO"
    log_format: str = "text"  # daemon.logs: text | json
    # "module:Factory" of a stand-in backend (daemon.testing), injected by code for tests and benchmarks,
    # never by configuration. None: the real diffusers backend.
    backend: str | None = None
    # The worker sees only its own GPU (CUDA_VISIBLE_DEVICES, set before it imports torch).
    visible_device: str | None = None


@dataclass(frozen=True)
class JobPayload:
    """One attempt of one job, as the worker runs it: every parameter resolved, the plan applied."""

    id: str
    token: str
    attempt: int
    model: LocatedModel
    params: ResolvedParams  # the record's parameters with this attempt's offload plan applied
    video_tmp: str  # where the finished MP4 goes (a temp name in the outbox's folder)
    input_image: str | None = None
    # The plan's estimate of this attempt's peak (MiB, CUDA context included); None without a plan. The worker
    # evicts warm pipelines until it fits beside the ones it keeps (see DeviceMemory).
    estimate_mb: int | None = None

    @property
    def poster_tmp(self) -> str:
        video = Path(self.video_tmp)
        return str(video.with_name(video.stem + ".poster.jpg"))


# ---- events (worker -> daemon) ------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfo:
    """A classified error on the wire (daemon.errors.JobError without the exception)."""

    error_category: Category
    message: str
    recovery_suggestions: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, err: JobError) -> ErrorInfo:
        return cls(**err.to_dict())

    def to_error(self) -> JobError:
        return JobError(self.error_category, self.message, list(self.recovery_suggestions), dict(self.details))


@dataclass(frozen=True)
class VideoFacts:
    """The MP4 as a player reads it back (daemon.worker.media.probe_video)."""

    bytes: int
    sha256: str
    frames: int
    fps: float
    width: int
    height: int
    codec: str | None = None


@dataclass
class JobResult:
    """What a finished job reports for its sidecar. The video and poster are in their temp paths, fsynced."""

    device: str
    model_path: str | None  # the folder it loaded; None from a stand-in backend (daemon.testing)
    model_cache: str  # loaded | cached
    timings: dict[str, float]
    optimizations_applied: list[str]
    peak_vram_usage_mb: int | None = None
    peak_rss_mb: float | None = None
    models_evicted: list[str] = field(default_factory=list)
    frames_generated: int = 0
    resources: dict[str, Any] = field(default_factory=dict)
    video_tmp: str | None = None
    poster_tmp: str | None = None
    video: VideoFacts | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """What a backend says about its device once it is up."""

    device: str
    device_name: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    cpu_threads: int | None = None
    vram_total_mb: int | None = None
    vram_free_mb: int | None = None
    # Where a remote worker runs (a Ray actor: its node's host name and the actor's id); None for a local one.
    host: str | None = None
    actor: str | None = None


@dataclass(frozen=True)
class WarmPipeline:
    """A pipeline the worker keeps loaded, as its cache holds it (one entry per model, mode and precision)."""

    model: str  # LocatedModel.name
    offload: str  # none | model | group | sequential (params.offload's names)
    fp8: bool = False
    device_mb: int = 0  # what it keeps on the device between jobs (its weights when resident; ~0 offloaded)


@dataclass(frozen=True)
class DeviceMemory:
    """What the worker holds on its device while no job of it is there: the CUDA context, its warm
    pipelines' weights and the allocator's reserve (torch keeps a job's peak reserved until emptied).

    NVML counts all of it as used. It is the worker's to give back, not another process's: the daemon adds
    ``held_mb`` back to NVML's free figure before it plans the worker's next job, and the worker evicts warm
    pipelines (least recently used first, then empties the allocator's cache) until that job's estimate fits
    beside the ones it keeps. Sent with every event that ends a job's device part (and with Ready);
    None from a backend that cannot tell (a CPU)."""

    held_mb: int
    warm: tuple[WarmPipeline, ...] = ()  # least recently used first


@dataclass(frozen=True)
class Ready:
    """The worker is up and takes jobs."""

    pid: int
    info: DeviceInfo
    memory: DeviceMemory | None = None
    type: Literal["ready"] = "ready"


@dataclass(frozen=True)
class Fatal:
    """The worker could not start; it exits after this."""

    error: ErrorInfo
    traceback: str = ""
    type: Literal["fatal"] = "fatal"


@dataclass(frozen=True)
class Started:
    id: str
    type: Literal["started"] = "started"


@dataclass(frozen=True)
class Phase:
    """The job entered a phase (building_tiny_model, loading_model, encoding, ...)."""

    id: str
    phase: str
    type: Literal["phase"] = "phase"


@dataclass(frozen=True)
class Progress:
    """A denoising step finished."""

    id: str
    phase: str
    step: int
    total: int
    type: Literal["progress"] = "progress"


@dataclass(frozen=True)
class DeviceFree:
    """The job's frames are off the device: the worker takes the next job while this one is encoded."""

    id: str
    memory: DeviceMemory | None = None
    type: Literal["device_free"] = "device_free"


@dataclass(frozen=True)
class Done:
    id: str
    result: JobResult
    memory: DeviceMemory | None = None  # None when it was encoded after DeviceFree (the next job may be running)
    type: Literal["done"] = "done"


@dataclass(frozen=True)
class Failed:
    """The job failed. ``synthetic``: made up by the executor because the worker died or went silent."""

    id: str
    error: ErrorInfo
    traceback: str = ""
    synthetic: bool = False
    memory: DeviceMemory | None = None
    type: Literal["failed"] = "failed"


@dataclass(frozen=True)
class Interrupted:
    """The job stopped at a denoising step because the daemon asked (shutdown, cancel)."""

    id: str
    memory: DeviceMemory | None = None
    type: Literal["interrupted"] = "interrupted"


WorkerEvent = Ready | Fatal | Started | Phase | Progress | DeviceFree | Done | Failed | Interrupted

_EVENT = TypeAdapter(Annotated[WorkerEvent, Field(discriminator="type")])
_PAYLOAD = TypeAdapter(JobPayload)
_CONFIG = TypeAdapter(WorkerConfig)


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    """The TypeAdapter of a message class, built on its first use. (Two threads may both build one the first
    time; either result is the same, and a dict write is atomic.)"""
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def to_wire(message: Any) -> dict[str, Any]:
    """A message as plain JSON values (what goes into the pipe). Nested pydantic models (a payload's
    LocatedModel and ResolvedParams) become their JSON form, which the ``*_from_wire`` parsers read back;
    a value JSON has no type for (a numpy scalar, a TorchVersion) becomes its ``str``."""
    return _adapter(type(message)).dump_python(message, mode="json", fallback=str)


def event_from_wire(data: dict[str, Any]) -> WorkerEvent:
    """The one place an event from a worker is parsed (and checked)."""
    return _EVENT.validate_python(data)


def payload_from_wire(data: dict[str, Any]) -> JobPayload:
    return _PAYLOAD.validate_python(data)


def config_from_wire(data: dict[str, Any]) -> WorkerConfig:
    return _CONFIG.validate_python(data)


# ---- the two interfaces -------------------------------------------------------------------------


class Report(Protocol):
    """How a backend reports what it is doing; the worker turns each call into a Phase or Progress event."""

    def __call__(self, phase: str, step: int | None = None, total: int | None = None) -> None: ...


class Generated(Protocol):
    """A job whose device work is done (its frames wait on the CPU); opaque to the worker loop."""

    payload: JobPayload


#: What a backend's ``generate`` hands to its own ``finish`` (each backend has its own kind).
G = TypeVar("G", bound=Generated)


class Backend(Protocol[G]):
    """Runs jobs on one device inside the worker process. The real one is
    daemon.worker.backend.DiffusersWanBackend; daemon.testing.CueBackend stands in for a GPU in tests.

    A job is split in two so the worker can overlap them across jobs: ``generate`` (the device's part:
    load, denoise, decode to frames on the CPU) and ``finish`` (the CPU's part: encode the MP4 into
    ``payload.video_tmp``, read it back, write the poster, fsync all). Both raise what
    daemon.errors.classify_exception understands; ``generate`` raises JobInterrupted at the next step once
    ``should_stop()`` is true."""

    device: str

    def describe(self) -> DeviceInfo: ...

    def generate(self, payload: JobPayload, report: Report, should_stop: Callable[[], bool]) -> G: ...

    def finish(self, generated: G) -> JobResult: ...

    def memory(self) -> DeviceMemory | None:
        """What the worker holds on its device now (between jobs), or None where there is nothing to tell."""
        ...


@dataclass
class WorkerStatus:
    """An executor's view of its worker, for placement, health and metrics."""

    state: str = "stopped"  # stopped | starting | ready | busy | backoff | parked (stopped until unparked)
    pid: int | None = None
    info: DeviceInfo | None = None  # from Ready
    job_id: str | None = None  # the job on its device
    restarts: int = 0
    last_fatal: str | None = None  # why the worker could not start, if it could not
    memory: DeviceMemory | None = None  # what it holds on its device, as of its last report


class ExecutorProtocol(Protocol):
    """The daemon's handle on one worker (a local process today; a Ray actor can implement the same).
    It forwards and watches; it decides nothing about jobs."""

    name: str
    gpu: GpuInfo | None  # None: a CPU worker
    status: WorkerStatus
    warm: list[str]  # models the worker holds, least recently used first
    finishing: dict[str, float]  # jobs off its device still being encoded -> since when

    def note_warm(self, model: str) -> None:
        """A job for ``model`` was handed over: the worker holds it now (most recently used)."""
        ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def submit(self, payload: JobPayload, silence_limit: float | None = None) -> None: ...

    def poll(self) -> list[WorkerEvent]:
        """Events since the last poll, plus synthetic Failed events for jobs lost when the worker died or
        went silent (it is then respawned with a backoff)."""
        ...

    def interrupt(self) -> None:
        """Ask the worker to stop the job on its device at the next denoising step."""
        ...

    def kill(self) -> None: ...

    def park(self) -> None:
        """Stop the worker (its warm pipelines and device context freed) and keep it stopped, state ``parked``:
        never respawned until :meth:`unpark`. Only for a worker with no job (the daemon checks)."""
        ...

    def unpark(self) -> None:
        """Let a parked worker start again: the next poll() starts it as any respawn (cold: its next job loads its
        model); a no-op for any other."""
        ...

    @property
    def ready(self) -> bool: ...

    @property
    def failing_to_start(self) -> bool: ...

    @property
    def event_handle(self) -> Any:
        """Something multiprocessing.connection.wait() can wait on for this worker's next event, or None."""
        ...
