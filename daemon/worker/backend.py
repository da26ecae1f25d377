"""The real backend: Wan2.2 through diffusers, pipelines kept warm.

It runs inside the worker process and owns the device (daemon.worker.protocol.Backend). A job arrives as a
typed JobPayload (every parameter resolved); ``generate`` loads or reuses the pipeline, denoises and decodes
to uint8 frames on the CPU, reporting phases and steps; ``finish`` encodes the MP4 into the payload's temp
path, reads it back and writes the poster, every file fsynced. Exceptions leave it through
:func:`daemon.errors.classify_exception`.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.errors import Category, JobError, JobInterrupted
from daemon.memory import CUDA_CONTEXT_MB
from daemon.models import LocatedModel
from daemon.worker.cache import Loaded, PipelineCache, weights_mb
from daemon.worker.media import (
    encode_mp4,
    ffmpeg_versions,
    fit_image,
    pipeline_provenance,
    raise_if_disk_full,
    video_facts,
    write_poster_frame,
)
from daemon.worker.protocol import DeviceInfo, DeviceMemory, JobPayload, JobResult, Report, WarmPipeline

_MIB = 1 << 20


@dataclass
class Generated:
    """A job whose device work is done: its frames wait, on the CPU, to be encoded and written."""

    payload: JobPayload
    frames: Any  # numpy uint8 (frames, height, width, 3)
    result: JobResult  # the facts known so far; finish() adds the video's


def _never() -> bool:
    return False


class DiffusersWanBackend:
    """Wan2.2 through diffusers ``WanPipeline`` / ``WanImageToVideoPipeline``, pipelines kept warm (LRU)."""

    def __init__(
        self,
        *,
        device: str = "auto",
        allow_cpu_for_real_models: bool = False,
        max_cached_pipelines: int = 1,
        models_dir: Path,
        cache_budget_mb: float | None = None,
        cpu_threads: int | None = None,
        visible_device: str | None = None,  # already applied: the worker's CUDA_VISIBLE_DEVICES, its cuda:0
    ) -> None:
        import torch

        # Imported now, not at the first job: diffusers' lazy pipeline imports cost about a second.
        from diffusers import WanImageToVideoPipeline, WanPipeline

        self.pipeline_classes = {"t2v": WanPipeline, "i2v": WanImageToVideoPipeline}
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise JobError(
                Category.INSUFFICIENT_VRAM,
                "worker.device is cuda but torch sees no CUDA device",
                ["Install a CUDA build of torch (see README) or set worker.device: auto"],
            )
        self.device = device
        if device == "cpu" and cpu_threads:
            # Several workers on one host's cores: each keeps to its share instead of all of them spinning
            # OpenMP threads over the same cores.
            torch.set_num_threads(cpu_threads)
        self.allow_cpu_for_real_models = allow_cpu_for_real_models
        self.models_dir = Path(models_dir)
        self._cache = PipelineCache(
            max_entries=max_cached_pipelines,
            budget_mb=cache_budget_mb or self._default_budget_mb(),
            release=self._release,
        )
        self.evicted: list[str] = []  # model folders evicted while loading the current job's

    def _default_budget_mb(self) -> float:
        """What warm pipelines may hold: 90% of the GPU's memory, or half the host's RAM on a CPU."""
        if self.device == "cuda":
            return self.torch.cuda.get_device_properties(0).total_memory / (1 << 20) * 0.9
        import psutil

        return psutil.virtual_memory().total / (1 << 20) * 0.5

    def _release(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def memory(self) -> DeviceMemory:
        """What this worker holds on its device between jobs (daemon.worker.protocol.DeviceMemory): torch's
        reserved pool (warm weights and the last peak's cached blocks) plus the CUDA context."""
        warm = tuple(WarmPipeline(e.model, e.offload, e.fp8, int(e.device_mb)) for e in self._cache.entries())
        held = 0
        if self.device == "cuda" and self.torch.cuda.is_initialized():
            held = self.torch.cuda.memory_reserved() // _MIB + CUDA_CONTEXT_MB
        return DeviceMemory(held_mb=held, warm=warm)

    def _device_room_mb(self) -> float:
        """The device's free memory plus what this worker holds there: what its warm pipelines and the next
        job may use together (the daemon planned the job against the same figure)."""
        free, _ = self.torch.cuda.mem_get_info()
        return (free + self.torch.cuda.memory_reserved()) / _MIB + CUDA_CONTEXT_MB

    def describe(self) -> DeviceInfo:
        import diffusers
        import transformers

        torch = self.torch
        vram_total = vram_free = None
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            vram_total, vram_free = total // (1 << 20), free // (1 << 20)
        return DeviceInfo(
            device=self.device,
            device_name=torch.cuda.get_device_name(0) if self.device == "cuda" else platform.processor() or "cpu",
            versions={
                "torch": str(torch.__version__),
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                **ffmpeg_versions(),
            },
            cpu_threads=torch.get_num_threads(),  # the host's share for this worker, CUDA or not
            vram_total_mb=vram_total,
            vram_free_mb=vram_free,
        )

    # ---- loading -------------------------------------------------------------------------------

    def _dtype(self):
        torch = self.torch
        if self.device == "cuda":
            # bf16 transformers and text encoder; the VAE stays fp32 (bf16 decode visibly degrades).
            return {"default": torch.bfloat16, "vae": torch.float32}
        return torch.float32

    def _pipeline(
        self,
        model: LocatedModel,
        kind: str,
        report: Report,
        offload: str = "none",
        fp8: bool = False,
        estimate_mb: int | None = None,
    ) -> tuple[Any, str, float, str]:
        path = str(model.path) if model.path else None
        if model.tiny and not path:
            from daemon.worker.tiny import build_tiny

            report("building_tiny_model")
            path = str(build_tiny(model.name, self.models_dir))
        if not path or not Path(path, "model_index.json").is_file():
            raise JobError(Category.MODEL_NOT_FOUND, f"model folder {path} is missing or incomplete")
        model_path = str(Path(path).resolve())
        # Offload hooks change the pipeline itself: each offload mode is its own cache entry.
        key = f"{model_path}|{offload}|{'fp8' if fp8 else 'bf16'}"
        cls = self.pipeline_classes[kind]
        loaded = self._cache.get(key)
        if estimate_mb is not None and self.device == "cuda":
            # The daemon planned this job against the device's free memory plus what this worker holds: make
            # it true by evicting the warm pipelines the job does not fit beside.
            self.evicted.extend(self._cache.fit_on_device(key, estimate_mb, self._device_room_mb()))
        if loaded is not None:
            if kind not in loaded.pipes:
                # Same weights, other task (TI2V-5B): share the loaded components, load nothing.
                base = next(iter(loaded.pipes.values()))
                loaded.pipes[kind] = cls.from_pipe(base)
            return loaded.pipes[kind], "cached", 0.0, model_path
        size_mb = weights_mb(path)
        # Least recently used first, until the new pipeline fits the memory budget and the count limit.
        self.evicted.extend(self._cache.make_room(size_mb))
        report("loading_model")
        t0 = time.perf_counter()
        allocated_before = self.torch.cuda.memory_allocated() if self.device == "cuda" else 0
        pipe = cls.from_pretrained(path, dtype=self._dtype())
        if fp8:
            # Lossy, only when the job's plan allows it: weights stored in FP8, computed in bf16.
            for name in ("transformer", "transformer_2"):
                module = getattr(pipe, name, None)
                if module is not None:
                    module.enable_layerwise_casting(
                        storage_dtype=self.torch.float8_e4m3fn, compute_dtype=self.torch.bfloat16
                    )
        self._place(pipe, offload)
        pipe.set_progress_bar_config(disable=True)
        load_seconds = time.perf_counter() - t0
        device_mb = (self.torch.cuda.memory_allocated() - allocated_before) / _MIB if self.device == "cuda" else 0.0
        self._cache.put(
            key,
            Loaded(
                model_path,
                {kind: pipe},
                load_seconds,
                size_mb,
                model=model.name,
                offload=offload,
                fp8=fp8,
                device_mb=max(0.0, device_mb),
            ),
        )
        logger.info("worker.pipeline_loaded path={} seconds={:.2f}", key, load_seconds)
        return pipe, "loaded", load_seconds, model_path

    def _place(self, pipe: Any, offload: str) -> None:
        """Put the pipeline on the device, fully resident or with one of diffusers' offload modes."""
        if offload == "none":
            pipe.to(self.device)
        elif offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif offload == "group":
            # Block-level groups with CUDA streams: weights stream in while the previous block computes.
            pipe.enable_group_offload(
                onload_device=self.torch.device(self.device),
                offload_device=self.torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=True,
            )
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            raise JobError(Category.INTERNAL, f"unknown offload mode {offload!r}")

    @staticmethod
    def _transformers(pipe: Any) -> list[Any]:
        return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]

    def _apply_speed(self, pipe: Any, entry: Loaded | None, payload: JobPayload):
        """Set the run's attention backend, compile once per warm pipeline, enable the planned cache."""
        from daemon.speed import ATTENTION_BACKENDS, plan_speed
        from daemon.worker.speed import attention_available, cache_config

        params = payload.params
        modules = self._transformers(pipe)
        wanted = params.attention_backend or "native"
        problem = attention_available(wanted) if wanted != "native" and self.device == "cuda" else None
        plan = plan_speed(params, two_experts=len(modules) > 1, device=self.device, attention_problem=problem)
        current = entry.attention if entry is not None else "native"
        if plan.attention_backend != current:
            for module in modules:
                module.set_attention_backend(ATTENTION_BACKENDS[plan.attention_backend])
            if entry is not None:
                entry.attention = plan.attention_backend
        if entry is not None and entry.compiled and not plan.compile:
            # Compiled in place: what runs is the compiled code, so the sidecar says so.
            plan.notes.append("compile:repeated_blocks (warm pipeline compiled by an earlier job)")
        elif plan.compile:
            if entry is None or not entry.compiled:
                for module in modules:
                    # Not fullgraph: a cache's hooks are a graph break, and a later job may enable one.
                    module.compile_repeated_blocks(fullgraph=False)
                if entry is not None:
                    entry.compiled = True
                plan.notes.append("compile:compiled by this job (its first step includes the compile)")
            else:
                plan.notes.append("compile:reused from an earlier job")
        if plan.cache:
            for module in modules:
                module.enable_cache(cache_config(plan.cache, params.steps))
        return plan

    # ---- running -------------------------------------------------------------------------------

    def generate(self, payload: JobPayload, report: Report, should_stop: Callable[[], bool] = _never) -> Generated:
        """The device's part of a job: load (or reuse) the pipeline, denoise, decode to uint8 frames on
        the CPU. Nothing of it stays on the device once this returns."""
        from daemon.worker.sampling import ResourceSampler

        sampler = ResourceSampler(gpu_index=0 if self.device == "cuda" else None)

        def tracked(phase: str, step: int | None = None, total: int | None = None) -> None:
            sampler.phase = phase
            report(phase, step, total)

        with sampler:
            generated = self._generate(payload, tracked, should_stop)
        generated.result.resources = {**sampler.summary(), **generated.result.resources}
        return generated

    def finish(self, generated: Generated) -> JobResult:
        """The CPU's part: encode the MP4 into the job's temp path and read it back, write the poster;
        every file fsynced. Runs while the device already works on the next job."""
        payload, frames, result = generated.payload, generated.frames, generated.result
        t0 = time.perf_counter()
        video_tmp = Path(payload.video_tmp)
        try:
            encode_mp4(frames, video_tmp, fps=payload.params.fps, quality=payload.params.quality)
            t1 = time.perf_counter()
            video = video_facts(video_tmp)
        except Exception as exc:
            raise_if_disk_full(video_tmp.parent, exc)
            raise
        t2 = time.perf_counter()
        poster_tmp = Path(payload.poster_tmp)
        write_poster_frame(frames, poster_tmp)
        timings = {
            **result.timings,
            "encode": round(t1 - t0, 4),
            "verify": round(t2 - t1, 4),
            "poster": round(time.perf_counter() - t2, 4),
        }
        return dataclasses.replace(
            result, timings=timings, video_tmp=str(video_tmp), poster_tmp=str(poster_tmp), video=video
        )

    def _generate(self, payload: JobPayload, report: Report, should_stop: Callable[[], bool]) -> Generated:
        torch = self.torch
        model, params = payload.model, payload.params
        if self.device == "cpu" and not model.tiny and not self.allow_cpu_for_real_models:
            raise JobError(
                Category.INSUFFICIENT_VRAM,
                f"no CUDA GPU: a real Wan2.2 model ({model.name}) on a CPU would take hours and tens of GB of "
                "RAM per video, so it is refused",
                [
                    "Run the daemon on a machine with a CUDA GPU and a CUDA build of torch.",
                    "Set worker.allow_cpu_for_real_models: true to force it anyway.",
                ],
            )
        timings: dict[str, float] = {}
        self.evicted = []
        offload = params.offload if self.device == "cuda" else "none"
        fp8 = params.fp8 and self.device == "cuda"
        pipe, cache_state, load_seconds, model_path = self._pipeline(
            model, params.pipeline, report, offload, fp8, payload.estimate_mb
        )
        timings["model_load"] = load_seconds
        optimizations = [f"offload:{offload}"] if offload != "none" else []
        if fp8:
            optimizations.append("fp8_weights")
        entry = self._cache.holding(pipe)
        if entry is not None:
            if entry.loras is None:
                from daemon.worker.lora import LoraManager

                entry.loras = LoraManager()
            applied = entry.loras.apply(pipe, params.loras or [])
            optimizations.extend(f"lora:{name}" for name in applied.active)
        if params.vae_tiling:
            pipe.vae.enable_tiling()
            optimizations.append("vae_tiling")
        else:
            pipe.vae.disable_tiling()
        speed = self._apply_speed(pipe, entry, payload)
        optimizations.extend(speed.applied())
        scheduler_cls = type(pipe.scheduler)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, flow_shift=params.flow_shift)

        kwargs: dict[str, Any] = dict(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            height=params.height,
            width=params.width,
            num_frames=params.frames,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(params.seed),
        )
        if params.guidance_scale_2 is not None:
            kwargs["guidance_scale_2"] = params.guidance_scale_2
        if params.pipeline == "i2v":
            from PIL import Image

            if payload.input_image is None:  # intake copies the image of every i2v job into its spool folder
                raise JobError(Category.INTERNAL, "an image-to-video job arrived without its input image")
            with Image.open(payload.input_image) as img:
                kwargs["image"] = fit_image(img.convert("RGB"), params.width, params.height)

        total = params.steps
        last_step_at = [0.0]
        first_step_at = [0.0]

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            if should_stop():
                # Raising here aborts before the VAE decode and leaves the pipeline reusable.
                raise JobInterrupted()
            if step + 1 == total and self.device == "cuda":
                torch.cuda.synchronize()  # queued kernels belong to the denoising, not to the decode
            last_step_at[0] = time.perf_counter()
            first_step_at[0] = first_step_at[0] or last_step_at[0]
            report("denoising", step + 1, total)
            return callback_kwargs

        others_mb = self._cache.device_mb() - (entry.device_mb if entry else 0.0)  # other warm weights, not this job's
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        report("denoising", 0, total)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                # "pt": the decoded video stays a tensor on the device, where the conversion to uint8 is
                # cheap; the CPU receives a quarter of the bytes that float frames would be.
                out = pipe(**kwargs, output_type="pt", callback_on_step_end=on_step_end)
                video = out.frames[0]  # (frames, 3, height, width), float in [0, 1]
                frames = video.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                del out, video
        finally:
            if speed.cache:
                # Cache hooks hold the job's residuals and step count: the next job starts without them.
                for module in self._transformers(pipe):
                    module.disable_cache()
        t1 = time.perf_counter()
        if total and first_step_at[0]:
            timings["first_step"] = first_step_at[0] - t0  # includes torch.compile's work when it compiles
        # diffusers decodes right after the last step's callback: split the call there.
        timings["denoise"] = (last_step_at[0] or t1) - t0
        timings["vae_decode"] = t1 - (last_step_at[0] or t1)
        # An interrupt that lands now is too late to save anything: the video is made, it gets written.
        report("encoding")
        peak_vram = torch.cuda.max_memory_allocated() // _MIB - int(others_mb) if self.device == "cuda" else None
        return Generated(
            payload,
            frames,
            JobResult(
                device=self.device,
                model_path=model_path,
                model_cache=cache_state,
                timings={k: round(v, 4) for k, v in timings.items()},
                optimizations_applied=optimizations,
                peak_vram_usage_mb=peak_vram,
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                models_evicted=list(self.evicted),
                frames_generated=int(frames.shape[0]),
                # Carried to the daemon with the resources; the sidecar shows it as `pipeline`.
                resources={"pipeline": pipeline_provenance(pipe, fp8)},
            ),
        )
