"""Spec + model -> every generation parameter resolved, fixed at intake and persisted with the job."""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import Field

from daemon.errors import Category, JobError
from daemon.jobspec.spec import JobSpec, _Strict
from daemon.models import WAN_NEGATIVE_PROMPT, ModelInfo, Task
from daemon.speed import SpeedConfig


class ResolvedParams(_Strict):
    """Every generation parameter, fixed at intake and persisted, so that a retry does exactly the same."""

    task: Literal["t2v", "i2v", "ti2v"]
    pipeline: Literal["t2v", "i2v"]  # which diffusers pipeline runs it
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    flow_shift: float
    seed: int
    seed_was_drawn: bool
    quality: float
    basename: str
    offload: Literal["none", "model", "group", "sequential"] = "none"
    vae_tiling: bool = False
    fp8: bool = False  # FP8 weight storage: set only in a run's payload, by the offload plan
    timeout_seconds: float | None = None
    loras: list[dict[str, Any]] = Field(
        default_factory=list, description="Resolved LoRAs (daemon.jobspec.lora.ResolvedLora)."
    )
    preset: str | None = None
    compile: bool = False
    cache: dict[str, Any] | None = None
    attention_backend: str = "native"
    min_cache_steps: int = 10


def resolve_params(
    spec: JobSpec,
    info: ModelInfo,
    *,
    max_side: int,
    max_frames: int,
    max_steps: int,
    vae_tiling: bool = False,
    speed: SpeedConfig | None = None,
) -> ResolvedParams:
    """Fill in the model's defaults and check what depends on the model. Raises JobError(invalid_spec)."""
    problems: list[str] = []
    task: Task = spec.task or ("i2v" if spec.image else info.tasks[0])
    if task not in info.tasks:
        problems.append(f"task: model {info.name!r} cannot do {task!r} (it does: {', '.join(info.tasks)})")
    pipeline: Literal["t2v", "i2v"] = "i2v" if (task == "i2v" or (task == "ti2v" and spec.image)) else "t2v"
    if pipeline == "i2v" and not spec.image:
        problems.append("image: task i2v needs an input image")
    width, height = spec.requested_size() or (info.width, info.height)
    for name, value in (("width", width), ("height", height)):
        if value % info.multiple:
            lo = max(info.multiple, value - value % info.multiple)
            problems.append(
                f"{name}: {value} is not a multiple of {info.multiple} for {info.name} "
                f"(nearest: {lo} or {lo + info.multiple})"
            )
        if value > max_side or value < info.multiple:
            problems.append(f"{name}: {value} is outside {info.multiple}..{max_side} (limits.max_side)")
    frames = spec.frames or info.frames
    if frames > max_frames:
        problems.append(f"frames: {frames} is more than limits.max_frames ({max_frames})")
    steps = spec.steps or info.steps
    if steps > max_steps:
        problems.append(f"steps: {steps} is more than limits.max_steps ({max_steps})")
    if spec.guidance_scale_2 is not None and not info.two_experts:
        problems.append(
            f"guidance_scale_2: model {info.name!r} has one transformer; guidance_scale_2 applies only "
            "to the two-expert A14B models"
        )
    if problems:
        raise JobError(
            Category.INVALID_SPEC,
            "; ".join(problems),
            ["Fix the fields named in the message (or pick a model that fits them) and drop the file in again."],
        )
    preset: dict[str, Any] = {}
    if spec.preset:
        from daemon.jobspec.lora import apply_preset

        explicit = {k: getattr(spec, k) for k in ("steps", "guidance_scale", "guidance_scale_2", "flow_shift")}
        preset, _ = apply_preset(spec.preset, spec.loras, explicit, two_experts=info.two_experts)
        steps = preset.get("steps", steps)
    seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
    speed = speed or SpeedConfig()
    cache = spec.cache if spec.cache is not None else speed.cache
    return ResolvedParams(
        task=task,
        pipeline=pipeline,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt if spec.negative_prompt is not None else WAN_NEGATIVE_PROMPT,
        width=width,
        height=height,
        frames=frames,
        fps=spec.fps or info.fps,
        steps=steps,
        guidance_scale=spec.guidance_scale
        if spec.guidance_scale is not None
        else preset.get("guidance_scale", info.guidance_scale),
        guidance_scale_2=(
            spec.guidance_scale_2
            if spec.guidance_scale_2 is not None
            else preset.get("guidance_scale_2", info.guidance_scale_2)
        )
        if info.two_experts
        else None,
        flow_shift=spec.flow_shift if spec.flow_shift is not None else preset.get("flow_shift", info.flow_shift),
        seed=seed,
        seed_was_drawn=spec.seed is None,
        quality=spec.output.quality,
        basename=spec.output.basename or (spec.id or "job"),
        vae_tiling=vae_tiling,
        timeout_seconds=spec.timeout,
        preset=spec.preset,
        compile=spec.compile if spec.compile is not None else speed.compile,
        cache=cache.model_dump(mode="json") if cache.type != "none" else None,
        attention_backend=spec.attention_backend or speed.attention_backend,
        min_cache_steps=speed.min_cache_steps,
    )


def job_from_sidecar(sidecar: dict[str, Any], new_id: str) -> dict[str, Any]:
    """A job that renders a published video again, from its sidecar alone: every resolved parameter written out
    (seed, size, steps, scheduler shift, guidance, speed options), the model as it ran (after any fallback),
    and the job's own image, LoRAs and preset. Offload, VAE tiling and FP8 are the daemon's memory plan, not
    job fields: a run planned differently can differ in the last bits (see the sidecar's
    ``optimizations_applied``)."""
    p, spec, model = sidecar["parameters"], sidecar.get("spec") or {}, sidecar["model_used"]
    source = model.get("source")
    name = model["path"] if source == "local" else model.get("repo_id") if source == "hub-cache" else model["name"]
    job: dict[str, Any] = {
        "id": new_id,
        "model": name,
        "task": p["task"],
        "prompt": p["prompt"],
        "negative_prompt": p["negative_prompt"],
        "size": f"{p['width']}x{p['height']}",
        "frames": p["frames"],
        "fps": p["fps"],
        "steps": p["steps"],
        "guidance_scale": p["guidance_scale"],
        "flow_shift": p["flow_shift"],
        "seed": p["seed"],
        "output": {"basename": new_id, "quality": p["quality"]},
        "compile": p.get("compile", False),
        "cache": p.get("cache") or {"type": "none"},
        "attention_backend": p.get("attention_backend", "native"),
    }
    if p.get("guidance_scale_2") is not None:
        job["guidance_scale_2"] = p["guidance_scale_2"]
    for key in ("image", "loras", "preset"):
        if spec.get(key):
            job[key] = spec[key]
    return job
