"""Download real Wan2.2 weights into the standard Hugging Face cache, check them, list them, remove them.

Pure I/O around ``huggingface_hub`` (no torch import). What this module adds to ``snapshot_download``:

* **Only what the pipeline loads.** :func:`needed_patterns` gives the ``allow_patterns`` for a Wan
  architecture: configs, tokenizer, scheduler and ``*.safetensors`` weights (with their index), never
  ``*.bin``/``*.pth``/``*.pt``, original checkpoints, README or example media.
* **Refusal up front.** Sizes come from ``HfApi.model_info(files_metadata=True)``; when the bytes still
  missing from the cache (plus ``min_free_mb``) exceed the free space of the cache's filesystem,
  :func:`download` raises :class:`DownloadError` before fetching anything.
* **Progress without a terminal.** A background thread measures the repo's ``blobs/`` folder (finished
  blobs and ``*.incomplete`` partial files) every ``progress_interval`` seconds and calls ``progress``
  with a dict, so a service whose stderr is not a TTY still reports progress. huggingface_hub's own bars
  are passed a ``tqdm_class`` that shows them only when stderr is a terminal.
* **Resume.** huggingface_hub resumes a transfer cut off *during* a call (it retries with ``Range``), but
  since 1.x it writes each download to a process-unique ``<etag>.<random>.incomplete`` file and deletes it
  when the call fails, so a *new* call starts that file from zero. Partial files survive only when the
  process is killed (SIGKILL, OOM killer, power loss). Before each download, :func:`download` continues
  such orphaned partial files itself with an HTTP ``Range`` request (plain HTTP only, i.e. when Xet is
  disabled or ``hf_xet`` is not installed: a file Xet was writing need not be a prefix of the real one),
  checks the result against the hub's sha256 and moves it into place. It never deletes a partial file that
  could still be continued.
* **Checksums.** After a download the new files are hashed (sha256 for LFS files, the git blob id for the
  others) against the hub's metadata; corrupted ones are removed from the cache and reported. A manifest
  (``<snapshot>/.wan-daemon-manifest.json``: name, size, sha256 of each file) is written next to the files
  so that :func:`verify_local` (and :func:`verify` when the hub cannot be reached) works offline later.

``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured by
huggingface_hub itself (read when it is imported); this module never reads the environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from loguru import logger

from daemon.fsutil import atomic_write_json, read_json

MANIFEST_NAME = ".wan-daemon-manifest.json"
MANIFEST_VERSION = 1

# Architectures (see daemon.models) whose pipeline has a second expert, ``transformer_2``.
_TWO_EXPERT_ARCHS = ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b")
_KNOWN_ARCHS = ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "wan-t2v")

_GB = 1e9
_MIB = 1 << 20


class DownloadError(Exception):
    """A download (or its preparation) failed. ``suggestions`` says what a person can do about it."""

    def __init__(self, message: str, suggestions: Iterable[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.suggestions: list[str] = list(suggestions or [])

    def __str__(self) -> str:
        if not self.suggestions:
            return self.message
        return self.message + "".join(f"\n  - {s}" for s in self.suggestions)


@dataclass
class VerifyReport:
    """The result of :func:`verify` / :func:`verify_local`. ``problems`` name the files concerned."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    source: str = "hub"  # "hub": checked against the hub's metadata; "manifest": against the local manifest
    path: Path | None = None  # the snapshot folder checked


# ---- which files -----------------------------------------------------------------------------------


def needed_patterns(architecture: str) -> list[str]:
    """``allow_patterns`` for the files a diffusers Wan pipeline of ``architecture`` loads.

    ``architecture`` is one of daemon.models' architectures (``wan2.2-ti2v-5b``, ``wan2.2-t2v-a14b``,
    ``wan2.2-i2v-a14b``, ``wan-t2v``) or a registry model name. The patterns keep ``model_index.json``, the
    whole ``scheduler/`` and ``tokenizer/`` folders (small; the tokenizer needs ``spiece.model``), and for
    each weight folder (``text_encoder``, ``transformer``, ``transformer_2`` for the two-expert A14B models,
    ``vae``) only its ``*.json`` (config, safetensors index) and ``*.safetensors`` files. Anything else in the
    repo — ``*.bin``/``*.pth``/``*.pt`` duplicates, original checkpoints, README and example media — is
    not fetched. Patterns use fnmatch, as ``snapshot_download`` does (``*`` also matches ``/``).
    """
    arch = architecture
    if arch not in _KNOWN_ARCHS:
        from daemon.models import REGISTRY

        info = REGISTRY.get(arch)
        if info is None:
            raise ValueError(f"unknown architecture or model {architecture!r}; expected one of "
                             f"{', '.join(_KNOWN_ARCHS)} or a registry name")
        arch = info.architecture
    weights = ["text_encoder", "transformer", "vae"]
    if arch in _TWO_EXPERT_ARCHS:
        weights.insert(2, "transformer_2")
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*"]
    for folder in weights:
        patterns += [f"{folder}/*.json", f"{folder}/*.safetensors"]
    return patterns


def _filter(names: Iterable[str], allow_patterns: list[str] | str | None) -> list[str]:
    """The same filter snapshot_download applies, so that our sizes describe exactly what it fetches."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(items=list(names), allow_patterns=allow_patterns))


# ---- hub metadata ----------------------------------------------------------------------------------


class RemoteFile(NamedTuple):
    name: str
    size: int | None
    blob_id: str | None  # git object id (of the LFS pointer for LFS files)
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str | None:
        """The name of this file's blob in the cache: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 or self.blob_id


def _remote_files(info: Any, allow_patterns: list[str] | str | None) -> list[RemoteFile]:
    files: dict[str, RemoteFile] = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha = _lfs_field(lfs, "sha256")
        size = _lfs_field(lfs, "size") if lfs is not None else None
        files[s.rfilename] = RemoteFile(s.rfilename, size if size is not None else getattr(s, "size", None),
                                        getattr(s, "blob_id", None), sha)
    return [files[n] for n in _filter(files, allow_patterns)]


def _lfs_field(lfs: Any, key: str) -> Any:
    if lfs is None:
        return None
    if isinstance(lfs, dict):
        return lfs.get(key)
    return getattr(lfs, key, None)


def _cache_root(cache_dir: Path | str | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().resolve()


def _storage(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _is_commit(revision: str | None) -> bool:
    return revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _model_info(repo_id: str, revision: str | None, token: str | None, endpoint: str | None) -> Any:
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise _translate(exc, repo_id, revision) from exc


def _translate(exc: BaseException, repo_id: str, revision: str | None) -> DownloadError:
    """A huggingface_hub / network / OS error as a DownloadError that says what to do."""
    from huggingface_hub import errors as hf_errors

    name = type(exc).__name__
    net = ("Check the network connection, a proxy (HTTPS_PROXY) or HF_ENDPOINT if you use a mirror, "
           "then run the download again: finished files are kept.")
    if isinstance(exc, DownloadError):
        return exc
    if isinstance(exc, getattr(hf_errors, "OfflineModeIsEnabled", ())) or "offline mode is enabled" in str(exc):
        return DownloadError(f"cannot download {repo_id}: huggingface_hub offline mode is on (HF_HUB_OFFLINE=1)",
                             ["Unset HF_HUB_OFFLINE (or set it to 0) for the download; the daemon itself "
                              "can keep running offline."])
    if isinstance(exc, getattr(hf_errors, "GatedRepoError", ())):
        return DownloadError(f"{repo_id} is a gated repo and this request is not allowed to read it ({name})",
                             [f"Accept the model's licence on https://huggingface.co/{repo_id} with your account.",
                              "Then pass a token that can read it: set HF_TOKEN or run `hf auth login`."])
    if isinstance(exc, getattr(hf_errors, "RevisionNotFoundError", ())):
        return DownloadError(f"revision {revision!r} of {repo_id} does not exist on the hub",
                             ["Check the revision (branch, tag or full commit hash)."])
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
        return DownloadError(f"repository {repo_id} was not found (or is private / gated and no valid token was "
                             "sent)", ["Check the repo id (e.g. Wan-AI/Wan2.2-TI2V-5B-Diffusers).",
                                       "For a private or gated repo set HF_TOKEN or run `hf auth login`."])
    if isinstance(exc, OSError) and getattr(exc, "errno", None) in (28, 122):  # ENOSPC, EDQUOT
        return DownloadError(f"the disk filled up while downloading {repo_id}: {exc}",
                             ["Free disk space (or point HF_HOME / HF_HUB_CACHE at a larger disk), then run the "
                              "download again: finished files are kept."])
    if isinstance(exc, getattr(hf_errors, "HfHubHTTPError", ())):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        tips = [net]
        if status in (401, 403):
            tips.insert(0, "The hub refused the request: check HF_TOKEN (or `hf auth login`) and that your "
                           "account may read this repo.")
        return DownloadError(f"the hub answered HTTP {status} for {repo_id}: {str(exc).splitlines()[0]}", tips)
    return DownloadError(f"downloading {repo_id} failed: {name}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         [net])


# ---- the cache on disk -----------------------------------------------------------------------------


def _scan_blobs(blobs: Path) -> tuple[dict[str, int], dict[str, list[tuple[Path, int]]]]:
    """Finished blobs (etag -> size) and partial files (etag -> [(path, size)]) in a repo's blobs folder."""
    done: dict[str, int] = {}
    partial: dict[str, list[tuple[Path, int]]] = {}
    try:
        entries = list(os.scandir(blobs))
    except OSError:
        return done, partial
    for entry in entries:
        try:
            size = entry.stat().st_size  # follows a shared-store symlink: the payload's size
        except OSError:
            continue
        if entry.name.endswith(".incomplete"):
            partial.setdefault(entry.name.split(".", 1)[0], []).append((Path(entry.path), size))
        elif "." not in entry.name:
            done[entry.name] = size
    return done, partial


def _nearest_existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _missing_bytes(files: list[RemoteFile], blobs: Path) -> int:
    done, partial = _scan_blobs(blobs)
    missing = 0
    for f in files:
        if f.size is None or (f.etag and f.etag in done):
            continue
        have = max((s for _, s in partial.get(f.etag or "", [])), default=0) if _http_resume_possible() else 0
        missing += max(f.size - (have if have <= f.size else 0), 0)
    return missing


def _http_resume_possible() -> bool:
    """Partial files are continued by plain HTTP only when Xet is not used (see the module docstring)."""
    import importlib.util

    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_DISABLE_XET", False):
        return True
    return importlib.util.find_spec("hf_xet") is None


# ---- progress --------------------------------------------------------------------------------------


class _Progress(threading.Thread):
    """Reports download progress by measuring the repo's blobs folder; works whatever stderr is."""

    def __init__(self, repo_id: str, blobs: Path, files: list[RemoteFile],
                 callback: Callable[[dict], None], interval: float) -> None:
        super().__init__(name=f"download-progress {repo_id}", daemon=True)
        self.repo_id, self.blobs, self.files, self.callback, self.interval = repo_id, blobs, files, callback, interval
        self.total = sum(f.size or 0 for f in files)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._last = -1
        self._phase = ""

    def measure(self) -> dict:
        done, partial = _scan_blobs(self.blobs)
        downloaded = files_done = 0
        for f in self.files:
            if f.etag in done:
                files_done += 1
                downloaded += f.size if f.size is not None else done[f.etag]
            else:
                have = max((s for _, s in partial.get(f.etag or "", [])), default=0)
                downloaded += min(have, f.size) if f.size is not None else have
        return {"repo": self.repo_id, "downloaded_bytes": downloaded, "total_bytes": self.total,
                "files_done": files_done, "files_total": len(self.files)}

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


# ---- resuming partial files left by a killed process ----------------------------------------------


def _resume_partials(repo_id: str, commit: str, files: list[RemoteFile], cache: Path, storage: Path,
                     token: str | None, endpoint: str | None) -> None:
    """Continue ``*.incomplete`` files that a killed download left behind (see the module docstring)."""
    if not _http_resume_possible():
        return
    blobs = storage / "blobs"
    done, partial = _scan_blobs(blobs)
    for f in files:
        if not f.etag or f.etag in done or f.etag not in partial or f.size is None:
            continue
        try:
            _resume_one(repo_id, commit, f, cache, storage, token, endpoint)
        except Exception as exc:  # keep the partial file; snapshot_download fetches the file from scratch
            logger.warning("download.resume_failed repo={} file={} error={}: {}", repo_id, f.name,
                           type(exc).__name__, exc)


def _resume_one(repo_id: str, commit: str, f: RemoteFile, cache: Path, storage: Path,
                token: str | None, endpoint: str | None) -> None:
    from filelock import FileLock, Timeout
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    blobs = storage / "blobs"
    # The lock huggingface_hub holds while it downloads this blob: if it is taken, someone is downloading it.
    lock_path = cache / ".locks" / storage.name / f"{f.etag}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), mode=0o664)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return
    try:
        done, partial = _scan_blobs(blobs)
        if f.etag in done or f.etag not in partial:
            return
        candidates = sorted(partial[f.etag], key=lambda p: p[1], reverse=True)
        best, have = candidates[0]
        for other, _ in candidates[1:]:  # shorter copies of the same bytes: nobody can use them any more
            other.unlink(missing_ok=True)
        if have > f.size:
            best.unlink(missing_ok=True)
            return
        if have < f.size:
            url = hf_hub_url(repo_id, f.name, revision=commit, endpoint=endpoint)
            meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
            if meta.etag != f.etag:
                return  # not the file the partial belongs to: leave both alone
            headers = build_hf_headers(token=token)
            if _origin(meta.location) != _origin(url):
                headers.pop("authorization", None)  # a CDN's signed URL; the token stays on the hub
            logger.info("download.resume repo={} file={} from_byte={} of={}", repo_id, f.name, have, f.size)
            with open(best, "ab") as fh:
                http_get(meta.location, fh, resume_size=have, headers=headers, expected_size=f.size,
                         displayed_filename=f.name)
        problem = _check_file(best, f)
        if problem:
            logger.warning("download.resume_discarded repo={} file={}: {}", repo_id, f.name, problem)
            best.unlink(missing_ok=True)
            return
        os.chmod(best, 0o644)
        os.replace(best, blobs / f.etag)
    finally:
        lock.release()


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlparse

    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port


# ---- checksums -------------------------------------------------------------------------------------


def _digests(path: Path, *, git: bool) -> tuple[int, str, str | None]:
    """(size, sha256, git blob id or None) of a file, in one read."""
    size = path.stat().st_size
    sha = hashlib.sha256()
    gsha = hashlib.sha1(b"blob %d\0" % size) if git else None
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            sha.update(chunk)
            if gsha is not None:
                gsha.update(chunk)
    return size, sha.hexdigest(), gsha.hexdigest() if gsha else None


def _check_file(path: Path, f: RemoteFile) -> str | None:
    """None when ``path`` holds ``f``'s bytes, else what is wrong (naming the file)."""
    try:
        size = path.stat().st_size
    except OSError:
        return f"{f.name}: missing"
    if f.size is not None and size != f.size:
        return f"{f.name}: size {size} bytes, expected {f.size}"
    if f.sha256:
        got = _digests(path, git=False)[1]
        if got != f.sha256:
            return f"{f.name}: sha256 {got} does not match the hub's {f.sha256} (corrupted)"
    elif f.blob_id:
        got = _digests(path, git=True)[2]
        if got != f.blob_id:
            return f"{f.name}: git blob id {got} does not match the hub's {f.blob_id} (corrupted)"
    return None


# ---- manifest --------------------------------------------------------------------------------------


def _read_manifest(snapshot: Path) -> dict | None:
    try:
        data = read_json(snapshot / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _write_manifest(snapshot: Path, repo_id: str, revision: str | None, commit: str,
                    allow_patterns: list[str] | str | None, files: list[RemoteFile],
                    sha_of: dict[str, str]) -> None:
    old = _read_manifest(snapshot) or {}
    entries = dict(old.get("files", {})) if old.get("commit") == commit else {}
    for f in files:
        entries[f.name] = {"size": f.size, "sha256": f.sha256 or sha_of.get(f.name)
                           or entries.get(f.name, {}).get("sha256"), "git_oid": f.blob_id, "lfs": bool(f.sha256)}
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
    atomic_write_json(snapshot / MANIFEST_NAME, {
        "version": MANIFEST_VERSION, "repo_id": repo_id, "revision": revision, "commit": commit,
        "allow_patterns": patterns, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
    })


# ---- public API ------------------------------------------------------------------------------------


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

    cache = _cache_root(cache_dir)
    info = _model_info(repo_id, revision, token, endpoint)
    commit = info.sha
    if not commit:
        raise DownloadError(f"the hub did not say which commit {repo_id}@{revision or 'main'} is",
                            ["Check HF_ENDPOINT: it must point at a Hugging Face Hub compatible server."])
    files = _remote_files(info, allow_patterns)
    if not files:
        raise DownloadError(f"no file of {repo_id}@{revision or 'main'} matches {allow_patterns!r}",
                            ["Check the repo id and the patterns (needed_patterns(architecture))."])
    storage = _storage(cache, repo_id)
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
                ["Free disk space there, or point HF_HOME / HF_HUB_CACHE (or cache_dir) at a larger disk.",
                 "Remove cached models you no longer need: `hf cache ls`, then `hf cache rm model/<org>/<name>`."])

    before, _ = _scan_blobs(blobs)
    reporter = _Progress(repo_id, blobs, files, progress, progress_interval) if progress else None
    if reporter:
        reporter.report()
        reporter.start()
    try:
        _resume_partials(repo_id, commit, files, cache, storage, token, endpoint)
        try:
            from huggingface_hub import ResolvedRevision  # 1.x: skips a second repo_info call

            rev: str = ResolvedRevision(commit, initial=revision, repo_id=repo_id)
        except ImportError:  # pragma: no cover - older huggingface_hub
            rev = commit
        try:
            path = Path(snapshot_download(
                repo_id, revision=rev, cache_dir=cache, allow_patterns=allow_patterns, token=token,
                endpoint=endpoint, max_workers=max_workers, tqdm_class=_terminal_bar_class(),
            ))
        except Exception as exc:
            raise _translate(exc, repo_id, revision) from exc
    finally:
        if reporter:
            reporter.stop()
    # With a resolved revision huggingface_hub does not record the branch -> commit ref: do it, so that
    # snapshot_download(local_files_only=True) and hub_snapshot() find this snapshot by branch name.
    _write_ref(storage, revision, commit)

    # Hash what this call fetched, and anything the manifest does not vouch for yet.
    if reporter:
        reporter.report("verifying")
    manifest = _read_manifest(path) if path.name == commit else None
    vouched = (manifest or {}).get("files", {})
    sha_of: dict[str, str] = {}
    bad: list[str] = []
    for f in files:
        local = path / f.name
        entry = vouched.get(f.name)
        if f.etag in before and entry and entry.get("sha256") and entry.get("size") == f.size:
            continue
        problem = _check_file(local, f)
        if problem:
            bad.append(problem)
            _discard(local, blobs / f.etag if f.etag else None)
        elif not f.sha256:
            sha_of[f.name] = _digests(local, git=False)[1]
    if bad:
        raise DownloadError(f"{len(bad)} downloaded file(s) of {repo_id} are corrupted and were removed from the "
                            "cache: " + "; ".join(bad),
                            ["Run the download again (only these files are fetched again).",
                             "If it happens again, check a proxy or mirror (HF_ENDPOINT) that may alter files."])
    _write_manifest(path, repo_id, revision, commit, allow_patterns, files, sha_of)
    if reporter:
        reporter.report("done")
    return path


def _write_ref(storage: Path, revision: str | None, commit: str) -> None:
    ref = revision or "main"
    if _is_commit(ref):
        return
    ref_path = storage / "refs" / ref
    with contextlib.suppress(OSError):
        if ref_path.read_text() == commit:
            return
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_path.with_name(f"{ref_path.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref_path)


def _discard(pointer: Path, blob: Path | None) -> None:
    with contextlib.suppress(OSError):
        pointer.unlink()
    if blob is not None:
        with contextlib.suppress(OSError):
            blob.unlink()


def snapshot_path(repo_id: str, *, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (branch, tag or commit), or None. No network.

    Unlike ``snapshot_download(local_files_only=True)``, this also finds snapshots downloaded with
    ``allow_patterns`` (huggingface_hub then reports the repo as incomplete because files that were never
    wanted are missing). When a manifest is there, every file it lists must be present with its size.
    """
    storage = _storage(_cache_root(cache_dir), repo_id)
    rev = revision or "main"
    commit = rev if _is_commit(rev) else None
    if commit is None:
        try:
            commit = (storage / "refs" / rev).read_text().strip()
        except OSError:
            return None
    snap = storage / "snapshots" / commit
    if not snap.is_dir():
        return None
    manifest = _read_manifest(snap)
    if manifest is not None:
        for name, entry in manifest["files"].items():
            try:
                if (snap / name).stat().st_size != entry.get("size"):
                    return None
            except OSError:
                return None
    return snap


def verify_local(path: Path, *, checksums: bool = True) -> VerifyReport:
    """Check a snapshot folder against the manifest :func:`download` wrote in it. No network.

    Every listed file must exist with its recorded size and (``checksums``) sha256.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        return VerifyReport(False, [f"no {MANIFEST_NAME} in {path}: not downloaded by wan-daemon (use verify())"],
                            0, "manifest", path)
    problems: list[str] = []
    for name, entry in sorted(manifest["files"].items()):
        local = path / name
        try:
            size = local.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if entry.get("size") is not None and size != entry["size"]:
            problems.append(f"{name}: size {size} bytes, expected {entry['size']}")
            continue
        if checksums and entry.get("sha256"):
            got = _digests(local, git=False)[1]
            if got != entry["sha256"]:
                problems.append(f"{name}: sha256 {got} does not match the recorded {entry['sha256']} (corrupted)")
    return VerifyReport(not problems, problems, len(manifest["files"]), "manifest", path)


def verify(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    allow_patterns: list[str] | str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> VerifyReport:
    """Check the cached snapshot of ``repo_id`` against the hub's metadata: every file matching
    ``allow_patterns`` present, with the hub's size and checksum (sha256 for LFS files, git blob id for the
    others). ``allow_patterns`` None: the patterns recorded at download time (all files without a manifest).

    When the hub cannot be reached (offline mode, no network) it falls back to :func:`verify_local` on the
    snapshot's manifest; ``report.source`` says which was used.
    """
    cache = _cache_root(cache_dir)
    storage = _storage(cache, repo_id)
    try:
        info = _model_info(repo_id, revision, token, endpoint)
    except DownloadError as exc:
        snap = snapshot_path(repo_id, revision=revision, cache_dir=cache)
        if snap is not None and _read_manifest(snap) is not None:
            logger.info("download.verify_offline repo={} reason={}", repo_id, exc.message)
            return verify_local(snap)
        return VerifyReport(False, [f"cannot check {repo_id}: {exc.message}, and no downloaded snapshot with a "
                                    "manifest is here"], 0, "hub", snap)
    snap = storage / "snapshots" / str(info.sha)
    if not snap.is_dir():
        problem = f"{repo_id}@{revision or 'main'} (commit {info.sha}) is not in the cache ({cache})"
        older = snapshot_path(repo_id, revision=revision, cache_dir=cache)
        if older is not None:
            problem += (f"; the cache holds commit {older.name}: download again to update it, or check that "
                        "one with verify_local()")
        return VerifyReport(False, [problem], 0, "hub", older)
    if allow_patterns is None:
        allow_patterns = (_read_manifest(snap) or {}).get("allow_patterns")
    files = _remote_files(info, allow_patterns)
    problems = [p for f in files if (p := _check_file(snap / f.name, f))]
    return VerifyReport(not problems, problems, len(files), "hub", snap)


def remove(repo_id: str, *, cache_dir: Path | None = None) -> int:
    """Delete every cached revision of model ``repo_id`` (and its partial downloads). Returns bytes freed.

    Uses ``scan_cache_dir().delete_revisions(...)`` (which also frees Xet payloads in the cache-wide shared
    blob store that no other repo uses), then removes what it leaves (partial files, a repo huggingface_hub
    considers corrupted). The bytes freed are measured on disk, in the repo folder and the shared store.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = _cache_root(cache_dir)
    storage = _storage(cache, repo_id)
    if not storage.exists():
        return 0
    shared = cache / "blobs"
    before = _tree_bytes(storage) + _tree_bytes(shared)
    try:
        scan = scan_cache_dir(cache)
    except CacheNotFound:
        return 0
    repo = next((r for r in scan.repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is not None and repo.revisions:
        scan.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
    # A repo huggingface_hub calls corrupted (a blob deleted by hand, no snapshots) is not in scan.repos,
    # and deleting the last revision leaves nothing worth keeping: remove whatever is left.
    if storage.exists():
        shutil.rmtree(storage, ignore_errors=True)
    with contextlib.suppress(OSError):
        shutil.rmtree(cache / ".locks" / storage.name)
    return max(before - _tree_bytes(storage) - _tree_bytes(shared), 0)


def _tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (symlinks not followed); 0 when it does not exist."""
    total = 0
    for root, _dirs, names in os.walk(folder):
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, n))
                if not os.path.islink(os.path.join(root, n)):
                    total += st.st_size
    return total


def list_cached(cache_dir: Path | None = None) -> list[dict]:
    """The models in the HF cache: one dict per repo, largest first.

    Keys: ``repo_id``, ``revisions`` (commit hashes), ``refs`` (branch/tag -> commit), ``size_on_disk``
    (bytes), ``nb_files``, ``path`` (the repo folder), ``snapshot`` (the ``main`` snapshot, else the newest),
    ``manifest`` (whether that snapshot was downloaded by :func:`download`), ``incomplete_bytes`` (partial
    downloads).
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = _cache_root(cache_dir)
    try:
        scan = scan_cache_dir(cache)
    except CacheNotFound:
        return []
    partial_by_repo: dict[Path, int] = {}
    for inc in getattr(scan, "incomplete_files", ()) or ():
        repo_dir = Path(inc.file_path).parent.parent
        partial_by_repo[repo_dir] = partial_by_repo.get(repo_dir, 0) + inc.size_on_disk
    out = []
    for repo in scan.repos:
        if repo.repo_type != "model":
            continue
        revs = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        refs = {ref: r.commit_hash for r in revs for ref in r.refs}
        main = next((r for r in revs if "main" in r.refs), revs[0] if revs else None)
        out.append({
            "repo_id": repo.repo_id,
            "revisions": [r.commit_hash for r in revs],
            "refs": refs,
            "size_on_disk": repo.size_on_disk,
            "nb_files": repo.nb_files,
            "path": Path(repo.repo_path),
            "snapshot": Path(main.snapshot_path) if main else None,
            "manifest": bool(main and (Path(main.snapshot_path) / MANIFEST_NAME).is_file()),
            "incomplete_bytes": partial_by_repo.get(Path(repo.repo_path), 0),
        })
    return sorted(out, key=lambda d: d["size_on_disk"], reverse=True)


__all__ = ["DownloadError", "VerifyReport", "needed_patterns", "download", "verify", "verify_local", "remove",
           "list_cached", "snapshot_path", "MANIFEST_NAME"]
