"""``wan-daemon validate``, ``submit`` and ``resubmit``: job files checked exactly as the daemon's intake checks them
(one :func:`daemon.jobspec.resolve.resolve_job`), then dropped into the inbox atomically, as a tool would do it.

``submit`` prints every job id it creates, one per line (``--json``: a list), so a script can follow its jobs. It
refuses a file holding an id that a daemon on this inbox already holds (queued, waiting or running: the spools in
the state folder), that a job file still in the inbox holds (not taken in yet: no daemon runs, or one is about to),
or whose video is already published (its sidecar is in the outbox): the daemon would reject that
job as ``duplicate_job``. ``--force`` renames such ids instead (``<id>-2``, ``-3``, ... the first free one, and the
output name with them) and drops the file rewritten as JSON, which is YAML 1.2.

``--wait`` follows each job to its end in the outbox alone, with no clock compared: a sidecar naming the job's id (the
submit refused published names, so any that appears is new), or a failure record that was not there, or not that
file, before the submit (records are replaced atomically, so a new one is a new inode). Exit: 0 all done, 3 any
failed, 1 on timeout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.control import requester
from daemon.fsutil import atomic_create
from daemon.jobspec.spec import SpecEntry, parse_job_file, safe_stem
from daemon.ops import spool_view

EXIT_OK, EXIT_FAIL, EXIT_INVALID = 0, 1, 3  # daemon.cli's exit codes
POLL_SECONDS = 0.3
MAX_ID = 128


# ---- checking ----------------------------------------------------------------------------------------------


def check_bytes(data: bytes, name: str, settings, default_model: Callable[[], str], *, validate: bool = True):
    """(entries, problems) of job-file bytes, exactly as the daemon's intake would take them in (no problems:
    valid). Checks that depend on what the daemon holds (an id already queued, a published video) are not made."""
    from daemon.errors import JobError
    from daemon.jobspec.resolve import resolve_job, unusable_path

    entries, file_error = parse_job_file(data, name, max_bytes=settings.limits.max_job_file_bytes)
    if file_error:
        return entries, [file_error.message]
    problems = []
    for e in entries if validate else ():
        try:
            resolve_job(e, settings, default_model)
        except JobError as err:
            problems.append(f"job {e.id}: {err.message}")
        except OSError as exc:  # the disk's fault (EIO): the daemon would try again later
            problems.append(f"job {e.id}: {unusable_path(exc).message}")
    return entries, problems


def read_job_file(path: Path, settings) -> bytes:
    """The file's bytes, at most one more than the limit (so a huge file is refused without reading it all)."""
    with open(path, "rb") as fh:
        return fh.read(settings.limits.max_job_file_bytes + 1)


def check_file(path: Path, settings, default_model: Callable[[], str]) -> list[str]:
    try:
        data = read_job_file(path, settings)
    except OSError as exc:
        return [f"cannot read: {exc.strerror}"]
    return check_bytes(data, path.name, settings, default_model)[1]


def validate(args: argparse.Namespace, settings, default_model: Callable[[], str]) -> int:
    results = [{"file": f, "problems": check_file(Path(f), settings, default_model)} for f in args.files]
    for r in results:
        r["ok"] = not r["problems"]
    if args.json:
        print(json.dumps(results, indent=2))
    for r in [] if args.json else results:
        print(f"{'ok     ' if r['ok'] else 'INVALID'} {r['file']}")
        for p in r["problems"]:
            print(f"  - {p}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_INVALID


# ---- shared with retry ---------------------------------------------------------------------------------------


def note_operation(settings, op: str, *, by: str, job_id: str | None = None, detail: dict | None = None) -> None:
    """Record an operator request in this host's job history (``operations``), when there is one to write to: a
    history that is disabled or not created yet is left alone."""
    if not settings.history.enabled or not settings.history.path.exists():
        return
    from daemon.errors import WanDaemonError
    from daemon.ops.history import History

    try:
        with History(settings.history.path) as history:
            history.record_operation(op, by=by, job_id=job_id, detail=detail or {})
    except (WanDaemonError, OSError):
        return


def basename_of(entry: SpecEntry) -> str:
    if entry.spec is not None and entry.spec.output.basename:
        return entry.spec.output.basename
    return entry.id


def suffixed(name: str, n: int) -> str:
    tail = f"-{n}"
    return name[: MAX_ID - len(tail)] + tail


# ---- what the farm holds -----------------------------------------------------------------------------------


@dataclass
class Taken:
    """Ids and output names in use: held by a daemon, waiting in an inbox file no daemon has taken in yet,
    published, or submitted earlier by this command."""

    state: Path
    outbox: Path
    inbox: Path | None = None
    max_bytes: int = 0  # the job-file size limit, for reading the inbox's files
    ids: set[str] = field(default_factory=set)  # this command's
    basenames: set[str] = field(default_factory=set)
    _active_basenames: set[str] | None = None
    _in_inbox: dict[str, spool_view.InboxJob] | None = None  # read once, on the first question

    def in_inbox(self) -> dict[str, spool_view.InboxJob]:
        """The jobs of the inbox's files, by id (read on the first question only)."""
        if self._in_inbox is None:
            found = spool_view.inbox_jobs(self.inbox, max_bytes=self.max_bytes) if self.inbox else None
            self._in_inbox = {j.id: j for j in found.jobs} if found else {}
        return self._in_inbox

    def id_holder(self, job_id: str) -> str | None:
        if job_id in self.ids:
            return "submitted just before, by this command"
        job = spool_view.find_active(self.state, job_id)
        if job is not None:
            return f"{job.state.value if job.state else 'held'} (daemon {job.instance})"
        waiting = self.in_inbox().get(job_id)
        return f"waiting in the inbox in {waiting.file} (not taken in yet)" if waiting else None

    def published(self, basename: str) -> bool:
        return basename in self.basenames or (self.outbox / f"{basename}.json").exists()

    def basename_free(self, basename: str) -> bool:
        if self._active_basenames is None:
            self._active_basenames = {j.basename for j in spool_view.iter_active(self.state)}
        if self.published(basename) or basename in self._active_basenames:
            return False
        return all(j.basename != basename for j in self.in_inbox().values())

    def why(self, entry: SpecEntry) -> str | None:
        holder = self.id_holder(entry.id)
        if holder:
            return f"job {entry.id} is already {holder}"
        if self.published(basename_of(entry)):
            return f"job {entry.id}: {basename_of(entry)}.json is already published in {self.outbox}"
        return None

    def rename(self, entry: SpecEntry) -> tuple[str, str | None]:
        """(new id, new basename or None when it needs no ``output.basename``) for a job :meth:`why` refused. An
        output name that is the id's (by default, or written the same) moves with the id; another one only if it
        is taken itself."""
        explicit = entry.spec.output.basename if entry.spec is not None else None
        if explicit is None or explicit == entry.id:
            for new_id in (suffixed(entry.id, n) for n in itertools.count(2)):
                if not self.id_holder(new_id) and self.basename_free(new_id):
                    return new_id, None if explicit is None else new_id
        assert explicit is not None
        new_id = entry.id
        if self.id_holder(entry.id):
            new_id = next(i for i in (suffixed(entry.id, n) for n in itertools.count(2)) if not self.id_holder(i))
        if self.basename_free(explicit):
            return new_id, None
        return new_id, next(b for b in (suffixed(explicit, n) for n in itertools.count(2)) if self.basename_free(b))

    def rename_all(self, entries: list[SpecEntry], which) -> dict[int, tuple[str, str | None]]:
        """:meth:`rename` for entries ``which`` (indexes), each new name taken before the next is chosen."""
        renames = {}
        for i in which:
            renames[i] = new_id, new_base = self.rename(entries[i])
            self.ids.add(new_id)
            self.basenames.add(new_base or new_id)
        return renames

    def claim(self, entries: list[SpecEntry]) -> None:
        self.ids.update(e.id for e in entries)
        self.basenames.update(basename_of(e) for e in entries)


def renamed_document(data: bytes, name: str, settings, renames: dict[int, tuple[str, str | None]], note: str) -> bytes:
    """The job file with job ``i`` given ``renames[i]`` (id, basename), as JSON (valid YAML 1.2, every value
    written exactly) after a comment line."""
    from daemon.jobspec.reader import load_yaml_bytes

    doc = load_yaml_bytes(data, max_bytes=settings.limits.max_job_file_bytes, name=name)
    jobs = doc["jobs"] if "jobs" in doc else [doc]
    for i, (new_id, new_base) in renames.items():
        jobs[i]["id"] = new_id
        if new_base is not None:
            jobs[i]["output"] = {**(jobs[i].get("output") or {}), "basename": new_base}
    return (f"# {note}\n" + json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


# ---- submit ------------------------------------------------------------------------------------------------


@dataclass
class Submitted:
    id: str
    file: str  # the file given
    basename: str
    inbox_path: str
    renamed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k != "renamed_from"}


def submit(args: argparse.Namespace, settings, default_model: Callable[[], str]) -> int:
    inbox, outbox = settings.paths.inbox, settings.paths.outbox
    inbox.mkdir(parents=True, exist_ok=True)
    taken = Taken(settings.paths.state, outbox, inbox, settings.limits.max_job_file_bytes)
    watcher = OutcomeWatcher(outbox) if args.wait else None
    submitted: list[Submitted] = []
    status, who = EXIT_OK, requester()
    for f in args.files:
        src = Path(f)
        try:
            data = read_job_file(src, settings)
        except OSError as exc:
            print(f"not submitted: cannot read {f}: {exc.strerror}", file=sys.stderr)
            status = max(status, EXIT_FAIL)
            continue
        entries, problems = check_bytes(data, src.name, settings, default_model, validate=not args.no_validate)
        if problems and not args.no_validate:
            print(f"not submitted (invalid): {f}", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            status = max(status, EXIT_INVALID)
            continue
        jobs = [e for e in entries if e.error is None]
        refusals = {i: why for i, e in enumerate(entries) if e.error is None and (why := taken.why(e))}
        if refusals and not args.force:
            print(f"not submitted: {f}: " + "; ".join(refusals.values()), file=sys.stderr)
            print("  (--force submits them under new ids: <id>-2, -3, ...)", file=sys.stderr)
            status = max(status, EXIT_FAIL)
            continue
        renamed_from: dict[str, str] = {}
        if refusals:
            renames = taken.rename_all(entries, refusals)
            renamed_from = {new: entries[i].id for i, (new, _) in renames.items() if new != entries[i].id}
            what = ", ".join(f"{entries[i].id} -> {new}" for i, (new, _) in renames.items())
            data = renamed_document(data, src.name, settings, renames, f"{src.name}, submitted by {who}: {what}")
            entries, problems = check_bytes(data, src.name, settings, default_model, validate=not args.no_validate)
            jobs = [e for e in entries if e.error is None]
            if problems and not args.no_validate:  # not expected: a renamed id is as valid as the original
                print(f"not submitted: {f}: renamed, it no longer validates: {'; '.join(problems)}", file=sys.stderr)
                status = max(status, EXIT_INVALID)
                continue
            for i, (new, base) in renames.items():
                extra = f" (output {base})" if base else ""
                print(f"renamed: {refusals[i]}: submitted as {new}{extra}", file=sys.stderr)
        dest = inbox / src.name
        if watcher is not None:
            watcher.expect(entries, dest.name)
        try:
            atomic_create(dest, data)
        except FileExistsError:
            print(f"not submitted: {dest} already exists in the inbox", file=sys.stderr)
            status = max(status, EXIT_FAIL)
            if watcher is not None:
                watcher.forget(dest.name)
            continue
        taken.claim(jobs)
        rows = [Submitted(e.id, f, basename_of(e), str(dest), renamed_from.get(e.id)) for e in entries]
        submitted += rows
        print(f"submitted {f} as {dest} ({len(rows)} job{'s' if len(rows) != 1 else ''})", file=sys.stderr)
        if not args.json:
            for r in rows:
                print(r.id, flush=True)
        note_operation(
            settings, "submit", by=who, detail={"file": f, "inbox_path": str(dest), "ids": [r.id for r in rows]}
        )
    if watcher is None or not watcher.pending:
        if args.json:
            print(json.dumps([s.to_dict() for s in submitted], indent=2))
        return status
    outcome = watcher.wait(args.timeout, emit=None if args.json else print)
    if args.json:
        print(json.dumps([{**s.to_dict(), **watcher.result(s.id)} for s in submitted], indent=2))
    return max(status, outcome)


# ---- --wait ------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    id: str
    basename: str
    file: str  # its file's name in the inbox (a whole-file rejection record names it)


class OutcomeWatcher:
    """Follows submitted jobs to their end through the outbox alone (module docstring). :meth:`expect` is called
    before a file is written into the inbox: it notes the failure records already there, which are not its jobs'."""

    def __init__(self, outbox: Path, *, poll_seconds: float = POLL_SECONDS) -> None:
        self.outbox, self.failed = Path(outbox), Path(outbox) / "failed"
        self.poll_seconds = poll_seconds
        self.pending: dict[str, _Job] = {}
        self.results: dict[str, dict[str, str]] = {}
        self._seen: dict[str, tuple[int, int] | None] = {}  # record name -> (inode, mtime_ns) already accounted for
        self._files: dict[str, list[str]] = {}  # inbox file name -> its pending job ids

    def _stat(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.failed / name)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _names(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.failed) if not n.startswith(".") and n.endswith(".json")}
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def expect(self, entries: list[SpecEntry], file_name: str) -> None:
        # Duplicate records already there are other submissions': marked seen (never read).
        self._seen.update({n: None for n in self._names() if ".duplicate-" in n and n not in self._seen})
        for e in entries:
            self.pending[e.id] = _Job(e.id, basename_of(e), file_name)
            self._files.setdefault(file_name, []).append(e.id)
            self._seen[f"{e.id}.json"] = self._stat(f"{e.id}.json")
        stem = f"{safe_stem(file_name)}.json"
        self._seen.setdefault(stem, self._stat(stem))
        if not entries:  # unreadable as a whole (--no-validate): only its file record can end it
            self.pending[stem[:-5]] = _Job(stem[:-5], stem[:-5], file_name)
            self._files.setdefault(file_name, []).append(stem[:-5])

    def forget(self, file_name: str) -> None:
        for job_id in self._files.pop(file_name, []):
            self.pending.pop(job_id, None)

    def _end(self, job_id: str, status: str, path: Path, emit: Callable[[str], Any] | None) -> None:
        if self.pending.pop(job_id, None) is None:
            return
        self.results[job_id] = {"status": status, "path": str(path)}
        if emit is not None:
            emit(f"{status} {job_id} {path}")
            sys.stdout.flush()

    def _record(self, name: str, emit: Callable[[str], Any] | None) -> None:
        """A failure record that is new or replaced since the submit: whose end it tells."""
        now = self._stat(name)
        if now is None or self._seen.get(name, ()) == now:
            return
        path = self.failed / name
        try:
            with open(path, "rb") as fh:
                record = json.loads(fh.read())
        except (OSError, ValueError):
            return  # not readable yet: looked at again next round
        self._seen[name] = now
        if not isinstance(record, dict):
            return
        job_id = record.get("id")
        if isinstance(job_id, str) and job_id in self.pending:
            self._end(job_id, "failed", path, emit)
        elif job_id is None and record.get("file") in self._files:  # the whole file was rejected
            for other in self._files[record["file"]]:
                self._end(other, "failed", path, emit)

    def poll(self, emit: Callable[[str], Any] | None = print) -> None:
        for job in list(self.pending.values()):
            sidecar = self.outbox / f"{job.basename}.json"
            try:
                with open(sidecar, "rb") as fh:
                    published = json.loads(fh.read())
            except (OSError, ValueError):
                continue
            if isinstance(published, dict) and published.get("id") == job.id:
                self._end(job.id, "done", self.outbox / f"{job.basename}.mp4", emit)
        names = self._names()
        wanted = {f"{j}.json" for j in self.pending} | {f"{safe_stem(f)}.json" for f in self._files}
        for name in sorted(names & wanted | {n for n in names if ".duplicate-" in n and n not in self._seen}):
            self._record(name, emit)

    def wait(self, timeout: float | None, emit: Callable[[str], Any] | None = print) -> int:
        """Until every job ended (0: all done, 3: any failed) or ``timeout`` seconds passed (1)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll(emit)
            if not self.pending:
                failed = any(r["status"] == "failed" for r in self.results.values())
                return EXIT_INVALID if failed else EXIT_OK
            if deadline is not None and time.monotonic() >= deadline:
                left = ", ".join(sorted(self.pending))
                print(f"timed out after {timeout:g}s; not finished: {left}", file=sys.stderr)
                return EXIT_FAIL
            time.sleep(self.poll_seconds)

    def result(self, job_id: str) -> dict[str, str]:
        return self.results.get(job_id, {"status": "pending"})
