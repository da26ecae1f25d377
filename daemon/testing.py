"""Stand-ins for hardware a test machine lacks, behind the same interface as the real thing (shipped in the
package, like a message broker's stub: tests and benchmarks of code built on wan-daemon use it too).

``CueBackend`` (a daemon.worker.protocol.Backend) replaces the GPU for scheduler, policy and chaos tests that
need many jobs or faults on cue. It is injected by code (``Daemon(backend="daemon.testing:CueBackend")``),
never reachable from a config, and it writes a marker file, not a video.

Cues are read from the job's prompt, e.g. ``"sleep=0.2 oom_above=4096 crash_once"``:
- ``sleep=S``: take S seconds, in steps of 0.05 s (progress events, interruptible);
- ``oom_above=N``: raise an out-of-memory error while width*height > N pixels;
- ``oom_unless_tiled``: raise out-of-memory until VAE tiling is on;
- ``crash_once``: kill the worker process the first time the job runs (a marker file remembers);
- ``crash_always``: kill the worker process every time;
- ``hang=S``: go silent (no progress) for S seconds before working, the first time the job runs;
- ``encode_sleep=S``: the CPU-side finish (the real backend's MP4 encoding) takes S seconds;
- ``crash_encoding_once``: kill the worker while the job is being finished, the first time.
Like the real backend it splits a job into ``generate`` (device) and ``finish`` (CPU), so the worker
overlaps one job's finish with the next job's generation here too.

``SimulatedGpus`` (a GPU inventory) and ``SimulatedGpuBackend`` stand in for CUDA cards of any size: the
daemon's real scheduler, planner and admission and the worker's real warm cache run against the memory
model's real-size numbers (daemon.memory), with what NVML would report as used: other processes, the
worker's context, warm pipelines and allocator reserve.

This module imports no torch and no diffusers.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from daemon.errors import JobInterrupted
from daemon.fsutil import atomic_write_json, read_json, sha256_file
from daemon.jobs import JobRecord, JobState
from daemon.jobspec.params import ResolvedParams
from daemon.memory import CUDA_CONTEXT_MB, MODE_ALIASES, device_weights_mb, phase_peaks_mb, weights_mb
from daemon.models import I2V_A14B, REGISTRY, TI2V_5B, TWO_EXPERT_ARCHITECTURES, LocatedModel
from daemon.ops.inventory import GpuInfo
from daemon.worker.protocol import (
    DeviceInfo,
    DeviceMemory,
    JobPayload,
    JobResult,
    Report,
    VideoFacts,
    WarmPipeline,
)


@dataclass
class CueGenerated:
    """A cue job whose "device" part is done."""

    payload: JobPayload
    seconds: float  # how long its generation took (the sleep cue)


def write_stand_in_video(out: Path, text: str, params: ResolvedParams) -> VideoFacts:
    """A stand-in backend's output: ``text`` written and fsynced where the video goes, described as the video
    the job asked for (stand-ins never make a video; the outbox publishes whatever file it is handed)."""
    out.write_bytes(text.encode())
    with open(out, "rb") as fh:
        os.fsync(fh.fileno())
    return VideoFacts(
        bytes=out.stat().st_size,
        sha256=sha256_file(out),
        frames=params.frames,
        fps=float(params.fps),
        width=params.width,
        height=params.height,
    )


class CueBackend:
    def __init__(self, *, device: str = "cpu", models_dir: Path, **_: Any) -> None:
        self.device = "cpu"
        self.models_dir = Path(models_dir)

    def describe(self) -> DeviceInfo:
        return DeviceInfo(
            device="cpu",
            device_name="cue-backend (test stand-in)",
            versions={"torch": "n/a", "diffusers": "n/a", "transformers": "n/a", "python": "n/a"},
        )

    @staticmethod
    def _cues(payload: JobPayload) -> dict[str, str]:
        return dict(c.partition("=")[::2] for c in payload.params.prompt.split())

    def generate(self, payload: JobPayload, report: Report, should_stop: Callable[[], bool]) -> CueGenerated:
        """The device's part (sleeps, fails or dies on cue); like the real backend's, it writes nothing."""
        params = payload.params
        cues = self._cues(payload)
        if "crash_always" in cues:
            os._exit(3)
        if "crash_once" in cues:
            marker = self.models_dir / f".crashed-{payload.id}-{payload.token}"
            if not marker.exists():
                marker.touch()
                os._exit(3)
        if "oom_above" in cues and params.width * params.height > int(cues["oom_above"]):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (cue)")
        if "oom_unless_tiled" in cues and not params.vae_tiling:
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB (cue)")
        if "hang" in cues:
            marker = self.models_dir / f".hung-{payload.id}-{payload.token}"
            if not marker.exists():
                marker.touch()
                time.sleep(float(cues["hang"]))
        seconds = float(cues.get("sleep", 0))
        steps = max(1, int(seconds / 0.05))
        for i in range(steps):
            if should_stop():
                raise JobInterrupted()
            time.sleep(seconds / steps)
            report("denoising", i + 1, steps)
        return CueGenerated(payload, seconds)

    def finish(self, generated: CueGenerated) -> JobResult:
        """The CPU's part: "encoding" (encode_sleep=S), dying in it once on cue (crash_encoding_once)."""
        payload, seconds = generated.payload, generated.seconds
        params, cues = payload.params, self._cues(payload)
        if "crash_encoding_once" in cues:
            marker = self.models_dir / f".crashed-encoding-{payload.id}-{payload.token}"
            if not marker.exists():
                marker.touch()
                os._exit(3)
        time.sleep(float(cues.get("encode_sleep", 0)))
        out = Path(payload.video_tmp)
        video = write_stand_in_video(out, f"cue-backend output for {payload.id} token {payload.token}\n", params)
        return JobResult(
            device="cpu",
            model_path=None,
            model_cache="cached",
            timings={"model_load": 0.0, "denoise": seconds, "vae_decode": 0.0, "encode": 0.0},
            optimizations_applied=(["vae_tiling"] if params.vae_tiling else []),
            peak_vram_usage_mb=None,
            peak_rss_mb=0.0,
            frames_generated=params.frames,
            video_tmp=str(out),
            video=video,
        )


class SlowStartCueBackend(CueBackend):
    """A CueBackend whose worker takes ``START_SECONDS`` to become ready (a slow import or warm-up): jobs queued
    meanwhile wait for a starting worker."""

    START_SECONDS = 3.0

    def __init__(self, **kwargs: Any) -> None:
        time.sleep(self.START_SECONDS)
        super().__init__(**kwargs)


# ---- a simulated GPU (the planner, the warm cache and admission on real-size models, without a GPU) ---------


SIMULATED_GPUS = ".simulated-gpus"  # under the models folder: the one path every worker is given


class SimulatedGpus:
    """Cards of the given sizes (MiB), as NVML would report them: a :class:`daemon.ops.inventory.GpuInventory`.

    The state lives in small JSON files under ``<models>/.simulated-gpus`` so that the daemon (through
    :meth:`gpus`) and each worker process (through :class:`SimulatedGpuBackend`) see one card: its size,
    other processes' use (``other_mb``, :meth:`set_other`), and what each worker process holds there (its
    CUDA context, its warm pipelines, its allocator's reserve), which NVML counts as used. A dead worker's
    holding is gone, as the driver frees a dead process's memory."""

    def __init__(
        self, models_dir: Path | str, totals_mb: list[int], *, other_mb: list[int] | None = None, name: str = ""
    ) -> None:
        self.folder = Path(models_dir) / SIMULATED_GPUS
        self.folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        self.cards: list[dict[str, Any]] = [
            {
                "index": i,
                "uuid": f"GPU-sim{token}-{i}",
                "name": name or f"Simulated {total / 1024:g} GiB",
                "total_mb": int(total),
                "other_mb": int((other_mb or [0] * len(totals_mb))[i]),
            }
            for i, total in enumerate(totals_mb)
        ]
        for card in self.cards:
            atomic_write_json(self.folder / f"{card['uuid']}.json", card, durable=False)

    def set_other(self, index: int, mb: int) -> None:
        """Other processes (not this daemon's workers) now use ``mb`` MiB of card ``index``."""
        card = self.cards[index]
        card["other_mb"] = int(mb)
        atomic_write_json(self.folder / f"{card['uuid']}.json", card, durable=False)

    def held(self, index: int) -> dict[int, int]:
        """What each live worker process holds on card ``index``: pid -> MiB."""
        return _holders(self.folder, self.cards[index]["uuid"])

    def gpus(self) -> list[GpuInfo]:
        out = []
        for card in self.cards:
            held = self.held(card["index"])
            used = min(card["total_mb"], card["other_mb"] + sum(held.values()))
            out.append(
                GpuInfo(
                    card["index"],
                    card["name"],
                    card["total_mb"],
                    used,
                    card["total_mb"] - used,
                    processes=tuple(held.items()),
                    physical_index=card["index"],
                    uuid=card["uuid"],
                )
            )
        return out


def _holders(folder: Path, uuid: str) -> dict[int, int]:
    out = {}
    for path in folder.glob(f"{uuid}.held-*.json"):
        try:
            entry = read_json(path)
            os.kill(int(entry["pid"]), 0)
        except (OSError, ValueError, KeyError):  # gone, unreadable, or written by a dead process
            continue
        out[int(entry["pid"])] = int(entry["held_mb"])
    return out


@dataclass
class SimulatedGenerated:
    payload: JobPayload
    result: JobResult


class SimulatedGpuBackend:
    """A Backend on a card of :class:`SimulatedGpus` (``Daemon(backend="daemon.testing:SimulatedGpuBackend",
    inventory=SimulatedGpus(...))``): the real warm cache (daemon.worker.cache.PipelineCache) holding
    pipelines of the memory model's real sizes (daemon.memory), each job peaking at the memory model's own
    figure for its plan beside the other warm pipelines, and an allocator that keeps that peak reserved until
    an eviction empties its cache. A job that would not fit beside what the card's other users hold fails
    with CUDA's out-of-memory message. It writes a marker file, not a video."""

    def __init__(
        self,
        *,
        models_dir: Path,
        visible_device: str | None = None,
        max_cached_pipelines: int = 2,
        cache_budget_mb: float | None = None,
        **_: Any,
    ) -> None:
        from daemon.worker.cache import PipelineCache

        self.device = "cuda"
        self.folder = Path(models_dir) / SIMULATED_GPUS
        self.card = read_json(self.folder / f"{visible_device}.json")
        self.total_mb = int(self.card["total_mb"])
        self.reserve_mb = 0.0  # torch's reserved pool: the warm weights, and the last peak's cached blocks
        self.cache = PipelineCache(
            max_entries=max_cached_pipelines,
            budget_mb=cache_budget_mb or self.total_mb * 0.9,
            release=self._empty_cache,
        )
        self._publish()

    def _empty_cache(self) -> None:
        self.reserve_mb = self.cache.device_mb()  # torch.cuda.empty_cache keeps the allocated blocks only

    def _publish(self) -> None:
        held = {"pid": os.getpid(), "held_mb": self.memory().held_mb}
        atomic_write_json(self.folder / f"{self.card['uuid']}.held-{os.getpid()}.json", held, durable=False)

    def _room_mb(self) -> float:
        """The card less what others use: what this worker's context, pipelines and jobs may take."""
        card = read_json(self.folder / f"{self.card['uuid']}.json")
        others = sum(mb for pid, mb in _holders(self.folder, self.card["uuid"]).items() if pid != os.getpid())
        return self.total_mb - int(card["other_mb"]) - others

    def memory(self) -> DeviceMemory:
        warm = tuple(WarmPipeline(e.model, e.offload, e.fp8, round(e.device_mb)) for e in self.cache.entries())
        return DeviceMemory(held_mb=math.ceil(CUDA_CONTEXT_MB + self.reserve_mb), warm=warm)

    def describe(self) -> DeviceInfo:
        return DeviceInfo(
            device="cuda",
            device_name=f"{self.card['name']} (simulated)",
            versions={"torch": "n/a", "diffusers": "n/a", "transformers": "n/a", "python": "n/a"},
            vram_total_mb=self.total_mb,
            vram_free_mb=int(self._room_mb() - self.memory().held_mb),
        )

    def generate(self, payload: JobPayload, report: Report, should_stop: Callable[[], bool]) -> SimulatedGenerated:
        from daemon.worker.cache import Loaded

        model, params = payload.model, payload.params
        arch, offload, fp8 = model.architecture, params.offload, params.fp8
        mode = MODE_ALIASES.get(offload, offload)
        key = f"{model.path or model.name}|{offload}|{'fp8' if fp8 else 'bf16'}"  # as the real backend keys it
        evicted: list[str] = []
        entry = self.cache.get(key)
        if payload.estimate_mb is not None:
            evicted += self.cache.fit_on_device(key, payload.estimate_mb, self._room_mb())
        cache_state = "cached"
        if entry is None:
            cache_state = "loaded"
            size = weights_mb(arch, fp8=fp8, tiny=model.tiny)
            evicted += self.cache.make_room(size)
            report("loading_model")
            device = device_weights_mb(arch, mode, fp8=fp8, tiny=model.tiny)
            entry = Loaded(str(model.path), {}, 0.0, size, model=model.name, offload=offload, fp8=fp8, device_mb=device)
            self.cache.put(key, entry)
        peaks = phase_peaks_mb(
            arch,
            params.width,
            params.height,
            params.frames,
            mode,
            fp8=fp8,
            vae_tiling=params.vae_tiling,
            tiny=model.tiny,
        )
        own = max(peaks.values())
        need = self.cache.device_mb() - entry.device_mb + own  # beside the other warm pipelines
        room = self._room_mb()
        if CUDA_CONTEXT_MB + max(self.reserve_mb, need) > room:
            raise RuntimeError(
                f"CUDA out of memory. Tried to allocate {need - self.reserve_mb:.0f} MiB (simulated card of "
                f"{self.total_mb} MiB, {room:.0f} MiB of it not used by others, {self.reserve_mb:.0f} MiB reserved)"
            )
        for step in range(params.steps):
            if should_stop():
                raise JobInterrupted()
            report("denoising", step + 1, params.steps)
        self.reserve_mb = max(self.reserve_mb, need)
        self._publish()
        applied = [f"offload:{offload}"] if offload != "none" else []
        applied += (["fp8_weights"] if fp8 else []) + (["vae_tiling"] if params.vae_tiling else [])
        result = JobResult(
            device="cuda",
            model_path=str(model.path) if model.path else None,
            model_cache=cache_state,
            timings={"model_load": 0.0, "denoise": 0.0, "vae_decode": 0.0},
            optimizations_applied=applied,
            peak_vram_usage_mb=math.ceil(own),  # the job's own peak, as torch's max_memory_allocated less the others
            models_evicted=evicted,
            frames_generated=params.frames,
        )
        return SimulatedGenerated(payload, result)

    def finish(self, generated: SimulatedGenerated) -> JobResult:
        payload, params = generated.payload, generated.payload.params
        out = Path(payload.video_tmp)
        video = write_stand_in_video(out, f"simulated-gpu output for {payload.id} token {payload.token}\n", params)
        return replace(generated.result, video_tmp=str(out), video=video)


def write_model_folder(folder: Path | str, architecture: str) -> Path:
    """A diffusers model folder of ``architecture`` with its configs and no weights: enough for the daemon to
    locate it as a real-size local model (daemon.models.inspect_folder), for :class:`SimulatedGpuBackend`."""
    folder = Path(folder)
    ti2v = architecture == TI2V_5B
    index: dict[str, Any] = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    if ti2v:
        index["expand_timesteps"] = True
    if architecture in TWO_EXPERT_ARCHITECTURES:
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
    transformer = {"patch_size": [1, 2, 2], "in_channels": 36 if architecture == I2V_A14B else (48 if ti2v else 16)}
    vae = {"z_dim": 48, "scale_factor_spatial": 16} if ti2v else {"z_dim": 16, "scale_factor_spatial": 8}
    for name, data in (("model_index.json", index), ("transformer/config.json", transformer), ("vae/config.json", vae)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data))
    return folder


# ---- typed job records without a job file (scheduler, policy and book tests; bench/scheduling.py) ----------

PARAMS: dict[str, Any] = {
    "task": "t2v",
    "pipeline": "t2v",
    "prompt": "a fox",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "frames": 9,
    "fps": 16,
    "steps": 3,
    "guidance_scale": 5.0,
    "guidance_scale_2": None,
    "flow_shift": 5.0,
    "seed": 1,
    "seed_was_drawn": False,
    "quality": 8.0,
    "basename": "job",
}


def make_params(**overrides: Any) -> ResolvedParams:
    return ResolvedParams.model_validate({**PARAMS, **overrides})


def make_model(name: str = "tiny-ti2v-5b", architecture: str | None = None) -> LocatedModel:
    """A registry model by name, or any name (e.g. "m1") standing for a model of ``architecture``."""
    info = REGISTRY.get(name) or replace(REGISTRY["tiny-ti2v-5b"], name=name)
    if architecture is not None:
        info = replace(info, architecture=architecture)
    return LocatedModel(info=info, source="tiny" if info.tiny else "hub-cache")


def make_record(
    job_id: str = "j",
    *,
    seq: int = 1,
    params: dict[str, Any] | None = None,
    model: str = "tiny-ti2v-5b",
    architecture: str | None = None,
    state: JobState | None = JobState.QUEUED,
    **fields: Any,
) -> JobRecord:
    base: dict[str, Any] = dict(
        id=job_id,
        token="t",
        source=f"{seq:012d}.me.f.yaml",
        source_name="f.yaml",
        seq=seq,
        spec={},
        received_at=0.0,
        state=state,
    )
    base.update(fields)
    return JobRecord(
        params=make_params(**{"basename": job_id, **(params or {})}), model=make_model(model, architecture), **base
    )
