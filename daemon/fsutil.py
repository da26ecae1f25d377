"""Durable, atomic file operations: the only way anything in the daemon writes a file others read.

Recipe (maildir / PostgreSQL "fsyncgate"): write a temp file in the *same folder*, fsync it, rename it
over the final name, fsync the folder. Readers see the old file or the new one, never half of one.
Temp names start with a dot so that watchers and globs skip them.

Tests inject filesystem faults behind this interface (:class:`Faults`, :func:`injected_faults`): while a
fault is set on a folder, every write this module makes there fails with its errno, as the kernel would
answer (EROFS for a read-only remount, EACCES for permissions lost on a share, ENOENT for a folder gone).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat as _stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

TEMP_PREFIX = ".wan-tmp-"


# ---- faults injected by tests ---------------------------------------------------------------------------


class Faults:
    """Folders whose writes fail, and with which errno. Only tests install one (:func:`injected_faults`)."""

    def __init__(self) -> None:
        self._folders: dict[Path, int] = {}

    def fail(self, folder: Path, err: int) -> None:
        """From now on every write at or under ``folder`` fails with ``err`` (an ``errno`` value)."""
        self._folders[Path(folder).absolute()] = err

    def heal(self, folder: Path | None = None) -> None:
        """``folder`` (every folder: None) takes writes again."""
        if folder is None:
            self._folders.clear()
        else:
            self._folders.pop(Path(folder).absolute(), None)

    def error_for(self, path: Path) -> OSError | None:
        path = Path(path).absolute()
        for folder, err in list(self._folders.items()):
            if path == folder or folder in path.parents:
                return OSError(err, os.strerror(err), str(path))
        return None


_faults: Faults | None = None


@contextlib.contextmanager
def injected_faults() -> Iterator[Faults]:
    """Install a :class:`Faults` for the duration of the block (tests only; one at a time)."""
    global _faults
    if _faults is not None:
        raise RuntimeError("filesystem faults are already injected")
    _faults = Faults()
    try:
        yield _faults
    finally:
        _faults = None


def _check(path: Path) -> None:
    if _faults is not None and (exc := _faults.error_for(path)) is not None:
        raise exc


def folder_problem(folder: Path) -> OSError | None:
    """What stops writes in ``folder``, found without writing: it is missing (ENOENT; not a folder: ENOTDIR), an
    injected fault, or it is on a read-only mount (EROFS). None when nothing is seen (a write may still fail:
    :func:`probe_write` tries one)."""
    folder = Path(folder)
    try:
        st = os.stat(folder)
    except OSError as exc:
        return exc
    if not _stat.S_ISDIR(st.st_mode):
        return OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if _faults is not None and (injected := _faults.error_for(folder)) is not None:
        return injected
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
    except OSError as exc:
        return exc
    return None


def rename(src: Path, dst: Path) -> None:
    """``os.rename``, through this module so that an injected fault on either folder fails it too."""
    _check(src)
    _check(dst)
    os.rename(src, dst)


def remove(path: Path) -> bool:
    """Unlink ``path``; False when it was already gone. Other errors (EROFS, EACCES) are raised."""
    _check(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_new_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Create ``path`` (which must not exist) with ``data`` and fsync it: for a hidden temp that is published
    under its final name next (:func:`publish`), whose folder fsync then covers both names. Unlike
    :func:`atomic_write_bytes` no second temp and no rename: nobody reads a temp before it is published."""
    path = Path(path)
    _check(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):  # a failed clean-up never replaces the error that caused it
            os.unlink(path)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a part.
    ``durable``: also fsync the file and its folder, so that the new content survives a power loss
    (what status snapshots rewritten many times a second do not need)."""
    path = Path(path)
    _check(path)
    tmp = temp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a failed clean-up never replaces the error that caused it
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
    _check(final)
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
    _check(final)
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
    """Copy ``src`` to ``dst`` atomically (temp + fsync + link); refuses to replace an existing file."""
    dst = Path(dst)
    _check(dst)
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
        _publish_new(tmp, dst)
    finally:
        with contextlib.suppress(OSError):  # never replaces the error that brought us here
            os.unlink(tmp)


def atomic_create(dst: Path, data: bytes) -> None:
    """Write ``data`` as the new file ``dst`` atomically (temp + fsync + link), as ``submit`` drops a job file into
    an inbox; refuses to replace an existing file (FileExistsError)."""
    dst = Path(dst)
    _check(dst)
    tmp = temp_path_for(dst)
    try:
        write_new_file(tmp, data)
        _publish_new(tmp, dst)
    finally:
        with contextlib.suppress(OSError):  # the temp of a refused or failed publish is not left behind
            os.unlink(tmp)


def _publish_new(tmp: Path, dst: Path) -> None:
    if not publish(tmp, dst):
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    # link() names the finished file with no close event under the new name; an inotify watcher that waits
    # for a file's writer to close it (daemon.runtime.watch) would wait for its fallback. Opening it for
    # writing and closing it, writing nothing, is that close (IN_CLOSE_WRITE).
    with contextlib.suppress(OSError):
        os.close(os.open(dst, os.O_WRONLY | os.O_APPEND))


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
        try:
            if (mine and p.name.startswith(mine)) or owner is None or now - p.stat().st_mtime > max_age_seconds:
                if remove(p):
                    removed.append(p)
        except OSError as exc:  # e.g. a read-only outbox: left for the next clean-up
            if exc.errno != errno.ENOENT:
                logger.warning("fsutil.temp_left path={} error={}", p, exc)
    return removed


def probe_write(folder: Path, size: int = 65536) -> OSError | None:
    """Try to write and fsync ``size`` bytes in ``folder``: the error, or None when there is room."""
    probe = Path(folder) / f"{TEMP_PREFIX}space-probe-{os.getpid()}"
    try:
        _check(probe)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc
    finally:
        with contextlib.suppress(OSError):
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
def open_confined(
    path: Path, root_candidates: Sequence[Path | str], *, max_bytes: int, roots_resolved: bool = False
) -> Iterator[Any]:
    """Open ``path`` for reading only if it lies inside one of ``root_candidates``.

    Refuses absolute paths outside the roots, ``..`` escapes and symlinks anywhere on the way. The
    file is opened with O_NOFOLLOW and checked with fstat on the opened descriptor, so a symlink
    swapped in after the check is refused too. Raises ValueError with a reason a user can act on.
    ``roots_resolved``: the caller passes roots it resolved already (a realpath walk per file is a cost that
    shows when thousands of files are taken in).
    """
    raw = Path(path)
    if ".." in raw.parts:
        raise ValueError(f"path {str(path)!r} contains '..'")
    for root in root_candidates:
        root = Path(root) if roots_resolved else Path(root).resolve()
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
