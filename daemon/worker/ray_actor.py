"""A worker as a Ray actor: the same serve loop and backend as a local worker process
(daemon.worker.main.serve), run on a thread of the actor and fed through in-process queues.

```
daemon host (ray_executor.RayExecutor)                    a Ray node (WorkerActor, num_gpus=1)
  where() / ready() / lifetime()       ── calls ──►   placed?  Ready | Fatal (+ NVML)   ends when the actor does
  run(job, JobFiles)  (streaming)      ── job  ──►   serve loop ─► Backend.generate / finish (node-local temp)
  ◄── StreamItem(event, gpu, video, poster) per event; the bytes with the job's Done (object store)
  interrupt(job_id)                    ── call ──►   should_stop() of that job turns true
```

One streaming call per job carries the job's typed events (as ``to_wire`` dicts, parsed on the daemon side by
``event_from_wire``, as from a local worker's pipe). The job runs on node-local paths: its video is encoded into
a temp folder of the actor, and the bytes of the video and poster travel back with its Done item through Ray's
object store; the input image and the LoRAs travel with the job (:class:`JobFiles`). The model is resolved by
name on the node, in its own models folder and Hugging Face cache: a node without the weights fails the job
with ``model_not_found`` naming the node. Nodes hold no job state: an actor that dies takes nothing with it
that the daemon's spool does not have.

Imports neither ray nor torch at import time: the daemon side may import it (for :class:`StreamItem` and the
actor class it hands to ``ray.remote``).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import Category, JobError, classify_exception
from daemon.models import LocatedModel, hub_snapshot, tiny_model_dir
from daemon.worker.main import serve
from daemon.worker.protocol import (
    ErrorInfo,
    Failed,
    Fatal,
    JobPayload,
    WorkerConfig,
    config_from_wire,
    payload_from_wire,
    to_wire,
)


@dataclass(frozen=True)
class GpuReading:
    """The actor's GPU as NVML on its node reports it (the daemon's admission reads this, not Ray's resources)."""

    name: str
    total_mb: int
    used_mb: int
    free_mb: int
    uuid: str | None = None


@dataclass(frozen=True)
class Placed:
    """Where an actor runs."""

    host: str
    node_id: str
    actor_id: str
    pid: int


@dataclass(frozen=True)
class JobFiles:
    """The daemon host's files a job needs, as bytes: its input image (file name, bytes) and its LoRAs
    (sha256 -> bytes; only those the actor was not sent before)."""

    image: tuple[str, bytes] | None = None
    loras: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamItem:
    """One event of a job (or of the actor's start), as the wire dict, with what only a remote worker sends:
    the GPU's memory at the end of a job's device part, and with a Done the finished video and poster bytes."""

    event: dict[str, Any]
    gpu: GpuReading | None = None
    video: Any = None  # the file's bytes as a numpy uint8 array: Ray moves it without pickling, reads it in place
    poster: Any = None


def gpu_reading(device: str) -> GpuReading | None:
    """NVML's view of the GPU Ray gave this actor (CUDA_VISIBLE_DEVICES); None on a CPU or without NVML."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu" or not visible:
        return None
    from daemon.ops.inventory import NvmlInventory

    gpus = NvmlInventory(visible_devices=visible).gpus()
    if not gpus:
        return None
    g = gpus[0]
    return GpuReading(g.name, g.total_mb, g.used_mb, g.free_mb, g.uuid)


class _Router:
    """The serve loop's outgoing queue: each event goes to the stream of its job (dropped when that stream is
    gone); Ready and Fatal, which name no job, to the start-up queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, queue.SimpleQueue[dict[str, Any]]] = {}
        self.startup: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def open(self, job_id: str) -> queue.SimpleQueue[dict[str, Any]]:
        stream: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        with self._lock:
            self._streams[job_id] = stream
        return stream

    def close(self, job_id: str) -> None:
        with self._lock:
            self._streams.pop(job_id, None)

    def put(self, data: dict[str, Any]) -> None:
        job_id = data.get("id")
        if job_id is None:
            self.startup.put(data)
            return
        with self._lock:
            stream = self._streams.get(job_id)
        if stream is not None:
            stream.put(data)


class _Interrupts:
    """Interrupts by job id, so that one that arrives before its job's ``run`` call (Ray does not order calls
    to a threaded actor) still stops that job, and never the next one."""

    def __init__(self) -> None:
        self.current: str | None = None  # the job the serve loop takes next or is generating
        self.requested: set[str] = set()

    def is_set(self) -> bool:
        return self.current is not None and self.current in self.requested


class WorkerActor:
    """The actor class (``ray.remote`` is applied by the executor, with ``max_concurrency`` > 1: a job's
    stream, the next job's, an interrupt and the liveness call run at once on the actor's threads)."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray

        self.cfg: WorkerConfig = config_from_wire(config)
        from daemon import logs

        # The node's Ray worker log (and, with log_to_driver, the daemon's stderr): our lines, tagged.
        logs.setup(self.cfg.log_level, self.cfg.log_format, tag=f"actor[{os.getpid()}]")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = ray.get_runtime_context()
        self.placed = Placed(socket.gethostname(), ctx.get_node_id(), ctx.get_actor_id() or "", os.getpid())
        self.tmp = Path(tempfile.mkdtemp(prefix="wan-ray-"))
        self.jobs: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.router = _Router()
        self.interrupts = _Interrupts()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="wan-serve", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            serve(self.cfg, self.jobs, self.router, self.interrupts)
        except BaseException as exc:  # e.g. the real backend's libraries failing to import: say why
            self.router.put(to_wire(Fatal(ErrorInfo.of(classify_exception(exc)), traceback.format_exc())))
        finally:
            self.ended.set()

    # ---- the actor's life ------------------------------------------------------------------------

    def where(self) -> Placed:
        """Answers as soon as the actor is placed and constructed (before its backend is up)."""
        return self.placed

    def ready(self) -> StreamItem:
        """The serve loop's Ready (or Fatal), with this node's host and the actor's id in its DeviceInfo."""
        data = self.router.startup.get()
        if data.get("type") == "ready":
            data = {**data, "info": {**data["info"], "host": self.placed.host, "actor": self.placed.actor_id}}
        return StreamItem(data, gpu=gpu_reading(self.cfg.device))

    def lifetime(self) -> None:
        """Returns when the serve loop has ended; the daemon watches it to learn that the actor died."""
        self.ended.wait()

    def interrupt(self, job_id: str) -> None:
        self.interrupts.requested.add(job_id)

    def stop(self, timeout: float = 10.0) -> None:
        """End the serve loop (a job being encoded is finished first) and remove the actor's temp folder."""
        self.jobs.put(None)
        self.thread.join(timeout)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- jobs ----------------------------------------------------------------------------------

    def run(self, job: dict[str, Any], files: JobFiles) -> Iterator[StreamItem]:
        """One job: its events until the one that ends it (Done, with the bytes; Failed; Interrupted)."""
        payload = payload_from_wire(job)
        stream = self.router.open(payload.id)
        work = self.tmp / f"{payload.id}-{payload.attempt}"
        try:
            try:
                local = self._localize(payload, files, work)
            except Exception as exc:  # a model missing on this node, an unwritable temp folder
                err = classify_exception(exc)
                yield StreamItem(to_wire(Failed(payload.id, ErrorInfo.of(err), traceback.format_exc())))
                return
            self.interrupts.current = payload.id
            self.jobs.put(to_wire(local))
            while True:
                data = stream.get()
                kind = data.get("type")
                if kind == "done":
                    yield self._finished(data)
                    return
                ends_device_part = kind in ("device_free", "failed", "interrupted")
                yield StreamItem(data, gpu=gpu_reading(self.cfg.device) if ends_device_part else None)
                if kind in ("failed", "interrupted"):
                    return
        finally:
            self.router.close(payload.id)
            self.interrupts.requested.discard(payload.id)
            shutil.rmtree(work, ignore_errors=True)

    def _finished(self, data: dict[str, Any]) -> StreamItem:
        import numpy as np

        result = data["result"]
        video, poster = (
            np.fromfile(result[k], dtype=np.uint8) if result.get(k) else None for k in ("video_tmp", "poster_tmp")
        )
        return StreamItem(data, gpu=gpu_reading(self.cfg.device), video=video, poster=poster)

    def _localize(self, payload: JobPayload, files: JobFiles, work: Path) -> JobPayload:
        """The job on this node's paths: a temp folder for its outputs, its files written there, its model found
        in this node's own models folder or Hugging Face cache."""
        work.mkdir(parents=True, exist_ok=True)
        image = None
        if payload.input_image is not None:
            if files.image is None:
                raise JobError(Category.INTERNAL, f"job {payload.id}: its input image was not sent to the actor")
            name, data = files.image
            image = work / Path(name).name
            image.write_bytes(data)
        loras = []
        for entry in payload.params.loras:
            sha, path = entry["sha256"], self.tmp / "loras" / entry["sha256"][:16] / Path(entry["path"]).name
            if not path.is_file():
                if sha not in files.loras:
                    raise JobError(Category.INTERNAL, f"LoRA {path.name} was not sent to the actor")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(files.loras[sha])
            loras.append({**entry, "path": str(path)})
        return dataclasses.replace(
            payload,
            video_tmp=str(work / Path(payload.video_tmp).name),
            input_image=str(image) if image is not None else None,
            model=self._locate(payload.model),
            params=payload.params.model_copy(update={"loras": loras}) if loras else payload.params,
        )

    def _locate(self, model: LocatedModel) -> LocatedModel:
        """``model`` as this node has it (its own path and revision), by name; model_not_found naming the node."""
        host = self.placed.host
        if model.source == "tiny":
            folder = tiny_model_dir(Path(self.cfg.models_dir), model.name)
            return model.model_copy(update={"path": folder if (folder / "model_index.json").is_file() else None})
        if model.source == "hub-cache":
            repo = model.repo_id or model.name
            snap = hub_snapshot(repo)
            if snap is None:
                raise JobError(
                    Category.MODEL_NOT_FOUND,
                    f"model {model.name!r} ({repo}) is not in the Hugging Face cache of Ray node {host}",
                    [f"Download it on {host}: `wan-daemon models download {model.name}` (every node needs it)."],
                    {"node": host, "repo_id": repo},
                )
            return model.model_copy(update={"path": snap[0], "revision": snap[1]})
        if model.path is not None and (Path(model.path) / "model_index.json").is_file():
            return model
        raise JobError(
            Category.MODEL_NOT_FOUND,
            f"model folder {model.path} is not on Ray node {host}",
            [f"Copy the folder to the same path on {host} (and every other node)."],
            {"node": host},
        )
