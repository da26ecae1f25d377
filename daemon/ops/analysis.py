"""What the job history says: success rates, timings and failures per model and resolution, and concrete
recommendations drawn from them (``wan-daemon analysis``); plus the tables of ``wan-daemon tasks``.

Computing (:func:`analyse`, :func:`analyse_rows`) and rendering (:func:`render_tasks`,
:func:`render_analysis` for a terminal; :func:`print_tasks_plain`, :func:`print_analysis_plain` tab-separated,
every id and path whole, when stdout is not one) are separate: the result is a plain JSON-able dict. Every
statistic is defined for zero rows: counts are 0, rates and percentiles are ``None`` ("no data"), never a
division by zero.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, TextIO

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from daemon.ops.tables import print_table

if TYPE_CHECKING:
    from daemon.ops.history import History

SUCCESS_RATE_TARGET = 0.9
QUEUE_WAIT_P95_LIMIT_SECONDS = 300.0


def percentile(values: Iterable[float | None], p: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least p% of the values at or below it);
    ``None`` for no values. ``None`` entries are skipped."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if not 0 <= p <= 100:
        raise ValueError("p must be within [0, 100]")
    rank = max(1, math.ceil(p / 100 * len(data)))
    return data[rank - 1]


def _mean(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return sum(data) / len(data) if data else None


def _max(values: Iterable[float | None]) -> float | None:
    data = [v for v in values if v is not None]
    return max(data) if data else None


def _rate(done: int, failed: int) -> float | None:
    return done / (done + failed) if done + failed else None


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _download_hint(model: str) -> str:
    if "/" in model:
        return model
    from daemon.models import REGISTRY  # no torch: cheap

    info = REGISTRY.get(model)
    return info.repo_id if info and info.repo_id else "<repo>"


# ---- computing ----------------------------------------------------------------------------------


def analyse(history: History, hours: float, now: float, **limits: float) -> dict[str, Any]:
    """Analyse the jobs active in the last ``hours`` before ``now`` (see :meth:`History.rows`)."""
    since = now - hours * 3600
    return analyse_rows(history.rows(since=since, until=now), hours=hours, now=now, **limits)


def analyse_rows(
    rows: Sequence[dict[str, Any]],
    *,
    hours: float | None = None,
    now: float | None = None,
    success_rate_target: float = SUCCESS_RATE_TARGET,
    queue_wait_p95_limit_seconds: float = QUEUE_WAIT_P95_LIMIT_SECONDS,
) -> dict[str, Any]:
    """The analysis of history rows (dicts as :meth:`History.tasks` returns them). Pure."""
    status = Counter(r.get("status") for r in rows)
    done, failed = status.get("done", 0), status.get("failed", 0)
    done_rows = [r for r in rows if r.get("status") == "done"]
    failed_rows = [r for r in rows if r.get("status") == "failed"]

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("model_used") or "?", r.get("resolution") or "?"), []).append(r)
    per_model: list[dict[str, Any]] = []
    for (model, resolution), members in groups.items():
        g_status = Counter(m.get("status") for m in members)
        gen = [m.get("generation_time_seconds") for m in members if m.get("status") == "done"]
        per_model.append(
            {
                "model_used": model,
                "resolution": resolution,
                "count": len(members),
                "done": g_status.get("done", 0),
                "failed": g_status.get("failed", 0),
                "success_rate": _rate(g_status.get("done", 0), g_status.get("failed", 0)),
                "generation_p50_seconds": percentile(gen, 50),
                "generation_p95_seconds": percentile(gen, 95),
                "queue_wait_mean_seconds": _mean(m.get("queue_wait_seconds") for m in members),
                "peak_vram_max_mb": _max(m.get("peak_vram_usage_mb") for m in members),
                "failure_categories": dict(
                    Counter(
                        m.get("error_category") or "unknown" for m in members if m.get("status") == "failed"
                    ).most_common()
                ),
            }
        )
    per_model.sort(key=lambda g: (-g["count"], g["model_used"], g["resolution"]))

    failure_categories = dict(Counter(r.get("error_category") or "unknown" for r in failed_rows).most_common())
    # Last errors of every job, including those a retry then saved (a done job keeps its last error).
    errors_seen = dict(Counter(r["error_category"] for r in rows if r.get("error_category")).most_common())
    waits = [r.get("queue_wait_seconds") for r in rows]
    result: dict[str, Any] = {
        "window_hours": hours,
        "since": now - hours * 3600 if hours is not None and now is not None else None,
        "now": now,
        "total": len(rows),
        "done": done,
        "failed": failed,
        "queued": status.get("queued", 0),
        "running": status.get("running", 0),
        "success_rate": _rate(done, failed),
        "generation_p50_seconds": percentile((r.get("generation_time_seconds") for r in done_rows), 50),
        "generation_p95_seconds": percentile((r.get("generation_time_seconds") for r in done_rows), 95),
        "queue_wait_p50_seconds": percentile(waits, 50),
        "queue_wait_p95_seconds": percentile(waits, 95),
        "degraded": sum(1 for r in done_rows if r.get("degradations")),
        "per_model": per_model,
        "failure_categories": failure_categories,
        "errors_seen": errors_seen,
    }
    result["recommendations"] = _recommendations(result, rows, success_rate_target, queue_wait_p95_limit_seconds)
    return result


def _recommendations(
    result: dict[str, Any], rows: Sequence[dict[str, Any]], success_rate_target: float, queue_wait_limit: float
) -> list[str]:
    recs: list[str] = []
    for g in result["per_model"]:
        oom = g["failure_categories"].get("out_of_memory", 0)
        if oom:
            recs.append(
                f"out_of_memory failed {oom} of {_jobs(g['count'])} on {g['model_used']} at "
                f"{g['resolution']}: allow `fallback: [lower_resolution]` or use a GPU with more memory"
            )
        vram = g["failure_categories"].get("insufficient_vram", 0)
        if vram:
            recs.append(
                f"insufficient_vram failed {vram} of {_jobs(g['count'])} on {g['model_used']} at "
                f"{g['resolution']}: run them on a CUDA GPU with more free memory, or use a smaller "
                f"model (wan2.2-ti2v-5b)"
            )
    p95 = result["queue_wait_p95_seconds"]
    if p95 is not None and p95 > queue_wait_limit:
        recs.append(f"p95 queue wait is {_minutes(p95)}: add a GPU/worker or lower priorities")
    seen = result["errors_seen"]
    if seen.get("worker_crashed"):
        recs.append(
            f"worker_crashed on {_jobs(seen['worker_crashed'])}: check dmesg for the OOM killer "
            f"(host memory) or a GPU driver error"
        )
    if seen.get("timeout"):
        recs.append(
            f"timeout on {_jobs(seen['timeout'])}: raise worker.stall_timeout_seconds if the model "
            f"legitimately takes that long per step"
        )
    if seen.get("disk_full"):
        recs.append(f"disk_full on {_jobs(seen['disk_full'])}: free space on the outbox / spool filesystem")
    missing = Counter(
        r.get("model_used") or "?"
        for r in rows
        if r.get("error_category") == "model_not_found" and r.get("status") == "failed"
    )
    for model, n in missing.most_common():
        recs.append(f"model_not_found on {_jobs(n)} for {model}: download with `hf download {_download_hint(model)}`")
    if result["degraded"]:
        recs.append(
            f"{_jobs(result['degraded'])} finished degraded (lower resolution, fewer frames or a smaller "
            f"model) to fit memory: use a GPU with more memory to get what was asked for"
        )
    rate = result["success_rate"]
    if rate is not None and rate < success_rate_target:
        recs.append(
            f"success rate below {success_rate_target:.0%}: {rate:.0%} ({result['done']} of "
            f"{result['done'] + result['failed']} finished jobs); see the failure categories"
        )
    return recs


# ---- rendering ----------------------------------------------------------------------------------

STATUS_STYLE = {"done": "green", "failed": "red", "running": "cyan", "queued": "yellow"}


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%m-%d %H:%M") if ts is not None else "-"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f}m" if s >= 600 else f"{s:.1f}s"


def _fmt_mb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:,.0f}"


def _fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def render_tasks(rows: Sequence[dict[str, Any]]) -> Table:
    """The ``wan-daemon tasks`` table: one line per job, in the order given (History.tasks: newest first).
    Fits 120 columns; the full error message and paths are in the rows themselves."""
    table = Table(title="wan-daemon tasks", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    table.add_column("id", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("size", no_wrap=True)
    table.add_column("frames", justify="right", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("when", no_wrap=True)
    table.add_column("gen", justify="right", no_wrap=True)
    table.add_column("wait", justify="right", no_wrap=True)
    table.add_column("VRAM MB", justify="right", no_wrap=True)
    table.add_column("result", overflow="fold")
    for r in rows:
        state = r.get("status") or "?"
        if state == "failed":
            result = Text(r.get("error_category") or "unknown", style="red")
        elif state == "done" and r.get("output_video"):
            result = Text(PurePath(r["output_video"]).name)
        elif r.get("error_category"):  # queued again after a failed attempt
            result = Text(f"retry: {r['error_category']}", style="yellow")
        else:
            result = Text("")
        when = r.get("finished_at") or r.get("started_at") or r.get("queued_at")
        table.add_row(
            r.get("id") or "?",
            Text(state, style=STATUS_STYLE.get(state, "")),
            r.get("model_used") or "-",
            r.get("resolution") or "-",
            _dash(r.get("frames")),
            _dash(r.get("attempts")),
            _fmt_time(when),
            _fmt_seconds(r.get("generation_time_seconds")),
            _fmt_seconds(r.get("queue_wait_seconds")),
            _fmt_mb(r.get("peak_vram_usage_mb")),
            result,
        )
    if not rows:
        table.caption = "no jobs recorded"
    return table


def render_analysis(result: dict[str, Any]) -> list[RenderableType]:
    """The ``wan-daemon analysis`` report: a summary, the per-model table, failure categories and the
    recommendations, as rich renderables to print in order."""
    out: list[RenderableType] = []
    window = f"last {result['window_hours']:g} h" if result.get("window_hours") is not None else "all jobs"
    if not result["total"]:
        out.append(Text(f"No jobs in the {window}.", style="bold"))
        return out
    summary = Table(title=f"wan-daemon analysis ({window})", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row(
        "jobs",
        f"{result['total']} ({result['done']} done, {result['failed']} failed, "
        f"{result['running']} running, {result['queued']} queued)",
    )
    summary.add_row("success rate", _fmt_rate(result["success_rate"]))
    summary.add_row(
        "generation p50 / p95",
        f"{_fmt_seconds(result['generation_p50_seconds'])} / {_fmt_seconds(result['generation_p95_seconds'])}",
    )
    summary.add_row(
        "queue wait p50 / p95",
        f"{_fmt_seconds(result['queue_wait_p50_seconds'])} / {_fmt_seconds(result['queue_wait_p95_seconds'])}",
    )
    out.append(summary)

    per = Table(title="per model and resolution")
    for name, justify in (
        ("model", "left"),
        ("size", "left"),
        ("jobs", "right"),
        ("done", "right"),
        ("failed", "right"),
        ("success", "right"),
        ("gen p50", "right"),
        ("gen p95", "right"),
        ("mean wait", "right"),
        ("max VRAM MB", "right"),
    ):
        per.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for g in result["per_model"]:
        per.add_row(
            g["model_used"],
            g["resolution"],
            str(g["count"]),
            str(g["done"]),
            str(g["failed"]),
            _fmt_rate(g["success_rate"]),
            _fmt_seconds(g["generation_p50_seconds"]),
            _fmt_seconds(g["generation_p95_seconds"]),
            _fmt_seconds(g["queue_wait_mean_seconds"]),
            _fmt_mb(g["peak_vram_max_mb"]),
        )
    out.append(per)

    if result["failure_categories"]:
        cats = Table(title="failures by category")
        cats.add_column("category", no_wrap=True)
        cats.add_column("jobs", justify="right")
        for category, n in result["failure_categories"].items():
            cats.add_row(Text(category, style="red"), str(n))
        out.append(cats)

    if result["recommendations"]:
        out.append(Text("Recommendations", style="bold"))
        for rec in result["recommendations"]:
            out.append(Text(f"- {rec}"))
    else:
        out.append(Text("No recommendations: nothing in the history needs attention.", style="green"))
    return out


# ---- plain text (stdout is not a terminal): tab-separated, nothing cut ------------------------------------

TASK_COLUMNS = (
    "id", "status", "model", "resolution", "frames", "attempts", "when", "generation_seconds",
    "queue_wait_seconds", "peak_vram_mb", "result", "file",
)  # fmt: skip


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds") if ts is not None else None


def print_tasks_plain(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    """The ``tasks`` rows as a tab-separated table: the whole id, and the whole output path (a done job), the
    error category (a failed one) or ``retry: <category>`` (queued again after a failed attempt)."""
    table = []
    for r in rows:
        state = r.get("status")
        if state == "failed":
            result = r.get("error_category") or "unknown"
        elif state == "done":
            result = r.get("output_video")
        else:
            result = f"retry: {r['error_category']}" if r.get("error_category") else None
        table.append(
            [
                r.get("id"),
                state,
                r.get("model_used"),
                r.get("resolution"),
                r.get("frames"),
                r.get("attempts"),
                _iso(r.get("finished_at") or r.get("started_at") or r.get("queued_at")),
                r.get("generation_time_seconds"),
                r.get("queue_wait_seconds"),
                r.get("peak_vram_usage_mb"),
                result,
                r.get("file"),
            ]
        )
    print_table(TASK_COLUMNS, table, out=out, tty=False)


def print_analysis_plain(result: dict[str, Any], out: TextIO) -> None:
    """The ``analysis`` report as tab-separated tables, each under a ``# wan-daemon analysis: <part>`` line."""
    window = f"last {result['window_hours']:g} h" if result.get("window_hours") is not None else "all jobs"
    keys = ("total", "done", "failed", "running", "queued", "success_rate", "generation_p50_seconds",
            "generation_p95_seconds", "queue_wait_p50_seconds", "queue_wait_p95_seconds", "degraded")  # fmt: skip
    per_model = ("model_used", "resolution", "count", "done", "failed", "success_rate", "generation_p50_seconds",
                 "generation_p95_seconds", "queue_wait_mean_seconds", "peak_vram_max_mb")  # fmt: skip
    parts = [
        (f"summary ({window})", ("metric", "value"), [[k, result.get(k)] for k in keys]),
        ("per model and resolution", per_model, [[g.get(k) for k in per_model] for g in result["per_model"]]),
        ("failures by category", ("category", "jobs"), [[c, n] for c, n in result["failure_categories"].items()]),
        ("recommendations", ("recommendation",), [[rec] for rec in result["recommendations"]]),
    ]
    for n, (title, columns, rows) in enumerate(parts):
        out.write(("\n" if n else "") + f"# wan-daemon analysis: {title}\n")
        print_table(columns, rows, out=out, tty=False)
