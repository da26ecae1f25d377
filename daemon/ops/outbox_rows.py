"""``tasks --outbox`` and ``analysis --outbox``: the job history rebuilt from what is in the outbox, the
sidecars of published videos and the records in ``failed/``. A farm of daemons sharing one outbox keeps its
SQLite histories on each host's own disk (daemon.config_sources); this view reads the share instead, so
every daemon's jobs can be listed from any host without sharing a database file.

Rows have the shape of the history's (daemon.ops.history.row_from_record), so the same tables and the same
analysis apply. Only finished jobs are in an outbox; queued and running ones are in the daemons' histories.

And one job's records for ``wan-daemon status JOB_ID`` (daemon.ops.job_story): its sidecar, found without a
scan when the history names it, and the failure records ``retry`` set aside.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.fsutil import TEMP_PREFIX
from daemon.ops.history import row_from_record

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


def read_record(path: Path | str) -> dict[str, Any] | None:
    """A sidecar or failure record as a mapping, or None: removed meanwhile, being written, too large or not ours."""
    try:
        if os.stat(path).st_size > MAX_RECORD_BYTES:
            return None
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def row_from_sidecar(sidecar: dict[str, Any], path: Path) -> dict[str, Any]:
    """The history's row for a published job: its sidecar read as the job record it was published from, through
    the history's own mapping (the sidecar's measurements included)."""
    times = sidecar.get("timestamps") or {}
    video = sidecar.get("video") or {}
    record = {
        "id": sidecar.get("id"),
        "token": sidecar.get("job_token"),
        "source_name": sidecar.get("file"),
        "params": sidecar.get("parameters") or {},
        "model": sidecar.get("model_used") or {},
        "state": "done",
        "attempts": sidecar.get("attempts"),
        "queued_at": _epoch(times.get("queued_at")),
        "started_at": _epoch(times.get("started_at")),
        "finished_at": _epoch(times.get("finished_at")),
        "outputs": {"video": str(path.with_name(video.get("file") or f"{path.stem}.mp4")), "sidecar": str(path)},
    }
    return row_from_record(record, sidecar)


def row_from_failure(failure: dict[str, Any], path: Path) -> dict[str, Any]:
    """The history's row for a failed job, from its failure record (daemon.runtime.outbox.Outbox.write_failure)."""
    record = {
        "id": failure.get("id") or path.stem,
        "source_name": failure.get("file"),
        "params": failure.get("parameters") or {},
        "model": failure.get("model") or {},
        "state": "failed",
        "attempts": failure.get("attempts"),
        "finished_at": _epoch(failure.get("failed_at")),
        "last_error": failure,  # error_category, message, recovery_suggestions at its top level
        "outputs": {"failure": str(path)},
    }
    row = row_from_record(record)
    instance = failure.get("instance") or failure.get("host")
    return {**row, "instance": instance} if instance else row


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
        doc = read_record(path)
        if doc is not None and doc.get("status") == "done" and "job_token" in doc:
            rows.append(row_from_sidecar(doc, path))
    for path in _records(outbox / "failed"):
        doc = read_record(path)
        if doc is not None and doc.get("status") == "failed":
            rows.append(row_from_failure(doc, path))
    if since is not None:
        rows = [r for r in rows if (r.get("finished_at") or 0) >= since]
    rows.sort(key=lambda r: r.get("finished_at") or 0, reverse=True)
    return rows


# ---- one job's records (``wan-daemon status JOB_ID``, daemon.ops.job_story) ----------------------------------


def find_sidecar(outbox: Path, job_id: str, rows: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]] | None:
    """The sidecar of the published job ``job_id``: the one the history names, then ``<id>.json``."""

    def ours(doc: dict[str, Any] | None) -> bool:
        return doc is not None and doc.get("id") == job_id and doc.get("status") == "done"

    for row in reversed(rows):
        if row.get("output_sidecar") and ours(doc := read_record(row["output_sidecar"])):
            return Path(row["output_sidecar"]), doc  # type: ignore[return-value]
    direct = Path(outbox) / f"{job_id}.json"
    if ours(doc := read_record(direct)):
        return direct, doc  # type: ignore[return-value]
    return None


def scan_sidecars(outbox: Path, job_id: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest sidecar in ``outbox`` whose ``id`` is ``job_id``: every sidecar is looked at (the last resort)."""
    needle = json.dumps(job_id).encode()
    found: list[tuple[str, Path, dict[str, Any]]] = []
    try:
        entries = list(os.scandir(outbox))
    except OSError:
        return None
    for e in entries:
        if not e.name.endswith(".json") or e.name.startswith((".", TEMP_PREFIX)):
            continue
        try:
            if not e.is_file() or e.stat().st_size > MAX_RECORD_BYTES:
                continue
            with open(e.path, "rb") as fh:
                raw = fh.read()
            if needle not in raw:  # most sidecars are someone else's: not parsed
                continue
            doc = json.loads(raw)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("id") == job_id and doc.get("status") == "done":
            found.append((str((doc.get("timestamps") or {}).get("finished_at") or ""), Path(e.path), doc))
    if not found:
        return None
    _, path, doc = max(found, key=lambda f: f[0])
    return path, doc


def retried_archives(outbox: Path, job_id: str) -> list[dict[str, Any]]:
    """The failure records ``retry`` kept aside for this job, oldest first."""
    folder = Path(outbox) / "failed" / "retried"
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(f"{job_id}.") and n.endswith(".json"))
    except OSError:
        return []
    out = []
    for name in names:
        doc = read_record(folder / name)
        if doc is not None and doc.get("id") == job_id:
            out.append(
                {
                    "path": str(folder / name),
                    "failed_at": doc.get("failed_at"),
                    "category": doc.get("error_category"),
                    "message": doc.get("message"),
                    "attempts": doc.get("attempts"),
                    "instance": doc.get("instance") or doc.get("host"),
                }
            )
    return out
