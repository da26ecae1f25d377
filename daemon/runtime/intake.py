"""Turn a claimed job file into persisted, queued job records, or into precise failure records.

Idempotent: running it again on the same claimed file (after a crash mid-intake) creates only the
records that are missing and rewrites the same failure records.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from daemon.config import Settings
from daemon.errors import Category, JobError, WanDaemonError
from daemon.fsutil import open_confined
from daemon.jobs import JobRecord, JobState
from daemon.jobspec.resolve import DISK_ERRNOS, InputImage, resolve_job, unusable_path
from daemon.jobspec.spec import SpecEntry, parse_job_file, safe_stem
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool
from daemon.runtime.spool import original_name as spool_original_name

# Our own writes refused (a read-only or vanished spool): never the job's fault. (Reading the job's inputs is
# checked in daemon.jobspec.resolve, which turns such errors into invalid_input.)
UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.ESTALE)


def _epoch(when) -> float:
    from datetime import timezone

    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


@dataclass
class IntakeResult:
    queued: list[JobRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def rejected(self) -> list[str]:
        return [r.id for r in self.rejections]


@dataclass(frozen=True)
class Rejection:
    id: str  # the job's id; the file's stem when the whole file was refused
    category: str
    record: Path  # the failure record written for it (a duplicate's is named after the file that brought it)


class LeaseLost(WanDaemonError):
    """The lease was lost during intake: stop, write nothing more (the loop steps back at its next check)."""


class Intake:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        outbox: Outbox,
        *,
        default_model: Callable[[], str],
        is_active_id: Callable[[str], bool],
        clock: Callable[[], float],
        is_active_basename: Callable[[str], bool] = lambda name: False,
        has_records_from: Callable[[str], bool] = lambda source: False,
        lease_held: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self._spool_folder: tuple[Path, Path] | None = None  # the spool's files folder and its resolved path
        self.spool = spool
        self.outbox = outbox
        self.default_model = default_model
        self.is_active_id = is_active_id
        self.is_active_basename = is_active_basename
        self.has_records_from = has_records_from
        self.lease_held = lease_held
        self.clock = clock

    def process(self, claimed: Path) -> IntakeResult:
        result = IntakeResult()
        source = claimed.name
        original_name = spool_original_name(source)
        try:
            data = self._read(claimed)
        except JobError as err:
            if not os.path.lexists(claimed):
                # Gone while we looked: another daemon adopted this spool (a takeover), or it was released.
                # The file is theirs now, not a bad file: no failure record.
                logger.warning("intake.file_vanished file={}: taken by another daemon", claimed.name)
                return result
            self._reject_file(claimed, original_name, err, result)
            return result
        entries, file_error = parse_job_file(data, original_name, max_bytes=self.settings.limits.max_job_file_bytes)
        if file_error is not None:
            self._reject_file(claimed, original_name, file_error, result)
            return result
        for entry in entries:
            existing = self.spool.load(entry.id)
            if existing is not None and existing.source == source:
                if existing.state in (JobState.QUEUED, JobState.RUNNING, JobState.WAITING_FOR_MODEL):
                    result.queued.append(existing)
                continue  # already taken in by an earlier, interrupted intake
            try:
                record = self._accept(
                    entry, source, original_name, existing_elsewhere=existing is not None, file_jobs=len(entries)
                )
            except JobError as err:
                self._reject_entry(entry, original_name, err, source, result)
                continue
            except OSError as exc:
                if exc.errno in DISK_ERRNOS or exc.errno in UNWRITABLE_ERRNOS:
                    raise  # the disk or the spool folder, not the job: the daemon pauses and retries the whole file
                # e.g. ENAMETOOLONG from a hostile path: the entry is at fault
                self._reject_entry(entry, original_name, unusable_path(exc), source, result)
                continue
            result.queued.append(record)
        if not result.queued and not self.has_records_from(source):
            self.spool.remove_source(source)  # every job was rejected and recorded: nothing left to do
        return result

    # ---- helpers -------------------------------------------------------------------------------

    def _read(self, claimed: Path) -> bytes:
        limit = self.settings.limits.max_job_file_bytes
        if self._spool_folder is None or self._spool_folder[0] != claimed.parent:
            self._spool_folder = (claimed.parent, claimed.parent.resolve())  # resolved once, not per file
        try:
            with open_confined(Path(claimed.name), [self._spool_folder[1]], max_bytes=limit, roots_resolved=True) as fh:
                st = os.fstat(fh.fileno())
                data = fh.read(limit + 1)
        except ValueError as exc:
            raise JobError(Category.INVALID_SPEC, f"job file refused: {exc}") from None
        # Remembered so that a change behind our back (a writer still holding the file) stops its jobs' start.
        self.spool.note_read(claimed.name, st.st_size, st.st_mtime_ns, data)
        return data

    def _accept(
        self, entry: SpecEntry, source: str, original_name: str, *, existing_elsewhere: bool, file_jobs: int
    ) -> JobRecord:
        if entry.error is not None:
            raise entry.error
        spec = entry.spec
        assert spec is not None
        assert spec.id is not None  # parse_job_file fills in the default id of every spec it returns
        if existing_elsewhere or self.is_active_id(spec.id):
            raise JobError(Category.DUPLICATE_JOB, f"a job with id {spec.id!r} is already queued or running")
        basename = spec.output.basename or spec.id
        if self.is_active_basename(basename):
            raise JobError(
                Category.DUPLICATE_JOB, f"another queued or running job already writes {basename}.mp4 (output.basename)"
            )
        job = resolve_job(spec, self.settings, self.default_model)
        if spec.model is None and job.model.tiny:
            logger.warning(
                "job.default_model id={} model={}: the job names no model and no real weights are "
                "present; the tiny random-weight test model makes a noise video",
                spec.id,
                job.model.name,
            )
        params = job.params
        if self.outbox.is_published(params.basename):
            raise JobError(
                Category.DUPLICATE_JOB,
                f"{params.basename}.mp4 and its sidecar are already in the outbox; the job is not run twice",
            )
        now = self.clock()
        record = JobRecord(
            id=spec.id,
            token=secrets.token_hex(8),
            source=source,
            source_name=original_name,
            seq=self.spool.next_seq(),
            priority=spec.priority,
            spec=entry.raw if isinstance(entry.raw, dict) else {},
            params=params,
            model=job.model,
            received_at=now,
            file_jobs=file_jobs,
            queued_at=now,
            not_before=_epoch(spec.not_before) if spec.not_before else 0.0,
        )
        if job.image is not None:
            folder = self.spool.job_dir(spec.id)
            folder.mkdir(exist_ok=True)
            record.input_image = str(self._write_input(job.image, folder))
        if job.waiting:
            return self.spool.transition(
                record, JobState.WAITING_FOR_MODEL, note=f"from {original_name}; downloading {job.model.repo_id}"
            )
        return self.spool.transition(record, JobState.QUEUED, note=f"from {original_name}", durable=False)

    @staticmethod
    def _write_input(image: InputImage, folder: Path) -> Path:
        """The checked input image, copied durably into the job's spool folder."""
        dest = folder / f"input{image.suffix}"
        with open(dest, "wb") as fh:
            fh.write(image.data)
            fh.flush()
            os.fsync(fh.fileno())
        return dest

    def _check_lease(self, original_name: str) -> None:
        """Before any failure record: a daemon presumed dead (frozen, then taken over) must not write records for
        jobs that are its taker's now; what it was taking in is the taker's to take in."""
        if not self.lease_held():
            raise LeaseLost(f"lease lost while taking in {original_name}: left to the daemon that took over")

    def _reject_entry(
        self, entry: SpecEntry, original_name: str, err: JobError, source: str, result: IntakeResult
    ) -> None:
        self._check_lease(original_name)
        name = entry.id
        if err.category is Category.DUPLICATE_JOB or self.is_active_id(entry.id):
            # Never overwrite (or let a later success delete) the record of the job that owns this id.
            name = f"{entry.id}.duplicate-{safe_stem(source)}"
        record = self.outbox.write_failure(
            name,
            err,
            job_id=entry.id,
            source_name=original_name,
            spec=entry.raw if isinstance(entry.raw, dict) else {"raw": repr(entry.raw)[:2000]},
            attempts=0,
        )
        logger.bind(job=entry.id).warning(
            "job.rejected id={} file={} category={} error={}", entry.id, original_name, err.category.value, err.message
        )
        result.rejections.append(Rejection(entry.id, err.category.value, record))

    def _reject_file(self, claimed: Path, original_name: str, err: JobError, result: IntakeResult) -> None:
        self._check_lease(original_name)
        stem = safe_stem(original_name)
        record = self.outbox.write_failure(stem, err, job_id=None, source_name=original_name, spec=None, attempts=0)
        logger.warning("job.rejected file={} category={} error={}", original_name, err.category.value, err.message)
        self.spool.remove_source(claimed.name)
        result.rejections.append(Rejection(stem, err.category.value, record))
