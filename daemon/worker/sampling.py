"""Resource sampling while a job runs: CPU and memory of the worker (psutil), GPU utilisation and memory
(NVML), sampled on a thread in the worker; peaks and means go to the sidecar and the history, and
obvious bottlenecks are named.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


class ResourceSampler:
    def __init__(self, *, interval: float = 0.5, gpu_index: int | None = None) -> None:
        import psutil

        self.interval = interval
        self.process = psutil.Process(os.getpid())
        self.samples: list[dict[str, float]] = []
        self.phase = "starting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        if gpu_index is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(gpu_index))
            except Exception:  # no driver: CPU figures only
                self._nvml = None

    def _sample(self) -> None:
        s: dict[str, Any] = {
            "t": time.monotonic(),
            "phase": self.phase,
            "cpu_percent": self.process.cpu_percent(None),
            "rss_mb": self.process.memory_info().rss / (1 << 20),
        }
        if self._nvml is not None:
            pynvml, handle = self._nvml
            try:
                s["gpu_util_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                s["gpu_memory_used_mb"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / (1 << 20)
            except Exception:
                pass
        self.samples.append(s)

    def _run(self) -> None:
        self.process.cpu_percent(None)  # the first call only starts psutil's measurement window
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> ResourceSampler:
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self._sample()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": len(self.samples), "interval_seconds": self.interval}
        for key in ("cpu_percent", "rss_mb", "gpu_util_percent", "gpu_memory_used_mb"):
            values = [s[key] for s in self.samples if key in s]
            if values:
                out[f"{key}_peak"] = round(max(values), 1)
                out[f"{key}_mean"] = round(sum(values) / len(values), 1)
        out["bottlenecks"] = self.bottlenecks()
        return out

    def bottlenecks(self) -> list[str]:
        found = []
        denoise = [s for s in self.samples if s["phase"] == "denoising" and "gpu_util_percent" in s]
        if len(denoise) >= 3:
            mean = sum(s["gpu_util_percent"] for s in denoise) / len(denoise)
            if mean < 50:
                found.append(
                    f"GPU under-used while denoising (mean {mean:.0f}%): weights streaming in "
                    "(offload) or a CPU-bound step; a resident mode or faster host memory would help"
                )
        loading = [s for s in self.samples if s["phase"] == "loading_model"]
        if len(loading) * self.interval > 30:
            found.append(
                f"model loading took about {len(loading) * self.interval:.0f}s: keep the model warm "
                "(worker.max_cached_pipelines) or use faster storage for the model cache"
            )
        if self.samples and "gpu_util_percent" not in self.samples[0]:
            cpu = [s["cpu_percent"] for s in self.samples if s["phase"] == "denoising"]
            if cpu and max(cpu) < 50 * (os.cpu_count() or 1) / 100:
                found.append("CPU under-used while denoising: torch may be limited to few threads")
        return found
