"""The Hugging Face cache on disk: where a repo's snapshot is, what is cached, removing a repo, and the
manifest wan-daemon writes into each snapshot it downloads. No network, no torch.

The manifest (``<snapshot>/.wan-daemon-manifest.json``: name, size, sha256 of each file) is written next to
the files by :func:`daemon.hub.download.download`, so that :func:`daemon.hub.verify.verify_local` (and
:func:`daemon.hub.verify.verify` when the hub cannot be reached) works offline later, and so that
:func:`snapshot_path` can tell a complete snapshot from one with missing files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from daemon.fsutil import atomic_write_json, read_json
from daemon.hub.remote import RemoteFile

MANIFEST_NAME = ".wan-daemon-manifest.json"
MANIFEST_VERSION = 1


# ---- where things are ------------------------------------------------------------------------------


def cache_root(cache_dir: Path | str | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().resolve()


def repo_storage(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def is_commit(revision: str | None) -> bool:
    return revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def scan_blobs(blobs: Path) -> tuple[dict[str, int], dict[str, list[tuple[Path, int]]]]:
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


def snapshot_path(repo_id: str, *, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (branch, tag or commit), or None. No network.

    Unlike ``snapshot_download(local_files_only=True)``, this also finds snapshots downloaded with
    ``allow_patterns`` (huggingface_hub then reports the repo as incomplete because files that were never
    wanted are missing). When a manifest is there, every file it lists must be present with its size.
    """
    storage = repo_storage(cache_root(cache_dir), repo_id)
    rev = revision or "main"
    commit = rev if is_commit(rev) else None
    if commit is None:
        try:
            commit = (storage / "refs" / rev).read_text().strip()
        except OSError:
            return None
    snap = storage / "snapshots" / commit
    if not snap.is_dir():
        return None
    manifest = read_manifest(snap)
    if manifest is not None:
        for name, entry in manifest["files"].items():
            try:
                if (snap / name).stat().st_size != entry.get("size"):
                    return None
            except OSError:
                return None
    return snap


def write_ref(storage: Path, revision: str | None, commit: str) -> None:
    ref = revision or "main"
    if is_commit(ref):
        return
    ref_path = storage / "refs" / ref
    with contextlib.suppress(OSError):
        if ref_path.read_text() == commit:
            return
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_path.with_name(f"{ref_path.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref_path)


def discard(pointer: Path, blob: Path | None) -> None:
    with contextlib.suppress(OSError):
        pointer.unlink()
    if blob is not None:
        with contextlib.suppress(OSError):
            blob.unlink()


# ---- manifest --------------------------------------------------------------------------------------


def read_manifest(snapshot: Path) -> dict | None:
    try:
        data = read_json(snapshot / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def write_manifest(
    snapshot: Path,
    repo_id: str,
    revision: str | None,
    commit: str,
    allow_patterns: list[str] | str | None,
    files: list[RemoteFile],
    sha_of: dict[str, str],
) -> None:
    old = read_manifest(snapshot) or {}
    entries = dict(old.get("files", {})) if old.get("commit") == commit else {}
    for f in files:
        entries[f.name] = {
            "size": f.size,
            "sha256": f.sha256 or sha_of.get(f.name) or entries.get(f.name, {}).get("sha256"),
            "git_oid": f.blob_id,
            "lfs": bool(f.sha256),
        }
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
    atomic_write_json(
        snapshot / MANIFEST_NAME,
        {
            "version": MANIFEST_VERSION,
            "repo_id": repo_id,
            "revision": revision,
            "commit": commit,
            "allow_patterns": patterns,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": entries,
        },
    )


# ---- listing and removing --------------------------------------------------------------------------


def list_cached(cache_dir: Path | None = None) -> list[dict]:
    """The models in the HF cache: one dict per repo, largest first.

    Keys: ``repo_id``, ``revisions`` (commit hashes), ``refs`` (branch/tag -> commit), ``size_on_disk``
    (bytes), ``nb_files``, ``path`` (the repo folder), ``snapshot`` (the ``main`` snapshot, else the newest),
    ``manifest`` (whether that snapshot was downloaded by :func:`download`), ``incomplete_bytes`` (partial
    downloads).
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = cache_root(cache_dir)
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
        out.append(
            {
                "repo_id": repo.repo_id,
                "revisions": [r.commit_hash for r in revs],
                "refs": refs,
                "size_on_disk": repo.size_on_disk,
                "nb_files": repo.nb_files,
                "path": Path(repo.repo_path),
                "snapshot": Path(main.snapshot_path) if main else None,
                "manifest": bool(main and (Path(main.snapshot_path) / MANIFEST_NAME).is_file()),
                "incomplete_bytes": partial_by_repo.get(Path(repo.repo_path), 0),
            }
        )
    return sorted(out, key=lambda d: d["size_on_disk"], reverse=True)


def remove(repo_id: str, *, cache_dir: Path | None = None) -> int:
    """Delete every cached revision of model ``repo_id`` (and its partial downloads). Returns bytes freed.

    Uses ``scan_cache_dir().delete_revisions(...)`` (which also frees Xet payloads in the cache-wide shared
    blob store that no other repo uses), then removes what it leaves (partial files, a repo huggingface_hub
    considers corrupted). The bytes freed are measured on disk, in the repo folder and the shared store.
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = cache_root(cache_dir)
    storage = repo_storage(cache, repo_id)
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
