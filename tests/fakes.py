"""Stand-ins for hardware this machine lacks, behind the same interface as the real thing.

``CueBackend`` replaces the GPU for scheduler, policy and chaos tests that need many jobs or faults on
cue. It is injected by code (``Daemon(backend="fakes:CueBackend")``), never reachable from a config,
and it writes a marker file, not a video: it exists only in tests and benchmarks.

Cues are read from the job's prompt, e.g. ``"sleep=0.2 oom_above=4096 crash_once"``:
- ``sleep=S``: take S seconds, in steps of 0.05 s (progress events, interruptible);
- ``oom_above=N``: raise an out-of-memory error while width*height > N pixels;
- ``oom_unless_tiled``: raise out-of-memory until VAE tiling is on;
- ``crash_once``: kill the worker process the first time the job runs (a marker file remembers);
- ``crash_always``: kill the worker process every time;
- ``hang=S``: go silent (no progress) for S seconds before working, the first time the job runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from daemon.errors import JobInterrupted


class CueBackend:
    def __init__(self, *, device: str = "cpu", models_dir: Path, **_: Any) -> None:
        self.device = "cpu"
        self.models_dir = Path(models_dir)

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu", "device_name": "cue-backend (test stand-in)",
                "versions": {"torch": "n/a", "diffusers": "n/a", "transformers": "n/a", "python": "n/a"}}

    def run(self, job: dict[str, Any], report: Callable[[dict], None], should_stop: Callable[[], bool]) -> dict:
        params = job["params"]
        cues = dict(c.partition("=")[::2] for c in params["prompt"].split())
        if "crash_always" in cues:
            os._exit(3)
        if "crash_once" in cues:
            marker = self.models_dir / f".crashed-{job['id']}-{job['token']}"
            if not marker.exists():
                marker.touch()
                os._exit(3)
        if "oom_above" in cues and params["width"] * params["height"] > int(cues["oom_above"]):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (cue)")
        if "oom_unless_tiled" in cues and not params.get("vae_tiling"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB (cue)")
        if "hang" in cues:
            marker = self.models_dir / f".hung-{job['id']}-{job['token']}"
            if not marker.exists():
                marker.touch()
                time.sleep(float(cues["hang"]))
        seconds = float(cues.get("sleep", 0))
        steps = max(1, int(seconds / 0.05))
        for i in range(steps):
            if should_stop():
                raise JobInterrupted()
            time.sleep(seconds / steps)
            report({"type": "progress", "phase": "denoising", "step": i + 1, "total": steps})
        out = Path(job["video_tmp"])
        out.write_bytes(f"cue-backend output for {job['id']} token {job['token']}\n".encode())
        with open(out, "rb") as fh:
            os.fsync(fh.fileno())
        return {
            "video_tmp": str(out), "video": {"bytes": out.stat().st_size, "frames": params["frames"]},
            "timings": {"model_load": 0.0, "denoise": seconds, "vae_decode": 0.0, "encode": 0.0},
            "model_cache": "cached", "model_path": None, "device": "cpu", "peak_vram_usage_mb": None,
            "peak_rss_mb": 0.0,
            "optimizations_applied": (["vae_tiling"] if params.get("vae_tiling") else []),
        }
