"""``wan-daemon status JOB_ID``: one job's whole story, whether it is queued, running, done or failed, from any
host that sees the state folder and the outbox.

Where it is looked for, in order:

1. the spools of every daemon on the state folder (daemon.ops.spool_view.find_active): a waiting, queued or
   running job, with its progress from its daemon's health file when it runs;
2. the outbox: its sidecar (the name is the job's basename, which may differ from its id: the history's
   ``output_sidecar`` first, then ``<outbox>/<id>.json`` when its ``id`` matches, then the failure record
   ``<outbox>/failed/<id>.json``, and last a scan of the sidecars for that id);
3. the inbox's job files (daemon.ops.spool_view.inbox_jobs): a job submitted that no daemon has taken in yet
   (none is running, or it is about to), ``state: inbox``.

Added from wherever they are: this host's history (every row of the id: an earlier series under another
intake token, e.g. a failed run before a retry; the operators' requests on it) and the failure records a
``retry`` kept aside (``<outbox>/failed/retried/<id>.*.json``). An id that is not a valid job id is never
looked up as a path. ``--json``: ``id, state, source`` (spool | outbox | inbox), ``instance, token, priority, model,
file, attempts, worker, not_before, errors`` ([{attempt, category, message, at}]), ``last_error, degradations,
events`` ([{state, at, note}]), ``outputs`` (video, sidecar, poster | failure; ``will_be`` while active),
``timings, progress`` (running: worker, phase, step, total, fraction), ``queue`` (while active: ``position`` of
``of`` in its daemon's order, effective_priority, est_start, est_finish, as ``queue`` shows them), ``earlier``
(history rows under other tokens), ``retried`` (kept failure records), ``operations``. Times are ISO 8601.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from daemon.ops import spool_view
from daemon.ops.outbox_rows import find_sidecar, read_record, retried_archives, scan_sidecars
from daemon.runtime.health import iso

EXIT_OK, EXIT_FAIL = 0, 1


def _when(value: Any) -> str | None:
    """A time as text: epoch seconds (records, history) as local ISO 8601; text (sidecars) as written."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return iso(float(value))
    return str(value) if value else None


# ---- sources ------------------------------------------------------------------------------------------------


def _history(settings: Any, job_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """This host's history rows of ``job_id`` (oldest first) and the operators' requests on it (newest first)."""
    path = Path(settings.history.path)
    if not path.exists():  # never created by a reader
        return [], []
    from daemon.ops.history import History, HistoryError

    try:
        with History(path) as history:
            rows, operations = history.rows_for_id(job_id), history.operations(job_id=job_id)
    except (HistoryError, sqlite3.Error, OSError) as exc:
        print(f"wan-daemon: the history {path} cannot be read: {exc}", file=sys.stderr)
        return [], []
    return rows, operations


def _progress(settings: Any, instance: str, job_id: str) -> dict[str, Any] | None:
    from daemon.ops.queue_view import read_healths

    health = read_healths(settings.health_path.parent).get(instance) or {}
    for run in health.get("running_jobs") or []:
        if isinstance(run, dict) and run.get("id") == job_id:
            step, total = run.get("step"), run.get("total")
            fraction = step / total if isinstance(step, int) and isinstance(total, int) and total else None
            keys = ("worker", "phase", "step", "total", "attempt", "model", "started_at")
            return {**{k: run.get(k) for k in keys}, "fraction": fraction}
    return None


# ---- the story ----------------------------------------------------------------------------------------------


def _errors(items: Any) -> list[dict[str, Any]]:
    """Each attempt's error as ``{attempt, category, message, at}``, from a record's ``errors`` or a sidecar's
    ``earlier_attempts``."""
    return [
        {
            "attempt": e.get("attempt"),
            "category": e.get("error_category") or e.get("category"),
            "message": e.get("message"),
            "at": _when(e.get("at")),
        }
        for e in items or []
        if isinstance(e, dict)
    ]


def _events_from(row: dict[str, Any] | None, finished: Any, final: str) -> list[dict[str, Any]]:
    """A finished job's events, rebuilt from its times (its record, which held them, is gone with its spool)."""
    row = row or {}
    events = [
        {"state": "queued", "at": _when(row.get("queued_at")), "note": None},
        {"state": "running", "at": _when(row.get("started_at")), "note": None},
        {"state": final, "at": _when(finished or row.get("finished_at")), "note": None},
    ]
    return [e for e in events if e["at"]]


def _from_record(raw: dict[str, Any], job: spool_view.ActiveJob, settings: Any) -> dict[str, Any]:
    params = raw.get("params") or {}
    started, queued = raw.get("started_at"), raw.get("queued_at")
    outbox = Path(settings.paths.outbox)
    return {
        "state": raw.get("state"),
        "source": "spool",
        "instance": job.instance,
        "record": job.path,
        "token": raw.get("token"),
        "priority": job.priority,
        "model": job.model,
        "file": job.source_name,
        "attempts": job.attempts,
        "worker": job.worker,
        "not_before": _when(job.not_before) if job.not_before else None,
        "errors": _errors(raw.get("errors")),
        "last_error": raw.get("last_error"),
        "degradations": raw.get("degradations") or [],
        "events": [
            {"state": e.get("state"), "at": _when(e.get("at")), "note": e.get("note")}
            for e in raw.get("events") or []
            if isinstance(e, dict)
        ],
        "outputs": {
            **(raw.get("outputs") or {}),
            "will_be": {
                "video": str(outbox / f"{params.get('basename') or job.id}.mp4"),
                "sidecar": str(outbox / f"{params.get('basename') or job.id}.json"),
            },
        },
        "timings": {
            "received_at": _when(raw.get("received_at")),
            "queued_at": _when(queued),
            "started_at": _when(started),
            "finished_at": _when(raw.get("finished_at")),
            "queue_wait_seconds": round(started - queued, 3) if started and queued else None,
            "generation_seconds": None,
        },
        "progress": _progress(settings, job.instance, job.id) if raw.get("state") == "running" else None,
    }


def _place_in_queue(settings: Any, job: spool_view.ActiveJob, now: float) -> dict[str, Any] | None:
    """Where ``queue`` places the job in its daemon's order (position, effective priority, estimated start and
    finish): the same listing, so the two never disagree."""
    from daemon.ops.queue_view import queue_rows

    rows = [r for r in queue_rows(settings, now=now) if r["instance"] == job.instance]
    row = next((r for r in rows if r["id"] == job.id), None)
    if row is None:
        return None
    keys = ("position", "effective_priority", "est_start", "est_start_in", "est_finish", "est_finish_in")
    return {"of": len(rows), **{k: row.get(k) for k in keys}}


def _from_sidecar(path: Path, doc: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    times = doc.get("timestamps") or {}
    video = doc.get("video") or {}
    poster = doc.get("poster")
    return {
        "state": "done",
        "source": "outbox",
        "instance": doc.get("instance") or (row or {}).get("instance"),
        "host": doc.get("host"),
        "token": doc.get("job_token"),
        "priority": (doc.get("spec") or {}).get("priority", 0),
        "model": (doc.get("model_used") or {}).get("name"),
        "file": doc.get("file"),
        "attempts": doc.get("attempts"),
        "worker": doc.get("worker"),
        "not_before": None,
        "errors": _errors(doc.get("earlier_attempts")),
        "last_error": None,
        "degradations": doc.get("degradations") or [],
        "events": [
            {"state": s, "at": times.get(k), "note": None}
            for s, k in (("received", "received_at"), ("queued", "queued_at"), ("running", "started_at"))
            if times.get(k)
        ]
        + [{"state": "done", "at": times.get("finished_at"), "note": None}],
        "outputs": {
            "video": str(path.with_name(video.get("file") or f"{path.stem}.mp4")),
            "sidecar": str(path),
            **({"poster": str(path.with_name(poster))} if isinstance(poster, str) else {}),
        },
        "timings": {
            "received_at": times.get("received_at"),
            "queued_at": times.get("queued_at"),
            "started_at": times.get("started_at"),
            "finished_at": times.get("finished_at"),
            "queue_wait_seconds": (doc.get("timings") or {}).get("queue_wait"),
            "generation_seconds": doc.get("generation_time_seconds"),
        },
        "progress": None,
    }


def _from_failure(path: Path, doc: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    row = row or {}
    errors = _errors(doc.get("errors"))
    return {
        "state": "failed",
        "source": "outbox",
        "instance": doc.get("instance") or row.get("instance"),
        "host": doc.get("host"),
        "token": row.get("token"),
        "priority": (doc.get("spec") or {}).get("priority", 0),
        "model": (doc.get("model") or {}).get("name") or row.get("model_used"),
        "file": doc.get("file"),
        "attempts": doc.get("attempts"),
        "worker": None,
        "not_before": None,
        "errors": errors,
        "last_error": {k: doc.get(k) for k in ("error_category", "message", "recovery_suggestions", "decision")},
        "degradations": row.get("degradations") or [],
        "events": _events_from(row, doc.get("failed_at"), "failed"),
        "outputs": {"failure": str(path)},
        "timings": {
            "received_at": None,
            "queued_at": _when(row.get("queued_at")),
            "started_at": _when(row.get("started_at")),
            "finished_at": doc.get("failed_at"),
            "queue_wait_seconds": row.get("queue_wait_seconds"),
            "generation_seconds": None,
        },
        "progress": None,
    }


def _from_inbox(settings: Any, job_id: str) -> dict[str, Any] | None:
    """A job still in an inbox file (no daemon has taken it in: none runs, or it is about to)."""
    limit = settings.limits.max_job_file_bytes
    job = next((j for j in spool_view.inbox_jobs(settings.paths.inbox, max_bytes=limit).jobs if j.id == job_id), None)
    if job is None:
        return None
    out = Path(settings.paths.outbox) / job.basename
    return {
        "state": "inbox",
        "source": "inbox",
        "instance": None,
        "file": str(Path(settings.paths.inbox) / job.file),
        "note": "not taken in by a daemon yet (is one running on this inbox? `wan-daemon status`)",
        "outputs": {"will_be": {"video": f"{out}.mp4", "sidecar": f"{out}.json"}},
    }


def _earlier(rows: list[dict[str, Any]], token: str | None) -> list[dict[str, Any]]:
    keys = ("token", "status", "attempts", "model_used", "error_category", "error_message", "instance")
    return [
        {
            **{k: r.get(k) for k in keys},
            "queued_at": _when(r.get("queued_at")),
            "finished_at": _when(r.get("finished_at")),
            "output_video": r.get("output_video"),
            "failure_record": r.get("failure_record"),
        }
        for r in rows
        if r.get("token") != token
    ]


def job_story(settings: Any, job_id: str, *, now: float | None = None) -> dict[str, Any] | None:
    """The whole story of ``job_id`` (module doc), or None when it is nowhere (or not a valid job id). ``now``: the
    time its place in the queue is estimated at."""
    if not spool_view.is_job_id(job_id):
        return None
    outbox = Path(settings.paths.outbox)
    job = spool_view.find_active(settings.paths.state, job_id)
    rows, operations = _history(settings, job_id)
    story: dict[str, Any] | None = None
    if job is not None:
        story = {**_from_record(job.raw, job, settings), "queue": _place_in_queue(settings, job, now or time.time())}
    elif (found := find_sidecar(outbox, job_id, rows)) is not None:
        story = _from_sidecar(*found, _row_of(rows, found[1].get("job_token")))
    elif (failure := read_record(outbox / "failed" / f"{job_id}.json")) is not None and failure.get("id") == job_id:
        failed_rows = [r for r in rows if r.get("status") == "failed"]
        story = _from_failure(outbox / "failed" / f"{job_id}.json", failure, failed_rows[-1] if failed_rows else None)
    elif (found := scan_sidecars(outbox, job_id)) is not None:
        story = _from_sidecar(*found, _row_of(rows, found[1].get("job_token")))
    else:
        story = _from_inbox(settings, job_id)
    if story is None:
        return None
    return {
        "id": job_id,
        **story,
        "earlier": _earlier(rows, story.get("token")),
        "retried": retried_archives(outbox, job_id),
        "operations": [{**op, "at": _when(op.get("at"))} for op in operations],
    }


def _row_of(rows: list[dict[str, Any]], token: Any) -> dict[str, Any] | None:
    return next((r for r in rows if token and r.get("token") == token), None)


# ---- output -------------------------------------------------------------------------------------------------


def format_story(story: dict[str, Any]) -> str:
    """The story as a readable block of lines."""
    lines = [f"job {story['id']}: {story['state']}" + (f" (daemon {story['instance']})" if story["instance"] else "")]

    def field(name: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"  {name:<12} {value}")

    field("file", story.get("file"))
    field("note", story.get("note"))
    field("model", story.get("model"))
    field("priority", story.get("priority"))
    field("attempts", story.get("attempts"))
    field("worker", story.get("worker"))
    field("not before", story.get("not_before"))
    if q := story.get("queue"):
        field("position", f"{q['position']} of {q['of']} (effective priority {q['effective_priority']})")
        field("est. start", q["est_start"])
        field("est. finish", q["est_finish"])
    if p := story.get("progress"):
        pct = f" ({p['fraction']:.0%})" if p.get("fraction") is not None else ""
        field("progress", f"{p.get('phase') or ''} step {p.get('step')}/{p.get('total')}{pct} on {p.get('worker')}")
    t = story.get("timings") or {}
    for key in ("received_at", "queued_at", "started_at", "finished_at"):
        field(key.removesuffix("_at"), t.get(key))
    field("queue wait", f"{t['queue_wait_seconds']:.1f}s" if t.get("queue_wait_seconds") is not None else None)
    field("generation", f"{t['generation_seconds']:.1f}s" if t.get("generation_seconds") is not None else None)
    outputs = dict(story.get("outputs") or {})
    will_be = outputs.pop("will_be", None)
    for key, path in outputs.items():
        field(key, path)
    if will_be:
        field("will write", f"{will_be['video']} + {Path(will_be['sidecar']).name}")
    if err := story.get("last_error"):
        field("error", f"{err.get('error_category')}: {err.get('message')}")
        for hint in err.get("recovery_suggestions") or []:
            lines.append(f"  {'':<12} - {hint}")
    sections = (
        (
            "errors",
            story.get("errors"),
            lambda e: f"attempt {e['attempt']} {e['category']} at {e['at']}: {e['message']}",
        ),
        ("degradations", story.get("degradations"), lambda d: json.dumps(d, default=str)),
        ("events", story.get("events"), lambda e: f"{e['at']}  {e['state']}" + (f"  {e['note']}" if e["note"] else "")),
        (
            "earlier runs (history)",
            story.get("earlier"),
            lambda r: (
                f"{r['queued_at'] or '?'}  {r['status']}  token {r['token']}"
                + (f"  {r['error_category']}: {r['error_message']}" if r.get("error_category") else "")
            ),
        ),
        (
            "failure records kept by retry",
            story.get("retried"),
            lambda r: f"{r['failed_at']}  {r['category']}: {r['message']}  ({r['path']})",
        ),
        (
            "operations",
            story.get("operations"),
            lambda o: f"{o.get('at')}  {o.get('op')} by {o.get('by')}  {json.dumps(o.get('detail') or {})}",
        ),
    )
    for title, items, line in sections:
        if items:
            lines.append(f"  {title}:")
            lines += [f"    {line(item)}" for item in items]
    return "\n".join(lines)


def job_status_command(args: argparse.Namespace, settings: Any) -> int:
    """``wan-daemon status JOB_ID [--json]``: exit 0 with the story, 1 when the job is nowhere."""
    story = job_story(settings, args.job_id)
    if story is None:
        where = f"{settings.paths.state}, {settings.paths.outbox}"
        if Path(settings.history.path).exists():
            where += f" or {settings.history.path}"
        print(f"no job {args.job_id!r} queued, running, done or failed in {where}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(story, indent=2, default=str) if getattr(args, "json", False) else format_story(story))
    return EXIT_OK
