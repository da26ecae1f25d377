"""Several daemons on one shared inbox: who owns which spool, heartbeats, and taking over the dead's work.

```
<state>/owners/<id>/lease        this daemon's heartbeat: its mtime is refreshed while it runs
<state>/owners/<id>/progress     touched (at most once per heartbeat) when its main loop made progress
<state>/owners/<id>/files, jobs  its spool (daemon.runtime.spool)
<state>/takeover/<me>~<dead>~<n> a dead owner's spool, renamed here by the one daemon that won it
```

- Locks are not trusted over NFS/SMB, so ownership is a lease: a file whose mtime the owner refreshes
  every ``heartbeat_seconds`` (from its heartbeat thread, daemon.runtime.heartbeat, and only while its
  main loop makes progress). Staleness is judged against the file server's clock (we touch a probe
  file and read its mtime), with a grace above the attribute-cache time (``acregmax`` defaults to 60 s)
  plus clock skew. An owner is taken over only when its lease is stale *and* its progress marker has
  not changed for the grace either.
- The heartbeat thread and the main loop meet in :class:`Lease`: ``lock`` (re-entrant) serialises the
  beat, the ownership check and the renewal after a loss, so that a beat never refreshes a lease the
  main loop is replacing.
- A dead owner's whole spool folder is taken with one ``rename()``: exactly one daemon wins it.
- An owner that comes back after losing its lease finds its folder gone (or the lease file no longer
  holding its instance token): it drops what it held without publishing and starts a fresh spool.
- On one host, two daemons with the same id are refused with an ``flock`` (reliable locally).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from daemon.errors import WanDaemonError
from daemon.fsutil import atomic_write_json, fsync_dir


class LeaseError(WanDaemonError):
    """This daemon cannot own its spool (another live daemon uses the same id on this host)."""


class Lease:
    def __init__(
        self,
        state_dir: Path,
        owner: str,
        *,
        grace_seconds: float,
        heartbeat_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = Path(state_dir)
        self.owner = owner
        self.owners = self.state / "owners"
        self.takeovers = self.state / "takeover"
        self.mine = self.owners / owner
        self.grace = grace_seconds
        self.heartbeat = heartbeat_seconds
        self.clock = clock
        self.instance = secrets.token_hex(8)
        self._lock_fd: int | None = None
        self._last_beat = float("-inf")
        # Where the heartbeat thread and the main loop meet: beat, held, acquire, renew_after_loss.
        self.lock = threading.RLock()

    @property
    def lease_file(self) -> Path:
        return self.mine / "lease"

    @property
    def progress_file(self) -> Path:
        return self.mine / "progress"

    # ---- owning --------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Own ``owners/<id>`` (creating it, or re-owning our previous incarnation's)."""
        self.owners.mkdir(parents=True, exist_ok=True)
        self.takeovers.mkdir(parents=True, exist_ok=True)
        lock_path = self.owners / f".{self.owner}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseError(
                f"another daemon with id {self.owner!r} is running on this host "
                f"(lock {lock_path}); give each daemon its own instance.id"
            ) from None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._lock_fd = fd
        with self.lock:
            self.mine.mkdir(exist_ok=True)
            self._write_lease()
        logger.info("lease.acquired owner={} instance={}", self.owner, self.instance)

    def _write_lease(self) -> None:
        atomic_write_json(
            self.lease_file,
            {"owner": self.owner, "instance": self.instance, "host": socket.gethostname(), "pid": os.getpid()},
        )
        self._last_beat = self.clock()

    def held(self) -> bool:
        """True while our folder and lease are still ours (nobody took them over)."""
        with self.lock:
            return self._held()

    def _held(self) -> bool:
        try:
            return json.loads(self.lease_file.read_text()).get("instance") == self.instance
        except FileNotFoundError:
            # Our folder renamed away: taken over. Unless the whole state folder is gone (an unmounted share, a
            # deleted folder): nobody took anything then, and the daemon pauses until it is back.
            return not self.owners.is_dir()
        except (OSError, ValueError) as exc:
            # A transient read error (EIO, ESTALE, a half-visible file on NFS) is not a takeover: the lease
            # is only lost when the file is gone or names another instance. Check again at the next beat.
            logger.warning("lease.unreadable path={} error={}", self.lease_file, exc)
            return True

    def beat(self, *, force: bool = False, progressed: bool = False) -> bool:
        """Refresh the heartbeat when due (``progressed``: touch the progress marker too). Returns False when
        the lease was lost. Called by the heartbeat thread (daemon.runtime.heartbeat)."""
        with self.lock:
            now = self.clock()
            if not force and now - self._last_beat < self.heartbeat:
                return True
            if not self._held():
                return False
            try:
                os.utime(self.lease_file)
                if progressed:
                    _touch(self.progress_file)
            except FileNotFoundError:  # our folder was renamed away between the check and the touch, or all is gone
                return self._held()
            self._last_beat = now
            return True

    def renew_after_loss(self) -> None:
        """After losing the lease: start over with a fresh, empty folder and a new instance token."""
        with self.lock:
            self.instance = secrets.token_hex(8)
            self.mine.mkdir(parents=True, exist_ok=True)
            self._write_lease()
        logger.warning("lease.renewed owner={} instance={}", self.owner, self.instance)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- the others ----------------------------------------------------------------------------

    def server_now(self) -> float:
        """The file server's idea of now: the mtime of a file we just touched."""
        probe = self.state / f".clock-{self.owner}"
        with open(probe, "a"):
            pass
        os.utime(probe)
        return probe.stat().st_mtime

    def expired_owners(self) -> list[str]:
        """Owners whose lease is older than the grace and whose progress marker (where they have one: an
        older daemon may not) has not changed for the grace either, by the file server's clock."""
        now = self.server_now()
        dead = []
        for d in self.owners.iterdir():
            if d.name == self.owner or d.name.startswith(".") or not d.is_dir():
                continue
            try:
                beat = (d / "lease").stat().st_mtime
            except FileNotFoundError:
                try:
                    beat = d.stat().st_mtime  # a folder whose lease was never written
                except FileNotFoundError:
                    continue
            with contextlib.suppress(FileNotFoundError):
                beat = max(beat, (d / "progress").stat().st_mtime)
            if now - beat > self.grace:
                dead.append(d.name)
        return dead

    def take_over(self, dead: str) -> Path | None:
        """Rename a dead owner's folder into ``takeover/``. Exactly one contender succeeds."""
        dest = self.takeovers / f"{self.owner}~{dead}~{time.time_ns()}"
        try:
            os.rename(self.owners / dead, dest)
        except FileNotFoundError:
            if dest.exists():  # NFS: the rename happened, its reply was lost
                return dest
            return None
        except OSError as exc:
            logger.warning("lease.takeover_failed dead={} error={}", dead, exc)
            return None
        with contextlib.suppress(OSError):
            fsync_dir(self.owners)
            fsync_dir(self.takeovers)
        logger.warning("lease.takeover owner={} took over {}", self.owner, dead)
        return dest

    def my_takeovers(self) -> list[Path]:
        """Taken-over folders not yet merged (a crash during a merge leaves one behind)."""
        if not self.takeovers.is_dir():
            return []
        return sorted(p for p in self.takeovers.iterdir() if p.name.startswith(f"{self.owner}~"))


def _touch(path: Path) -> None:
    """Set ``path``'s mtime to now (the file server's now), creating it if need be (never its folder)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        with open(path, "a"):
            pass
