"""Durable, atomic file operations: the only way anything in the daemon writes a file others read.

Recipe (maildir / PostgreSQL "fsyncgate"): write a temp file in the *same folder*, fsync it, rename it
over the final name, fsync the folder. Readers see the old file or the new one, never half of one.
Temp names start with a dot so that watchers and globs skip them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".wan-tmp-"


def temp_path_for(final: Path, suffix: str | None = None, owner: str | None = None) -> Path:
    """A unique hidden temp name beside ``final`` (same folder, so rename stays atomic). ``owner`` tags it so
    that daemons sharing an outbox clean up only their own temps."""
    final = Path(final)
    tag = f"{owner}~" if owner else ""
    ext = suffix if suffix is not None else final.suffix
    return final.with_name(f"{TEMP_PREFIX}{tag}{final.stem}-{secrets.token_hex(4)}{ext}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a part.
    ``durable``: also fsync the file and its folder, so that the new content survives a power loss
    (what status snapshots rewritten many times a second do not need)."""
    path = Path(path)
    tmp = temp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, *, durable: bool = True, compact: bool = False) -> None:
    """``compact``: one line, for files only programs read, which json encodes in C (with an indent it falls back
    to its Python encoder, several times slower)."""
    text = json.dumps(data, indent=None if compact else 2, ensure_ascii=False, default=str)
    atomic_write_bytes(path, (text + "\n").encode(), durable=durable)


def read_json(path: Path) -> Any:
    with open(path, "rb") as fh:
        return json.loads(fh.read())


def publish(tmp: Path, final: Path) -> bool:
    """Move a finished, fsynced temp file to its final name without ever replacing an existing file.

    Uses ``link()``, which fails with EEXIST when ``final`` exists: publishing is idempotent and a
    second owner can never overwrite the first. Returns False when ``final`` already existed.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        os.unlink(tmp)
        return False
    except OSError as exc:
        # Some filesystems (SMB, FAT) lack hard links: fall back to an exclusive-create check + rename.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(final):
            os.unlink(tmp)
            return False
        os.rename(tmp, final)
        fsync_dir(Path(final).parent)
        return True
    os.unlink(tmp)
    fsync_dir(Path(final).parent)
    return True


def link_new(tmp: Path, final: Path) -> bool:
    """Give a finished, fsynced temp file the name ``final`` too, never replacing an existing file; False when
    ``final`` exists. The temp keeps its name: until the caller removes it, a temp of its own that is the same
    file as ``final`` marks an unfinished publication (daemon.runtime.outbox repairs one after a crash). The
    caller fsyncs the folder. Without hard links (SMB, FAT) the temp is renamed instead (after an
    exclusive-existence check, as in :func:`publish`)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(final):
            return False
        os.rename(tmp, final)
    return True


def atomic_copy(src: Path, dst: Path, *, max_bytes: int | None = None) -> None:
    """Copy ``src`` to ``dst`` atomically (temp + fsync + rename); refuses to replace an existing file."""
    dst = Path(dst)
    tmp = temp_path_for(dst)
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            copied = 0
            while chunk := fin.read(1 << 20):
                copied += len(chunk)
                if max_bytes is not None and copied > max_bytes:
                    raise ValueError(f"{src} is larger than {max_bytes} bytes")
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if not publish(tmp, dst):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remove_stale_temps(folder: Path, owner: str | None = None, max_age_seconds: float = 86400.0) -> list[Path]:
    """Delete temp files left by a crash: all of ``owner``'s (it is not writing any now), and anyone's older
    than ``max_age_seconds`` (never published, so nobody depends on them; another live daemon's are young)."""
    import time

    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    mine = f"{TEMP_PREFIX}{owner}~" if owner else None
    now = time.time()
    for p in folder.glob(TEMP_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            if (mine and p.name.startswith(mine)) or owner is None or now - p.stat().st_mtime > max_age_seconds:
                p.unlink()
                removed.append(p)
    return removed


def probe_write(folder: Path, size: int = 65536) -> OSError | None:
    """Try to write and fsync ``size`` bytes in ``folder``: the error, or None when there is room."""
    probe = Path(folder) / f"{TEMP_PREFIX}space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
    return None


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def open_confined(path: Path, root_candidates: Sequence[Path | str], *, max_bytes: int) -> Iterator[Any]:
    """Open ``path`` for reading only if it lies inside one of ``root_candidates``.

    Refuses absolute paths outside the roots, ``..`` escapes and symlinks anywhere on the way. The
    file is opened with O_NOFOLLOW and checked with fstat on the opened descriptor, so a symlink
    swapped in after the check is refused too. Raises ValueError with a reason a user can act on.
    """
    raw = Path(path)
    if ".." in raw.parts:
        raise ValueError(f"path {str(path)!r} contains '..'")
    for root in root_candidates:
        root = Path(root).resolve()
        candidate = raw if raw.is_absolute() else root / raw
        try:
            rel = candidate.relative_to(root)
        except ValueError:
            continue
        # Walk the components ourselves so that no symlink anywhere below the root is followed.
        current = root
        for part in rel.parts[:-1]:
            current = current / part
            if current.is_symlink():
                raise ValueError(f"path {str(path)!r} goes through a symlink ({current.name}), which is not allowed")
        if not candidate.exists() and not candidate.is_symlink():
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError(f"path {str(path)!r} is a symlink, which is not allowed") from None
            raise ValueError(f"cannot open {str(path)!r}: {exc.strerror}") from None
        import stat as _stat

        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ValueError(f"path {str(path)!r} is not a regular file")
        if st.st_size > max_bytes:
            os.close(fd)
            raise ValueError(f"file {str(path)!r} is {st.st_size} bytes, more than the limit of {max_bytes}")
        fh = os.fdopen(fd, "rb")
        try:
            yield fh
        finally:
            fh.close()
        return
    roots = ", ".join(str(r) for r in root_candidates)
    raise ValueError(f"file {str(path)!r} not found under the allowed input roots ({roots})")
