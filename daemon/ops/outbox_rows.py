"""``tasks --outbox`` and ``analysis --outbox``: the job history rebuilt from what is in the outbox, the
sidecars of published videos and the records in ``failed/``. A farm of daemons sharing one outbox keeps its
SQLite histories on each host's own disk (daemon.config_sources); this view reads the share instead, so
every daemon's jobs can be listed from any host without sharing a database file.

Rows have the shape of the history's (daemon.ops.history.row_from_record), so the same tables and the same
analysis apply. Only finished jobs are in an outbox; queued and running ones are in the daemons' histories.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.fsutil import TEMP_PREFIX
from daemon.ops.history import resolution_of

# A sidecar or failure record larger than this is not one of ours: skipped, not parsed.
MAX_RECORD_BYTES = 4 << 20


def _epoch(value: Any) -> float | None:
    """RFC 3339 / ISO 8601 text (``+00:00`` or ``+0000``), or epoch seconds, as epoch seconds."""
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    for parse in (datetime.fromisoformat, lambda v: datetime.strptime(v, "%Y-%m-%dT%H:%M:%S%z")):
        try:
            return parse(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None  # removed meanwhile, being written, or not ours
    return data if isinstance(data, dict) else None


def row_from_sidecar(sidecar: dict[str, Any], path: Path) -> dict[str, Any]:
    params = sidecar.get("parameters") or {}
    used = sidecar.get("model_used") or {}
    times = sidecar.get("timestamps") or {}
    timings = sidecar.get("timings") or {}
    device = sidecar.get("device")
    video = sidecar.get("video") or {}
    row: dict[str, Any] = {
        "id": sidecar.get("id"),
        "token": sidecar.get("job_token"),
        "file": sidecar.get("file"),
        "model_used": used.get("name") if isinstance(used, dict) else used,
        "task": params.get("task"),
        "frames": params.get("frames"),
        "steps": params.get("steps"),
        "status": "done",
        "attempts": sidecar.get("attempts"),
        "queued_at": _epoch(times.get("queued_at")),
        "started_at": _epoch(times.get("started_at")),
        "finished_at": _epoch(times.get("finished_at")),
        "generation_time_seconds": sidecar.get("generation_time_seconds"),
        "queue_wait_seconds": timings.get("queue_wait"),
        "peak_vram_usage_mb": sidecar.get("peak_vram_usage_mb"),
        "peak_rss_mb": sidecar.get("peak_rss_mb"),
        "optimizations_applied": sidecar.get("optimizations_applied"),
        "degradations": sidecar.get("degradations"),
        "output_video": str(path.with_name(video.get("file") or f"{path.stem}.mp4")),
        "output_sidecar": str(path),
        "instance": sidecar.get("instance"),
        "device": device.get("type") if isinstance(device, dict) else device,
    }
    row["resolution"] = resolution_of(params)
    return {k: v for k, v in row.items() if v is not None}


def row_from_failure(record: dict[str, Any], path: Path) -> dict[str, Any]:
    params = record.get("parameters") or {}
    model = record.get("model") or {}
    row: dict[str, Any] = {
        "id": record.get("id") or path.stem,
        "file": record.get("file"),
        "model_used": model.get("name") if isinstance(model, dict) else None,
        "task": params.get("task"),
        "frames": params.get("frames"),
        "steps": params.get("steps"),
        "status": "failed",
        "attempts": record.get("attempts"),
        "finished_at": _epoch(record.get("failed_at")),
        "error_category": record.get("error_category"),
        "error_message": record.get("message"),
        "recovery_suggestions": record.get("recovery_suggestions"),
        "failure_record": str(path),
        "instance": record.get("instance") or record.get("host"),
    }
    row["resolution"] = resolution_of(params)
    return {k: v for k, v in row.items() if v is not None}


def _records(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [
                Path(e.path)
                for e in entries
                if e.name.endswith(".json") and not e.name.startswith((".", TEMP_PREFIX)) and e.is_file()
            ]
    except FileNotFoundError:
        return []


def outbox_rows(outbox: Path, *, since: float | None = None) -> list[dict[str, Any]]:
    """Every finished job in ``outbox``, newest first (as :meth:`History.rows`)."""
    rows = []
    for path in _records(outbox):
        doc = _read(path)
        if doc is not None and doc.get("status") == "done" and "job_token" in doc:
            rows.append(row_from_sidecar(doc, path))
    for path in _records(outbox / "failed"):
        doc = _read(path)
        if doc is not None and doc.get("status") == "failed":
            rows.append(row_from_failure(doc, path))
    if since is not None:
        rows = [r for r in rows if (r.get("finished_at") or 0) >= since]
    rows.sort(key=lambda r: r.get("finished_at") or 0, reverse=True)
    return rows
