"""Checking a cached snapshot: against the hub's metadata (sha256 for LFS files, the git blob id for the
others), or offline against the manifest :func:`daemon.hub.download.download` wrote. No torch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from daemon.hub.cache import MANIFEST_NAME, cache_root, read_manifest, repo_storage, snapshot_path
from daemon.hub.remote import DownloadError, RemoteFile, model_info, remote_files


@dataclass
class VerifyReport:
    """The result of :func:`verify` / :func:`verify_local`. ``problems`` name the files concerned."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    source: str = "hub"  # "hub": checked against the hub's metadata; "manifest": against the local manifest
    path: Path | None = None  # the snapshot folder checked
    by_sha256: int = 0  # files whose every byte was hashed (sha256) against the reference
    by_blob_id: int = 0  # files hashed as git blobs against the hub's blob id (small non-LFS files)

    def what(self) -> str:
        """What was checked, in words (``wan-daemon models verify`` prints it)."""
        where = f" in {self.path}" if self.path else ""
        if self.source == "manifest":
            ref = "the manifest wan-daemon wrote when it downloaded them (offline: the hub was not asked)"
        else:
            commit = f" for commit {self.path.name}" if self.path else ""
            ref = f"the hub's metadata{commit}"
        sizes_only = self.checked - self.by_sha256 - self.by_blob_id
        return (
            f"{self.checked} files{where} checked against {ref}: each present with its size; "
            f"{self.by_sha256} hashed in full (sha256), {self.by_blob_id} by git blob id"
            + (f", {sizes_only} by size only (no checksum known)" if sizes_only > 0 else "")
        )


def file_digests(path: Path, *, git: bool) -> tuple[int, str, str | None]:
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


def check_file(path: Path, f: RemoteFile) -> str | None:
    """None when ``path`` holds ``f``'s bytes, else what is wrong (naming the file)."""
    try:
        size = path.stat().st_size
    except OSError:
        return f"{f.name}: missing"
    if f.size is not None and size != f.size:
        return f"{f.name}: size {size} bytes, expected {f.size}"
    if f.sha256:
        got = file_digests(path, git=False)[1]
        if got != f.sha256:
            return f"{f.name}: sha256 {got} does not match the hub's {f.sha256} (corrupted)"
    elif f.blob_id:
        got_blob = file_digests(path, git=True)[2]
        if got_blob != f.blob_id:
            return f"{f.name}: git blob id {got_blob} does not match the hub's {f.blob_id} (corrupted)"
    return None


def verify_local(path: Path, *, checksums: bool = True) -> VerifyReport:
    """Check a snapshot folder against the manifest :func:`download` wrote in it. No network.

    Every listed file must exist with its recorded size and (``checksums``) sha256.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return VerifyReport(
            False, [f"no {MANIFEST_NAME} in {path}: not downloaded by wan-daemon (use verify())"], 0, "manifest", path
        )
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
            got = file_digests(local, git=False)[1]
            if got != entry["sha256"]:
                problems.append(f"{name}: sha256 {got} does not match the recorded {entry['sha256']} (corrupted)")
    hashed = sum(1 for e in manifest["files"].values() if e.get("sha256")) if checksums else 0
    return VerifyReport(not problems, problems, len(manifest["files"]), "manifest", path, by_sha256=hashed)


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
    cache = cache_root(cache_dir)
    storage = repo_storage(cache, repo_id)
    try:
        info = model_info(repo_id, revision, token, endpoint)
    except DownloadError as exc:
        snap = snapshot_path(repo_id, revision=revision, cache_dir=cache)
        if snap is not None and read_manifest(snap) is not None:
            logger.info("download.verify_offline repo={} reason={}", repo_id, exc.message)
            return verify_local(snap)
        return VerifyReport(
            False,
            [f"cannot check {repo_id}: {exc.message}, and no downloaded snapshot with a manifest is here"],
            0,
            "hub",
            snap,
        )
    snap = storage / "snapshots" / str(info.sha)
    if not snap.is_dir():
        problem = f"{repo_id}@{revision or 'main'} (commit {info.sha}) is not in the cache ({cache})"
        older = snapshot_path(repo_id, revision=revision, cache_dir=cache)
        if older is not None:
            problem += (
                f"; the cache holds commit {older.name}: download again to update it, or check that "
                "one with verify_local()"
            )
        return VerifyReport(False, [problem], 0, "hub", older)
    if allow_patterns is None:
        allow_patterns = (read_manifest(snap) or {}).get("allow_patterns")
    files = remote_files(info, allow_patterns)
    problems = [p for f in files if (p := check_file(snap / f.name, f))]
    sha = sum(1 for f in files if f.sha256)
    blob = sum(1 for f in files if f.blob_id and not f.sha256)
    return VerifyReport(not problems, problems, len(files), "hub", snap, by_sha256=sha, by_blob_id=blob)
