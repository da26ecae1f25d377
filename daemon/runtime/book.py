"""The job book: every job this daemon holds, the one way to change a job's state, and the decisions that
end a job or send it round again (retry, cancel, reconcile, release).

A record is in the book while its folder is in the spool: active, or terminal with its claimed file not yet
released. Every change goes through :meth:`JobBook.set`, which persists it (daemon.runtime.spool), records
it in the history, and has the health file rewritten.

Costs do not grow with the queue: the book keeps indexes by state, by claimed file and by active output
name, updated on every change, so a lookup, a transition or a release is O(1) (plus the jobs it touches),
not a scan of every record. ``records`` is read-only for everyone else: records enter through :meth:`add`
or :meth:`set` and leave through :meth:`release_if_finished` or :meth:`drop_all`.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from collections.abc import Set as AbstractSet  # `set` is a JobBook method: in its body, `set` names that
from typing import Any

from loguru import logger

from daemon.config import Settings
from daemon.control import cancel_dir, predates, read_request
from daemon.errors import Category, JobError, classify_exception
from daemon.jobs import JobRecord, JobState
from daemon.jobspec.resolve import resolve_retry
from daemon.ops.history import History
from daemon.policy import decide
from daemon.runtime.autodownload import ModelDownloads
from daemon.runtime.disk import DiskGuard
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool
from daemon.runtime.status import Status
from daemon.scheduler import ReadyQueue

# Queued jobs cancelled in one round at most (each is a failure record, a spool write and a history row, several
# fsyncs): ``cancel --all-queued`` on ten thousand jobs is spread over rounds, each short enough for the loop to
# report progress to the heartbeat (daemon.runtime.heartbeat) long before its lease could be taken over.
CANCELS_PER_ROUND = 200


class JobBook:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        outbox: Outbox,
        *,
        status: Status,
        history: History | None,
        disk: DiskGuard,
        downloads: ModelDownloads,
        clock: Callable[[], float],
        rng: random.Random,
        on_change: Callable[[], None],
        device_of: Callable[[JobRecord], str],
        lease_held: Callable[[], bool] = lambda: True,
        on_lease_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.outbox = outbox
        self.status = status
        self.history = history
        self.disk = disk
        self.downloads = downloads
        self.clock = clock
        self.rng = rng
        self.on_change = on_change
        self.device_of = device_of
        self.lease_held = lease_held
        self.on_lease_lost = on_lease_lost
        self.records: dict[str, JobRecord] = {}
        self._by_state: dict[JobState | None, dict[str, JobRecord]] = {s: {} for s in [None, *JobState]}
        self._by_source: dict[str, set[str]] = {}
        self._active_names: dict[str, str] = {}  # output basename -> id of the active job that writes it
        self.queue = ReadyQueue()  # the queued records, ranked for the scheduler (daemon.scheduler)
        # Records that entered the queue since placement last looked (it checks each once for fitting nowhere).
        self.newly_queued: list[JobRecord] = []
        self.cancel_dir = cancel_dir(settings.paths.state)
        self.cancel_requested: dict[str, str] = {}  # running job id -> who asked (it is cancelled as it stops)
        self.cancel_names: set[str] = set()  # the cancel folder's names at the last look (take_cancels)
        # Running job id -> why it is being interrupted, for the note of its requeue (default: a shutdown).
        self.interrupt_notes: dict[str, str] = {}
        # Decisions whose record could not be written (a read-only or vanished folder): reconcile makes them again
        # with the same error, so that the cause is never replaced by the write's own error.
        self.unrecorded: dict[str, JobError] = {}

    # ---- reading -------------------------------------------------------------------------------

    def in_state(self, state: JobState) -> list[JobRecord]:
        return list(self._by_state[state].values())

    def count(self, state: JobState) -> int:
        return len(self._by_state[state])

    def is_active_id(self, job_id: str) -> bool:
        return job_id in self.records

    def is_active_basename(self, name: str) -> bool:
        return name in self._active_names

    def queued_by_priority(self) -> dict[int, int]:
        return self.queue.by_priority()

    def has_records_from(self, source: str) -> bool:
        return bool(self._by_source.get(source))

    def fully_taken_in(self, source: str) -> bool:
        """Every job of this claimed file has its record here (so a restart need not parse it again). A file
        with a rejected job, or one whose intake a crash cut short, has fewer: it is taken in again (idempotent)."""
        ids = self._by_source.get(source)
        if not ids:
            return False
        expected = self.records[next(iter(ids))].file_jobs
        return expected is not None and len(ids) >= expected

    def has_waiting_work(self) -> bool:
        return bool(self._by_state[JobState.QUEUED] or self._by_state[JobState.WAITING_FOR_MODEL])

    # ---- indexes -------------------------------------------------------------------------------

    def _index(self, rec: JobRecord) -> None:
        old = self.records.get(rec.id)
        if old is not None:
            self._unindex(old)
        self.records[rec.id] = rec
        self._by_state[rec.state][rec.id] = rec
        self._by_source.setdefault(rec.source, set()).add(rec.id)
        if rec.state is not None and rec.state.active:
            self._active_names[rec.params.basename] = rec.id
        if rec.state is JobState.QUEUED:
            self.queue.add(rec)
            if old is None or old.state is not JobState.QUEUED:
                self.newly_queued.append(rec)

    def _unindex(self, rec: JobRecord) -> None:
        self.records.pop(rec.id, None)
        self._by_state[rec.state].pop(rec.id, None)
        ids = self._by_source.get(rec.source)
        if ids is not None:
            ids.discard(rec.id)
            if not ids:
                del self._by_source[rec.source]
        if self._active_names.get(rec.params.basename) == rec.id:
            del self._active_names[rec.params.basename]
        if rec.state is JobState.QUEUED:
            self.queue.discard(rec.id)

    def drop_all(self) -> None:
        """Forget every record (the lease was lost: they are another daemon's now). Nothing is written."""
        for rec in list(self.records.values()):
            self._unindex(rec)
        self.cancel_requested.clear()
        self.interrupt_notes.clear()
        self.newly_queued.clear()
        self.unrecorded.clear()

    def outputs(self, basename: str) -> dict[str, str]:
        return {"video": str(self.outbox.video_path(basename)), "sidecar": str(self.outbox.sidecar_path(basename))}

    # ---- the one way to change state -----------------------------------------------------------

    def add(self, rec: JobRecord) -> None:
        """A record already persisted (by intake, or found in the spool)."""
        self._index(rec)

    def set(
        self, rec: JobRecord, state: JobState, note: str = "", *, durable: bool = True, **changes: Any
    ) -> JobRecord:
        """``durable=False`` only where a crash before the next fsync loses nothing: the record is rebuilt from
        something else that is durable (see Spool.transition and Publisher.publish)."""
        updated = self.spool.transition(rec, state, note, durable=durable, **changes)
        self._index(updated)
        self.record_history(updated)
        self.on_change()
        return updated

    def amend(self, rec: JobRecord, note: str, **changes: Any) -> JobRecord:
        """Persist changed fields of a record without a change of state (daemon.runtime.spool.Spool.amend), and
        re-index it: a queued job's new priority ranks it at once."""
        updated = self.spool.amend(rec, note, **changes)
        self._index(updated)
        self.record_history(updated)
        self.on_change()
        return updated

    def record_history(self, rec: JobRecord, sidecar: dict[str, Any] | None = None) -> None:
        if self.history is not None:
            self.history.record(rec.summary(), sidecar)

    def record_operation(self, op: str, by: str, job_id: str | None = None, **detail: Any) -> None:
        """An operator's request this daemon applied, in its history (daemon.ops.history ``operations``)."""
        if self.history is not None:
            self.history.record_operation(op, by=by, job_id=job_id, instance=self.settings.owner, detail=detail)

    # ---- ends and repeats ----------------------------------------------------------------------

    def done_if_published(self, rec: JobRecord, note: str) -> bool:
        """A RUNNING job whose sidecar (with its token) is in the outbox was published: record it DONE."""
        basename = rec.params.basename
        if self.outbox.published_token(basename) != rec.token:
            return False
        self.set(rec, JobState.DONE, note=note, finished_at=self.clock(), outputs=self.outputs(basename))
        return True

    def requeue_interrupted(self, rec: JobRecord) -> None:
        # Interrupted by us (a shutdown, an operator's pause), not by the job: the attempt is given back.
        note = self.interrupt_notes.pop(rec.id, "interrupted by shutdown")
        self.set(rec, JobState.QUEUED, note=note, attempts=max(0, rec.attempts - 1))

    def fail_or_retry(self, rec: JobRecord, err: JobError) -> None:
        """Ask the retry policy; queue the job again (with any changes it asks for) or write its failure
        record and mark it FAILED. A failure that is the folders' fault (full, unwritable, gone) pauses the
        daemon and sends the job back with its attempt given back (daemon.runtime.disk). When the decision
        cannot be written, reconcile makes it again with this same error."""
        err = self.disk.screen(err)
        try:
            self._fail_or_retry(rec, err)
        except OSError:
            self.unrecorded[rec.id] = err
            raise

    def _fail_or_retry(self, rec: JobRecord, err: JobError) -> None:
        w = self.settings.worker
        decision = decide(
            err,
            rec.attempts,
            params=rec.params,
            model=rec.model.name,
            fallback=list(rec.spec.get("fallback") or []),
            device=self.device_of(rec),
            max_attempts=w.max_attempts,
            base_seconds=w.retry_base_seconds,
            cap_seconds=w.retry_cap_seconds,
            rng=self.rng,
            multiple=rec.model.multiple,
        )
        errors = [*rec.errors, {**err.to_dict(), "attempt": rec.attempts, "at": self.clock()}]
        if decision.retry:
            changes: dict[str, Any] = {}
            if decision.changes:
                try:
                    changes = self._retry_changes(rec, decision.changes)
                except JobError as change_err:
                    err, decision = (
                        change_err,
                        decide(change_err, rec.attempts, max_attempts=0, base_seconds=0, cap_seconds=0),
                    )
            if decision.retry:
                if decision.degradation:
                    changes["degradations"] = [*rec.degradations, decision.degradation]
                if "pause" in err.details and rec.state is JobState.RUNNING:
                    changes["attempts"] = max(0, rec.attempts - 1)  # the folders' fault, not the job's
                self.set(
                    rec,
                    JobState.QUEUED,
                    note=decision.reason,
                    not_before=self.clock() + decision.delay_seconds,
                    last_error=err.to_dict(),
                    errors=errors,
                    **changes,
                )
                return
        if not self.lease_held():
            # Presumed dead while this was decided: the job is another daemon's now, and so is its record.
            self.on_lease_lost()
            return
        path = self.outbox.write_failure(
            rec.id,
            err,
            job_id=rec.id,
            source_name=rec.source_name,
            spec=rec.spec,
            attempts=rec.attempts,
            extra={
                "decision": decision.reason,
                "errors": errors,
                "model": rec.model.to_dict(),
                "parameters": rec.params.model_dump(mode="json"),
            },
        )
        self.set(
            rec,
            JobState.FAILED,
            note=f"{err.category.value}: {decision.reason}",
            finished_at=self.clock(),
            last_error=err.to_dict(),
            errors=errors,
            outputs={"failure": str(path)},
        )
        self.status.job_failed(rec.id, err.category.value, str(path))
        logger.bind(job=rec.id).error("job.failed id={} category={} error={}", rec.id, err.category.value, err.message)
        self.release_if_finished(rec.source)

    def _retry_changes(self, rec: JobRecord, changes: dict[str, Any]) -> dict[str, Any]:
        """Record fields for the next attempt after a degrading retry (policy.Decision.changes). A change of
        model resolves the job again, through the same path as intake."""
        if "model" not in changes:
            return {"params": rec.params.model_copy(update=changes)}
        params, model = resolve_retry(rec.spec, rec.id, rec.params, changes, self.settings)
        return {"params": params, "model": model}

    def release_if_finished(self, source: str) -> None:
        """Remove a claimed file once all its jobs are terminal, then their spool folders."""
        recs = [self.records[i] for i in self._by_source.get(source, ())]
        if not recs or not all(r.state is not None and r.state.terminal for r in recs):
            return
        self.spool.remove_source(source)
        for r in recs:
            self.spool.remove_job_dir(r.id)
            self._unindex(r)
            if r.id in self.cancel_names:  # a request that came as the job ended: not left for a later job of its id
                self.forget_cancel(r.id)

    def reconcile(self, running: AbstractSet[str]) -> None:
        """A record left RUNNING with no job in a worker (a write failed mid-way, e.g. on a full disk) goes
        back through the retry policy, so that no job is ever stuck."""
        for rec in self.in_state(JobState.RUNNING):
            if rec.id not in running:
                err = self.unrecorded.pop(rec.id, None)
                try:
                    if self.done_if_published(rec, "published; recorded late"):  # only DONE was not recorded
                        self.release_if_finished(rec.source)
                        continue
                    err = err or JobError(Category.IO_ERROR, "the job's result could not be recorded")
                    self.fail_or_retry(rec, err)
                except OSError as exc:
                    self.on_write_error(exc)
                    return

    def on_write_error(self, exc: OSError) -> None:
        err = classify_exception(exc)
        logger.error("daemon.write_failed category={} error={}", err.category.value, exc)
        self.disk.screen(err)  # full, unwritable or gone: pause

    # ---- cancels -------------------------------------------------------------------------------

    def take_cancels(self) -> list[str]:
        """Apply ``wan-daemon cancel ID`` requests (files in the state folder; whichever daemon holds the
        job acts). Queued and waiting jobs are cancelled now; returns the running ones, to be interrupted. The
        request names who asked (``by``; an empty file of an older CLI still cancels)."""
        try:
            names = os.listdir(self.cancel_dir)
        except FileNotFoundError:
            return []
        self.cancel_names = set(names)
        interrupt, cancelled = [], 0
        for job_id in names:
            if cancelled >= CANCELS_PER_ROUND:
                break  # the rest at the next rounds: a round stays short, so the lease keeps being beaten
            rec = self.records.get(job_id)
            if rec is None or (job_id in self.cancel_requested and rec.state is JobState.RUNNING):
                continue
            if rec.state is None or rec.state.terminal:  # it ended before the request came: nothing to cancel
                self.forget_cancel(job_id)
                continue
            # Active (waiting, queued or running) from here on.
            request = read_request(self.cancel_dir / job_id)
            if predates(request, rec.received_at):
                logger.bind(job=job_id).warning(
                    "job.cancel_ignored id={} by={}: the request predates this job (left for an earlier one)",
                    job_id,
                    request.get("by"),
                )
                self.forget_cancel(job_id)
                continue
            by, state = str(request.get("by") or ""), rec.state.value
            if rec.state is JobState.RUNNING:
                self.cancel_requested[job_id] = by
                interrupt.append(job_id)
            else:
                self.cancel(rec, "before it started", by=by)
                cancelled += 1
            self.record_operation("cancel", by or "?", job_id, state=state)
        return interrupt

    def cancel(self, rec: JobRecord, when: str, *, by: str | None = None) -> None:
        # The request is forgotten only once the cancellation is recorded: when the failure record cannot be
        # written (a read-only outbox), the request file stays and is applied again at the next round.
        by = by if by is not None else self.cancel_requested.get(rec.id, "")
        asked = f"by request of {by}" if by else "by request"
        self.fail_or_retry(rec, JobError(Category.CANCELLED, f"cancelled {asked} {when}"))
        self.forget_cancel(rec.id)

    def forget_cancel(self, job_id: str) -> None:
        self.cancel_requested.pop(job_id, None)
        self.cancel_names.discard(job_id)
        with contextlib.suppress(FileNotFoundError):
            (self.cancel_dir / job_id).unlink()

    # ---- models being downloaded --------------------------------------------------------------

    def models_arrived(self) -> None:
        """Queue the jobs whose model finished downloading; fail those whose download failed."""
        from daemon.models import locate

        for repo, error in self.downloads.finished().items():
            waiting = [r for r in self.in_state(JobState.WAITING_FOR_MODEL) if r.model.repo_id == repo]
            for rec in waiting:
                if error is None:
                    try:
                        located = locate(
                            rec.model.name,
                            models_dir=self.settings.paths.models,
                            model_roots=self.settings.paths.model_roots,
                        )
                    except JobError as err:
                        self.fail_or_retry(rec, JobError(Category.MODEL_DOWNLOAD, f"downloaded, but: {err.message}"))
                        continue
                    self.set(rec, JobState.QUEUED, note=f"{repo} downloaded", model=located)
                else:
                    suggestions = list(getattr(error, "suggestions", []))
                    self.fail_or_retry(
                        rec, JobError(Category.MODEL_DOWNLOAD, f"downloading {repo} failed: {error}", suggestions)
                    )
        self.ensure_downloads()

    def ensure_downloads(self) -> None:
        """Jobs taken in (or recovered) while waiting for a model: their download is under way."""
        for rec in self.in_state(JobState.WAITING_FOR_MODEL):
            if rec.model.repo_id:
                self.downloads.ensure(rec.model.repo_id, rec.model.architecture)
