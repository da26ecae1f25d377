"""``wan-daemon monitor``: a live terminal view of every daemon on this inbox (from their health files),
the running jobs' progress, and GPU memory (NVML, where present)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from daemon.runtime.health import health_age


def read_all(health_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(health_dir.glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


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


def render(healths: list[dict[str, Any]], gpus: list[dict[str, Any]], now: float | None = None) -> Group:
    now = now if now is not None else time.time()
    daemons = Table(title="wan-daemon", expand=True)
    for col in ("instance", "state", "queued", "done", "failed", "worker", "updated", "paused"):
        daemons.add_column(col)
    jobs = Table(title="running", expand=True)
    for col in ("instance", "job", "model", "phase", "progress", "step", "attempt"):
        jobs.add_column(col)
    for h in healths:
        age = health_age(h, now)
        dev = h.get("device") or {}
        daemons.add_row(
            str(h.get("instance")),
            str(h.get("state")) + (" (stale)" if age > 30 else ""),
            str(h.get("queue_depth", 0)),
            str(h.get("done", 0)),
            str(h.get("failed", 0)),
            f"{dev.get('state')} {dev.get('device') or ''}",
            f"{age:.0f}s ago",
            h.get("paused") or "",
        )
        run = h.get("running")
        if run:
            total = max(1, int(run.get("total") or 1))
            step = int(run.get("step") or 0)
            jobs.add_row(
                str(h.get("instance")),
                str(run.get("id")),
                str(run.get("model")),
                str(run.get("phase")),
                ProgressBar(total=total, completed=step, width=30),
                f"{step}/{total}",
                str(run.get("attempt")),
            )
    parts: list[Any] = [daemons, jobs]
    if gpus:
        g = Table(title="GPUs", expand=True)
        for col in ("gpu", "name", "memory", "util"):
            g.add_column(col)
        for row in gpus:
            g.add_row(
                str(row["index"]), str(row["name"]), f"{row['used_mb']} / {row['total_mb']} MiB", f"{row['util']}%"
            )
        parts.append(g)
    return Group(*parts)


def run(health_dir: Path, interval: float, iterations: int | None = None) -> None:
    from rich.live import Live

    with Live(render(read_all(health_dir), gpu_rows()), refresh_per_second=4, screen=False) as live:
        n = 0
        while iterations is None or n < iterations:
            time.sleep(interval)
            live.update(render(read_all(health_dir), gpu_rows()))
            n += 1
