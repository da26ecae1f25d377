"""The jobs every daemon on this inbox holds, read from their spools (``<state>/owners/<instance>/jobs/<id>/job.json``)
by the operator commands (queue, status, cancel, priority, submit, retry), without the daemon's help.

Fast at ten thousand jobs: one listing per spool and the C JSON parser, no pydantic model per record. A record
being rewritten as it is read (the daemon writes atomically, so it is there, old or new) or a folder that
vanished (the job was released) is skipped. :class:`ActiveJob` carries the fields the scheduler ranks by under
the names :mod:`daemon.ranking` reads (state, priority, seq, queued_at, received_at, not_before).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.jobs import JobState
from daemon.jobspec.patterns import ID_CHARS

_ID = re.compile(ID_CHARS)


def is_job_id(text: str) -> bool:
    """A string the job language accepts as an id (so it is safe as a file name in the state folder)."""
    return _ID.fullmatch(text) is not None


@dataclass
class ActiveJob:
    id: str
    instance: str  # the daemon holding it (its owners/<instance> folder)
    state: JobState | None
    priority: int
    seq: int
    received_at: float
    queued_at: float | None
    not_before: float
    attempts: int
    model: str | None
    source_name: str
    worker: str | None
    started_at: float | None
    path: str  # its job.json (a string: a Path per record is a tenth of a large scan)
    raw: dict[str, Any] = field(repr=False)  # the whole record, as JSON

    @property
    def record_path(self) -> Path:
        return Path(self.path)

    @property
    def basename(self) -> str:
        return str((self.raw.get("params") or {}).get("basename") or self.id)


def _model_name(model: Any) -> str | None:
    """The model's name: a record holds the located model (``{"info": {"name": ...}, "path": ...}``), a summary
    (the history's, a sidecar's) the flat form (``{"name": ...}``)."""
    if not isinstance(model, dict):
        return None
    name = model.get("name") or (model.get("info") or {}).get("name")
    return str(name) if name else None


def _job(instance: str, path: str, data: dict[str, Any]) -> ActiveJob:
    state = data.get("state")
    return ActiveJob(
        id=str(data["id"]),
        instance=instance,
        state=JobState(state) if state else None,
        priority=int(data.get("priority") or 0),
        seq=int(data.get("seq") or 0),
        received_at=float(data.get("received_at") or 0.0),
        queued_at=data.get("queued_at"),
        not_before=float(data.get("not_before") or 0.0),
        attempts=int(data.get("attempts") or 0),
        model=_model_name(data.get("model")),
        source_name=str(data.get("source_name") or ""),
        worker=data.get("worker"),
        started_at=data.get("started_at"),
        path=path,
        raw=data,
    )


def _active(instance: str, path: str) -> ActiveJob | None:
    """The record at ``path`` when it is an active job's; None when it is gone, being replaced, or has ended."""
    try:
        with open(path, "rb") as fh:
            job = _job(instance, path, json.loads(fh.read()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return job if job.state is not None and job.state.active else None


def owners(state: Path) -> list[str]:
    try:
        with os.scandir(Path(state) / "owners") as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def iter_active(state: Path) -> Iterator[ActiveJob]:
    """Every job record in every spool under ``state`` whose state is active (waiting, queued, running)."""
    for instance in owners(state):
        jobs = os.path.join(state, "owners", instance, "jobs")
        try:
            with os.scandir(jobs) as entries:
                names = [e.name for e in entries if not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            job = _active(instance, os.path.join(jobs, name, "job.json"))
            if job is not None:
                yield job


def find_active(state: Path, job_id: str) -> ActiveJob | None:
    """The active job with this id, whichever daemon holds it (one stat per spool, not a scan)."""
    if not is_job_id(job_id):
        return None
    for instance in owners(state):
        job = _active(instance, os.path.join(state, "owners", instance, "jobs", job_id, "job.json"))
        if job is not None:
            return job
    return None


# ---- the inbox: jobs no daemon has taken in yet ----------------------------------------------------------------

INBOX_READ_LIMIT = 1000  # job files read for their ids at most (a stopped farm's inbox may hold ten thousand)


@dataclass(frozen=True)
class InboxJob:
    """A job of a file still in the inbox, as intake will read it: its id (a default id comes from the file's
    name, as intake makes it) and its output name."""

    id: str
    file: str  # the job file's name in the inbox
    basename: str


@dataclass
class InboxJobs:
    jobs: list[InboxJob]
    files: int  # ready job files in the inbox
    unread: int  # of them, not read (past the limit, unreadable, or not a valid job file)


def inbox_job_files(inbox: Path) -> list[str]:
    """The names of the inbox's job files no daemon has taken in yet (the watcher's own rule for a job file's name),
    sorted; none when the inbox cannot be listed."""
    from daemon.runtime.watch import is_job_file_name

    try:
        with os.scandir(inbox) as listing:
            return sorted(e.name for e in listing if is_job_file_name(e.name) and e.is_file())
    except OSError:
        return []


def inbox_jobs(inbox: Path, *, max_bytes: int, limit: int = INBOX_READ_LIMIT) -> InboxJobs:
    """The jobs waiting in the inbox's ready job files (the watcher's own rule for a job file's name), parsed by
    the daemon's own parser. At most ``limit`` files are read, in name order; the rest are counted in ``unread``."""
    from daemon.jobspec.spec import parse_job_file

    names = inbox_job_files(inbox)
    jobs: list[InboxJob] = []
    unread = max(0, len(names) - limit)
    for name in names[:limit]:
        try:
            with open(os.path.join(inbox, name), "rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError:  # taken in (renamed away) as we looked: a daemon holds it now
            continue
        entries, error = parse_job_file(data, name, max_bytes=max_bytes)
        if error is not None:
            unread += 1
            continue
        for entry in entries:
            if entry.error is None and entry.spec is not None:
                jobs.append(InboxJob(entry.id, name, entry.spec.output.basename or entry.id))
    return InboxJobs(jobs, len(names), unread)
