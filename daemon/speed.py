"""Speed options: torch.compile of the repeated transformer blocks, diffusers' step caches, and attention
backends. What a job asks for (or the config's ``speed`` defaults) is fixed at intake; what is applied is
decided here, per run, by a pure function, and written to ``optimizations_applied`` either way, so a user
reading a sidecar knows what made the video. This module imports no torch and no diffusers (the daemon
imports it); what asks diffusers is in daemon.worker.speed.

The rules (each one a note in the sidecar when it changes what was asked):
- a cache is turned off for distill presets and for runs with fewer than ``min_cache_steps`` steps: with
  four steps every skipped step is a quarter of the denoising and the video visibly suffers;
- ``mag`` is turned off on the two-expert A14B models: diffusers' MagCache assumes one transformer that
  runs every step (diffusers issue #14025), while the A14B experts each run part of them;
- ``mag`` needs the model's magnitude ratios (``mag_ratios``); they are model-specific and published by the
  MagCache authors for each Wan2.2 model;
- a non-native attention backend that is not installed (or a GPU-only one on a CPU) runs as native.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The daemon's names for attention backends -> diffusers' AttentionBackendName values. Hub-kernel variants
# are left out on purpose: they download code at run time.
ATTENTION_BACKENDS: dict[str, str] = {
    "native": "native",  # torch scaled_dot_product_attention, whichever kernel torch picks
    "flash": "flash",  # flash-attn 2
    "flash_3": "_flash_3",  # flash-attn 3 (Hopper)
    "sage": "sage",  # SageAttention
    "cudnn": "_native_cudnn",  # torch SDPA, cuDNN kernel
    "efficient": "_native_efficient",
    "flex": "flex",
    "xformers": "xformers",
}
CPU_ATTENTION = {"native", "flex"}

DEFAULT_FIRST_BLOCK_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default
DEFAULT_MAG_THRESHOLD = 0.06  # the MagCache authors' setting for Wan2.2


class CacheOptions(BaseModel):
    """Reuse of transformer computations between denoising steps (diffusers cache hooks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["none", "first_block", "mag"] = Field(
        "none",
        description="first_block: skip the remaining blocks while the first block's output barely "
        "changes; mag: MagCache (needs mag_ratios); none: compute every step.",
    )
    threshold: float | None = Field(
        None, gt=0, le=1, description="Higher skips more and costs quality. Default: 0.05 (first_block), 0.06 (mag)."
    )
    mag_ratios: list[float] | None = Field(
        None,
        min_length=2,
        max_length=1000,
        description="MagCache's per-step magnitude ratios for this model (published per Wan2.2 model by the "
        "MagCache authors); interpolated to the job's step count.",
    )

    @model_validator(mode="after")
    def _mag_needs_ratios(self) -> CacheOptions:
        if self.type == "mag" and not self.mag_ratios:
            raise ValueError(
                "cache type mag needs mag_ratios: MagCache's magnitude ratios are model-specific "
                "(the MagCache authors publish them for each Wan2.2 model)"
            )
        if self.type != "mag" and self.mag_ratios:
            raise ValueError("mag_ratios apply only to cache type mag")
        return self


class SpeedConfig(BaseModel):
    """Defaults for every job; a job's own compile / cache / attention_backend win."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compile: bool = Field(
        False,
        description="torch.compile the transformer's repeated blocks (diffusers "
        "compile_repeated_blocks); compiled once per warm pipeline, reused by later jobs.",
    )
    cache: CacheOptions = CacheOptions()
    attention_backend: Literal[tuple(ATTENTION_BACKENDS)] = "native"  # type: ignore[valid-type]
    min_cache_steps: int = Field(10, ge=1, description="Runs with fewer steps never use a cache.")


@dataclass(frozen=True)
class SpeedPlan:
    """What one run applies, and why anything asked for is not applied."""

    compile: bool = False
    cache: dict[str, Any] | None = None  # {"type", "threshold", "mag_ratios"}
    attention_backend: str = "native"
    notes: list[str] = field(default_factory=list)

    def applied(self) -> list[str]:
        """The optimizations_applied entries, notes included."""
        out = []
        if self.compile:
            out.append("compile:repeated_blocks")
        if self.cache:
            out.append(f"cache:{self.cache['type']}@{self.cache['threshold']:g}")
        if self.attention_backend != "native":
            out.append(f"attention:{self.attention_backend}")
        return out + self.notes


def plan_speed(
    params: Mapping[str, Any] | Any, *, two_experts: bool, device: str, attention_problem: str | None = None
) -> SpeedPlan:
    """Decide what a run applies from its resolved parameters (a ResolvedParams, or its fields as a
    mapping). Pure: no torch, no diffusers. ``attention_problem``: why the requested attention backend
    cannot run here (daemon.worker.speed.attention_available)."""
    if not isinstance(params, Mapping):
        params = params.model_dump()
    notes: list[str] = []
    cache = params.get("cache") or None
    if cache and cache.get("type", "none") != "none":
        kind = cache["type"]
        steps, min_steps = params["steps"], params.get("min_cache_steps", 10)
        if params.get("preset"):
            notes.append(f"cache:{kind} off (distill preset {params['preset']}: every step counts)")
            cache = None
        elif steps < min_steps:
            notes.append(f"cache:{kind} off ({steps} steps < speed.min_cache_steps {min_steps})")
            cache = None
        elif kind == "mag" and two_experts:
            notes.append(
                "cache:mag off (two-expert model: diffusers' MagCache assumes one transformer running "
                "every step, diffusers#14025)"
            )
            cache = None
        else:
            default = DEFAULT_MAG_THRESHOLD if kind == "mag" else DEFAULT_FIRST_BLOCK_THRESHOLD
            cache = {
                "type": kind,
                "threshold": cache.get("threshold") or default,
                "mag_ratios": cache.get("mag_ratios"),
            }
    else:
        cache = None
    attention = params.get("attention_backend") or "native"
    if attention != "native":
        if device != "cuda" and attention not in CPU_ATTENTION:
            notes.append(f"attention:native ({attention} needs a CUDA GPU)")
            attention = "native"
        elif attention_problem:
            notes.append(f"attention:native ({attention} unavailable: {attention_problem})")
            attention = "native"
    return SpeedPlan(compile=bool(params.get("compile")), cache=cache, attention_backend=attention, notes=notes)
