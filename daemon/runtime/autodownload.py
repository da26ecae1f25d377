"""Background downloads of absent models for jobs that wait for them (``models.auto_download``).

One thread per repository, whatever the number of jobs waiting for it; the daemon's loop polls the
results, so every job transition still happens on the daemon's thread. Progress is kept for the
health file and logged at most every 10 seconds (a service has no terminal for progress bars).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from daemon.hub.download import DownloadError, download
from daemon.models import needed_patterns


class ModelDownloads:
    def __init__(self, *, min_free_mb: int = 0) -> None:
        self.min_free_mb = min_free_mb
        self.progress: dict[str, dict[str, Any]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._results: dict[str, Exception | None] = {}
        self._lock = threading.Lock()
        # Whether a download of this repo is wanted: some job waiting for it could run on some configured worker
        # (runtime.placement sets it). None: every download asked for is started.
        self.wanted: Callable[[str], bool] | None = None

    def ensure(self, repo_id: str, architecture: str) -> None:
        """Start downloading ``repo_id`` unless it is already under way, or no job waiting for it could run
        here (tens of GB are not fetched for jobs that would be refused once they arrive)."""
        if self.wanted is not None and not self.wanted(repo_id):
            return
        with self._lock:
            if (repo_id in self._threads and self._threads[repo_id].is_alive()) or repo_id in self._results:
                return  # under way, or finished and not yet collected by finished()
            self.progress[repo_id] = {"phase": "starting", "downloaded_bytes": 0, "total_bytes": None}
            thread = threading.Thread(
                target=self._run, args=(repo_id, architecture), name=f"download-{repo_id}", daemon=True
            )
            self._threads[repo_id] = thread
        logger.info("model.download_started repo={}", repo_id)
        thread.start()

    def _run(self, repo_id: str, architecture: str) -> None:
        last_log = [0.0]

        def on_progress(p: dict[str, Any]) -> None:
            self.progress[repo_id] = dict(p)
            now = time.monotonic()
            if now - last_log[0] >= 10 or p.get("phase") == "done":
                last_log[0] = now
                total = p.get("total_bytes") or 0
                logger.info(
                    "model.download_progress repo={} phase={} {:.2f}/{:.2f} GB files {}/{}",
                    repo_id,
                    p.get("phase"),
                    (p.get("downloaded_bytes") or 0) / 1e9,
                    total / 1e9,
                    p.get("files_done"),
                    p.get("files_total"),
                )

        error: Exception | None = None
        try:
            download(
                repo_id,
                allow_patterns=needed_patterns(architecture),
                progress=on_progress,
                min_free_mb=self.min_free_mb,
            )
        except DownloadError as exc:
            error = exc
        except Exception as exc:  # anything else is a failed download too, never a crashed daemon
            error = exc
        with self._lock:
            self._results[repo_id] = error
        if error is None:
            logger.info("model.download_done repo={}", repo_id)
        else:
            logger.error("model.download_failed repo={} error={}", repo_id, error)

    def finished(self) -> dict[str, Exception | None]:
        """Downloads that ended since the last call: repo -> None (success) or the error."""
        with self._lock:
            done, self._results = self._results, {}
        for repo in done:
            self.progress.pop(repo, None)
        return done
