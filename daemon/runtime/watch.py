"""Notice job files in the inbox. Events are hints; a periodic full scan is the source of truth.

- watchdog's inotify observer by default, ``PollingObserver`` for NFS/SMB shares (inotify never sees
  writes made by other hosts there);
- files present at start and files lost to an inotify queue overflow produce no event: the scan at
  start-up and every ``rescan_interval_seconds`` finds them;
- dotfiles, ``*.tmp`` and ``*.part`` are ignored; only ``*.yaml`` / ``*.yml`` are job files;
- a file renamed into the inbox (watchdog: a *move*) is complete and taken at once; a file written in
  place (a *create*, fired at open() before any byte) is taken only once its size and mtime are
  unchanged across two checks ``settle_seconds`` apart.

The observer thread only enqueues paths; all decisions happen on the daemon's thread.
"""

from __future__ import annotations

import os
import queue
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.config import WatchConfig

JOB_SUFFIXES = (".yaml", ".yml")


def is_job_file_name(name: str) -> bool:
    lower = name.lower()
    return not name.startswith(".") and lower.endswith(JOB_SUFFIXES) and not lower.endswith((".tmp", ".part"))


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: queue.Queue[tuple[str, bool]]) -> None:
        self.sink = sink

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put((os.fsdecode(event.src_path), False))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put((os.fsdecode(event.src_path), False))

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put((os.fsdecode(event.src_path), False))

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink.put((os.fsdecode(event.dest_path), True))


# How long watchdog's inotify backend holds an IN_MOVED_FROM waiting for its IN_MOVED_TO.
MOVE_PAIRING_SECONDS = 0.05


def _shorten_move_pairing() -> None:
    """watchdog holds an unpaired IN_MOVED_FROM for 0.5 s, and every event queued behind it waits too.
    Each claim renames a job file out of the inbox, an IN_MOVED_FROM that never gets its pair, so the
    next file dropped within half a second was seen only then (measured: 450 ms instead of 1 ms). The
    two events of one rename come from the kernel together; a rename whose halves still fail to pair
    shows up as a created file and is taken once it has settled, as a file written in place is."""
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # no inotify here (macOS, Windows): other backends do not hold moves back
        return
    InotifyMoveEventGrouper.delay = MOVE_PAIRING_SECONDS


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    checked_at: float
    complete: bool  # arrived by rename: no need to wait for it to settle


class InboxWatcher:
    def __init__(self, inbox: Path, config: WatchConfig, *, clock: Callable[[], float]) -> None:
        self.inbox = Path(inbox)
        self.config = config
        self.clock = clock
        self._hints: queue.Queue[tuple[str, bool]] = queue.Queue()
        self._seen: dict[Path, _Seen] = {}
        self._observer: BaseObserver | None = None
        self._last_scan = float("-inf")

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        observer: BaseObserver
        if self.config.mode == "polling":
            observer = PollingObserver(timeout=self.config.poll_interval_seconds)
        else:
            _shorten_move_pairing()
            observer = Observer()
        self._observer = observer
        observer.schedule(_Handler(self._hints), str(self.inbox), recursive=False)
        observer.daemon = True
        observer.start()
        logger.info("watch.started inbox={} mode={}", self.inbox, self.config.mode)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def wait_for_hint(self, timeout: float) -> None:
        """Block until an event arrives or ``timeout`` passes (the daemon's idle wait)."""
        try:
            item = self._hints.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        self._hints.put(item)

    # ---- decisions -----------------------------------------------------------------------------

    def _note(self, path: Path, complete: bool, now: float) -> None:
        if path.parent != self.inbox or not is_job_file_name(path.name):
            return
        try:
            st = path.lstat()
        except FileNotFoundError:
            self._seen.pop(path, None)
            return
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            return
        prev = self._seen.get(path)
        if prev is None or (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now, complete or (prev.complete if prev else False))
        elif complete:
            prev.complete = True

    def scan(self) -> None:
        now = self.clock()
        try:
            names = os.listdir(self.inbox)
        except FileNotFoundError:
            return
        for name in names:
            if is_job_file_name(name):
                self._note(self.inbox / name, False, now)
        self._last_scan = now

    def ready_files(self) -> list[Path]:
        """Job files that may be claimed now, oldest first."""
        now = self.clock()
        while True:
            try:
                raw, complete = self._hints.get_nowait()
            except queue.Empty:
                break
            self._note(Path(raw), complete, now)
        if now - self._last_scan >= self.config.rescan_interval_seconds:
            self.scan()
        ready = []
        for path, seen in list(self._seen.items()):
            try:
                st = path.lstat()
            except FileNotFoundError:
                del self._seen[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now, False)
                continue
            if seen.complete or now - seen.checked_at >= self.config.settle_seconds:
                ready.append((seen.checked_at, path))
        return [p for _, p in sorted(ready)]

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    @property
    def pending(self) -> int:
        """Job files seen in the inbox but not yet claimed (still settling, or waiting)."""
        return len(self._seen)
