"""Operator requests: the files ``wan-daemon pause|resume|cancel|priority`` write in the state folder, which every
daemon on the inbox reads on its one decision thread (daemon.runtime.control). Writing a file is all a command
does, so it works from any shell on any host that sees the state folder, and nothing races the scheduler.

```
<state>/control/pause.json        present: paused. Level-triggered: every daemon on the inbox obeys it, a daemon
                                  that starts later too; ``resume`` removes it.
<state>/cancel/<job id>           cancel one job: whichever daemon holds it acts, then removes the file.
<state>/control/priority/<job id> set one queued job's priority: whichever daemon holds it acts, then removes it.
<state>/control/resumed.json      who lifted the last pause, and when (written by ``resume`` before it removes
                                  pause.json; only for the daemons' log and history).
```

Each file is one JSON object written atomically, and names who asked (``by``: user@host) and when (``at``): the
daemon that applies it records both in its history (``operations``). Pure: stdlib only, no daemon state.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.fsutil import atomic_write_json

PAUSE_MODES = ("drain", "now")
OPERATOR_PAUSE = "operator"  # an operator's pause's kind in the health file and metrics (beside runtime.disk's)


def requester() -> str:
    """Who is asking: ``user@host`` (the history's ``by``)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


LATEST_TIME = 4_102_444_800.0  # 2100-01-01: a later "time" in a request file is damage, not a time


def epoch(value: Any) -> float | None:
    """A request file's time (epoch seconds) when it is one: a finite number from 1970 to 2100. Anything else (a
    string, a bool, ``1e999``, an integer too large for a float) is None, never an exception."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if 0.0 <= seconds <= LATEST_TIME else None  # NaN fails both comparisons


REQUEST_SKEW_SECONDS = 60.0  # how far the clocks of hosts sharing one state folder may differ


def predates(request: dict[str, Any], received_at: float) -> bool:
    """A cancel or priority request written before the job it names was taken in: a leftover for an earlier job
    of that id (``retry`` reuses ids), allowing for hosts' clocks differing by REQUEST_SKEW_SECONDS. A request
    without a readable time (an older CLI's empty cancel file) is taken as current."""
    at = epoch(request.get("requested_at"))
    return at is not None and at < received_at - REQUEST_SKEW_SECONDS


def forget_requests(state: Path, job_id: str) -> None:
    """Remove any cancel or priority request for ``job_id`` (before ``retry`` reuses the id)."""
    for path in (cancel_dir(state) / job_id, priority_dir(state) / job_id):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def control_dir(state: Path) -> Path:
    return Path(state) / "control"


def pause_path(state: Path) -> Path:
    return control_dir(state) / "pause.json"


def resumed_path(state: Path) -> Path:
    return control_dir(state) / "resumed.json"


def cancel_dir(state: Path) -> Path:
    return Path(state) / "cancel"


def priority_dir(state: Path) -> Path:
    return control_dir(state) / "priority"


@dataclass(frozen=True)
class PauseRequest:
    """``mode``: ``drain`` (running jobs finish) or ``now`` (they go back to the queue at their next step, the
    attempt given back). ``free_vram``: once its jobs are off the device, each worker process is stopped (its
    warm pipelines and CUDA context freed for other programs) until ``resume``."""

    mode: str = "drain"
    free_vram: bool = False
    by: str = ""
    at: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        what = "running jobs go back to the queue" if self.mode == "now" else "running jobs finish"
        vram = "; the GPUs are freed" if self.free_vram else ""
        why = f" ({self.reason})" if self.reason else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at)) if epoch(self.at) else "?"
        return f"paused by {self.by or 'an operator'} at {when}{why}: nothing new starts, {what}{vram}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PauseRequest:
        """A pause file written by hand or by another version: what cannot be read keeps the pause (a damaged
        file must not start jobs someone wanted held), with the safest reading."""
        if not isinstance(data, dict):
            return cls(reason="unreadable pause file")
        mode = data.get("mode") if data.get("mode") in PAUSE_MODES else "drain"
        return cls(
            mode=str(mode),
            free_vram=data.get("free_vram") is True,
            by=str(data.get("by") or ""),
            at=epoch(data.get("at")) or 0.0,
            reason=str(data.get("reason") or ""),
        )


def write_pause(state: Path, request: PauseRequest) -> Path:
    path = pause_path(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, request.to_dict())
    return path


def read_pause(state: Path) -> PauseRequest | None:
    """The pause in force, or None. A file that cannot be parsed still pauses (PauseRequest.from_dict)."""
    try:
        raw = pause_path(state).read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    return PauseRequest.from_dict(data)


def clear_pause(state: Path) -> bool:
    """Resume: True when a pause was removed. Who resumed (this process's requester(), at now) is noted first in
    ``control/resumed.json``, for the daemons' log and history (read_resume)."""
    if not pause_path(state).exists():
        return False
    with contextlib.suppress(OSError):  # only a note: the pause is lifted whether or not it is written
        atomic_write_json(resumed_path(state), {"by": requester(), "at": time.time()})
    try:
        pause_path(state).unlink()
    except FileNotFoundError:
        return False
    return True


def read_resume(state: Path) -> dict[str, Any]:
    """The last resume's note (``by``, ``at``), {} when there is none."""
    return read_request(resumed_path(state))


def write_cancel(state: Path, job_id: str, *, by: str, at: float | None = None) -> Path:
    folder = cancel_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / job_id
    atomic_write_json(path, {"id": job_id, "by": by, "requested_at": time.time() if at is None else at})
    return path


def write_priority(state: Path, job_id: str, priority: int, *, by: str, at: float | None = None) -> Path:
    folder = priority_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / job_id
    atomic_write_json(
        path, {"id": job_id, "priority": int(priority), "by": by, "requested_at": time.time() if at is None else at}
    )
    return path


def read_request(path: Path) -> dict[str, Any]:
    """A cancel or priority request's fields ({} when it is unreadable: an old-style empty cancel file still
    cancels)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(Path(path).read_bytes())
        if isinstance(data, dict):
            return data
    return {}
