"""What users receive: ``<name>.mp4`` + ``<name>.json`` sidecar, or ``failed/<id>.json``.

Everything appears atomically. The video is encoded by the worker into a hidden temp name in the
outbox folder and fsynced; here it is moved to its final name, then the sidecar is written last and
published with ``link()`` (which never replaces an existing file): a sidecar's presence means the
job is complete, and a job is never published twice.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from loguru import logger

from daemon import __version__
from daemon.errors import JobError
from daemon.fsutil import (
    TEMP_PREFIX,
    atomic_write_json,
    fsync_dir,
    publish,
    read_json,
    remove_stale_temps,
    temp_path_for,
)


class Outbox:
    def __init__(self, root: Path, owner: str | None = None) -> None:
        self.root = Path(root)
        self.owner = owner
        self.failed = self.root / "failed"
        self.root.mkdir(parents=True, exist_ok=True)
        self.failed.mkdir(exist_ok=True)

    def video_path(self, basename: str) -> Path:
        return self.root / f"{basename}.mp4"

    def sidecar_path(self, basename: str) -> Path:
        return self.root / f"{basename}.json"

    def poster_path(self, basename: str) -> Path:
        return self.root / f"{basename}.jpg"

    def failure_path(self, name: str) -> Path:
        return self.failed / f"{name}.json"

    def is_published(self, basename: str) -> bool:
        return self.sidecar_path(basename).exists()

    def published_token(self, basename: str) -> str | None:
        """The job token in an existing sidecar (to tell our own earlier publication from another job's)."""
        try:
            return read_json(self.sidecar_path(basename)).get("job_token")
        except (OSError, ValueError, AttributeError):
            return None

    def temp_video_path(self, basename: str) -> Path:
        return temp_path_for(self.video_path(basename), owner=self.owner)

    def clean_temps(self) -> list[Path]:
        """Our own leftovers (we are writing none now), and anyone's that are a day old."""
        removed = remove_stale_temps(self.root, self.owner) + remove_stale_temps(self.failed, self.owner)
        for p in removed:
            logger.info("outbox.temp_removed path={}", p)
        return removed

    def publish_result(
        self, basename: str, video_tmp: Path, sidecar: dict[str, Any], poster_tmp: Path | None = None
    ) -> bool:
        """Publish video (and poster), then the sidecar. False if a sidecar for ``basename`` already existed."""
        if self.is_published(basename):
            for tmp in (video_tmp, poster_tmp):
                if tmp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            return False
        # No sidecar: any existing mp4/jpg of this name is an incomplete earlier attempt of this job.
        if poster_tmp is not None and os.path.exists(poster_tmp):
            os.replace(poster_tmp, self.poster_path(basename))
        os.replace(video_tmp, self.video_path(basename))
        fsync_dir(self.root)
        tmp = temp_path_for(self.sidecar_path(basename), owner=self.owner)
        atomic_write_json(tmp, sidecar)
        return publish(tmp, self.sidecar_path(basename))

    def remove_stale_failure(self, job_id: str) -> None:
        """A job that succeeds after an earlier submission failed: the old failure record is obsolete."""
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(job_id).unlink()
            fsync_dir(self.failed)

    def write_failure(
        self,
        name: str,
        error: JobError,
        *,
        job_id: str | None,
        source_name: str | None,
        spec: dict[str, Any] | None,
        attempts: int,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        path = self.failure_path(name)
        record = {
            "id": job_id,
            "status": "failed",
            "file": source_name,
            **error.to_dict(),
            "attempts": attempts,
            "spec": spec,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "wan_daemon_version": __version__,
            **(extra or {}),
        }
        atomic_write_json(path, record)
        return path


__all__ = ["Outbox", "TEMP_PREFIX"]
