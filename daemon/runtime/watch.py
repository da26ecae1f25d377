"""Notice job files in the inbox. Events are hints; a periodic full scan is the source of truth.

- watchdog's inotify observer by default, ``PollingObserver`` for NFS/SMB shares (inotify never sees
  writes made by other hosts there);
- files present at start and files lost to an inotify queue overflow produce no event: the scan at
  start-up and every ``rescan_interval_seconds`` finds them;
- dotfiles, ``*.tmp`` and ``*.part`` are ignored; only ``*.yaml`` / ``*.yml`` are job files;
- a file renamed into the inbox (watchdog: a *move*) is complete and taken at once (the safe protocol);
- a file written in place (a *create*, fired at open() before any byte) is taken, with inotify, only after
  its writer closed it (IN_CLOSE_WRITE: watchdog's *closed*) and its size and mtime then stayed unchanged
  for ``settle_seconds``: a writer that pauses between writes is waited for however long it pauses. Polling
  sees no close (and nothing of writes by other hosts but their result), so there a file is taken once its
  size and mtime stayed unchanged for ``poll_settle_seconds``, long enough for a slow NFS/SMB writer. A close
  lost to an inotify queue overflow delays a file by ``UNCLOSED_SETTLE_SECONDS``, never forever;
- a missing inbox (an unmounted share, a deleted folder) is reported (``missing``), and when it is back
  (another folder, or the share's root instead of the bare mount point) the observer watches it afresh.

The observer thread only enqueues paths; all decisions happen on the daemon's thread.
"""

from __future__ import annotations

import os
import queue
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

if sys.platform.startswith("linux"):
    from watchdog.observers.inotify import InotifyObserver
else:  # no inotify, and no close events
    InotifyObserver = None  # type: ignore[assignment,misc]

from daemon.config import WatchConfig

JOB_SUFFIXES = (".yaml", ".yml")


def is_job_file_name(name: str) -> bool:
    lower = name.lower()
    return not name.startswith(".") and lower.endswith(JOB_SUFFIXES) and not lower.endswith((".tmp", ".part"))


# What an event says about a file: being written (created, modified), closed after writing, renamed in.
WRITING, CLOSED, MOVED, SEEN = "writing", "closed", "moved", "seen"

# A file seen being written whose close never came (an event lost to an inotify overflow) is taken once it has
# not changed for this long.
UNCLOSED_SETTLE_SECONDS = 60.0


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: Callable[[str, str], None]) -> None:
        self.sink = sink

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink(os.fsdecode(event.src_path), WRITING)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink(os.fsdecode(event.src_path), WRITING)

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink(os.fsdecode(event.src_path), CLOSED)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.sink(os.fsdecode(event.dest_path), MOVED)


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
    checked_at: float  # when its size and mtime were last seen to change
    complete: bool  # arrived by rename: no need to wait for it to settle
    writing: bool = False  # inotify: open for writing (created or modified, not closed since)


class InboxWatcher:
    def __init__(self, inbox: Path, config: WatchConfig, *, clock: Callable[[], float]) -> None:
        self.inbox = Path(inbox)
        self.config = config
        self.clock = clock
        self._hints: queue.Queue[tuple[str, str]] = queue.Queue()  # in the order the events came: it matters
        self._wake = threading.Event()  # set with every hint (the daemon's idle wait)
        self._seen: dict[Path, _Seen] = {}
        self._observer: BaseObserver | None = None
        self._watching = False  # start() was called, stop() not yet
        self._watched: tuple[int, int] | None = None  # (st_dev, st_ino) of the folder the observer watches
        self._last_scan = float("-inf")
        self.missing = False  # the inbox folder is gone
        # inotify reports a writer's close; polling (and other platforms' observers) never do.
        self._sees_close = config.mode != "polling" and InotifyObserver is not None

    @property
    def settle_seconds(self) -> float:
        return self.config.poll_settle_seconds if self.config.mode == "polling" else self.config.settle_seconds

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._watching = True
        self._observe()

    def _observe(self) -> None:
        observer: BaseObserver
        if self.config.mode == "polling":
            observer = PollingObserver(timeout=self.config.poll_interval_seconds)
        elif self._sees_close:
            _shorten_move_pairing()
            # Full events: a file moved in from another folder arrives as a move (complete), not as a create
            # (which would wait for a close that never comes).
            observer = InotifyObserver(generate_full_events=True)
        else:
            observer = Observer()
        try:
            st = os.stat(self.inbox)
            observer.schedule(_Handler(self._hint), str(self.inbox), recursive=False)
        except OSError as exc:  # gone (an unmounted share): watched again when a scan finds it back
            logger.error("watch.unavailable inbox={} error={}", self.inbox, exc)
            observer.stop()  # the inotify observer's reader thread starts with the observer object
            return
        observer.daemon = True
        observer.start()
        self._observer, self._watched = observer, (st.st_dev, st.st_ino)
        logger.info("watch.started inbox={} mode={}", self.inbox, self.config.mode)

    def _observing(self) -> bool:
        """The observer still watches (watchdog's inotify emitter stops for good when the folder is deleted)."""
        observer = self._observer
        return observer is not None and any(e.is_alive() for e in observer.emitters)

    def _unobserve(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer, self._watched = None, None

    def stop(self) -> None:
        self._watching = False
        self._unobserve()

    def _hint(self, raw: str, what: str) -> None:
        """The observer thread's only action: enqueue (decisions are the daemon thread's)."""
        self._hints.put((raw, what))
        self._wake.set()

    def wait_for_hint(self, timeout: float) -> None:
        """Block until an event arrives or ``timeout`` passes (the daemon's idle wait). The hints stay in their
        order: a writer's close must never be read before its last write."""
        self._wake.clear()
        if self._hints.empty():
            self._wake.wait(max(0.0, timeout))

    # ---- decisions -----------------------------------------------------------------------------

    def _note(self, path: Path, what: str, now: float) -> None:
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
            prev = self._seen[path] = _Seen(
                st.st_size, st.st_mtime_ns, now, prev.complete if prev else False, prev.writing if prev else False
            )
        if what == MOVED:
            prev.complete, prev.writing = True, False
        elif what == WRITING and self._sees_close:
            prev.complete, prev.writing = False, True
        elif what == CLOSED:
            prev.writing = False

    def scan(self) -> None:
        """Look at every file in the inbox (the source of truth). A missing inbox is noted, and one that is back,
        or that is now another folder than the one watched, is watched afresh."""
        now = self.clock()
        self._last_scan = now
        try:
            names = os.listdir(self.inbox)
            st = os.stat(self.inbox)
        except OSError as exc:
            if not self.missing:
                logger.error("watch.inbox_missing inbox={} error={}", self.inbox, exc)
            self.missing = True
            self._seen.clear()
            return
        back = self.missing
        if back:
            logger.warning("watch.inbox_back inbox={}", self.inbox)
            self.missing = False
        if self._watching and (back or self._watched != (st.st_dev, st.st_ino) or not self._observing()):
            self._unobserve()
            self._observe()
        for name in names:
            if is_job_file_name(name):
                self._note(self.inbox / name, SEEN, now)

    def ready_files(self) -> list[Path]:
        """Job files that may be claimed now, oldest first."""
        now = self.clock()
        while True:
            try:
                raw, what = self._hints.get_nowait()
            except queue.Empty:
                break
            self._note(Path(raw), what, now)
        if now - self._last_scan >= self.config.rescan_interval_seconds:
            self.scan()
        settle_seconds = self.settle_seconds
        ready = []
        for path, seen in list(self._seen.items()):
            try:
                st = path.lstat()
            except FileNotFoundError:
                del self._seen[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now, False, seen.writing)
                continue
            settle = UNCLOSED_SETTLE_SECONDS if seen.writing else settle_seconds
            if seen.complete or now - seen.checked_at >= settle:
                ready.append((seen.checked_at, path))
        return [p for _, p in sorted(ready)]

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    @property
    def pending(self) -> int:
        """Job files seen in the inbox but not yet claimed (still settling, or waiting)."""
        return len(self._seen)
