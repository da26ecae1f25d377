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

This module imports no torch and no diffusers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from daemon.errors import JobInterrupted
from daemon.fsutil import sha256_file
from daemon.jobs import JobRecord, JobState
from daemon.jobspec.params import ResolvedParams
from daemon.models import REGISTRY, LocatedModel
from daemon.worker.protocol import DeviceInfo, JobPayload, JobResult, Report, VideoFacts


@dataclass
class CueGenerated:
    """A cue job whose "device" part is done."""

    payload: JobPayload
    seconds: float  # how long its generation took (the sleep cue)


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
        out.write_bytes(f"cue-backend output for {payload.id} token {payload.token}\n".encode())
        with open(out, "rb") as fh:
            os.fsync(fh.fileno())
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
            video=VideoFacts(
                bytes=out.stat().st_size,
                sha256=sha256_file(out),
                frames=params.frames,
                fps=float(params.fps),
                width=params.width,
                height=params.height,
            ),
        )


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
