"""``wan-daemon monitor``: a live terminal view of every daemon on this inbox (from their health files): each
daemon (with an operator's pause), each of its workers (parked ones too, with their warm models), every running
job's progress, and GPU memory (NVML, where present).

When stdout is not a terminal it prints one plain snapshot instead (each table tab-separated under a ``#``
title line, daemon.ops.tables) and exits. Log lines are kept out of the view: whatever the readings log
(NVML, each refresh) is silenced for the monitor's duration.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from loguru import logger
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from daemon.control import OPERATOR_PAUSE, PauseRequest, read_pause
from daemon.ops import tables
from daemon.ops.queue_view import STALE_SECONDS, read_healths
from daemon.runtime.health import health_age


def read_all(health_dir: Path) -> list[dict[str, Any]]:
    """Every daemon's health document (queue_view.read_healths: one per instance, temp files skipped)."""
    return list(read_healths(health_dir).values())


def gpu_rows() -> list[dict[str, Any]]:
    from daemon.ops.inventory import NvmlInventory

    return [
        {
            "index": g.index,
            "name": g.name,
            "used_mb": g.used_mb,
            "total_mb": g.total_mb,
            "util": g.utilization_percent if g.utilization_percent is not None else "?",
        }
        for g in NvmlInventory().gpus()
    ]


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """No log line from daemon.* while the view is drawn (the CLI's own sink writes to the same terminal)."""
    logger.disable("daemon")
    try:
        yield
    finally:
        logger.enable("daemon")


# ---- the tables, as plain values --------------------------------------------------------------------------

DAEMON_COLUMNS = ("instance", "host", "state", "queued", "running", "done", "failed", "workers", "updated", "paused")
WORKER_COLUMNS = ("instance", "worker", "state", "gpu", "device", "warm_models", "job", "restarts", "pid")
JOB_COLUMNS = ("instance", "job", "worker", "model", "phase", "step", "total", "progress", "attempt", "running_for")
GPU_COLUMNS = ("gpu", "name", "used_mb", "total_mb", "util")


def pause_text(h: dict[str, Any], requested: PauseRequest | None = None) -> str:
    """Why the daemon starts nothing new: an operator's pause (as it describes itself), a disk pause, or a
    pause written to the state folder that this daemon has not applied yet."""
    operator = h.get("operator_pause")
    parts = []
    if operator:
        parts.append(PauseRequest.from_dict(operator).describe())
    if h.get("paused") and (h.get("pause") or {}).get("kind") != OPERATOR_PAUSE:
        parts.append(str(h["paused"]))
    if not parts and requested is not None:
        parts.append(f"pause requested, not yet applied: {requested.describe()}")
    return "; ".join(parts)


def _running(h: dict[str, Any]) -> list[dict[str, Any]]:
    jobs = [j for j in h.get("running_jobs") or [] if isinstance(j, dict)]
    if not jobs and isinstance(h.get("running"), dict):  # an older daemon: only its first running job
        jobs = [h["running"]]
    return jobs


def daemon_rows(
    healths: Sequence[dict[str, Any]], now: float, requested: PauseRequest | None = None
) -> list[list[Any]]:
    rows = []
    for h in healths:
        age = health_age(h, now)
        workers = h.get("workers") or {}
        parked = sum(1 for w in workers.values() if (w or {}).get("state") == "parked")
        rows.append(
            [
                h.get("instance"),
                h.get("host"),
                str(h.get("state")) + (" (stale)" if age > STALE_SECONDS else ""),
                h.get("queue_depth", 0),
                len(_running(h)),
                h.get("done", 0),
                h.get("failed", 0),
                f"{len(workers)}" + (f" ({parked} parked)" if parked else ""),
                f"{age:.0f}s ago",
                pause_text(h, requested) or None,
            ]
        )
    return rows


def worker_rows(healths: Sequence[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for h in healths:
        on = {j.get("worker"): j.get("id") for j in _running(h)}
        workers = h.get("workers") or {}
        if not workers and h.get("device"):  # an older daemon: its one worker as "device"
            workers = {"worker": {**h["device"], "gpu": None, "warm_models": []}}
        for name, w in workers.items():
            w = w or {}
            rows.append(
                [
                    h.get("instance"),
                    name,
                    w.get("state"),
                    w.get("gpu"),
                    w.get("device") or w.get("host"),
                    ", ".join(w.get("warm_models") or []) or None,
                    on.get(name),
                    w.get("restarts"),
                    w.get("pid"),
                ]
            )
    return rows


def job_rows(healths: Sequence[dict[str, Any]], now: float) -> list[list[Any]]:
    rows = []
    for h in healths:
        for run in _running(h):
            step, total = run.get("step"), run.get("total")
            progress = f"{step / total:.0%}" if isinstance(step, int) and isinstance(total, int) and total else None
            started = run.get("started_at")
            rows.append(
                [
                    h.get("instance"),
                    run.get("id"),
                    run.get("worker"),
                    run.get("model"),
                    run.get("phase"),
                    step,
                    total,
                    progress,
                    run.get("attempt"),
                    f"{now - started:.0f}s" if isinstance(started, int | float) else None,
                ]
            )
    return rows


def gpu_table_rows(gpus: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[g["index"], g["name"], g["used_mb"], g["total_mb"], g["util"]] for g in gpus]


# ---- drawing ----------------------------------------------------------------------------------------------


def _rich(title: str, columns: Sequence[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, expand=True)
    for col in columns:
        table.add_column(col.replace("_", " "))
    for row in rows:
        table.add_row(*(tables.cell(v) if v is not None else "" for v in row))
    return table


def render(
    healths: list[dict[str, Any]],
    gpus: list[dict[str, Any]],
    now: float | None = None,
    requested: PauseRequest | None = None,
) -> Group:
    now = now if now is not None else time.time()
    parts: list[Any] = [
        _rich("wan-daemon", DAEMON_COLUMNS, daemon_rows(healths, now, requested)),
        _rich("workers", WORKER_COLUMNS, worker_rows(healths)),
    ]
    jobs = Table(title="running", expand=True)
    for col in (*JOB_COLUMNS[:5], "progress", "step", "attempt", "running for"):
        jobs.add_column(col)
    for r in job_rows(healths, now):
        total = max(1, int(r[6] or 1))
        step = int(r[5] or 0)
        bar = ProgressBar(total=total, completed=step, width=30)
        jobs.add_row(*(tables.cell(v) for v in r[:5]), bar, f"{step}/{total}", tables.cell(r[8]), r[9] or "")
    parts.append(jobs)
    if gpus:
        parts.append(
            _rich(
                "GPUs",
                ("gpu", "name", "memory", "util"),
                [[g["index"], g["name"], f"{g['used_mb']} / {g['total_mb']} MiB", f"{g['util']}%"] for g in gpus],
            )
        )
    return Group(*parts)


def snapshot(
    healths: list[dict[str, Any]],
    gpus: list[dict[str, Any]],
    now: float,
    out: TextIO,
    requested: PauseRequest | None = None,
) -> None:
    """The plain view: each table under a ``# wan-daemon <table>`` line, tab-separated, a blank line between."""
    sections = (
        ("daemons", DAEMON_COLUMNS, daemon_rows(healths, now, requested)),
        ("workers", WORKER_COLUMNS, worker_rows(healths)),
        ("running", JOB_COLUMNS, job_rows(healths, now)),
        ("gpus", GPU_COLUMNS, gpu_table_rows(gpus)),
    )
    for n, (title, columns, rows) in enumerate(sections):
        out.write(("\n" if n else "") + f"# wan-daemon {title}\n")
        tables.print_table(columns, rows, out=out, tty=False)


def run(
    health_dir: Path,
    interval: float,
    iterations: int | None = None,
    *,
    state: Path | None = None,
    out: TextIO | None = None,
    tty: bool | None = None,
) -> None:
    """Draw the view every ``interval`` seconds (``iterations`` times, or until interrupted) on a terminal; a
    single plain snapshot otherwise. ``state``: the state folder, for a pause not yet applied by the daemons."""
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty

    def requested() -> PauseRequest | None:
        return read_pause(state) if state is not None else None

    with quiet_logs():
        if not tty:
            snapshot(read_all(health_dir), gpu_rows(), time.time(), out, requested())
            return
        from rich.console import Console
        from rich.live import Live

        view = render(read_all(health_dir), gpu_rows(), requested=requested())
        with Live(view, console=Console(file=out), refresh_per_second=4, screen=False) as live:
            n = 0
            while iterations is None or n < iterations:
                time.sleep(interval)
                live.update(render(read_all(health_dir), gpu_rows(), requested=requested()))
                n += 1
