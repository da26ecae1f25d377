"""The lease's heartbeat, on its own thread: it never starves behind a long step of the main loop, and it
still stops when the main loop is stuck.

- Every ``instance.heartbeat_seconds`` the thread refreshes the lease (daemon.runtime.leases), but only while
  the main loop has reported progress (:meth:`Heartbeat.progress`, a monotonic timestamp: cheap enough for
  every tick and for every record read while recovering) within ``stuck_after``. When progress was made since
  the last beat it touches the progress marker next to the lease too.
- ``stuck_after`` is half of ``instance.lease_grace_seconds`` (:func:`stuck_after_for`). A loop that makes
  no progress for that long stops heartbeating: its peers take its spool over once the lease and the
  progress marker are older than the grace, i.e. between one grace and one and a half graces (plus a
  takeover check) after its last progress. A loop that is merely slow (a recovery of thousands of records,
  a long intake) keeps reporting progress and keeps its lease however long it takes. Half the grace leaves
  a tick room to run long between two progress reports, and is above two heartbeats
  (``lease_grace_seconds > 2 * heartbeat_seconds`` is checked by the config).
- When a beat finds the lease lost (another daemon took the spool over), the thread stops beating and
  :attr:`Heartbeat.lost` turns True; the main loop reads it and steps back
  (``Recovery.lease_lost``, which renews the lease with a new instance token: ``lost`` is then False again
  and the thread beats for the new instance).
- :meth:`Heartbeat.progress` also says when the loop comes back from a stall longer than ``stuck_after``:
  the thread did not beat meanwhile, so the main loop checks the lease itself before doing anything else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from loguru import logger

from daemon.config import InstanceConfig
from daemon.runtime.leases import Lease

# How long stop() waits for a beat in progress (a beat is a few small file operations; on a hung NFS
# server it can block, and the thread is a daemon thread: it never keeps the process alive).
STOP_TIMEOUT_SECONDS = 30.0


def stuck_after_for(instance: InstanceConfig) -> float:
    """How long the main loop may go without reporting progress before the heartbeat stops: half the grace."""
    return instance.lease_grace_seconds / 2


class Heartbeat:
    def __init__(
        self,
        lease: Lease,
        *,
        interval: float,
        stuck_after: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.interval = interval
        self.stuck_after = stuck_after
        self._monotonic = monotonic
        self._last_progress = monotonic()
        self._marked = float("-inf")  # the progress already recorded in the marker
        self._lost_instance: str | None = None
        self._withholding = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the main loop's side ------------------------------------------------------------------

    def progress(self) -> bool:
        """The main loop is making progress. True when it comes back from a stall longer than ``stuck_after``
        (the lease may have been taken meanwhile: check it before acting)."""
        now = self._monotonic()
        stalled = now - self._last_progress > self.stuck_after
        self._last_progress = now
        return stalled

    @property
    def lost(self) -> bool:
        """A beat found the lease lost, and the main loop has not renewed it since."""
        lost = self._lost_instance
        return lost is not None and lost == self.lease.instance

    # ---- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self.progress()  # the loop starts now, not when this object was made
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.lease.owner}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_TIMEOUT_SECONDS)
            if thread.is_alive():
                logger.error("heartbeat.stop_timeout owner={}: a beat is blocked (file server?)", self.lease.owner)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # e.g. EIO/ESTALE from the file server: try again at the next beat
                logger.warning("heartbeat.failed owner={} error={!r}", self.lease.owner, exc)

    def beat(self) -> bool:
        """One heartbeat (the thread calls it every ``interval``). True when the lease was refreshed."""
        if self.lost:
            return False  # the main loop has not stepped back yet
        last = self._last_progress
        idle = self._monotonic() - last
        if idle > self.stuck_after:
            if not self._withholding:
                self._withholding = True
                logger.error(
                    "heartbeat.withheld owner={}: the main loop made no progress for {:.1f}s (over {:.1f}s); "
                    "the lease is no longer refreshed",
                    self.lease.owner,
                    idle,
                    self.stuck_after,
                )
            return False
        if self._withholding:
            self._withholding = False
            logger.warning("heartbeat.resumed owner={}: the main loop made progress again", self.lease.owner)
        progressed = last > self._marked
        with self.lease.lock:
            instance = self.lease.instance
            held = self.lease.beat(force=True, progressed=progressed)
        if not held:
            self._lost_instance = instance
            logger.error("heartbeat.lease_lost owner={} instance={}", self.lease.owner, instance)
            return False
        if progressed:
            self._marked = last
        return True
