"""What the Ray tests share (tests/test_ray.py, tests/test_ray_cluster.py): real daemons whose workers are Ray
actors (worker.executor: ray) on a Ray cluster of this machine, with fake GPUs (Ray resources, not CUDA) and the
stand-in backend, daemon.testing.CueBackend, inside the actors."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from conftest import DaemonHarness, fast_settings, wait_for

CUE = "daemon.testing:CueBackend"
# Ray's footprint on the 2-core CI machine: no dashboard, a small object store, actors' logs kept out of pytest's.
RAY_INIT: dict[str, Any] = {
    "include_dashboard": False,
    "log_to_driver": False,
    "object_store_memory": 150 * 2**20,
    "namespace": "wan-daemon-tests",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RayDaemons:
    """Makes started daemons with Ray workers; stops them all and checks that no actor outlived its daemon."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.made: list[DaemonHarness] = []

    def start(
        self, backend: str | None = CUE, models: Path | None = None, **overrides: dict[str, Any]
    ) -> DaemonHarness:
        root = self.tmp_path / f"daemon{len(self.made)}"
        root.mkdir()
        if models is None:
            models = self.tmp_path / "models"  # CueBackend's markers (crash_once, hang) live there
            models.mkdir(exist_ok=True)
        worker = {"executor": "ray", "stall_timeout_seconds": 120, **overrides.pop("worker", {})}
        ray_config = {"actors": 1, "start_timeout_seconds": 120, **overrides.pop("ray", {})}
        settings = fast_settings(root, models, worker=worker, ray=ray_config, **overrides)
        h = DaemonHarness(root, settings, backend)
        self.made.append(h)
        return h.start()

    def stop_all(self) -> None:
        import ray

        for h in self.made:
            h.stop()
        total = ray.cluster_resources().get("GPU", 0)
        wait_for(lambda: ray.available_resources().get("GPU", 0) == total, 30, what="every actor to be gone")


def actor_of(sidecar: dict[str, Any]) -> dict[str, Any]:
    """Where the job ran, as its sidecar records it."""
    return sidecar["resources"]["ray"]
