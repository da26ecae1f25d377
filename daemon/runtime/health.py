"""The health file: a small JSON document, rewritten atomically every few seconds and on each change.

Monitoring reads it (``wan-daemon status``, ``check-health --max-age``); nothing in the daemon reads it
back, so a stale file means a stuck or dead daemon.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from daemon.control import OPERATOR_PAUSE, PauseRequest
from daemon.fsutil import atomic_write_json


class HealthWriter:
    # Progress changes the document at every denoising step; readers poll it every second or so.
    MIN_GAP_SECONDS = 0.25

    def __init__(self, path: Path, *, interval: float, clock=time.time) -> None:
        self.path = Path(path)
        self.interval = interval
        self.clock = clock
        self._last_written = float("-inf")
        self._last_payload: dict[str, Any] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def maybe_write(self, payload: dict[str, Any], *, force: bool = False) -> bool:
        """Write when forced (a job changed state), when the content changed and the last write is at
        least MIN_GAP_SECONDS old, or every ``interval`` anyway (the heartbeat monitors check)."""
        now = self.clock()
        since = now - self._last_written
        changed = payload != self._last_payload and since >= self.MIN_GAP_SECONDS
        if not (force or changed or since >= self.interval):
            return False
        self._last_payload = payload
        self._last_written = now
        # Atomic (readers never see half a file) but not fsynced: a snapshot that is rewritten within
        # seconds need not survive a power loss, and the daemon never reads it back.
        atomic_write_json(
            self.path,
            {
                **payload,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "updated_at": now,
                "updated_at_iso": iso(now),
            },
            durable=False,
            compact=True,  # one line, by json's C encoder: written up to every round of a busy loop
        )
        return True


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) + f"{time.strftime('%z', time.localtime(ts))}"


def read_health(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def health_age(health: dict[str, Any], now: float | None = None) -> float:
    return (now if now is not None else time.time()) - float(health.get("updated_at", 0))


def format_status(h: dict[str, Any], now: float | None = None) -> str:
    """A person-readable view of a health document."""
    lines = [
        f"wan-daemon {h.get('version', '?')}  pid {h.get('pid')} on {h.get('host')}  state: {h.get('state')}",
        f"  updated {health_age(h, now):.1f}s ago; up since {h.get('started_at_iso')}",
        f"  inbox {h.get('inbox')}  ->  outbox {h.get('outbox')}",
        f"  queue: {h.get('queue_depth', 0)} queued, {h.get('inbox_pending', 0)} settling in inbox; "
        f"done {h.get('done', 0)}, failed {h.get('failed', 0)}",
    ]
    if h.get("paused"):
        kind = (h.get("pause") or {}).get("kind")
        lines.append(f"  PAUSED{f' ({kind})' if kind else ''}: {h.get('paused')}")
    operator = h.get("operator_pause")
    if operator and (h.get("pause") or {}).get("kind") != OPERATOR_PAUSE:  # under a disk pause: both are shown
        lines.append(f"  PAUSED ({OPERATOR_PAUSE}): {PauseRequest.from_dict(operator).describe()}")
    parked = sorted(name for name, w in (h.get("workers") or {}).items() if w.get("state") == "parked")
    if parked:
        lines.append(f"  parked (stopped until resume, GPU memory freed): {', '.join(parked)}")
    recovering = h.get("recovering")
    if recovering:
        lines.append(f"  recovering {recovering.get('done')}/{recovering.get('total')} records from the spool")
    dev = h.get("device") or {}
    if dev:
        lines.append(
            f"  worker: {dev.get('state')} on {dev.get('device')} ({dev.get('device_name')}), "
            f"restarts {dev.get('restarts', 0)}"
        )
    run = h.get("running")
    if run:
        prog = f"step {run.get('step')}/{run.get('total')}" if run.get("total") else ""
        lines.append(
            f"  running: {run.get('id')} ({run.get('model')}) phase {run.get('phase')} {prog} "
            f"attempt {run.get('attempt')}"
        )
    return "\n".join(lines)


def missing_folder(folders: list[Path]) -> Path | None:
    """The first of ``folders`` that is gone (an unmounted share, a deleted folder), for messages about a health
    file that cannot be found."""
    return next((Path(f) for f in folders if not Path(f).is_dir()), None)


def verdict(h: dict[str, Any] | None, *, max_age: float, now: float, health_path: Path, folders: list[Path]) -> str:
    """``check-health``'s answer: "healthy: ..." or "unhealthy: ..." (a stale, missing or stopped daemon, or one
    that is paused: it takes and starts nothing until a person frees space or brings a folder back). An
    operator's pause (``wan-daemon pause``) is healthy, and says so: someone asked for it."""
    if h is None:
        gone = missing_folder(folders)
        why = f"; {gone} is missing (an unmounted share or a deleted folder?)" if gone is not None else ""
        return f"unhealthy: no health file at {health_path}{why}"
    age = health_age(h, now)
    if age > max_age:
        gone = missing_folder(folders)
        why = f"; {gone} is missing (an unmounted share or a deleted folder?)" if gone is not None else ""
        return f"unhealthy: health file is {age:.1f}s old (max {max_age}s); state was {h.get('state')}{why}"
    if h.get("state") == "stopped":
        return "unhealthy: the daemon has stopped"
    if h.get("paused") and (h.get("pause") or {}).get("kind") == OPERATOR_PAUSE:
        return f"healthy: {h.get('paused')}; {h.get('state')}, updated {age:.1f}s ago, {h.get('queue_depth', 0)} queued"
    if h.get("paused"):
        return f"unhealthy: paused: {h.get('paused')}"
    return f"healthy: {h.get('state')}, updated {age:.1f}s ago, {h.get('queue_depth', 0)} queued"
