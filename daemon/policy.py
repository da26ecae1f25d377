"""Retry decisions: a pure function of (error, attempts so far, the job's parameters, settings, a random draw).

- Transient categories (worker crash, timeout, I/O error) are retried with exponential backoff and
  full jitter, ``sleep = uniform(0, min(cap, base * 2**(attempt-1)))``, until ``max_attempts``
  attempts, counted on disk, are spent: a job that kills its worker every time ends up failed instead
  of looping forever.
- A full disk, or a folder the daemon writes that is read-only or gone, is retried later without counting
  against ``max_attempts``: the job is not at fault.
- Out of memory climbs a ladder, one rung per retry: stronger offload (CUDA only: model, then
  block-level group offload, then sequential), then VAE tiling, then, only where the job lists them in
  ``fallback``, degraded settings (lower resolution, fewer frames, a smaller model), each degradation
  recorded in the sidecar. When no rung is left, the job fails with what was tried.
- Everything else is final at once. Every decision is a retry of real generation or a failure record.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from daemon.errors import Category, JobError, Outcome
from daemon.jobspec.params import ResolvedParams
from daemon.models import REGISTRY, TI2V_5B, TINY_FOR

OFFLOAD_LADDER = ("none", "model", "group", "sequential")
SMALLER_MODEL = {
    "wan2.2-t2v-a14b": TI2V_5B,
    "wan2.2-i2v-a14b": TI2V_5B,
    "tiny-t2v-a14b": TINY_FOR[TI2V_5B],
    "tiny-i2v-a14b": TINY_FOR[TI2V_5B],
}
RESOLUTION_STEP = 0.75  # per side: about 56% of the pixels


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_seconds: float = 0.0
    reason: str = ""
    changes: dict[str, Any] = field(default_factory=dict)  # parameter changes for the next attempt
    degradation: dict[str, Any] | None = None  # recorded in the sidecar when the output is degraded


def _snap(value: float, multiple: int) -> int:
    return max(multiple, int(value) // multiple * multiple)


def _oom_rung(params: ResolvedParams, model: str, fallback: list[str], device: str, multiple: int) -> Decision | None:
    offload = params.offload
    if device == "cuda" and offload != OFFLOAD_LADDER[-1]:
        nxt = OFFLOAD_LADDER[OFFLOAD_LADDER.index(offload) + 1]
        return Decision(True, 0.0, f"out of memory: retrying with {nxt} offload", {"offload": nxt})
    if not params.vae_tiling:
        return Decision(True, 0.0, "out of memory: retrying with VAE tiling", {"vae_tiling": True})
    for kind in fallback:
        if kind == "lower_resolution":
            w, h = _snap(params.width * RESOLUTION_STEP, multiple), _snap(params.height * RESOLUTION_STEP, multiple)
            if (w, h) != (params.width, params.height):
                return Decision(
                    True,
                    0.0,
                    f"out of memory: lowering the resolution to {w}x{h}",
                    {"width": w, "height": h},
                    {"kind": "lower_resolution", "from": f"{params.width}x{params.height}", "to": f"{w}x{h}"},
                )
        elif kind == "fewer_frames":
            frames = (params.frames - 1) // 2 // 4 * 4 + 1
            if 5 <= frames < params.frames:
                return Decision(
                    True,
                    0.0,
                    f"out of memory: generating {frames} frames instead of {params.frames}",
                    {"frames": frames},
                    {"kind": "fewer_frames", "from": params.frames, "to": frames},
                )
        elif kind == "smaller_model" and model in SMALLER_MODEL:
            smaller = SMALLER_MODEL[model]
            return Decision(
                True,
                0.0,
                f"out of memory: switching to the smaller model {smaller}",
                {"model": smaller},
                {"kind": "smaller_model", "from": model, "to": smaller},
            )
    return None


def decide(
    error: JobError,
    attempts: int,
    *,
    params: ResolvedParams | None = None,
    model: str = "",
    fallback: list[str] | None = None,
    device: str = "cpu",
    max_attempts: int,
    base_seconds: float,
    cap_seconds: float,
    rng: random.Random | None = None,
    multiple: int | None = None,
) -> Decision:
    if error.category is Category.OUT_OF_MEMORY and params is not None:
        multiple = multiple or (REGISTRY[model].multiple if model in REGISTRY else 32)
        rung = _oom_rung(params, model, fallback or [], device, multiple)
        if rung is not None:
            return rung
        tried = f"offload {params.offload}, VAE tiling"
        return Decision(
            False,
            reason=f"out of memory with every allowed measure applied ({tried}"
            f"{', fallbacks ' + ', '.join(fallback) if fallback else ''})",
        )
    if error.outcome is not Outcome.RETRY:
        return Decision(False, reason=f"{error.category.value} is not retryable")
    draw = (rng or random).random()
    delay = draw * min(cap_seconds, base_seconds * (2 ** max(0, attempts - 1)))
    if error.category is Category.DISK_FULL:
        return Decision(True, delay, f"disk full: retrying in {delay:.1f}s once space is back (not counted)")
    if error.category is Category.UNWRITABLE:
        return Decision(True, delay, f"a folder is unwritable: retrying in {delay:.1f}s once writes work (not counted)")
    if attempts >= max_attempts:
        return Decision(False, reason=f"gave up after {attempts} attempts (worker.max_attempts={max_attempts})")
    return Decision(True, delay, f"attempt {attempts} of {max_attempts} failed; retrying in {delay:.1f}s")
