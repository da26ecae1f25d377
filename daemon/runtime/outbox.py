"""What users receive: ``<name>.mp4`` + ``<name>.json`` sidecar, or ``failed/<id>.json``.

Everything appears atomically. The video (and poster) is encoded by the worker into a hidden temp name in
the outbox folder and fsynced; here each file gets its final name with ``link()``, which never replaces an
existing file (daemon.fsutil.link_new / publish): the video first (it holds the name: whoever links it
publishes), then the poster; the folder is fsynced; then the sidecar, written last: a sidecar's presence
means the job is complete, and a job is never published twice. A daemon that lost a race (a peer that took
its jobs over published first, while it was frozen between its lease check and here) leaves the winner's
files as they are and removes its own temps.

Our temps keep their names until the sidecar is published, so an unfinished publication of ours is known by
them: one that failed (a sidecar that could not be written) is undone at once, and one that a crash cut
short is undone at the next start (``clean_temps``), before the temps go.

A video without a sidecar is an unfinished publication: someone's in progress, or an earlier attempt that a
crash interrupted between the video and the sidecar. It is left alone until it is ``abandoned_after``
seconds old (the daemon uses the lease grace: a publisher stuck that long has lost its jobs to another
daemon), then removed, so that the job can be published (its age is judged by the file server's clock: the
ctime a ``link()`` sets, against our own fresh temp's).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from daemon import __version__
from daemon.errors import JobError
from daemon.fsutil import (
    TEMP_PREFIX,
    atomic_write_json,
    fsync_dir,
    link_new,
    publish,
    read_json,
    remove,
    remove_stale_temps,
    temp_path_for,
    write_new_file,
)


class Outbox:
    def __init__(self, root: Path, owner: str | None = None, *, abandoned_after: float | None = None) -> None:
        """``abandoned_after``: seconds after which a video (or poster) without a sidecar is an abandoned
        attempt that may be removed; None: never (it then blocks its name until someone removes it)."""
        self.root = Path(root)
        self.owner = owner
        self.abandoned_after = abandoned_after
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
        """Our own leftovers (we are writing none now), and anyone's that are a day old. Our unfinished
        publications (a crash between the video's link and the sidecar's) are undone first."""
        self._undo_unfinished()
        removed = remove_stale_temps(self.root, self.owner) + remove_stale_temps(self.failed, self.owner)
        for p in removed:
            logger.info("outbox.temp_removed path={}", p)
        return removed

    def publish_result(
        self,
        basename: str,
        video_tmp: Path,
        sidecar: dict[str, Any],
        poster_tmp: Path | None = None,
        *,
        before_link: Callable[[], None] | None = None,
    ) -> bool:
        """Publish the video, the poster, then the sidecar, each with ``link()``: never over an existing file.

        False when the name was taken: a sidecar already existed, or another video holds the name (someone
        published it first, or is publishing it); then nothing of ours is left in the outbox. A leftover
        poster is not replaced either: the sidecar then names no poster. ``before_link``: a seam for tests,
        called in the window between the "already published?" check and the first link."""
        temps = (video_tmp, poster_tmp)
        if self.is_published(basename):
            _discard(temps)
            return False
        if before_link is not None:
            before_link()
        self._remove_abandoned(basename, video_tmp)
        video = self.video_path(basename)
        if not link_new(video_tmp, video):  # EEXIST: theirs stands
            _discard(temps)
            logger.warning("outbox.name_taken video={}: another publication holds it; ours is dropped", video)
            return False
        linked = [(video, video_tmp)]
        try:
            if poster_tmp is not None and os.path.exists(poster_tmp):
                poster = self.poster_path(basename)
                if link_new(poster_tmp, poster):
                    linked.append((poster, poster_tmp))
                else:
                    # We hold the video's name, so nobody else is publishing this name: a poster left by an
                    # attempt that never finished. It is not replaced, and the sidecar does not claim it.
                    logger.warning("outbox.poster_exists poster={}: left as it is; the sidecar names no poster", poster)
                    sidecar = {**sidecar, "poster": None}
            fsync_dir(self.root)  # the video's name is durable before a sidecar can describe it
            tmp = temp_path_for(self.sidecar_path(basename), owner=self.owner)
            write_new_file(tmp, (json.dumps(sidecar, indent=2, ensure_ascii=False, default=str) + "\n").encode())
            published = publish(tmp, self.sidecar_path(basename))  # link, then one folder fsync for the name
        except BaseException:
            # No sidecar describes them: the name is free again for the retry. Undoing may fail too (a read-only
            # outbox refuses the unlinks as it refused the link): logged, never raised over the first error.
            _unlink_ours(linked)
            _discard(temps)
            raise
        _discard(temps)
        return published

    def _remove_abandoned(self, basename: str, video_tmp: Path) -> None:
        """Remove a video and poster without a sidecar once they are ``abandoned_after`` seconds old."""
        if self.abandoned_after is None or self.is_published(basename):
            return
        try:
            now = os.stat(video_tmp).st_ctime  # the file server's clock, a lower bound of its now
        except FileNotFoundError:
            return
        for path in (self.video_path(basename), self.poster_path(basename)):
            try:
                age = now - os.stat(path).st_ctime
            except FileNotFoundError:
                continue
            if age >= self.abandoned_after:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    fsync_dir(self.root)
                logger.warning("outbox.abandoned_removed path={} age={:.0f}s: no sidecar ever completed it", path, age)

    def _undo_unfinished(self) -> None:
        """Undo our publications that a crash cut short: a video (and poster) of ours without a sidecar, known by
        our temp that is the same file."""
        if self.owner is None:
            return
        prefix = f"{TEMP_PREFIX}{self.owner}~"
        for video_tmp in self.root.glob(f"{prefix}*.mp4"):
            basename = video_tmp.name[len(prefix) :].rsplit("-", 1)[0]
            if not basename or self.is_published(basename):
                continue
            poster_tmp = video_tmp.with_name(video_tmp.stem + ".poster.jpg")
            ours = [(self.video_path(basename), video_tmp), (self.poster_path(basename), poster_tmp)]
            for final in _unlink_ours(ours):
                logger.warning("outbox.unfinished_removed path={}: our publication stopped before its sidecar", final)

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
        self.failed.mkdir(exist_ok=True)  # an outbox emptied by hand (failed/ included) takes failure records again
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


def _unlink_ours(linked: list[tuple[Path, Path]]) -> list[Path]:
    """Remove each final name that is still the same file as our temp (so ours, not someone else's). One that
    cannot be removed is logged (it is undone at the next start, by :meth:`Outbox.clean_temps`)."""
    removed = []
    for final, tmp in linked:
        try:
            if os.path.samefile(final, tmp):
                remove(final)
                removed.append(final)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.error("outbox.undo_failed path={} error={}", final, exc)
    if removed:
        with contextlib.suppress(OSError):
            fsync_dir(removed[0].parent)
    return removed


def _discard(temps: tuple[Path | None, ...]) -> None:
    """Remove our temps; one that cannot be removed (a read-only outbox) is left to clean_temps, and logged."""
    for tmp in temps:
        if tmp is not None:
            try:
                remove(tmp)
            except OSError as exc:
                logger.warning("outbox.temp_left path={} error={}", tmp, exc)


__all__ = ["Outbox", "TEMP_PREFIX"]
