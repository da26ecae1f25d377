"""``wan-daemon queue``: every waiting and running job of every daemon on this state folder, in the order each
daemon's scheduler will take them, with when each should start and finish.

Per daemon (its ``instance``; ``position`` counts within it, so with one daemon it is the global order):

1. its running jobs (oldest first), with their worker, step/total, phase and progress from its health file;
2. its ready queued jobs, in :func:`daemon.ranking.rank`'s order: effective priority with aging
   (``scheduler.aging_bound_seconds``, the span of the priorities present), then intake order. The ranking's
   own functions are called on the spool's records, so this order cannot drift from the scheduler's;
3. its queued jobs waiting out a ``not_before`` (a retry's backoff, a scheduled job), by ``not_before``;
4. its jobs waiting for their model's download.

What the scheduler adds at dispatch, and this list cannot know, is placement: within one priority bucket a job
whose model is already warm on a free worker goes first, and a GPU takes only the jobs whose memory fits it.

Estimates (``est_start``, ``est_finish``): the daemon's workers (those of its health file that are not parked)
take its jobs in this order; a job lasts the median ``generation_time_seconds`` of the recent done jobs of its
model in this host's history; a running job lasts what its progress says (elapsed / step * total), else that
median less what it has run. A model without a timing gives no finish, nor a start to the jobs that would
follow on that worker; a paused daemon (``wan-daemon pause``, or a full disk), one not reporting (no health
file, or a stale one) gives none, with a ``note`` saying why.

``--json``: ``{"jobs": [...], "daemons": [...], "inbox_pending": N, "model_timings": {model: seconds}}``; a job is
``position, id, state, priority, effective_priority, model, instance, worker, waited`` (seconds in the queue:
until now, or until it started), ``step, total, phase, progress`` (0..1), ``attempts, not_before, est_start,
est_finish`` (ISO 8601), ``est_start_in, est_finish_in`` (seconds from now), ``note, file, seq``; a daemon is
``instance, host, state, health_age_seconds, workers`` ({name: state}), ``active_workers, paused,
operator_pause`` and its ``waiting_for_model, queued, running`` counts.

Cost: one listing and one JSON parse per record (daemon.ops.spool_view), one ranking per daemon, one history
query: ten thousand queued jobs are listed in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from daemon import control
from daemon.jobs import JobRecord, JobState
from daemon.ops import spool_view, tables
from daemon.ops.spool_view import ActiveJob
from daemon.ranking import effective_priority, rank, waited
from daemon.runtime.health import health_age, iso

EXIT_OK, EXIT_FAIL = 0, 1
STALE_SECONDS = 30.0  # a health file older than this: the daemon is not reporting (monitor's "stale" too)
TIMING_SAMPLE = 500  # recent done jobs of the history read for the per-model medians
IDLE_WORKER_STATES = frozenset({"parked", "stopped"})  # workers that take no job until someone acts


# ---- inputs -------------------------------------------------------------------------------------------------


def read_healths(health_dir: Path) -> dict[str, dict[str, Any]]:
    """Every daemon's health document in ``health_dir``, by its instance id."""
    out: dict[str, dict[str, Any]] = {}
    try:
        paths = sorted(p for p in Path(health_dir).glob("*.json") if not p.name.startswith("."))
    except OSError:
        return out
    for path in paths:
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            out[str(doc.get("instance") or path.stem)] = doc
    return out


def model_timings(history_path: Path, sample: int = TIMING_SAMPLE) -> dict[str, float]:
    """Median ``generation_time_seconds`` per model of the last ``sample`` done jobs in the history at
    ``history_path`` ({} when there is none: the view never creates one)."""
    if not Path(history_path).exists():
        return {}
    from daemon.ops.history import History, HistoryError

    try:
        with History(history_path) as history:
            rows = history.tasks(last=sample, status="done")
    except (HistoryError, OSError, ValueError) as exc:
        print(f"wan-daemon: no timings from the history {history_path}: {exc}", file=sys.stderr)
        return {}
    seconds: dict[str, list[float]] = {}
    for row in rows:
        value = row.get("generation_time_seconds")
        if row.get("model_used") and isinstance(value, int | float) and value > 0:
            seconds.setdefault(str(row["model_used"]), []).append(float(value))
    return {model: statistics.median(values) for model, values in seconds.items()}


def inbox_pending(inbox: Path) -> int:
    """Job files in the inbox no daemon has taken in yet."""
    return len(spool_view.inbox_job_files(inbox))


# ---- order --------------------------------------------------------------------------------------------------


def daemon_order(
    jobs: Iterable[ActiveJob], now: float, aging_bound_seconds: float | None
) -> list[tuple[ActiveJob, float | None]]:
    """One daemon's jobs in its scheduler's order (module doc), each with its effective priority (None for a job
    that is not ranked: running, waiting out its ``not_before``, or for its model)."""
    running, queued, waiting = [], [], []
    for job in jobs:
        if job.state is JobState.RUNNING:
            running.append(job)
        elif job.state is JobState.QUEUED:
            queued.append(job)
        else:
            waiting.append(job)
    # daemon.ranking reads only the fields ActiveJob carries under the same names (state, priority, seq,
    # queued_at, received_at, not_before): the scheduler's own functions rank the spool's records.
    ready = cast("list[ActiveJob]", rank(cast("list[JobRecord]", queued), now, aging_bound_seconds))
    span = max(j.priority for j in ready) - min(j.priority for j in ready) if ready else 0
    later = sorted((j for j in queued if j.not_before > now), key=lambda j: (j.not_before, j.seq))
    unranked: list[tuple[ActiveJob, float | None]] = [(j, None) for j in later + sorted(waiting, key=lambda j: j.seq)]
    return (
        [(j, None) for j in sorted(running, key=lambda j: (j.started_at or 0.0, j.seq))]
        + [(j, effective_priority(cast(JobRecord, j), now, aging_bound_seconds, span=span)) for j in ready]
        + unranked
    )


# ---- estimates ----------------------------------------------------------------------------------------------


def _running_left(row: dict[str, Any], median: float | None, now: float) -> float | None:
    """Seconds a running job has left: by its progress once a step is done, else its model's median."""
    started = row.get("_started")
    if started is None:
        return median
    elapsed = max(0.0, now - started)
    step, total = row.get("step"), row.get("total")
    if isinstance(step, int) and isinstance(total, int) and total > 0 and 0 < step <= total:
        return elapsed / step * (total - step)
    return None if median is None else max(0.0, median - elapsed)


def estimate(
    rows: list[dict[str, Any]],
    workers: int,
    timings: dict[str, float],
    now: float,
    *,
    hold: str | None,
    keep_running: bool,
) -> None:
    """Fill ``est_start``/``est_finish`` (epoch seconds, None when unknown) of one daemon's ``rows`` (in its
    order): ``workers`` take them in turn. ``hold``: why nothing new starts (the note of every job not running);
    ``keep_running``: whether running jobs still finish meanwhile (a draining pause)."""
    free: list[float] = []
    for row in rows:
        if row["state"] != JobState.RUNNING.value:
            continue
        left = _running_left(row, timings.get(row["model"] or ""), now)
        finish = now + left if left is not None else math.inf
        row["est_start"] = row.get("_started")
        row["est_finish"] = finish if (hold is None or keep_running) and finish < math.inf else None
        if hold is not None and not keep_running:
            row["note"] = hold
        free.append(finish)
    free.sort()
    free = free[:workers] + [now] * max(0, workers - len(free))
    heapq.heapify(free)
    for row in rows:
        if row["state"] == JobState.RUNNING.value:
            continue
        if hold is not None:
            row["note"] = "; ".join(n for n in (hold, row["note"]) if n)
            continue
        if row["state"] == JobState.WAITING_FOR_MODEL.value:
            row["note"] = "waiting for its model's download"
            continue
        at = heapq.heappop(free)
        if at == math.inf:
            heapq.heappush(free, at)
            row["note"] = row["note"] or "after a job of unknown length"
            continue
        start = max(at, now, row["_not_before"])
        median = timings.get(row["model"] or "")
        row["est_start"] = start
        row["est_finish"] = start + median if median is not None else None
        if median is None:
            row["note"] = row["note"] or f"no timing for {row['model']} in this host's history"
        heapq.heappush(free, start + median if median is not None else math.inf)


# ---- the view -----------------------------------------------------------------------------------------------


def _daemon(instance: str, health: dict[str, Any] | None, pause: control.PauseRequest | None, now: float) -> dict:
    """One daemon's summary, and why its estimates are held (``hold``) if they are."""
    workers = (health or {}).get("workers") or {}
    states = {name: (w or {}).get("state") for name, w in workers.items()}
    active = sum(1 for s in states.values() if s not in IDLE_WORKER_STATES)
    if health and not workers and (health.get("device") or {}).get("state") not in (None, *IDLE_WORKER_STATES):
        active = 1  # an older daemon: one worker, reported as "device"
    operator = (health or {}).get("operator_pause") or (pause.to_dict() if pause else None)
    age = health_age(health, now) if health else None
    if health is None:
        hold = "not reporting (no health file)"
    elif age is not None and age > STALE_SECONDS:
        hold = f"not reporting (health file {age:.0f}s old)"
    elif health.get("state") == "stopped":
        hold = "stopped"
    elif operator or health.get("paused"):
        hold = "paused"
    elif not active:
        hold = "no worker (all parked or stopped)"
    else:
        hold = None
    return {
        "instance": instance,
        "host": (health or {}).get("host"),
        "state": (health or {}).get("state"),
        "health_age_seconds": round(age, 1) if age is not None else None,
        "workers": states,
        "active_workers": active,
        "paused": (health or {}).get("paused") or (pause.describe() if pause else None),
        "operator_pause": operator,
        "hold": hold,
        "keep_running": hold == "paused" and (operator or {}).get("mode") != "now",
    }


def _row(job: ActiveJob, effective: float | None, run: dict[str, Any] | None, now: float) -> dict[str, Any]:
    step = run.get("step") if run else None
    total = run.get("total") if run else None
    started = (run or {}).get("started_at") or job.started_at
    in_queue = waited(cast(JobRecord, job), started if job.state is JobState.RUNNING and started else now)
    not_before = job.not_before if job.state is JobState.QUEUED and job.not_before > now else None
    return {
        "position": 0,
        "id": job.id,
        "state": job.state.value if job.state else None,
        "priority": job.priority,
        "effective_priority": round(effective, 3) if effective is not None else None,
        "model": job.model,
        "instance": job.instance,
        "worker": (run or {}).get("worker") or (job.worker if job.state is JobState.RUNNING else None),
        "waited": round(in_queue, 1),
        "step": step,
        "total": total,
        "phase": (run or {}).get("phase"),
        "progress": round(step / total, 4) if isinstance(step, int) and isinstance(total, int) and total else None,
        "attempts": job.attempts,
        "not_before": iso(not_before),
        "est_start": None,
        "est_finish": None,
        "note": f"not before {iso(not_before)}" if not_before else None,
        "file": job.source_name,
        "seq": job.seq,
        "_started": started,
        "_not_before": job.not_before,
    }


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Ten thousand parsed records are a large graph of objects without cycles, which the cyclic collector would
    walk again and again as they are made (a quarter of the listing's time): paused meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def queue_view(settings: Any, *, now: float) -> dict[str, Any]:
    """The whole ``queue --json`` document: ``jobs`` (in order, per daemon), ``daemons``, ``inbox_pending``."""
    with _collector_paused():
        return _view(settings, now)


def _view(settings: Any, now: float) -> dict[str, Any]:
    state_dir = settings.paths.state
    by_daemon: dict[str, list[ActiveJob]] = {}
    for job in spool_view.iter_active(state_dir):
        by_daemon.setdefault(job.instance, []).append(job)
    healths = read_healths(settings.health_path.parent)
    pause = control.read_pause(state_dir)
    timings = model_timings(settings.history.path) if by_daemon else {}
    bound = settings.scheduler.aging_bound_seconds
    jobs_out: list[dict[str, Any]] = []
    daemons: list[dict[str, Any]] = []
    for instance in sorted(set(by_daemon) | set(healths)):
        health = healths.get(instance)
        info = _daemon(instance, health, pause, now)
        running = {str(r.get("id")): r for r in (health or {}).get("running_jobs") or [] if isinstance(r, dict)}
        order = daemon_order(by_daemon.get(instance, []), now, bound)
        rows = [_row(job, effective, running.get(job.id), now) for job, effective in order]
        estimate(
            rows, info["active_workers"], timings, now, hold=info.pop("hold"), keep_running=info.pop("keep_running")
        )
        for position, row in enumerate(rows, 1):
            row["position"] = position
            for key in ("est_start", "est_finish"):
                at = row[key]
                row[f"{key}_in"] = round(at - now, 1) if at is not None else None
                row[key] = iso(at)
            del row["_started"], row["_not_before"]
        counts = {s.value: sum(1 for r in rows if r["state"] == s.value) for s in JobState if s.active}
        daemons.append({**info, **counts})
        jobs_out += rows
    return {
        "jobs": jobs_out,
        "daemons": daemons,
        "inbox_pending": inbox_pending(settings.paths.inbox),
        "model_timings": {model: round(seconds, 1) for model, seconds in sorted(timings.items())},
    }


def queue_rows(settings: Any, *, now: float) -> list[dict[str, Any]]:
    """Every waiting and running job of every daemon on ``settings``' state folder, in order (module doc)."""
    return queue_view(settings, now=now)["jobs"]


# ---- output -------------------------------------------------------------------------------------------------

COLUMNS = (
    "position",
    "id",
    "state",
    "priority",
    "effective",
    "model",
    "instance",
    "worker",
    "waited",
    "progress",
    "est_start",
    "est_finish",
    "file",
    "note",
)


def duration(seconds: float | None) -> str | None:
    """``45s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    if seconds is None:
        return None
    s = int(round(abs(seconds)))
    if s < 60:
        text = f"{s}s"
    elif s < 3600:
        text = f"{s // 60}m{s % 60:02d}s"
    elif s < 86400:
        text = f"{s // 3600}h{s % 3600 // 60:02d}m"
    else:
        text = f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"-{text}" if seconds < 0 else text


def _when(row: dict[str, Any], key: str) -> str | None:
    seconds = row[f"{key}_in"]
    if seconds is None:
        return None
    return f"{duration(-seconds)} ago" if seconds < 0 else ("now" if seconds < 1 else f"in {duration(seconds)}")


def table_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in jobs:
        progress = None
        if r["total"]:
            progress = f"{r['step']}/{r['total']} {r['progress']:.0%}" + (f" {r['phase']}" if r["phase"] else "")
        elif r["phase"]:
            progress = r["phase"]
        effective = r["effective_priority"]
        out.append(
            [
                r["position"],
                r["id"],
                r["state"],
                r["priority"],
                f"{effective:.1f}" if effective is not None else None,
                r["model"],
                r["instance"],
                r["worker"],
                duration(r["waited"]),
                progress,
                _when(r, "est_start"),
                _when(r, "est_finish"),
                r["file"],
                r["note"],
            ]
        )
    return out


def to_json(view: dict[str, Any]) -> str:
    """The document, one job a line (json's C encoder: an indented encoding of ten thousand jobs is the pure-Python
    one, several times slower), the rest indented."""
    jobs = ",\n    ".join(json.dumps(job) for job in view["jobs"])
    rest = json.dumps({k: v for k, v in view.items() if k != "jobs"}, indent=2)
    return '{\n  "jobs": [' + (f"\n    {jobs}\n  " if jobs else "") + "],\n" + rest.removeprefix("{\n") + "\n"


def queue_command(args: argparse.Namespace, settings: Any) -> int:
    """``wan-daemon queue [--json]``: the jobs as a table (aligned on a terminal, tab-separated when piped), or
    one JSON document."""
    view = queue_view(settings, now=time.time())
    if getattr(args, "json", False):
        sys.stdout.write(to_json(view))
        return EXIT_OK
    tables.print_table(COLUMNS, table_rows(view["jobs"]))
    if sys.stdout.isatty():
        for d in view["daemons"]:
            if d["paused"]:
                print(f"{d['instance']}: {d['paused']}")
        if not view["jobs"]:
            print(f"no job queued or running in {settings.paths.state}")
        if view["inbox_pending"]:
            print(f"{view['inbox_pending']} job file(s) in the inbox not yet taken in")
    return EXIT_OK
