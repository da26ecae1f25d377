"""Generation backends: the interface the worker drives, and the real diffusers Wan2.2 implementation.

A backend runs inside the worker process and owns the device. It takes a job payload (every parameter
already resolved), reports progress through a callback, writes the encoded MP4 to the temp path it is
given (fsynced), and returns the facts the sidecar records. Exceptions leave it through
:func:`daemon.errors.classify_exception`.
"""

from __future__ import annotations

import errno
import os
import platform
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from loguru import logger

from daemon.errors import Category, JobError, JobInterrupted
from daemon.fsutil import fsync_file, probe_write, sha256_file

Report = Callable[[dict[str, Any]], None]


class GenerationBackend(Protocol):
    def describe(self) -> dict[str, Any]:
        """Device and library versions, sent to the daemon once the worker is up."""

    def run(self, job: dict[str, Any], report: Report, should_stop: Callable[[], bool]) -> dict[str, Any]:
        """Generate the job's video into ``job['video_tmp']``; return the facts for the sidecar.
        Raise JobInterrupted at the next step once ``should_stop()`` is true.

        A backend may also split this in two, ``generate`` (the device's part, returning a
        :class:`Generated`) and ``finish`` (encoding and writing, on the CPU): the worker then starts the
        next job on the device while the previous one is being encoded."""


@dataclass
class Generated:
    """A job whose device work is done: its frames wait, on the CPU, to be encoded and written."""

    job: dict[str, Any]
    frames: Any  # numpy uint8 (frames, height, width, 3)
    result: dict[str, Any]  # the sidecar's facts known so far; finish() adds the video's


@dataclass
class _Loaded:
    pipes: dict[str, Any]  # "t2v" / "i2v" -> pipeline sharing the same components
    load_seconds: float
    size_mb: float = 0.0  # weights on disk: what it holds in memory, near enough for eviction
    loras: Any = None  # daemon.worker.lora.LoraManager: adapters stay loaded with the pipeline, switched per job
    compiled: bool = False  # its transformer blocks were torch.compiled (in place: every later job runs them)
    attention: str = "native"  # the attention backend its transformers are set to


def weights_mb(folder: Path) -> float:
    """Size of a diffusers folder's weights (safetensors): the memory its pipeline will hold, near enough."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / (1 << 20)


def fit_image(image: Any, width: int, height: int) -> Any:
    """Resize and centre-crop an input image to exactly width x height, keeping its aspect: scale so that
    it covers the target (the smaller scale that fills both sides), then cut the overflow equally from both
    edges. Nothing is stretched and no border is added."""
    from PIL import Image

    iw, ih = image.size
    scale = max(width / iw, height / ih)
    rw, rh = max(width, round(iw * scale)), max(height, round(ih * scale))
    resized = image.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - width) // 2, (rh - height) // 2
    return resized.crop((left, top, left + width, top + height))


def probe_video(path: Path) -> dict[str, Any]:
    """Read an MP4 back: frame count, fps and size as a player sees them, plus bytes and sha256.

    One ffmpeg run reads every packet of the video stream (stream copy: a truncated or corrupt container
    fails it; no decoding, which would cost as much again as a fast encode) and prints the stream header on
    the way: both are read from its output."""
    import subprocess

    import imageio_ffmpeg
    from imageio_ffmpeg._parsing import parse_ffmpeg_header

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0",
           "-c", "copy", "-f", "null", "-"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = done.stdout.decode(errors="ignore")
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg could not read {path.name} back (exit {done.returncode}): {text[-500:]}")
    frames = None
    for line in reversed(text.splitlines()):
        if line.lstrip().startswith("frame="):
            frames = int(line.split("frame=", 1)[1].split()[0])
            break
    meta = parse_ffmpeg_header(text)
    if frames is None or "size" not in meta:
        raise RuntimeError(f"ffmpeg's output for {path.name} has no frame count or size: {text[-500:]}")
    width, height = meta["size"]
    return {
        "path": str(path),
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
        "frames": frames,
        "fps": float(meta["fps"]),
        "width": int(width),
        "height": int(height),
        "codec": meta.get("codec"),
    }


def raise_if_disk_full(folder: Path, cause: BaseException) -> None:
    """ffmpeg reports a full disk only on its stderr ("Error writing trailer"), and imageio then fails
    later with an unrelated message: find out by trying to write, so the job is retried, not failed."""
    exc = probe_write(folder)
    if exc is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(exc.errno, f"no space left in {folder} while encoding ({cause})") from cause


def as_uint8(frame: Any) -> Any:
    """One frame as uint8 RGB: uint8 frames pass through, float frames in [0, 1] are rounded."""
    import numpy as np

    if frame.dtype == np.uint8:
        return frame
    return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)


def write_poster_frame(frames: Any, path: Path, *, at: float = 0.5, quality: int = 85) -> None:
    """Save the middle frame (uint8, or float in [0, 1]; H x W x 3) as a JPEG, fsynced: the poster."""
    from PIL import Image

    frame = frames[min(len(frames) - 1, int(len(frames) * at))]
    Image.fromarray(as_uint8(frame)).save(path, "JPEG", quality=quality)
    fsync_file(path)


def encode_mp4(frames: Any, path: Path, *, fps: int, quality: float) -> None:
    """Encode frames (F, H, W, 3; uint8, or float in [0, 1]) to H.264 MP4 through imageio's ffmpeg writer, as
    diffusers' export_to_video does (same quality scale, sizes padded to 16), without its float copy of
    every frame; fsync it."""
    import imageio

    with imageio.get_writer(str(path), fps=fps, quality=quality, macro_block_size=16) as writer:
        for frame in frames:
            writer.append_data(as_uint8(frame))
    fsync_file(path)


class DiffusersWanBackend:
    """Wan2.2 through diffusers ``WanPipeline`` / ``WanImageToVideoPipeline``, pipelines kept warm (LRU)."""

    def __init__(self, *, device: str = "auto", allow_cpu_for_real_models: bool = False,
                 max_cached_pipelines: int = 1, models_dir: Path, cache_budget_mb: float | None = None,
                 cpu_threads: int | None = None) -> None:
        import torch
        # Imported now, not at the first job: diffusers' lazy pipeline imports cost about a second.
        from diffusers import WanImageToVideoPipeline, WanPipeline

        self.pipeline_classes = {"t2v": WanPipeline, "i2v": WanImageToVideoPipeline}
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise JobError(Category.INSUFFICIENT_VRAM, "worker.device is cuda but torch sees no CUDA device",
                           ["Install a CUDA build of torch (see README) or set worker.device: auto"])
        self.device = device
        if device == "cpu" and cpu_threads:
            # Several workers on one host's cores: each keeps to its share instead of all of them spinning
            # OpenMP threads over the same cores.
            torch.set_num_threads(cpu_threads)
        self.allow_cpu_for_real_models = allow_cpu_for_real_models
        self.max_cached = max_cached_pipelines
        self.models_dir = Path(models_dir)
        self.cache_budget_mb = cache_budget_mb or self._default_budget_mb()
        self._cache: "OrderedDict[str, _Loaded]" = OrderedDict()
        self.evicted: list[str] = []  # model folders evicted while loading the current job's

    def _default_budget_mb(self) -> float:
        """What warm pipelines may hold: 90% of the GPU's memory, or half the host's RAM on a CPU."""
        if self.device == "cuda":
            return self.torch.cuda.get_device_properties(0).total_memory / (1 << 20) * 0.9
        import psutil

        return psutil.virtual_memory().total / (1 << 20) * 0.5

    def describe(self) -> dict[str, Any]:
        import diffusers
        import transformers

        torch = self.torch
        info: dict[str, Any] = {
            "device": self.device,
            "device_name": torch.cuda.get_device_name(0) if self.device == "cuda" else platform.processor() or "cpu",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
        }
        if self.device == "cpu":
            info["cpu_threads"] = torch.get_num_threads()
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            info["vram_total_mb"] = total // (1 << 20)
            info["vram_free_mb"] = free // (1 << 20)
        return info

    # ---- loading -------------------------------------------------------------------------------

    def _dtype(self):
        torch = self.torch
        if self.device == "cuda":
            # bf16 transformers and text encoder; the VAE stays fp32 (bf16 decode visibly degrades).
            return {"default": torch.bfloat16, "vae": torch.float32}
        return torch.float32

    def _pipeline(self, model: dict[str, Any], kind: str, report: Report,
                  offload: str = "none", fp8: bool = False) -> tuple[Any, str, float, str]:
        path = model.get("path")
        if model.get("tiny_random_weights") and not path:
            from daemon.worker.tiny import build_tiny

            report({"type": "phase", "phase": "building_tiny_model"})
            path = str(build_tiny(model["name"], self.models_dir))
        if not path or not Path(path, "model_index.json").is_file():
            raise JobError(Category.MODEL_NOT_FOUND, f"model folder {path} is missing or incomplete")
        model_path = str(Path(path).resolve())
        # Offload hooks change the pipeline itself: each offload mode is its own cache entry.
        key = f"{model_path}|{offload}|{'fp8' if fp8 else 'bf16'}"
        cls = self.pipeline_classes[kind]
        loaded = self._cache.get(key)
        if loaded is not None:
            self._cache.move_to_end(key)
            if kind not in loaded.pipes:
                # Same weights, other task (TI2V-5B): share the loaded components, load nothing.
                base = next(iter(loaded.pipes.values()))
                loaded.pipes[kind] = cls.from_pipe(base)
            return loaded.pipes[kind], "cached", 0.0, model_path
        size_mb = weights_mb(path)
        # Least recently used first, until the new pipeline fits the memory budget and the count limit.
        while self._cache and (len(self._cache) >= self.max_cached
                               or sum(e.size_mb for e in self._cache.values()) + size_mb > self.cache_budget_mb):
            old_key, _old = self._cache.popitem(last=False)
            logger.info("worker.pipeline_evicted path={} size_mb={:.0f} budget_mb={:.0f}", old_key, _old.size_mb,
                        self.cache_budget_mb)
            self.evicted.append(old_key.split("|", 1)[0])
            del _old
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        report({"type": "phase", "phase": "loading_model"})
        t0 = time.perf_counter()
        pipe = cls.from_pretrained(path, dtype=self._dtype())
        if fp8:
            # Lossy, only when the job's plan allows it: weights stored in FP8, computed in bf16.
            for name in ("transformer", "transformer_2"):
                module = getattr(pipe, name, None)
                if module is not None:
                    module.enable_layerwise_casting(storage_dtype=self.torch.float8_e4m3fn,
                                                    compute_dtype=self.torch.bfloat16)
        self._place(pipe, offload)
        pipe.set_progress_bar_config(disable=True)
        load_seconds = time.perf_counter() - t0
        self._cache[key] = _Loaded({kind: pipe}, load_seconds, size_mb)
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
            pipe.enable_group_offload(onload_device=self.torch.device(self.device),
                                      offload_device=self.torch.device("cpu"), offload_type="block_level",
                                      num_blocks_per_group=1, use_stream=True)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            raise JobError(Category.INTERNAL, f"unknown offload mode {offload!r}")

    @staticmethod
    def _transformers(pipe: Any) -> list[Any]:
        return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]

    def _apply_speed(self, pipe: Any, entry: _Loaded | None, params: dict[str, Any]):
        """Set the run's attention backend, compile once per warm pipeline, enable the planned cache."""
        from daemon.speed import ATTENTION_BACKENDS, attention_available, cache_config, plan_speed

        modules = self._transformers(pipe)
        wanted = params.get("attention_backend") or "native"
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
                module.enable_cache(cache_config(plan.cache, params["steps"]))
        return plan

    # ---- running -------------------------------------------------------------------------------

    def run(self, job: dict[str, Any], report: Report,
            should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """The whole job in one call: generate, then finish."""
        return self.finish(self.generate(job, report, should_stop))

    def generate(self, job: dict[str, Any], report: Report,
                 should_stop: Callable[[], bool] = lambda: False) -> Generated:
        """The device's part of a job: load (or reuse) the pipeline, denoise, decode to uint8 frames on
        the CPU. Nothing of it stays on the device once this returns."""
        from daemon.worker.sampling import ResourceSampler

        sampler = ResourceSampler(gpu_index=0 if self.device == "cuda" else None)

        def tracked(event: dict[str, Any]) -> None:
            sampler.phase = event.get("phase", sampler.phase)
            report(event)

        with sampler:
            generated = self._generate(job, tracked, should_stop)
        generated.result["resources"] = sampler.summary()
        return generated

    def finish(self, generated: Generated) -> dict[str, Any]:
        """The CPU's part: encode the MP4 into the job's temp path and read it back, write the poster;
        every file fsynced. Runs while the device already works on the next job."""
        job, frames, result = generated.job, generated.frames, generated.result
        params = job["params"]
        t0 = time.perf_counter()
        video_tmp = Path(job["video_tmp"])
        try:
            encode_mp4(frames, video_tmp, fps=params["fps"], quality=params["quality"])
            t1 = time.perf_counter()
            video = probe_video(video_tmp)
        except Exception as exc:
            raise_if_disk_full(video_tmp.parent, exc)
            raise
        t2 = time.perf_counter()
        poster_tmp = video_tmp.with_name(video_tmp.stem + ".poster.jpg")
        write_poster_frame(frames, poster_tmp)
        video.pop("path")
        result["timings"].update(encode=round(t1 - t0, 4), verify=round(t2 - t1, 4),
                                 poster=round(time.perf_counter() - t2, 4))
        return {**result, "video_tmp": str(video_tmp), "poster_tmp": str(poster_tmp), "video": video}

    def _generate(self, job: dict[str, Any], report: Report, should_stop: Callable[[], bool]) -> Generated:
        torch = self.torch
        model, params = job["model"], job["params"]
        if self.device == "cpu" and not model.get("tiny_random_weights") and not self.allow_cpu_for_real_models:
            raise JobError(
                Category.INSUFFICIENT_VRAM,
                f"no CUDA GPU: a real Wan2.2 model ({model['name']}) on a CPU would take hours and tens of GB of "
                "RAM per video, so it is refused",
                ["Run the daemon on a machine with a CUDA GPU and a CUDA build of torch.",
                 "Set worker.allow_cpu_for_real_models: true to force it anyway."],
            )
        timings: dict[str, float] = {}
        self.evicted = []
        offload = params.get("offload", "none") if self.device == "cuda" else "none"
        fp8 = bool(params.get("fp8")) and self.device == "cuda"
        pipe, cache_state, load_seconds, model_path = self._pipeline(model, params["pipeline"], report, offload, fp8)
        timings["model_load"] = load_seconds
        optimizations = [f"offload:{offload}"] if offload != "none" else []
        if fp8:
            optimizations.append("fp8_weights")
        entry = next((e for e in self._cache.values() if pipe in e.pipes.values()), None)
        if entry is not None:
            if entry.loras is None:
                from daemon.jobspec.lora import LoraManager

                entry.loras = LoraManager()
            applied = entry.loras.apply(pipe, params.get("loras") or [])
            optimizations.extend(f"lora:{name}" for name in applied.active)
        if params.get("vae_tiling"):
            pipe.vae.enable_tiling()
            optimizations.append("vae_tiling")
        else:
            pipe.vae.disable_tiling()
        speed = self._apply_speed(pipe, entry, params)
        optimizations.extend(speed.applied())
        scheduler_cls = type(pipe.scheduler)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, flow_shift=params["flow_shift"])

        kwargs: dict[str, Any] = dict(
            prompt=params["prompt"], negative_prompt=params["negative_prompt"], height=params["height"],
            width=params["width"], num_frames=params["frames"], num_inference_steps=params["steps"],
            guidance_scale=params["guidance_scale"],
            generator=torch.Generator(device="cpu").manual_seed(params["seed"]),
        )
        if params.get("guidance_scale_2") is not None:
            kwargs["guidance_scale_2"] = params["guidance_scale_2"]
        if params["pipeline"] == "i2v":
            from PIL import Image

            with Image.open(job["input_image"]) as img:
                kwargs["image"] = fit_image(img.convert("RGB"), params["width"], params["height"])

        total = params["steps"]
        last_step_at = [0.0]

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            if should_stop():
                # Raising here aborts before the VAE decode and leaves the pipeline reusable.
                raise JobInterrupted()
            if step + 1 == total and self.device == "cuda":
                torch.cuda.synchronize()  # queued kernels belong to the denoising, not to the decode
            last_step_at[0] = time.perf_counter()
            first_step_at[0] = first_step_at[0] or last_step_at[0]
            report({"type": "progress", "phase": "denoising", "step": step + 1, "total": total})
            return callback_kwargs

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        report({"type": "progress", "phase": "denoising", "step": 0, "total": total})
        first_step_at = [0.0]
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
        report({"type": "phase", "phase": "encoding"})
        peak_vram = torch.cuda.max_memory_allocated() // (1 << 20) if self.device == "cuda" else None
        return Generated(job, frames, {
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "model_cache": cache_state,
            "models_evicted": list(self.evicted),
            "model_path": model_path,
            "device": self.device,
            "peak_vram_usage_mb": peak_vram,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "optimizations_applied": optimizations,
            "frames_generated": int(frames.shape[0]),
        })
