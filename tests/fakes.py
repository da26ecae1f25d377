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
- ``hang=S``: go silent (no progress) for S seconds before working, the first time the job runs;
- ``encode_sleep=S``: the CPU-side finish (the real backend's MP4 encoding) takes S seconds;
- ``crash_encoding_once``: kill the worker while the job is being finished, the first time.
Like the real backend it splits a job into ``generate`` (device) and ``finish`` (CPU), so the worker
overlaps one job's finish with the next job's generation here too.
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
        return self.finish(self.generate(job, report, should_stop))

    @staticmethod
    def _cues(job: dict[str, Any]) -> dict[str, str]:
        return dict(c.partition("=")[::2] for c in job["params"]["prompt"].split())

    def generate(self, job: dict[str, Any], report: Callable[[dict], None], should_stop: Callable[[], bool]):
        """The device's part (sleeps, fails or dies on cue); like the real backend's, it writes nothing."""
        params = job["params"]
        cues = self._cues(job)
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
        return job, seconds

    def finish(self, generated) -> dict:
        """The CPU's part: "encoding" (encode_sleep=S), dying in it once on cue (crash_encoding_once)."""
        job, seconds = generated
        params, cues = job["params"], self._cues(job)
        if "crash_encoding_once" in cues:
            marker = self.models_dir / f".crashed-encoding-{job['id']}-{job['token']}"
            if not marker.exists():
                marker.touch()
                os._exit(3)
        time.sleep(float(cues.get("encode_sleep", 0)))
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
