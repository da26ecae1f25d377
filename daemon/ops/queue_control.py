"""``wan-daemon pause``, ``resume``, ``priority``, ``cancel`` and ``retry``: the queue controlled from any shell that
sees the state folder.

The first four only write request files (:mod:`daemon.control`) that every daemon on the inbox reads on its one
decision thread, so nothing here races a scheduler: ``pause`` is obeyed by every daemon (one that starts later too)
until ``resume``; ``cancel`` and ``priority`` are applied by whichever daemon holds the job, at its next round. A job
is looked up in the spools (:mod:`daemon.ops.spool_view`), so a request for a job nobody holds is refused at once.

``retry`` puts failed (or cancelled) jobs back in the queue from their failure records: the job exactly as it was
given (``spec``), checked as ``submit`` checks it, is dropped into the inbox as ``<id>.retry-<UTC stamp>.yaml``; the
old record then moves to ``<outbox>/failed/retried/<id>.<stamp>.json``, where ``status ID`` shows it as an earlier
series, so that it neither stands for the new run nor is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import control
from daemon.fsutil import atomic_create
from daemon.jobs import JobState
from daemon.ops import spool_view
from daemon.ops.submitting import basename_of, check_bytes, note_operation
from daemon.ops.tables import print_table

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INVALID = 0, 1, 2, 3  # daemon.cli's exit codes
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``30m``, ``1h``, ``2d``, ``1w``, ``90s`` or plain seconds, in seconds (argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30m, 1h, 2d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _dump(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# ---- pause / resume ----------------------------------------------------------------------------------------


def pause(args: argparse.Namespace, settings) -> int:
    state = settings.paths.state
    before = control.read_pause(state)
    request = control.PauseRequest(
        mode="now" if args.now else "drain",
        free_vram=args.free_vram,
        by=control.requester(),
        at=time.time(),
        reason=args.reason or "",
    )
    path = control.write_pause(state, request)
    if args.json:
        _dump({"paused": True, "path": str(path), **request.to_dict(), "replaces": before and before.to_dict()})
    else:
        print(f"{request.describe()}. Every daemon on {settings.paths.inbox} obeys until `wan-daemon resume`.")
    return EXIT_OK


def resume(args: argparse.Namespace, settings) -> int:
    was = control.read_pause(settings.paths.state)
    removed = control.clear_pause(settings.paths.state)
    if args.json:
        _dump({"resumed": removed, "was": was.to_dict() if was and removed else None})
    elif removed and was is not None:
        print(f"resumed: lifted the pause by {was.by or 'an operator'}; the daemons start jobs again")
    else:
        print("not paused by an operator: nothing to resume (a full or missing folder resumes by itself)")
    return EXIT_OK


# ---- priority ----------------------------------------------------------------------------------------------


def priority(args: argparse.Namespace, settings) -> int:
    from daemon.ranking import PRIORITY_MAX, PRIORITY_MIN

    if not PRIORITY_MIN <= args.priority <= PRIORITY_MAX:
        print(f"priority {args.priority} is outside {PRIORITY_MIN}..{PRIORITY_MAX}", file=sys.stderr)
        return EXIT_USAGE
    job = spool_view.find_active(settings.paths.state, args.job_id)
    if job is None:
        print(f"no queued or running job {args.job_id!r} in {settings.paths.state}", file=sys.stderr)
        return EXIT_FAIL
    path = control.write_priority(settings.paths.state, job.id, args.priority, by=control.requester())
    state = job.state.value if job.state else "?"
    if args.json:
        _dump(
            {
                "id": job.id,
                "priority": args.priority,
                "was": job.priority,
                "state": state,
                "instance": job.instance,
                "request": str(path),
            }
        )
    else:
        when = "if it goes back to the queue" if job.state is JobState.RUNNING else "at its next round"
        print(
            f"priority {job.priority} -> {args.priority} asked for {job.id} ({state}): daemon {job.instance} "
            f"applies it {when}"
        )
    return EXIT_OK


# ---- cancel ------------------------------------------------------------------------------------------------


def _row(job: spool_view.ActiveJob) -> dict[str, Any]:
    state = job.state.value if job.state else None
    return {"id": job.id, "state": state, "instance": job.instance, "model": job.model, "file": job.source_name}


def _matches(job: spool_view.ActiveJob, args: argparse.Namespace) -> bool:
    return (
        (args.file is None or job.source_name == args.file)
        and (args.model is None or job.model == args.model)
        and (not args.all_queued or job.state in (JobState.QUEUED, JobState.WAITING_FOR_MODEL))
    )


def cancel(args: argparse.Namespace, settings) -> int:
    """By ids, by filters (``--file``, ``--model``, ``--all-queued``: all that are given must match), or both (the
    ids that match the filters). An id no daemon holds: exit 1."""
    state = settings.paths.state
    filtered = args.file is not None or args.model is not None or args.all_queued
    if not args.ids and not filtered:
        print("cancel what? give job ids, --file NAME, --model M or --all-queued", file=sys.stderr)
        return EXIT_USAGE
    status, chosen, missing = EXIT_OK, [], []
    if args.ids:
        for job_id in dict.fromkeys(args.ids):
            job = spool_view.find_active(state, job_id)
            if job is None:
                print(f"no queued or running job {job_id!r} in {state}", file=sys.stderr)
                missing.append(job_id)
                status = EXIT_FAIL
            elif _matches(job, args):
                chosen.append(job)
            else:
                print(f"not cancelled: {job_id} does not match the filters ({_row(job)})", file=sys.stderr)
    else:
        chosen = sorted((j for j in spool_view.iter_active(state) if _matches(j, args)), key=lambda j: (j.seq, j.id))
    rows = [_row(j) for j in chosen]
    if not args.dry_run:
        who = control.requester()
        for job in chosen:
            control.write_cancel(state, job.id, by=who)
    if args.json:
        _dump({"dry_run": args.dry_run, "jobs": rows, "missing": missing})
    elif args.dry_run:
        print_table(["id", "state", "instance", "model", "file"], [list(r.values()) for r in rows])
        print(f"dry run: {len(rows)} job(s) would be cancelled; nothing was written", file=sys.stderr)
    else:
        for r in rows:
            print(
                f"cancel requested: {r['id']} ({r['state']}, daemon {r['instance']}; its failure record will say "
                "cancelled)"
            )
        if filtered and not rows:
            print("no queued or running job matches: nothing to cancel", file=sys.stderr)
    return status


# ---- retry -------------------------------------------------------------------------------------------------


@dataclass
class FailureRecord:
    path: Path
    data: dict[str, Any]
    stat: tuple[int, int]  # (inode, mtime_ns) when read: the record moves only if it is still this file

    @property
    def id(self) -> Any:
        return self.data.get("id")

    def failed_at(self) -> float:
        try:
            return datetime.strptime(str(self.data.get("failed_at")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except ValueError:
            return float(os.stat(self.path).st_mtime) if self.path.exists() else 0.0


def read_record(path: Path) -> FailureRecord | None:
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return FailureRecord(path, data, (st.st_ino, st.st_mtime_ns)) if isinstance(data, dict) else None


def _selected(args: argparse.Namespace, failed: Path, now: float) -> tuple[list[FailureRecord], list[dict]]:
    """(records to retry, refusals) for the ids given, or every job's own record (``failed/<id>.json``) that the
    filters take."""

    def wanted(r: FailureRecord) -> bool:
        young = args.failed_since is None or r.failed_at() >= now - args.failed_since
        return young and args.category in (None, r.data.get("error_category"))

    records, refused = [], []
    if args.ids:
        for job_id in dict.fromkeys(args.ids):
            r = read_record(failed / f"{job_id}.json") if spool_view.is_job_id(job_id) else None
            if r is None:
                refused.append({"id": job_id, "why": f"no failure record {failed / f'{job_id}.json'}"})
            elif wanted(r):
                records.append(r)
            else:
                refused.append({"id": job_id, "why": "does not match --failed-since/--category"})
        return records, refused
    try:
        names = sorted(n for n in os.listdir(failed) if n.endswith(".json") and not n.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        r = read_record(failed / name)
        # A job's own record only: not a whole file's rejection (no id), not a duplicate's (another name).
        if r is not None and isinstance(r.id, str) and name == f"{r.id}.json" and wanted(r):
            records.append(r)
    return records, refused


def _refusal(r: FailureRecord, settings) -> str | None:
    if r.id is None:
        file = r.data.get("file")
        return f"{r.path.name} records the rejection of a whole file ({file}): fix it and submit it again"
    if not isinstance(r.id, str) or r.path.name != f"{r.id}.json":
        return f"{r.path.name} is not the record of job {r.id!r}"
    job = spool_view.find_active(settings.paths.state, str(r.id))
    if job is not None:
        return f"{r.id} is {job.state.value if job.state else 'held'} (daemon {job.instance}): not failed now"
    if not isinstance(r.data.get("spec"), dict):
        return f"{r.path.name} holds no job to run again (no spec)"
    return None


def _job_document(r: FailureRecord, who: str, stamp: str) -> bytes:
    job = {**r.data["spec"], "id": r.id}
    why = " ".join(f"{r.data.get('error_category')}: {r.data.get('message') or ''}".split())[:300]
    header = f"# retry of {r.id} by {who} at {stamp} (failed {r.data.get('failed_at')}, {why})"
    return (header + "\n" + json.dumps(job, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _archive(r: FailureRecord, stamp: str) -> Path | None:
    """Move the old record aside (failed/retried/), only while it is still the file that was read."""
    try:
        st = os.stat(r.path)
        if (st.st_ino, st.st_mtime_ns) != r.stat:
            return None
        dest = r.path.parent / "retried" / f"{r.id}.{stamp}.json"
        dest.parent.mkdir(exist_ok=True)
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{r.id}.{stamp}-{n}.json")
        os.rename(r.path, dest)
    except FileNotFoundError:
        return None
    return dest


def retry(args: argparse.Namespace, settings, default_model: Callable[[], str]) -> int:
    if not args.ids and args.failed_since is None and args.category is None:
        print("retry what? give job ids, or --failed-since DURATION and/or --category C", file=sys.stderr)
        return EXIT_USAGE
    outbox, inbox = settings.paths.outbox, settings.paths.inbox
    now = time.time()
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    records, refused = _selected(args, outbox / "failed", now)
    who, done, status = control.requester(), [], EXIT_FAIL if refused else EXIT_OK
    for r in records:
        why, data, name = _refusal(r, settings), b"", f"{r.id}.retry-{stamp}.yaml"
        try:
            data = b"" if why else _job_document(r, who, stamp)
        except ValueError as exc:  # a value JSON cannot write (NaN)
            why = f"its stored job cannot be written again: {exc}"
        if data:
            entries, problems = check_bytes(data, name, settings, default_model)
            if problems:
                why, status = "the job no longer validates: " + "; ".join(problems), max(status, EXIT_INVALID)
            elif (outbox / f"{basename_of(entries[0])}.json").exists():
                why = f"its output is already published in {outbox}: the daemon would reject it as duplicate_job"
        if why:
            refused.append({"id": r.id, "why": why})
            status = max(status, EXIT_FAIL)
            continue
        row = {
            "id": r.id,
            "category": r.data.get("error_category"),
            "failed_at": r.data.get("failed_at"),
            "record": str(r.path),
            "job_file": str(inbox / name),
            "archived": None,
        }
        if not args.dry_run:
            inbox.mkdir(parents=True, exist_ok=True)
            control.forget_requests(settings.paths.state, r.id)  # an old cancel or priority is not for the new run
            try:
                atomic_create(inbox / name, data)
            except FileExistsError:
                refused.append({"id": r.id, "why": f"{name} is already in the inbox"})
                status = max(status, EXIT_FAIL)
                continue
            archived = _archive(r, stamp)
            row["archived"] = archived and str(archived)
            note_operation(settings, "retry", by=who, job_id=str(r.id), detail={k: row[k] for k in row if k != "id"})
        done.append(row)
        if not args.json:
            print(r.id, flush=True)
    for x in refused:
        print(f"not retried: {x['id']}: {x['why']}", file=sys.stderr)
    if args.json:
        _dump({"dry_run": args.dry_run, "retried": done, "refused": refused})
    elif args.dry_run:
        print(f"dry run: {len(done)} job(s) would be retried; nothing was written", file=sys.stderr)
    return status
