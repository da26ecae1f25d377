"""The worker process: owns the device, keeps pipelines warm, runs one job at a time on it.

Started with the ``spawn`` method (CUDA cannot survive ``fork``), long-lived, and disposable: the
daemon kills and respawns it when it dies or stalls, and retries its job. It talks to the daemon
only through two queues: jobs in, events out (``ready``, ``started``, ``phase``, ``progress``,
``device_free``, ``done``, ``failed``, ``interrupted``).

The end of a job that needs only the CPU (MP4 encoding, reading it back, the poster) runs on a finisher
thread: as soon as a job's frames are off the device the worker says ``device_free`` and takes the next
job, while the previous one is encoded. At most one job is finishing at a time, so at most two decoded
videos are held in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from daemon.errors import JobInterrupted, classify_exception


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
    """The worker's outgoing queue, carrying plain JSON values only: anything else (a TorchVersion, a
    numpy scalar) would make the daemon import torch just to unpickle an event."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def put(self, event: dict[str, Any]) -> None:
        self.queue.put(json.loads(json.dumps(event, default=str)))


class _Finisher:
    """One thread that finishes jobs (encode, verify, poster) one at a time, in order."""

    def __init__(self, backend, events: _Events) -> None:
        self.backend = backend
        self.events = events
        self._thread: threading.Thread | None = None

    def submit(self, job_id: str, generated) -> None:
        self.wait()  # the previous job's finish first: bounded memory, results in order
        self._thread = threading.Thread(target=self._finish, args=(job_id, generated), name="finisher", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _finish(self, job_id: str, generated) -> None:
        from loguru import logger

        try:
            result = self.backend.finish(generated)
        except BaseException as exc:
            err = classify_exception(exc)
            logger.error("worker.job_failed id={} category={} error={} (while encoding)", job_id,
                         err.category.value, err.message)
            self.events.put({"type": "failed", "id": job_id, "error": err.to_dict(),
                             "traceback": traceback.format_exc()})
            return
        self.events.put({"type": "done", "id": job_id, "result": result})


def worker_main(config: dict[str, Any], jobs, events_queue, interrupt) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the daemon decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.get("visible_device") is not None:
        # Before torch is imported: this worker's cuda:0 is its own GPU, whatever the others use.
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = config["visible_device"]
    events = _Events(events_queue)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _exit_with_parent()
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=config.get("log_level", "INFO"),
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | worker[{process}] | {message}")
    import diffusers
    import imageio
    import transformers

    import huggingface_hub.utils

    # The encoder's ffmpeg lookup and its probe for an H.264 encoder (two ffmpeg runs, cached per process):
    # now, rather than in the first job, where they cost a third of a second. An ffmpeg without H.264
    # fails that job with the reason instead.
    with contextlib.suppress(Exception):
        from imageio_ffmpeg._io import get_first_available_h264_encoder

        imageio.plugins.ffmpeg.get_exe()
        get_first_available_h264_encoder()

    # Progress bars are for terminals; the worker reports progress as events and log lines instead.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        backend_kwargs = dict(
            device=config["device"],
            allow_cpu_for_real_models=config["allow_cpu_for_real_models"],
            max_cached_pipelines=config["max_cached_pipelines"],
            models_dir=Path(config["models_dir"]),
            cache_budget_mb=config.get("cache_budget_mb"),
            cpu_threads=config.get("cpu_threads"),
        )
        if config.get("backend"):
            # Injected by code, never by configuration: the scheduler and chaos tests' stand-in for a GPU.
            import importlib

            module, _, attr = config["backend"].partition(":")
            backend = getattr(importlib.import_module(module), attr)(**backend_kwargs)
        else:
            from daemon.worker.backend import DiffusersWanBackend

            backend = DiffusersWanBackend(**backend_kwargs)
        events.put({"type": "ready", "pid": os.getpid(), **backend.describe()})
    except BaseException as exc:  # a worker that cannot start says why before it goes
        events.put({"type": "fatal", "error": classify_exception(exc).to_dict(), "traceback": traceback.format_exc()})
        return
    logger.info("worker.ready pid={} device={}", os.getpid(), backend.device)
    # Backends that split a job (generate on the device, finish on the CPU) overlap the two across jobs,
    # where the device is not the CPU itself: there the encoder and the generation would share its cores,
    # and overlapping them measured slower than taking turns (bench/RESULTS.md).
    overlap = config.get("overlap_encoding", "auto")
    split = hasattr(backend, "generate") and hasattr(backend, "finish")
    finisher = _Finisher(backend, events) if split and (
        overlap == "on" or (overlap == "auto" and backend.device != "cpu")) else None
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id = job["id"]
        events.put({"type": "started", "id": job_id})
        report = lambda ev, job_id=job_id: events.put({**ev, "id": job_id})  # noqa: E731
        try:
            if finisher is not None:
                generated = backend.generate(job, report, interrupt.is_set)
                events.put({"type": "device_free", "id": job_id})
                finisher.submit(job_id, generated)
                continue
            result = backend.run(job, report, interrupt.is_set)
        except JobInterrupted:
            logger.info("worker.job_interrupted id={}", job_id)
            events.put({"type": "interrupted", "id": job_id})
            continue
        except BaseException as exc:
            err = classify_exception(exc)
            logger.error("worker.job_failed id={} category={} error={}", job_id, err.category.value, err.message)
            events.put({"type": "failed", "id": job_id, "error": err.to_dict(), "traceback": traceback.format_exc()})
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            continue
        events.put({"type": "done", "id": job_id, "result": result})
    if finisher is not None:
        finisher.wait()  # the last job's video is written before the worker goes
    logger.info("worker.exit pid={}", os.getpid())
