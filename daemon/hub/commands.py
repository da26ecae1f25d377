"""``wan-daemon models ...``: build the tiny test models, list, download, verify and remove models.

The command-line layer of the hub: it reads the registry (daemon.models, imported inside the functions so
that no module of daemon.hub imports it at import time) and ``HF_TOKEN``. Building the tiny models is the
worker side's code (daemon.worker.tiny), which daemon.cli hands in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # daemon.cli's exit codes


def models(
    args: argparse.Namespace,
    settings,
    *,
    build_tiny: Callable[[Path], list[Path]],
    tiny_is_built: Callable[[Path], bool],
) -> int:
    """``wan-daemon models build-tiny|list|download|verify|remove``. ``build_tiny`` builds the tiny models
    into a folder (daemon.worker.tiny.build_all); ``tiny_is_built`` says whether one is built there."""
    if args.models_cmd == "build-tiny":
        for path in build_tiny(settings.paths.models):
            print(f"built {path}  (random weights: test model, the videos are noise)")
        return EXIT_OK
    if args.models_cmd == "list":
        return _models_list(settings, tiny_is_built, as_json=getattr(args, "json", False))
    from daemon.hub.cache import remove
    from daemon.hub.download import DownloadError, download
    from daemon.hub.verify import verify
    from daemon.models import REGISTRY, needed_patterns

    info = REGISTRY.get(args.name)
    if info is not None and info.tiny:
        print(f"{args.name} is a tiny test model built locally: `wan-daemon models build-tiny`", file=sys.stderr)
        return EXIT_USAGE
    repo = info.repo_id if info is not None else args.name
    assert repo is not None  # every registry model that is not tiny names its hub repo
    patterns = needed_patterns(info.architecture) if info is not None else None
    token = os.environ.get("HF_TOKEN")
    try:
        if args.models_cmd == "download":
            path = download(
                repo,
                revision=args.revision,
                allow_patterns=patterns,
                token=token,
                progress=_print_progress,
                min_free_mb=settings.limits.min_free_mb,
            )
            print(f"downloaded {repo} to {path}")
            return EXIT_OK
        if args.models_cmd == "verify":
            report = verify(repo, revision=args.revision, allow_patterns=patterns, token=token)
            for problem in report.problems:
                print(f"  - {problem}")
            print(f"{'ok' if report.ok else 'BROKEN'}: {repo}: {report.what()}")
            return EXIT_OK if report.ok else EXIT_FAIL
        if args.models_cmd == "remove":
            freed = remove(repo)
            print(f"removed {repo}: {freed / 1e9:.2f} GB freed")
            return EXIT_OK
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_USAGE


_last_progress = [0.0]


def _print_progress(p: dict) -> None:
    """Progress lines for logs and pipes (a terminal also gets huggingface_hub's bar); at most one a second."""
    now = time.time()
    if now - _last_progress[0] < 1.0 and p.get("phase") == "downloading":
        return
    _last_progress[0] = now
    total = p.get("total_bytes") or 0
    done = p.get("downloaded_bytes") or 0
    pct = f"{100 * done / total:5.1f}%" if total else "  ?  "
    print(
        f"{p.get('phase', 'downloading'):11} {p.get('repo')}: {pct} {done / 1e9:.2f}/{total / 1e9:.2f} GB, "
        f"{p.get('files_done', 0)}/{p.get('files_total', 0)} files",
        file=sys.stderr,
        flush=True,
    )


def _models_list(settings, is_built: Callable[[Path], bool], *, as_json: bool = False) -> int:
    """Every registry model, every local diffusers folder under the model roots and every other Wan repo in the
    hub cache: one line each, or with ``--json`` one list of objects (name, kind, present, size_bytes, revision,
    path, and the registry's default size for registry models)."""
    rows = _model_rows(settings, is_built)
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        if row["kind"] == "registry":
            where = _where(row)
            print(f"{row['name']:18} {row['width']}x{row['height']} {row['frames']}f@{row['fps']:<3} {where}")
        else:
            size = f"{row['size_bytes'] / 1e9:.1f} GB " if row["size_bytes"] else ""
            label = "local folder     " if row["kind"] == "local" else "hub cache        "
            print(f"{row['name']:18} {label} present  {size}{row['path']}")
    return EXIT_OK


def _where(row: dict[str, Any]) -> str:
    if not row["present"]:
        return (
            "absent   (built on first use)" if row["tiny"] else f"absent   (wan-daemon models download {row['name']})"
        )
    if row["tiny"]:
        return f"present  {row['path']}"
    size = f"{row['size_bytes'] / 1e9:.1f} GB" if row["size_bytes"] else ""
    return f"present  {size} rev {(row['revision'] or '')[:12]} {row['path']}"


def _model_rows(settings, is_built: Callable[[Path], bool]) -> list[dict[str, Any]]:
    from daemon.hub.cache import list_cached
    from daemon.models import REGISTRY, hub_snapshot, tiny_model_dir

    cached = {c["repo_id"]: c for c in list_cached()}
    rows: list[dict[str, Any]] = []
    for info in REGISTRY.values():
        row: dict[str, Any] = {"name": info.name, "kind": "registry", "tiny": info.tiny, "repo_id": info.repo_id}
        row.update(width=info.width, height=info.height, frames=info.frames, fps=info.fps)
        if info.tiny:
            folder = tiny_model_dir(settings.paths.models, info.name)
            present = is_built(folder)
            row.update(present=present, size_bytes=None, revision=None, path=str(folder) if present else None)
        else:
            assert info.repo_id is not None  # every registry model that is not tiny names its hub repo
            snap = hub_snapshot(info.repo_id)
            entry = cached.get(info.repo_id, {})
            row.update(
                present=snap is not None,
                size_bytes=entry.get("size_on_disk") if snap else None,
                revision=snap[1] if snap else None,
                path=str(snap[0]) if snap else None,
            )
        rows.append(row)
    for root in settings.paths.model_roots:
        for index in sorted(Path(root).glob("*/model_index.json")):
            rows.append(_other(index.parent.name, "local", None, str(index.parent)))
    known = {i.repo_id for i in REGISTRY.values() if i.repo_id}
    for repo, entry in sorted(cached.items()):
        if repo not in known:
            rows.append(_other(repo, "hub_cache", entry.get("size_on_disk", 0), str(entry.get("path"))))
    return rows


def _other(name: str, kind: str, size: int | None, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "tiny": False,
        "repo_id": name if kind == "hub_cache" else None,
        "present": True,
        "size_bytes": size,
        "revision": None,
        "path": path,
    }
