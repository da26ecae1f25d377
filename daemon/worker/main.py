"""The worker process: owns the device, keeps pipelines warm, runs one job at a time on it.

Started with the ``spawn`` method (CUDA cannot survive ``fork``), long-lived, and disposable: the
daemon kills and respawns it when it dies or stalls, and retries its job. It talks to the daemon
only through two queues: jobs in (JobPayload), events out (the typed events of
daemon.worker.protocol: Ready, Started, Phase, Progress, DeviceFree, Done, Failed, Interrupted; Fatal
when it cannot start), each as plain JSON values (``to_wire``).

A job runs in two parts on its backend: ``generate`` (the device) then ``finish`` (the CPU: MP4
encoding, reading it back, the poster). With overlap on, ``finish`` runs on a finisher thread: as soon
as a job's frames are off the device the worker says DeviceFree and takes the next job, while the
previous one is encoded. At most one job is finishing at a time, so at most two decoded videos are held
in memory. With overlap off, ``finish`` runs in line before Done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from daemon.errors import JobInterrupted, classify_exception
from daemon.worker.protocol import (
    Backend,
    DeviceFree,
    DeviceMemory,
    Done,
    ErrorInfo,
    Failed,
    Fatal,
    Generated,
    Interrupted,
    Phase,
    Progress,
    Ready,
    Started,
    WorkerConfig,
    config_from_wire,
    payload_from_wire,
    to_wire,
)


def _exit_with_parent() -> None:
    """A worker must not outlive its daemon (kill -9 of the daemon leaves no orphan holding the GPU)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Events:
    """The worker's outgoing queue, carrying plain JSON values only (``to_wire``): anything else (a
    TorchVersion, a numpy scalar) would make the daemon import torch just to unpickle an event."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def put(self, event: Any) -> None:
        self.queue.put(to_wire(event))


def _failed(job_id: str, exc: BaseException, *, while_: str = "", memory: DeviceMemory | None = None) -> Failed:
    from loguru import logger

    err = classify_exception(exc)
    logger.error("worker.job_failed id={} category={} error={}{}", job_id, err.category.value, err.message, while_)
    return Failed(job_id, ErrorInfo.of(err), traceback.format_exc(), memory=memory)


def _memory(backend: Backend[Any]) -> DeviceMemory | None:
    """What the backend holds on its device now; None when it cannot tell (or a stand-in has no such method)."""
    report = getattr(backend, "memory", None)
    if report is None:
        return None
    try:
        return report()
    except Exception:  # a report that fails must not fail the job whose end it describes
        return None


class _Finisher:
    """One thread that finishes jobs (encode, verify, poster) one at a time, in order."""

    def __init__(self, backend: Backend[Any], events: _Events) -> None:
        self.backend = backend
        self.events = events
        self._thread: threading.Thread | None = None

    def submit(self, job_id: str, generated: Generated) -> None:
        self.wait()  # the previous job's finish first: bounded memory, results in order
        self._thread = threading.Thread(target=self._finish, args=(job_id, generated), name="finisher", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _finish(self, job_id: str, generated: Generated) -> None:
        try:
            result = self.backend.finish(generated)
        except BaseException as exc:
            self.events.put(_failed(job_id, exc, while_=" (while encoding)"))
            return
        self.events.put(Done(job_id, result))


class _BackendKwargs(TypedDict):
    """What every backend's constructor is given (stand-ins take these too, and may ignore some)."""

    device: str
    allow_cpu_for_real_models: bool
    max_cached_pipelines: int
    models_dir: Path
    cache_budget_mb: float | None
    cpu_threads: int | None
    visible_device: str | None


def _make_backend(config: WorkerConfig) -> Backend[Any]:
    kwargs = _BackendKwargs(
        device=config.device,
        allow_cpu_for_real_models=config.allow_cpu_for_real_models,
        max_cached_pipelines=config.max_cached_pipelines,
        models_dir=Path(config.models_dir),
        cache_budget_mb=config.cache_budget_mb,
        cpu_threads=config.cpu_threads,
        visible_device=config.visible_device,
    )
    if config.backend:
        # Injected by code, never by configuration: the scheduler and chaos tests' stand-in for a GPU.
        import importlib

        module, _, attr = config.backend.partition(":")
        return getattr(importlib.import_module(module), attr)(**kwargs)
    from daemon.worker.backend import DiffusersWanBackend

    return DiffusersWanBackend(**kwargs)


def _reporter(events: _Events, job_id: str):
    """The backend's ``report(phase, step=None, total=None)`` for one job, as Phase / Progress events."""

    def report(phase: str, step: int | None = None, total: int | None = None) -> None:
        if step is None:
            events.put(Phase(job_id, phase))
        else:
            events.put(Progress(job_id, phase, step, total if total is not None else 0))

    return report


def _prepare_real_backend() -> None:
    """What the diffusers backend needs before its first job: quiet libraries and a warm encoder. A stand-in
    backend (daemon.testing) needs none of it, and its worker starts without importing them."""
    import diffusers
    import huggingface_hub.utils
    import imageio
    import transformers

    # The encoder's ffmpeg lookup and its probe for an H.264 encoder (two ffmpeg runs, cached per process):
    # now, rather than in the first job, where they cost a third of a second. An ffmpeg without H.264
    # fails that job with the reason instead.
    with contextlib.suppress(Exception):
        imageio.plugins.ffmpeg.get_exe()
        h264_encoder_probe()()

    # Progress bars are for terminals; the worker reports progress as events and log lines instead.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def h264_encoder_probe() -> Callable[[], str]:
    """imageio-ffmpeg's cached probe for the first H.264 encoder its ffmpeg has (what ``write_frames`` picks when
    no codec is named). It has no public name: this is the one place that reaches into ``imageio_ffmpeg._io``,
    and tests/test_private_apis.py fails loudly when imageio-ffmpeg moves it."""
    from imageio_ffmpeg._io import get_first_available_h264_encoder

    return get_first_available_h264_encoder


def worker_main(config: dict[str, Any], jobs, events_queue, interrupt) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the daemon decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    events = _Events(events_queue)
    try:
        cfg = config_from_wire(config)  # imports no torch
    except BaseException as exc:
        events.put(Fatal(ErrorInfo.of(classify_exception(exc)), traceback.format_exc()))
        return
    if cfg.visible_device is not None:
        # Before torch is imported: this worker's cuda:0 is its own GPU, whatever the others use.
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.visible_device
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _exit_with_parent()
    from daemon import logs

    # The daemon's stderr (journald's stream under systemd): the same one-line records, tagged with our pid.
    logs.setup(cfg.log_level, cfg.log_format, tag=f"worker[{os.getpid()}]")
    serve(cfg, jobs, events_queue, interrupt)


def serve(cfg: WorkerConfig, jobs, events_queue, interrupt) -> None:
    """The worker's life once its process is set up (signals, environment, logging): start the backend, say
    Ready (or Fatal), run jobs from ``jobs`` until it yields None. A Ray actor runs it on a thread of its own
    with in-process queues (daemon.worker.ray_actor); ``interrupt`` needs only ``is_set()``."""
    from loguru import logger

    events = _Events(events_queue)
    if cfg.backend is None:
        _prepare_real_backend()
    try:
        backend = _make_backend(cfg)
        events.put(Ready(pid=os.getpid(), info=backend.describe(), memory=_memory(backend)))
    except BaseException as exc:  # a worker that cannot start says why before it goes
        events.put(Fatal(ErrorInfo.of(classify_exception(exc)), traceback.format_exc()))
        return
    logger.info("worker.ready pid={} device={}", os.getpid(), backend.device)
    # The finish of one job overlaps the next one's generation where the device is not the CPU itself:
    # there the encoder and the generation would share its cores, and overlapping them measured slower than
    # taking turns (bench/RESULTS.md).
    overlap = cfg.overlap_encoding == "on" or (cfg.overlap_encoding == "auto" and backend.device != "cpu")
    finisher = _Finisher(backend, events) if overlap else None
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id = job["id"]
        events.put(Started(job_id))
        try:
            payload = payload_from_wire(job)
            generated = backend.generate(payload, _reporter(events, job_id), interrupt.is_set)
            if finisher is not None:
                events.put(DeviceFree(job_id, memory=_memory(backend)))
                finisher.submit(job_id, generated)
                continue
            result = backend.finish(generated)
        except JobInterrupted:
            logger.info("worker.job_interrupted id={}", job_id)
            events.put(Interrupted(job_id, memory=_memory(backend)))
            continue
        except BaseException as exc:
            events.put(_failed(job_id, exc, memory=_memory(backend)))
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            continue
        events.put(Done(job_id, result, memory=_memory(backend)))
    if finisher is not None:
        finisher.wait()  # the last job's video is written before the worker goes
    logger.info("worker.exit pid={}", os.getpid())
