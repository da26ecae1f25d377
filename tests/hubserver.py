"""A local stand-in for the Hugging Face Hub: serves model folders the way huggingface.co does, enough for
huggingface_hub 2.4's ``snapshot_download``, ``hf_hub_download`` and ``HfApi.model_info(files_metadata=True)``.

Two listeners on 127.0.0.1 (random ports), one thread each: the *hub* (API + ``resolve``) and a *CDN* on
another origin. As on huggingface.co, ``resolve`` of an LFS file answers 302 to the CDN, with the file's
sha256 in ``X-Linked-Etag`` and its size in ``X-Linked-Size``; huggingface_hub stops at that redirect
(another origin) and downloads from the CDN without the token. Regular (git) files are served directly,
with their git blob id as ETag.

Endpoints (``{repo}`` is ``namespace/name``, ``{rev}`` is ``main`` or the commit sha):

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: ``id``, ``sha``, ``siblings``
  (``rfilename``; with ``?blobs=true`` also ``size``, ``blobId``, ``lfs {size, sha256, pointerSize}``).
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true``: ``[{type, path, oid, size, lfs}]``.
* ``HEAD|GET /{repo}/resolve/{rev}/{filename}``: ``X-Repo-Commit``, ``ETag`` (quoted), ``Content-Length``,
  ``Accept-Ranges``; LFS files: 302 + ``Location``, ``X-Linked-Etag``, ``X-Linked-Size``.
* ``HEAD|GET /cdn/{repo}/{sha256}``: the LFS file's bytes; ``Range: bytes=N-[M]`` answers 206 with
  ``Content-Range``.
* Errors as the hub sends them: ``X-Error-Code`` RepoNotFound (401), RevisionNotFound (404),
  EntryNotFound (404, with ``X-Repo-Commit``), GatedRepo (401, for repos in ``gated`` without the token).

No Xet headers are ever sent, so clients use plain HTTP. Which files are "LFS": weights and media by
suffix (``.safetensors``, ``.bin``, ``.pth``, ``.pt``, ``.model``, images, videos) or anything over 10 MB.

Fault injection, keyed by ``(repo_id, filename)``, each used by the first matching GET only:
``cut_after_bytes`` (send N body bytes, then close the connection), ``stall_after_bytes`` (send N bytes,
set ``stalled[key]``, then hang until :meth:`HubServer.release` or shutdown). ``corrupt`` (a set, every
GET) serves the file with one byte flipped while every piece of metadata still describes the good file.
``throttle_bps`` slows each body down. Every request is recorded in ``requests``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = frozenset(
    {
        ".safetensors",
        ".bin",
        ".pth",
        ".pt",
        ".ckpt",
        ".model",
        ".onnx",
        ".gguf",
        ".png",
        ".jpg",
        ".jpeg",
        ".gif",
        ".webp",
        ".mp4",
        ".webm",
    }
)
LFS_MIN_SIZE = 10 * 1024 * 1024
POINTER_SIZE = 134
PIECE = 16 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, '/'-separated
    size: int
    git_oid: str  # sha1 of the git blob (of the LFS pointer for LFS files, as on the hub)
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    listener: str  # "hub" | "cdn"

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


def _pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    folder: Path
    _cache: dict = field(default_factory=dict)

    def files(self) -> dict[str, FileEntry]:
        out: dict[str, FileEntry] = {}
        for p in sorted(self.folder.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(self.folder).as_posix()
            st = p.stat()
            key = (rel, st.st_size, st.st_mtime_ns)
            entry = self._cache.get(key)
            if entry is None:
                data = p.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                lfs = p.suffix.lower() in LFS_SUFFIXES or len(data) >= LFS_MIN_SIZE
                oid = _git_oid(_pointer(sha, len(data)) if lfs else data)
                entry = self._cache[key] = FileEntry(rel, len(data), oid, sha, lfs)
            out[rel] = entry
        return out

    def commit(self, files: dict[str, FileEntry]) -> str:
        h = hashlib.sha1()
        for name, e in sorted(files.items()):
            h.update(f"{name}\0{e.git_oid}\n".encode())
        return h.hexdigest()


class HubServer:
    """The fake hub. Use as a context manager; ``url`` is the value for HF_ENDPOINT."""

    def __init__(
        self,
        repos: dict[str, Path] | None = None,
        *,
        gated: dict[str, str] | None = None,
        lfs_redirect: bool = True,
        throttle_bps: float | None = None,
    ) -> None:
        self.repos: dict[str, _Repo] = {}
        for repo_id, folder in (repos or {}).items():
            self.add_repo(repo_id, folder)
        self.gated: dict[str, str] = dict(gated or {})  # repo_id -> token required
        self.lfs_redirect = lfs_redirect
        self.throttle_bps = throttle_bps
        self.cut_after_bytes: dict[tuple[str, str], int] = {}
        self.stall_after_bytes: dict[tuple[str, str], int] = {}
        self.stalled: dict[tuple[str, str], threading.Event] = {}
        self.corrupt: set[tuple[str, str]] = set()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.cdn_url = ""

    # ---- set-up ------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path) -> None:
        if repo_id.count("/") != 1:
            raise ValueError(f"repo id must be namespace/name, got {repo_id!r}")
        self.repos[repo_id] = _Repo(Path(folder))

    def files(self, repo_id: str) -> dict[str, FileEntry]:
        return self.repos[repo_id].files()

    def commit(self, repo_id: str) -> str:
        repo = self.repos[repo_id]
        return repo.commit(repo.files())

    def stall(self, repo_id: str, filename: str, after_bytes: int) -> threading.Event:
        """Make the next GET of this file hang after ``after_bytes``; the event is set once it hangs."""
        key = (repo_id, filename)
        self.stall_after_bytes[key] = after_bytes
        self.stalled[key] = threading.Event()
        return self.stalled[key]

    def release(self) -> None:
        """Let stalled responses finish (by closing their connection)."""
        self._release.set()

    def body_requests(self, filename: str | None = None) -> list[Request]:
        """GET requests that returned (or would return) file bytes, optionally for one file."""
        out = []
        for r in list(self.requests):
            if r.method != "GET":
                continue
            name = r.query.get("file", [None])[0] if r.listener == "cdn" or r.path.startswith("/cdn/") else None
            if name is None and "/resolve/" in r.path:
                name = unquote(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
            if name is not None and (filename is None or name == filename):
                out.append(r)
        return out

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> HubServer:
        # The CDN on another host, as the real one is (huggingface_hub follows a redirect to the same host, and
        # would read the hub's headers off the CDN's response): 127.0.0.2, the loopback network's next address.
        for listener, host in (("hub", "127.0.0.1"), ("cdn", "127.0.0.2")):
            handler = type(f"_{listener.title()}Handler", (_Handler,), {"hub": self, "listener": listener})
            server = ThreadingHTTPServer((host, 0), handler)
            server.daemon_threads = True
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"hubserver-{listener}", daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.2:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        self._release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def serve(repos: dict[str, Path], **kwargs) -> Iterator[HubServer]:
    """``with serve({"org/name": folder}) as hub:`` -- a running HubServer, stopped afterwards."""
    with HubServer(repos, **kwargs) as hub:
        yield hub


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    listener: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    # ---- plumbing ----------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, *, head: bool) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        with self.hub._lock:
            self.hub.requests.append(
                Request(self.command, parts.path, query, {k.lower(): v for k, v in self.headers.items()}, self.listener)
            )
        try:
            self._route(unquote(parts.path), query, head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(
        self, status: int, headers: dict[str, str] | None = None, body: bytes = b"", *, head: bool = False
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, data, *, head: bool) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(data).encode(), head=head)

    def _error(
        self, status: int, code: str | None, message: str, *, head: bool, extra: dict[str, str] | None = None
    ) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode(), head=head)

    # ---- routing -----------------------------------------------------------------------------------

    def _route(self, path: str, query: dict, *, head: bool) -> None:
        segs = [s for s in path.split("/") if s != ""]
        if segs[:2] == ["api", "models"] and len(segs) >= 4:
            repo_id = f"{segs[2]}/{segs[3]}"
            rest = segs[4:]
            if not self._repo_ok(repo_id, head=head):
                return
            if not rest:
                return self._model_info(repo_id, "main", query, head=head)
            if rest[0] == "revision" and len(rest) >= 2:
                return self._model_info(repo_id, "/".join(rest[1:]), query, head=head)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query, head=head)
            return self._error(404, None, f"no such API route {path}", head=head)
        if segs[:1] == ["cdn"] and len(segs) == 4:
            return self._cdn(f"{segs[1]}/{segs[2]}", segs[3], head=head)
        if len(segs) >= 5 and segs[2] == "resolve":
            repo_id = f"{segs[0]}/{segs[1]}"
            if not self._repo_ok(repo_id, head=head):
                return
            return self._resolve(repo_id, segs[3], "/".join(segs[4:]), head=head)
        return self._error(404, None, f"not found: {path}", head=head)

    def _repo_ok(self, repo_id: str, *, head: bool) -> bool:
        if repo_id not in self.hub.repos:
            self._error(401, "RepoNotFound", "Repository not found", head=head)
            return False
        needed = self.hub.gated.get(repo_id)
        if needed is not None and self.headers.get("authorization") != f"Bearer {needed}":
            self._error(
                401,
                "GatedRepo",
                "Access to model is restricted. You must have access to it and be authenticated to access it.",
                head=head,
            )
            return False
        return True

    def _resolve_rev(self, repo_id: str, revision: str, *, head: bool) -> tuple[str, dict] | None:
        repo = self.hub.repos[repo_id]
        files = repo.files()
        commit = repo.commit(files)
        if revision not in ("main", commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return None
        return commit, files

    def _model_info(self, repo_id: str, revision: str, query: dict, *, head: bool) -> None:
        resolved = self._resolve_rev(repo_id, revision, head=head)
        if resolved is None:
            return
        commit, files = resolved
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for name, e in files.items():
            s: dict = {"rfilename": name}
            if blobs:
                s.update(size=e.size, blobId=e.git_oid)
                if e.lfs:
                    s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": POINTER_SIZE}
            siblings.append(s)
        self._json(
            {
                "_id": commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "lastModified": "2025-07-28T00:00:00.000Z",
                "private": False,
                "gated": "manual" if repo_id in self.hub.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["diffusers"],
                "library_name": "diffusers",
                "siblings": siblings,
            },
            head=head,
        )

    def _tree(self, repo_id: str, revision: str, sub: str, query: dict, *, head: bool) -> None:
        resolved = self._resolve_rev(repo_id, revision, head=head)
        if resolved is None:
            return
        _commit, files = resolved
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        entries, dirs = [], set()
        for name, e in files.items():
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix) :]
            folders = rel.split("/")[:-1]
            for i in range(len(folders) if recursive else min(len(folders), 1)):
                dirs.add(prefix + "/".join(folders[: i + 1]))
            if "/" in rel and not recursive:
                continue
            item = {"type": "file", "oid": e.git_oid, "size": e.size, "path": name}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": POINTER_SIZE}
            entries.append(item)
        if prefix and not entries and not dirs:
            return self._error(404, "EntryNotFound", f"{sub} does not exist", head=head)
        tree_oid = lambda d: hashlib.sha1(d.encode()).hexdigest()  # noqa: E731
        self._json([{"type": "directory", "oid": tree_oid(d), "path": d} for d in sorted(dirs)] + entries, head=head)

    def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
        resolved = self._resolve_rev(repo_id, revision, head=head)
        if resolved is None:
            return
        commit, files = resolved
        e = files.get(filename)
        if e is None:
            return self._error(
                404,
                "EntryNotFound",
                f"{filename} does not exist on {revision}",
                head=head,
                extra={"X-Repo-Commit": commit},
            )
        if e.lfs and self.hub.lfs_redirect:
            location = f"{self.hub.cdn_url}/cdn/{repo_id}/{e.sha256}?file={filename}"
            return self._send(
                302,
                {
                    "Location": location,
                    "X-Repo-Commit": commit,
                    "ETag": f'"{e.git_oid}"',
                    "X-Linked-Etag": f'"{e.sha256}"',
                    "X-Linked-Size": str(e.size),
                },
                head=head,
            )
        self._body(repo_id, e, {"X-Repo-Commit": commit}, head=head)

    def _cdn(self, repo_id: str, sha256: str, *, head: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        e = next((f for f in repo.files().values() if f.sha256 == sha256), None) if repo else None
        if e is None:
            return self._send(404, {"Content-Type": "text/plain"}, b"no such object", head=head)
        self._body(repo_id, e, {}, head=head)

    # ---- file bytes, with ranges and faults --------------------------------------------------------

    def _body(self, repo_id: str, e: FileEntry, extra: dict[str, str], *, head: bool) -> None:
        key = (repo_id, e.path)
        data = (self.hub.repos[repo_id].folder / e.path).read_bytes()
        if key in self.hub.corrupt and data:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        start, end = 0, len(data) - 1
        status = 200
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "ETag": f'"{e.etag}"', **extra}
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            lo, _, hi = rng[len("bytes=") :].partition("-")
            try:
                start = int(lo) if lo else max(len(data) - int(hi), 0)
                end = min(int(hi), len(data) - 1) if (hi and lo) else len(data) - 1
            except ValueError:
                start, end = 0, len(data) - 1
            if start >= len(data) and len(data) > 0:
                return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, head=head)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        chunk = data[start : end + 1]
        headers["Content-Length"] = str(len(chunk))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        with self.hub._lock:
            cut = self.hub.cut_after_bytes.pop(key, None)
            stall = self.hub.stall_after_bytes.pop(key, None)
        limit = len(chunk) if cut is None and stall is None else min(len(chunk), cut if cut is not None else stall)
        sent = 0
        while sent < limit:
            piece = chunk[sent : min(sent + PIECE, limit)]
            self.wfile.write(piece)
            sent += len(piece)
            if self.hub.throttle_bps:
                self.wfile.flush()
                time.sleep(len(piece) / self.hub.throttle_bps)
        self.wfile.flush()
        if stall is not None:
            event = self.hub.stalled.setdefault(key, threading.Event())
            event.set()
            self.hub._release.wait(120)
        if cut is not None or stall is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


__all__ = ["HubServer", "FileEntry", "Request", "serve"]
