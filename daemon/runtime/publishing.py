"""Publishing a finished job: the sidecar, the outbox (video, poster, then sidecar), the DONE record and its
history row. Only the owner of the job's lease publishes: it checks the lease before publishing, and again
after (a daemon frozen in between may have lost the job to the peer that took its spool over: the outbox
never lets it replace what that peer published, and it records nothing of the job)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon import __version__
from daemon.config import Settings
from daemon.errors import Category, JobError, classify_exception
from daemon.fsutil import remove
from daemon.jobs import JobRecord, JobState
from daemon.memory import PeakBook, book_key
from daemon.runtime.book import JobBook
from daemon.runtime.leases import Lease
from daemon.runtime.outbox import Outbox
from daemon.runtime.status import Status
from daemon.worker.protocol import DeviceInfo, JobResult

if TYPE_CHECKING:
    from daemon.runtime.placement import RunningJob

TINY_NOTE = "tiny random-weight test model: this video is noise, made only to exercise the real pipeline"


def rfc3339(ts: float | None) -> str | None:
    """A sidecar timestamp: RFC 3339 in UTC with microseconds, e.g. 2026-05-01T18:30:00.123456+00:00."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def earlier_attempts(rec: JobRecord) -> list[dict[str, Any]]:
    """Why each earlier attempt of the job ended (JobRecord.errors): attempt, category, message, when."""
    return [
        {
            "attempt": e.get("attempt"),
            "category": e.get("error_category"),
            "message": e.get("message"),
            "at": rfc3339(e.get("at")),
        }
        for e in rec.errors
    ]


class Publisher:
    def __init__(
        self,
        settings: Settings,
        book: JobBook,
        outbox: Outbox,
        lease: Lease,
        peaks: PeakBook,
        *,
        status: Status,
        clock: Callable[[], float],
        on_lease_lost: Callable[[], None],
        before_publish: Callable[[JobRecord, Path], None] | None = None,
    ) -> None:
        """``before_publish``: a seam for tests (a daemon frozen between its lease check and the outbox), called
        with the record and the video's temp path inside Outbox.publish_result's window; None in production."""
        self.settings = settings
        self.book = book
        self.outbox = outbox
        self.lease = lease
        self.peaks = peaks
        self.status = status
        self.clock = clock
        self.on_lease_lost = on_lease_lost
        self.before_publish = before_publish

    def publish(
        self, rec: JobRecord, result: JobResult, job: RunningJob, device: DeviceInfo | None, worker_pid: int | None
    ) -> None:
        basename = rec.params.basename
        now = self.clock()
        if not self.lease.held():
            # We were presumed dead and another daemon owns this job now: it publishes, we must not.
            self.discard_temp(job)
            self.on_lease_lost()
            return
        if result.peak_vram_usage_mb and job.estimate_mb and job.plan_matches_run:
            # Estimates improve with use: the measured peak corrects this kind of job's next estimate. A state
            # folder that refuses the write costs the lesson, never the job.
            try:
                self.peaks.record(
                    book_key(rec.model.architecture, job.run_offload, vae_tiling=job.run_tiling, tiny=rec.model.tiny),
                    job.estimate_mb,
                    result.peak_vram_usage_mb,
                )
            except OSError as exc:
                logger.warning("memory.peak_not_recorded id={} error={}", rec.id, exc)
        sidecar = self.sidecar(rec, result, device, worker_pid, now)
        video_tmp = Path(result.video_tmp or job.video_tmp)
        hook = self.before_publish
        try:
            poster = Path(result.poster_tmp) if result.poster_tmp else None
            published = self.outbox.publish_result(
                basename, video_tmp, sidecar, poster, before_link=None if hook is None else lambda: hook(rec, video_tmp)
            )
        except OSError as exc:
            self.discard_temp(job)
            if not self.lease.held():  # not ours to retry or fail any more
                self.on_lease_lost()
                return
            self.book.fail_or_retry(rec, classify_exception(exc))  # a full, read-only or gone outbox pauses there
            return
        if not self.lease.held():
            # Frozen past our lease while publishing: the job is the taker's now. If ours won the race it is
            # complete, and the taker finds it by its token; nothing else here is ours to record.
            self.discard_temp(job)
            self.on_lease_lost()
            return
        if not published:
            token = self.outbox.published_token(basename)
            if token is None:  # a video without a sidecar holds the name: retried once it is done or abandoned
                self.book.fail_or_retry(
                    rec,
                    JobError(
                        Category.IO_ERROR,
                        f"{basename}.mp4 is in the outbox without its sidecar (a publication in progress, or an "
                        "unfinished one); trying again later",
                    ),
                )
                return
            if token != rec.token:
                self.book.fail_or_retry(
                    rec, JobError(Category.DUPLICATE_JOB, f"{basename}.json appeared in the outbox while the job ran")
                )
                return
        self.outbox.remove_stale_failure(rec.id)
        outputs = self.book.outputs(basename)
        # Not fsynced: the sidecar with this job's token is durable in the outbox now, and a restart that finds
        # the record still RUNNING records it DONE from that sidecar (JobBook.done_if_published).
        done = self.book.set(
            rec, JobState.DONE, note=f"published {basename}.mp4", durable=False, finished_at=now, outputs=outputs
        )
        self.book.record_history(done, sidecar)
        seconds = now - (rec.started_at or now)
        self.status.job_done(rec.id, rec.model.name, seconds, outputs)
        logger.bind(job=rec.id).success(
            "job.published id={} video={} seconds={:.2f}", rec.id, self.outbox.video_path(basename), seconds
        )
        self.book.release_if_finished(rec.source)

    def sidecar(
        self, rec: JobRecord, result: JobResult, device: DeviceInfo | None, worker_pid: int | None, now: float
    ) -> dict[str, Any]:
        started = rec.started_at or now
        timings = {
            "queue_wait": round(started - (rec.queued_at or started), 4),
            **result.timings,
            "total": round(now - started, 4),
        }
        basename = rec.params.basename
        video = asdict(result.video) if result.video is not None else {}
        resources = dict(result.resources)
        pipeline = resources.pop("pipeline", None)  # what ran (daemon.worker.media.pipeline_provenance)
        sidecar: dict[str, Any] = {
            "id": rec.id,
            "job_token": rec.token,
            "status": "done",
            "file": rec.source_name,
            "spec": rec.spec,
            "parameters": rec.params.model_dump(mode="json"),
            "model_used": {
                **rec.model.to_dict(),
                "path": result.model_path,
                "cache": result.model_cache,
                "evicted": result.models_evicted,
                "load_seconds": result.timings.get("model_load"),
            },
            "device": {
                "type": result.device,
                "name": device.device_name if device else None,
                "cpu_threads": device.cpu_threads if device else None,
                **({"host": device.host, "actor": device.actor} if device and device.host else {}),  # Ray
            },
            "timings": timings,
            "generation_time_seconds": round(now - started, 4),
            "peak_vram_usage_mb": result.peak_vram_usage_mb,
            "peak_rss_mb": result.peak_rss_mb,
            "pipeline": pipeline,
            "resources": resources,
            "optimizations_applied": result.optimizations_applied,
            "degradations": rec.degradations,
            "attempts": rec.attempts,
            "earlier_attempts": earlier_attempts(rec),
            "video": {"file": f"{basename}.mp4", **video},
            "poster": f"{basename}.jpg" if result.poster_tmp else None,
            "versions": {"wan_daemon": __version__, **(device.versions if device else {})},
            "host": socket.gethostname(),
            "instance": self.settings.owner,
            "worker_pid": worker_pid,
            "worker": rec.worker,
            "timestamps": {
                "received_at": rfc3339(rec.received_at),
                "queued_at": rfc3339(rec.queued_at),
                "started_at": rfc3339(started),
                "finished_at": rfc3339(now),
            },
        }
        if rec.model.tiny:
            sidecar["note"] = TINY_NOTE
        return sidecar

    @staticmethod
    def discard_temp(job: RunningJob | None) -> None:
        """Remove a job's temps. Called while handling an error: one that cannot be removed (a read-only outbox)
        is logged and left for Outbox.clean_temps, never raised over the error being handled."""
        if job is not None and job.video_tmp:
            video_tmp = Path(job.video_tmp)
            for tmp in (video_tmp, video_tmp.with_name(video_tmp.stem + ".poster.jpg")):
                try:
                    remove(tmp)
                except OSError as exc:
                    logger.warning("outbox.temp_left path={} error={}", tmp, exc)
