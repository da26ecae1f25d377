"""Scale: what 10,000 (or 100,000) queued jobs cost the daemon, with the stand-in backend (daemon.testing).

Each phase runs a real Daemon (real watcher, spool, job book, worker process) in this process, on a fresh
folder, and reports wall-clock figures:

- files:    N job files renamed into the inbox at once -> all taken in (queued or running)
- batch:    the same N jobs as batch files of 1,000 jobs each -> all taken in
- restart:  a new daemon on the spool the files phase left -> recovered; -> first job dispatched
- decide:   one scheduler decision (placement's dispatch over the queue) with N queued, p50 / p95
- dispatch: stand-in jobs that take no time, through one worker: jobs per second end to end
- rss:      this process's resident memory with N queued

Logging is on at INFO, as in production (one line per job event): run it with ``2>/dev/null``.
The jobs of the files/batch/restart phases sleep (``sleep=600``) so that one runs and the rest stay
queued; the dispatch phase uses ``sleep=0`` jobs.

    python bench/scale.py [--jobs 10000] [--phases files,batch,restart,decide,dispatch] [--dispatch-jobs 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from daemon import logs
from daemon.config import load_settings
from daemon.jobs import JobState
from daemon.runtime.daemon import Daemon

BACKEND = "daemon.testing:CueBackend"


def settings_for(root: Path, **extra: Any):
    base: dict[str, Any] = {
        "paths": {"inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "models": str(root / "models")},
        "watch": {"settle_seconds": 0.2, "rescan_interval_seconds": 5.0},
        "models": {"default": "tiny-ti2v-5b"},
        "health": {"interval_seconds": 1.0},
        "logging": {"level": "INFO"},
        "instance": {"id": "scale"},
        **extra,
    }
    return load_settings(None, base)


class Running:
    """A daemon on a thread."""

    def __init__(self, settings) -> None:
        self.daemon = Daemon(settings, backend=BACKEND)
        self.thread = threading.Thread(target=self.daemon.run, name="daemon", daemon=True)

    def start(self) -> Running:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(120)


def wait(predicate, timeout: float, step: float = 0.01) -> float:
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"not done after {timeout:.0f} s")
        time.sleep(step)
    return time.perf_counter() - t0


def taken_in(d: Daemon, n: int) -> bool:
    return len(d.records) + d.done + d.failed >= n and not d.claims.retry and d.watcher.pending == 0


def stage_files(root: Path, n: int, *, batch: int = 0, sleep: float = 600) -> list[Path]:
    staging = root / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    files = []
    if batch:
        for b in range(0, n, batch):
            path = staging / f"batch{b // batch:05d}.yaml"
            lines = ["jobs:"] + [f"  - {{id: b{b + i}, prompt: 'sleep={sleep}'}}" for i in range(min(batch, n - b))]
            path.write_text("\n".join(lines) + "\n")
            files.append(path)
    else:
        for i in range(n):
            path = staging / f"job{i:06d}.yaml"
            path.write_text(f"prompt: 'sleep={sleep}'\n")
            files.append(path)
    return files


def drop(files: list[Path], inbox: Path) -> None:
    for f in files:
        os.rename(f, inbox / f.name)


def phase_intake(root: Path, n: int, batch: int) -> dict[str, float]:
    settings = settings_for(root)
    files = stage_files(root, n, batch=batch)
    run = Running(settings).start()
    wait(run.daemon.workers_ready, 120)
    t0 = time.perf_counter()
    drop(files, settings.paths.inbox)
    wait(lambda: taken_in(run.daemon, n), 3600)
    seconds = time.perf_counter() - t0  # the renames into the inbox included
    out = {"queued_s": seconds, "files_per_s": len(files) / seconds, "jobs_per_s": n / seconds}
    out["rss_mb"] = psutil.Process().memory_info().rss / (1 << 20)
    out["decide"] = measure_decisions(run.daemon)
    # Leave the spool as it is (a kill -9 would): the restart phase recovers it.
    run.daemon.kill_workers()
    run.daemon.request_stop()
    run.thread.join(120)
    return out


def measure_decisions(d: Daemon, rounds: int = 200) -> dict[str, float]:
    """Time what one dispatch decides over the queue, with a free slot that nothing can take (the running job
    holds the only worker, so nothing is started and the queue stays as it is)."""
    from daemon.scheduler import Slot

    placement = d.placement
    slot = [Slot("bench", None, None, frozenset())]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        placement.decide(slot, time.time())
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": statistics.median(times) * 1000, "p95_ms": times[int(len(times) * 0.95)] * 1000}


def phase_restart(root: Path, n: int) -> dict[str, float]:
    settings = settings_for(root)
    t0 = time.perf_counter()
    d = Daemon(settings, backend=BACKEND)
    started = threading.Thread(target=d.run, daemon=True)
    started.start()
    recovered = wait(lambda: d.status.state != "starting", 3600, 0.005)
    first = wait(lambda: d.book.count(JobState.RUNNING) > 0, 600, 0.005) + recovered
    out = {
        "recovered_s": recovered,
        "first_dispatch_s": first,
        "records": float(len(d.records)),
        "total_s": time.perf_counter() - t0,
    }
    d.kill_workers()
    d.request_stop()
    started.join(120)
    return out


def phase_dispatch(root: Path, n: int) -> dict[str, float]:
    settings = settings_for(root)
    files = stage_files(root, n, batch=1000, sleep=0)
    run = Running(settings).start()
    wait(run.daemon.workers_ready, 120)
    t0 = time.perf_counter()
    drop(files, settings.paths.inbox)
    wait(lambda: run.daemon.done + run.daemon.failed >= n, 3600)
    seconds = time.perf_counter() - t0
    run.stop()
    return {"jobs_per_s": n / seconds, "seconds": seconds, "failed": float(run.daemon.failed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--phases", default="files,restart,batch,dispatch")
    ap.add_argument("--dispatch-jobs", type=int, default=1000)
    args = ap.parse_args()
    logs.setup("INFO")  # as the daemon logs in production: one line per lifecycle event (run with 2>/dev/null)
    phases = args.phases.split(",")
    work = Path(tempfile.mkdtemp(prefix="wan-scale-"))
    print(
        f"wan-daemon scale benchmark: {args.jobs} jobs, stand-in backend, {os.cpu_count()} CPUs, {time.strftime('%F')}",
        flush=True,
    )
    try:
        if "files" in phases or "restart" in phases:
            r = phase_intake(work / "files", args.jobs, batch=0)
            print(
                f"files    {args.jobs} files dropped -> all taken in: {r['queued_s']:.2f} s "
                f"({r['files_per_s']:.0f} files/s); RSS with them queued {r['rss_mb']:.0f} MB; "
                f"decision p50 {r['decide']['p50_ms']:.3f} ms, p95 {r['decide']['p95_ms']:.3f} ms"
            )
        if "restart" in phases:
            r = phase_restart(work / "files", args.jobs)
            print(
                f"restart  {r['records']:.0f} records in the spool -> recovered {r['recovered_s']:.2f} s; "
                f"first dispatch {r['first_dispatch_s']:.2f} s after start"
            )
        if "batch" in phases:
            r = phase_intake(work / "batch", args.jobs, batch=1000)
            print(
                f"batch    {args.jobs} jobs in files of 1,000 -> all taken in: {r['queued_s']:.2f} s "
                f"({r['jobs_per_s']:.0f} jobs/s); RSS {r['rss_mb']:.0f} MB"
            )
        if "dispatch" in phases:
            r = phase_dispatch(work / "dispatch", args.dispatch_jobs)
            print(
                f"dispatch {args.dispatch_jobs} stand-in jobs of no duration through one worker: "
                f"{r['jobs_per_s']:.1f} jobs/s ({r['seconds']:.1f} s, failed {r['failed']:.0f})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
