"""Shared fixtures. Everything runs on the real stack: tiny random-weight Wan pipelines built here, saved in
diffusers format, loaded by the worker through ``from_pretrained``, denoised, decoded and encoded to MP4."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from daemon.config import load_settings  # noqa: E402
from daemon.runtime.daemon import Daemon  # noqa: E402


@pytest.fixture(autouse=True)
def local_state_home(tmp_path_factory, monkeypatch) -> Path:
    """Each test's own XDG state home: the job history's default folder (daemon.config_sources), which daemons
    in this process and CLI subprocesses alike resolve from the environment. No stray WAN_DAEMON_* setting
    or systemd StateDirectory of the caller's leaks into a test."""
    folder = tmp_path_factory.mktemp("xdg-state")
    monkeypatch.setenv("XDG_STATE_HOME", str(folder))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    for name in [n for n in os.environ if n.startswith("WAN_DAEMON_")]:
        monkeypatch.delenv(name)
    return folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The three tiny models, built once per test session (the worker would build them on first use too)."""
    from daemon.worker.tiny import build_all

    folder = tmp_path_factory.mktemp("models")
    build_all(folder)
    return folder


def fast_settings(root: Path, models_dir: Path, **overrides: Any):
    base: dict[str, Any] = {
        "paths": {
            "inbox": str(root / "inbox"),
            "outbox": str(root / "outbox"),
            "models": str(models_dir),
            "model_roots": [str(root)],
        },
        "watch": {"settle_seconds": 0.3, "rescan_interval_seconds": 1.0, "poll_interval_seconds": 0.2},
        "worker": {"retry_base_seconds": 0.0, "max_cached_pipelines": 2},
        "health": {"interval_seconds": 0.5},
        "models": {"default": "tiny-ti2v-5b"},
        "logging": {"level": "DEBUG"},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value}
    return load_settings(None, base)


def spool_root(settings) -> Path:
    return settings.paths.state / "owners" / settings.owner


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


class DaemonHarness:
    """A real Daemon (real watcher, real spawned worker) running on a thread, plus helpers to drive it."""

    def __init__(self, root: Path, settings, backend: str | None = None, inventory=None, seams=None) -> None:
        self.root = root
        self.settings = settings
        self.backend = backend
        self.inventory = inventory
        self.seams = seams  # daemon.runtime.daemon.Seams: stalls injected at chosen points (freeze tests)
        self.inbox = settings.paths.inbox
        self.outbox = settings.paths.outbox
        self.daemon: Daemon | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> DaemonHarness:
        self.daemon = Daemon(self.settings, backend=self.backend, inventory=self.inventory, seams=self.seams)
        self.daemon.start()

        def loop() -> None:
            try:
                self.daemon.run()
            except BaseException as exc:  # surfaced by stop()
                self.error = exc

        self.thread = threading.Thread(target=loop, name="daemon-under-test", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.daemon is not None and self.thread is not None:
            self.daemon.request_stop()
            self.thread.join(60)
            assert not self.thread.is_alive(), "daemon did not stop"
        self.thread = None
        if self.error:
            raise self.error

    # ---- driving -------------------------------------------------------------------------------

    def drop(self, name: str, text: str) -> Path:
        """Drop a job file the way careful tools do: write a dotfile, then rename it into place."""
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_text(text)
        final = self.inbox / name
        os.rename(tmp, final)
        return final

    def sidecar(self, basename: str, timeout: float = 90) -> dict:
        path = self.outbox / f"{basename}.json"
        wait_for(path.exists, timeout, what=f"sidecar {path}")
        return json.loads(path.read_text())

    def failure(self, name: str, timeout: float = 60) -> dict:
        path = self.outbox / "failed" / f"{name}.json"
        wait_for(path.exists, timeout, what=f"failure record {path}")
        return json.loads(path.read_text())

    def idle(self, timeout: float = 90) -> None:
        wait_for(lambda: self.daemon.is_idle() and self.daemon.workers_ready(), timeout, what="daemon idle")


@pytest.fixture
def harness_factory(tmp_path, models_dir):
    made: list[DaemonHarness] = []

    def make(root: Path | None = None, backend: str | None = None, inventory=None, **overrides: Any) -> DaemonHarness:
        root = root or tmp_path
        h = DaemonHarness(root, fast_settings(root, models_dir, **overrides), backend, inventory)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()
    # No test may leak a worker process.
    wait_for(lambda: not multiprocessing.active_children(), 15, what="worker processes to exit")


@pytest.fixture
def harness(harness_factory) -> DaemonHarness:
    return harness_factory().start()


# ---- two tiers -----------------------------------------------------------------------------------------
# `make test-fast` runs `-m "not slow"`: only tests that stay in this process and touch no model, no daemon, no
# worker, no subprocess, no ffmpeg and no fake hub. `make test` (CI) runs both tiers. A test is slow when its
# file is listed here, when it is listed by name, or when it asks (directly or through another fixture) for one
# of the fixtures below, so a new end-to-end test lands in the slow tier without being listed.
SLOW_FILES = {
    "test_e2e.py": "job files through a real daemon and worker rendering the tiny models",
    "test_lora_e2e.py": "LoRAs through a real daemon and worker on the tiny A14B",
    "test_gpu_scheduling.py": "two real daemons' workers on a static two-GPU inventory",
    "test_overlap.py": "a real spawned worker process running the tiny pipelines",
    "test_ops.py": "the daemon as a subprocess (sd_notify), metrics/doctor/report on a real outbox",
    "test_recovery.py": "kills and restarts real daemons and daemon subprocesses",
    "test_downloads.py": "a fake hub server (tests/hubserver.py) serving the tiny model, download subprocesses",
    "test_report.py": "encodes MP4s with ffmpeg for posters and runs headless chromium",
    "test_mp4.py": "encodes and reads back MP4s with ffmpeg",
    "test_ray.py": "a local Ray cluster with fake GPUs, daemons whose workers are Ray actors, a tiny model",
    "test_ray_cluster.py": "a three-node ray.cluster_utils.Cluster, a node removed mid-job",
    "test_simulated_gpu.py": "real daemons and worker processes on simulated GPU cards",
    "test_lora_parity.py": "tiny Wan transformers loading LoRAs through diffusers",
    "test_queue_e2e.py": "wan-daemon run processes on the tiny models, driven through the command line",
}
SLOW_TESTS = {
    "test_cli.py::test_console_script_help": "runs the wan-daemon console script as a subprocess",
    "test_history.py::test_several_processes_opening_a_fresh_file_at_once_all_succeed": "subprocesses",
    "test_history.py::test_readers_in_other_processes_never_see_database_is_locked": "a writer subprocess",
    "test_lora.py::test_parent_half_imports_no_torch": "a fresh interpreter as a subprocess",
    "test_notify.py::test_unit_file_has_no_syntax_errors": "runs systemd-analyze",
    "test_notify.py::test_unit_check_catches_typos": "runs systemd-analyze",
    "test_notify.py::test_units_are_hardened_to_an_exposure_of_at_most_2": "runs systemd-analyze security",
    "test_notify.py::test_the_exposure_check_sees_a_unit_without_its_hardening": "runs systemd-analyze security",
    "test_resilience.py::test_claim_race_2000_files_8_claimers_no_double_no_loss": "8 spawned claimer processes",
}
SLOW_FIXTURES = {
    "models_dir": "builds the tiny random-weight models",
    "harness": "starts a real daemon and its worker process",
    "harness_factory": "starts real daemons and their worker processes",
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        name = item.path.name
        if (
            name in SLOW_FILES
            or f"{name}::{item.originalname}" in SLOW_TESTS
            or SLOW_FIXTURES.keys() & set(item.fixturenames)
        ):
            item.add_marker(pytest.mark.slow)
