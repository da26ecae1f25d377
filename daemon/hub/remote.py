"""What the Hugging Face Hub says about a repo (its files, sizes and checksums), and its errors as
:class:`DownloadError` with what a person can do about them. Pure I/O around ``huggingface_hub``, imported
lazily; no torch.

``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured by
huggingface_hub itself (read when it is imported); the hub modules never read the environment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from daemon.errors import WanDaemonError


class DownloadError(WanDaemonError):
    """A download (or its preparation) failed. ``suggestions`` says what a person can do about it."""

    def __init__(self, message: str, suggestions: Iterable[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.suggestions: list[str] = list(suggestions or [])

    def __str__(self) -> str:
        if not self.suggestions:
            return self.message
        return self.message + "".join(f"\n  - {s}" for s in self.suggestions)


class RemoteFile(NamedTuple):
    name: str
    size: int | None
    blob_id: str | None  # git object id (of the LFS pointer for LFS files)
    sha256: str | None  # LFS files only

    @property
    def etag(self) -> str | None:
        """The name of this file's blob in the cache: the sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 or self.blob_id


def remote_files(info: Any, allow_patterns: list[str] | str | None) -> list[RemoteFile]:
    files: dict[str, RemoteFile] = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha = _lfs_field(lfs, "sha256")
        size = _lfs_field(lfs, "size") if lfs is not None else None
        files[s.rfilename] = RemoteFile(
            s.rfilename, size if size is not None else getattr(s, "size", None), getattr(s, "blob_id", None), sha
        )
    return [files[n] for n in filter_files(files, allow_patterns)]


def _lfs_field(lfs: Any, key: str) -> Any:
    if lfs is None:
        return None
    if isinstance(lfs, dict):
        return lfs.get(key)
    return getattr(lfs, key, None)


def filter_files(names: Iterable[str], allow_patterns: list[str] | str | None) -> list[str]:
    """The same filter snapshot_download applies, so that our sizes describe exactly what it fetches."""
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(items=list(names), allow_patterns=allow_patterns))


def model_info(repo_id: str, revision: str | None, token: str | None, endpoint: str | None) -> Any:
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise translate_error(exc, repo_id, revision) from exc


def translate_error(exc: BaseException, repo_id: str, revision: str | None) -> DownloadError:
    """A huggingface_hub / network / OS error as a DownloadError that says what to do."""
    from huggingface_hub import errors as hf_errors

    name = type(exc).__name__
    net = (
        "Check the network connection, a proxy (HTTPS_PROXY) or HF_ENDPOINT if you use a mirror, "
        "then run the download again: finished files are kept."
    )
    if isinstance(exc, DownloadError):
        return exc
    if isinstance(exc, getattr(hf_errors, "OfflineModeIsEnabled", ())) or "offline mode is enabled" in str(exc):
        return DownloadError(
            f"cannot download {repo_id}: huggingface_hub offline mode is on (HF_HUB_OFFLINE=1)",
            ["Unset HF_HUB_OFFLINE (or set it to 0) for the download; the daemon itself can keep running offline."],
        )
    if isinstance(exc, getattr(hf_errors, "GatedRepoError", ())):
        return DownloadError(
            f"{repo_id} is a gated repo and this request is not allowed to read it ({name})",
            [
                f"Accept the model's licence on https://huggingface.co/{repo_id} with your account.",
                "Then pass a token that can read it: set HF_TOKEN or run `hf auth login`.",
            ],
        )
    if isinstance(exc, getattr(hf_errors, "RevisionNotFoundError", ())):
        return DownloadError(
            f"revision {revision!r} of {repo_id} does not exist on the hub",
            ["Check the revision (branch, tag or full commit hash)."],
        )
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
        return DownloadError(
            f"repository {repo_id} was not found (or is private / gated and no valid token was sent)",
            [
                "Check the repo id (e.g. Wan-AI/Wan2.2-TI2V-5B-Diffusers).",
                "For a private or gated repo set HF_TOKEN or run `hf auth login`.",
            ],
        )
    if isinstance(exc, OSError) and getattr(exc, "errno", None) in (28, 122):  # ENOSPC, EDQUOT
        return DownloadError(
            f"the disk filled up while downloading {repo_id}: {exc}",
            [
                "Free disk space (or point HF_HOME / HF_HUB_CACHE at a larger disk), then run the "
                "download again: finished files are kept."
            ],
        )
    if isinstance(exc, getattr(hf_errors, "HfHubHTTPError", ())):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        tips = [net]
        if status in (401, 403):
            tips.insert(
                0,
                "The hub refused the request: check HF_TOKEN (or `hf auth login`) and that your "
                "account may read this repo.",
            )
        return DownloadError(f"the hub answered HTTP {status} for {repo_id}: {str(exc).splitlines()[0]}", tips)
    return DownloadError(f"downloading {repo_id} failed: {name}: {str(exc).splitlines()[0] if str(exc) else ''}", [net])
