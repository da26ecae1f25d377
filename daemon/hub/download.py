"""Download real Wan2.2 weights into the standard Hugging Face cache.

Pure I/O around ``huggingface_hub`` (no torch import). What this module adds to ``snapshot_download``:

* **Only what the pipeline loads.** :func:`daemon.models.needed_patterns` gives the ``allow_patterns`` for a
  Wan architecture: configs, tokenizer, scheduler and ``*.safetensors`` weights (with their index), never
  ``*.bin``/``*.pth``/``*.pt``, original checkpoints, README or example media.
* **Refusal up front.** Sizes come from ``HfApi.model_info(files_metadata=True)``; when the bytes still
  missing from the cache (plus ``min_free_mb``) exceed the free space of the cache's filesystem,
  :func:`download` raises :class:`DownloadError` before fetching anything.
* **Progress without a terminal.** A background thread measures the repo's ``blobs/`` folder (finished
  blobs and ``*.incomplete`` partial files) every ``progress_interval`` seconds and calls ``progress``
  with a dict, so a service whose stderr is not a TTY still reports progress. huggingface_hub's own bars
  are passed a ``tqdm_class`` that shows them only when stderr is a terminal.
* **Resume: huggingface_hub's own, as users get it.** With ``hf_xet`` installed (huggingface_hub's default),
  Xet-backed files (every Wan2.2 repo's weights) are fetched by hf_xet; other files, and every file when Xet is
  off, by plain HTTP, which huggingface_hub retries with a ``Range`` request when a transfer is cut off during
  a call. Each download is written to a process-unique ``<etag>.<random>.incomplete`` file that huggingface_hub
  deletes when its call fails and never reuses, so after a *killed* process the next call fetches that file
  from its start (files finished before stay). This module adds no resume of its own (a file Xet was writing
  need not be a prefix of the real one, and such code would run only with Xet off, not as users download): it
  removes the partial files killed processes left behind, which nothing would ever read, so that they neither
  fill the disk nor count as downloaded.
* **Checksums.** After a download the new files are hashed (sha256 for LFS files, the git blob id for the
  others) against the hub's metadata; corrupted ones are removed from the cache and reported. A manifest
  (``<snapshot>/.wan-daemon-manifest.json``: name, size, sha256 of each file) is written next to the files
  so that :func:`daemon.hub.verify.verify_local` (and :func:`daemon.hub.verify.verify` when the hub cannot be
  reached) works offline later.

``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured by
huggingface_hub itself (read when it is imported); this module never reads the environment.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.hub.cache import cache_root, discard, read_manifest, repo_storage, scan_blobs, write_manifest, write_ref
from daemon.hub.remote import DownloadError, RemoteFile, model_info, remote_files, translate_error
from daemon.hub.verify import check_file, file_digests

_GB = 1e9
_MIB = 1 << 20


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    allow_patterns: list[str] | str | None = None,
    progress: Callable[[dict], None] | None = None,
    token: str | None = None,
    min_free_mb: int = 0,
    endpoint: str | None = None,
    progress_interval: float = 0.5,
    max_workers: int = 8,
    disk_usage: Callable[[Path], Any] = shutil.disk_usage,
) -> Path:
    """Download ``repo_id`` (the files matching ``allow_patterns``; all when None) into the HF cache.

    Returns the snapshot folder (``<cache>/models--org--name/snapshots/<commit>``), which diffusers'
    ``from_pretrained`` loads. ``cache_dir`` None means huggingface_hub's default (``HF_HUB_CACHE`` /
    ``HF_HOME``). ``token`` None lets huggingface_hub use ``HF_TOKEN`` or the saved login; ``endpoint`` None
    means ``HF_ENDPOINT`` (as read when huggingface_hub was imported).

    ``progress`` is called from a background thread about every ``progress_interval`` seconds while bytes
    arrive, and once more at the end, with ``{"repo", "downloaded_bytes", "total_bytes", "files_done",
    "files_total", "phase"}`` (bytes already in the cache count as downloaded). ``phase`` is
    ``"downloading"``, then ``"verifying"`` while the new files are hashed (minutes for tens of GB), and
    ``"done"`` in the last call.

    Raises :class:`DownloadError` (with ``suggestions``) when the hub cannot be reached or refuses, when the
    free space of the cache's filesystem (``disk_usage``, default ``shutil.disk_usage``) is less than the
    bytes still missing plus ``min_free_mb`` MiB, or when downloaded files fail their checksum (they are
    removed from the cache so that the next call fetches them again). Files finished before a failure stay in
    the cache; calling again continues from there.
    """
    from huggingface_hub import snapshot_download

    cache = cache_root(cache_dir)
    info = model_info(repo_id, revision, token, endpoint)
    commit = info.sha
    if not commit:
        raise DownloadError(
            f"the hub did not say which commit {repo_id}@{revision or 'main'} is",
            ["Check HF_ENDPOINT: it must point at a Hugging Face Hub compatible server."],
        )
    files = remote_files(info, allow_patterns)
    if not files:
        raise DownloadError(
            f"no file of {repo_id}@{revision or 'main'} matches {allow_patterns!r}",
            ["Check the repo id and the patterns (needed_patterns(architecture))."],
        )
    storage = repo_storage(cache, repo_id)
    blobs = storage / "blobs"

    missing = _missing_bytes(files, blobs)
    need = missing + min_free_mb * _MIB
    where = _nearest_existing(cache)
    if missing > 0:
        free = disk_usage(where).free
        if free < need:
            extra = f" (+{min_free_mb} MiB to keep free)" if min_free_mb else ""
            raise DownloadError(
                f"{repo_id} needs {missing / _GB:.1f} GB{extra}, only {free / _GB:.1f} GB free on {where}",
                [
                    "Free disk space there, or point HF_HOME / HF_HUB_CACHE (or cache_dir) at a larger disk.",
                    "Remove cached models you no longer need: `hf cache ls`, then `hf cache rm model/<org>/<name>`.",
                ],
            )

    before, _ = scan_blobs(blobs)
    reporter = _Progress(repo_id, blobs, files, progress, progress_interval) if progress else None
    if reporter:
        reporter.report()
        reporter.start()
    try:
        _discard_orphaned_partials(cache, storage)
        try:
            from huggingface_hub import ResolvedRevision  # 1.x: skips a second repo_info call

            rev: str = ResolvedRevision(commit, initial=revision, repo_id=repo_id)
        except ImportError:  # pragma: no cover - older huggingface_hub
            rev = commit
        try:
            path = Path(
                snapshot_download(
                    repo_id,
                    revision=rev,
                    cache_dir=cache,
                    allow_patterns=allow_patterns,
                    token=token,
                    endpoint=endpoint,
                    max_workers=max_workers,
                    tqdm_class=_terminal_bar_class(),
                )
            )
        except Exception as exc:
            raise translate_error(exc, repo_id, revision) from exc
    finally:
        if reporter:
            reporter.stop()
    # With a resolved revision huggingface_hub does not record the branch -> commit ref: do it, so that
    # snapshot_download(local_files_only=True) and hub_snapshot() find this snapshot by branch name.
    write_ref(storage, revision, commit)

    # Hash what this call fetched, and anything the manifest does not vouch for yet.
    if reporter:
        reporter.report("verifying")
    manifest = read_manifest(path) if path.name == commit else None
    vouched = (manifest or {}).get("files", {})
    sha_of: dict[str, str] = {}
    bad: list[str] = []
    for f in files:
        local = path / f.name
        entry = vouched.get(f.name)
        if f.etag in before and entry and entry.get("sha256") and entry.get("size") == f.size:
            continue
        problem = check_file(local, f)
        if problem:
            bad.append(problem)
            discard(local, blobs / f.etag if f.etag else None)
        elif not f.sha256:
            sha_of[f.name] = file_digests(local, git=False)[1]
    if bad:
        raise DownloadError(
            f"{len(bad)} downloaded file(s) of {repo_id} are corrupted and were removed from the "
            "cache: " + "; ".join(bad),
            [
                "Run the download again (only these files are fetched again).",
                "If it happens again, check a proxy or mirror (HF_ENDPOINT) that may alter files.",
            ],
        )
    write_manifest(path, repo_id, revision, commit, allow_patterns, files, sha_of)
    if reporter:
        reporter.report("done")
    return path


# ---- free space ------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _missing_bytes(files: list[RemoteFile], blobs: Path) -> int:
    """Bytes still to fetch: every file not finished in the cache (huggingface_hub continues no partial file
    from an earlier process)."""
    done, _ = scan_blobs(blobs)
    return sum(f.size for f in files if f.size is not None and not (f.etag and f.etag in done))


# ---- progress --------------------------------------------------------------------------------------


class _Progress(threading.Thread):
    """Reports download progress by measuring the repo's blobs folder; works whatever stderr is."""

    def __init__(
        self, repo_id: str, blobs: Path, files: list[RemoteFile], callback: Callable[[dict], None], interval: float
    ) -> None:
        super().__init__(name=f"download-progress {repo_id}", daemon=True)
        self.repo_id, self.blobs, self.files, self.callback, self.interval = repo_id, blobs, files, callback, interval
        self.total = sum(f.size or 0 for f in files)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._last = -1
        self._phase = ""

    def measure(self) -> dict:
        done, partial = scan_blobs(self.blobs)
        downloaded = files_done = 0
        for f in self.files:
            if f.etag in done:
                files_done += 1
                downloaded += f.size if f.size is not None else done[f.etag]
            else:
                have = max((s for _, s in partial.get(f.etag or "", [])), default=0)
                downloaded += min(have, f.size) if f.size is not None else have
        return {
            "repo": self.repo_id,
            "downloaded_bytes": downloaded,
            "total_bytes": self.total,
            "files_done": files_done,
            "files_total": len(self.files),
        }

    def report(self, phase: str = "downloading") -> None:
        with self._lock:
            event = self.measure()
            # Never go backwards (a retry may truncate a partial file); phase changes are always reported.
            event["downloaded_bytes"] = max(event["downloaded_bytes"], self._last)
            if event["downloaded_bytes"] == self._last and phase == self._phase:
                return
            self._last, self._phase = event["downloaded_bytes"], phase
            event["phase"] = phase
            try:
                self.callback(event)
            except Exception:  # a broken callback must not break the download
                logger.opt(exception=True).warning("download progress callback failed")

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.report()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(5)


def _terminal_bar_class() -> type:
    """huggingface_hub's tqdm, shown only when stderr is a terminal.

    huggingface_hub disables most of its bars itself when stderr is not a TTY, but not all (the
    "Fetching N files" bar of snapshot_download prints carriage-return noise into a service's log).
    Progress for services goes through the ``progress`` callback instead.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _TerminalBar(hf_tqdm):
        def __init__(self, *args, **kwargs):
            if not _stderr_is_tty():
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _TerminalBar


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ---- partial files left by killed processes --------------------------------------------------------


def _discard_orphaned_partials(cache: Path, storage: Path) -> None:
    """Remove the ``*.incomplete`` files of downloads that no process is running any more (a killed one's).

    huggingface_hub holds ``<cache>/.locks/<repo folder>/<etag>.lock`` while it downloads a blob: a partial
    file whose lock can be taken at once belongs to nobody and is never continued (its name is unique to the
    process that wrote it)."""
    from filelock import FileLock, Timeout

    _, partial = scan_blobs(storage / "blobs")
    for etag, parts in partial.items():
        lock_path = cache / ".locks" / storage.name / f"{etag}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), mode=0o664)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # being downloaded right now, by another process or thread
        try:
            for path, size in parts:
                logger.info("download.partial_discarded file={} bytes={} (left by a killed download)", path, size)
                path.unlink(missing_ok=True)
        finally:
            lock.release()
