"""Prometheus metrics as a text file for node_exporter's textfile collector.

node_exporter (``--collector.textfile.directory``) reads every ``*.prom`` file in its folder at each
scrape. The file is therefore replaced atomically, and its temp name must *not* end in ``.prom``:
node_exporter would read the half-written temp file, or report every series twice. Point
:class:`MetricsWriter` at ``<textfile dir>/wan-daemon-<instance>.prom``; every series carries an
``instance_id`` label so that several daemons on one host can write one file each.

No prometheus_client dependency: the exposition format (text 0.0.4) is simple enough to write here.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.control import OPERATOR_PAUSE
from daemon.fsutil import atomic_write_bytes, fsync_dir, temp_path_for
from daemon.runtime.disk import PAUSE_KINDS as DISK_PAUSE_KINDS

# One 0/1 series per kind of pause: the disk guard's (daemon.runtime.disk) and an operator's (daemon.control).
PAUSE_KINDS: tuple[str, ...] = (*DISK_PAUSE_KINDS, OPERATOR_PAUSE)

# Every value Daemon.state takes (service.py); one 0/1 series each, so a missing series never means "not busy".
KNOWN_STATES: tuple[str, ...] = (
    "starting",
    "idle",
    "waiting",
    "waiting_for_worker",
    "busy",
    "pausing",
    "paused",
    "draining",
    "stopped",
)

# Upper bounds (seconds) of the job duration histogram: tiny CPU jobs take seconds, real A14B jobs up to an hour.
DURATION_BUCKETS: tuple[float, ...] = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

_MIB = 1 << 20


def escape_label_value(value: Any) -> str:
    """Escape a label value for the text exposition format: backslash, double quote and line feed."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _bound(le: float) -> str:
    # The form official clients write ("1.0", "+Inf"), which Prometheus 3 also normalises "le" to.
    return "+Inf" if math.isinf(le) else repr(float(le))


class _Builder:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float | int | bool, labels: Mapping[str, Any] | None = None) -> None:
        pairs = {"instance_id": self.instance_id, **(labels or {})}
        rendered = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs.items())
        self.lines.append(f"{name}{{{rendered}}} {format_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def model_label(name: str) -> str:
    """A model as a metric label: its name; a local folder by its folder name, never its whole path (a path
    leaks the host's layout and makes a new series per mount point). Hub repo ids stay as they are."""
    if os.path.isabs(name) or name.startswith(("./", "../", "~")):
        return Path(name).name or name
    return name


class DurationHistograms:
    """Job durations by model as cumulative histograms: counts only grow for the life of the process, as a
    Prometheus counter must (a window of recent jobs behind a ``_count`` would make it fall)."""

    def __init__(self) -> None:
        self._by_model: dict[str, tuple[list[int], list[float]]] = {}  # model -> (bucket counts, [sum, count])

    def observe(self, model: str, seconds: float) -> None:
        buckets, totals = self._by_model.setdefault(model_label(model), ([0] * (len(DURATION_BUCKETS) + 1), [0.0, 0]))
        for i, le in enumerate((*DURATION_BUCKETS, math.inf)):
            if seconds <= le:
                buckets[i] += 1
        totals[0] += seconds
        totals[1] += 1

    def items(self) -> list[tuple[str, list[int], float, int]]:
        return [(m, list(b), float(t[0]), int(t[1])) for m, (b, t) in sorted(self._by_model.items())]


def render(
    health: Mapping[str, Any],
    counters: Mapping[str, Any],
    durations: DurationHistograms | Iterable[tuple[str, float]],
    gpus: Sequence[Mapping[str, Any]] | None = None,
    known_priorities: Iterable[str] = (),
) -> str:
    """The metrics page, as text. Arguments as for :meth:`MetricsWriter.write`; ``durations`` may also be
    (model, seconds) pairs. ``known_priorities``: priorities seen before, shown at 0 rather than dropped."""
    b = _Builder(str(health.get("instance") or "unknown"))
    if not isinstance(durations, DurationHistograms):
        pairs, durations = durations, DurationHistograms()
        for model, seconds in pairs:
            durations.observe(str(model), float(seconds))

    b.family("wan_daemon_up", "gauge", "1 while the daemon runs; 0 written as it stops.")
    b.sample("wan_daemon_up", int(health.get("state") != "stopped"))

    state = health.get("state")
    b.family("wan_daemon_state", "gauge", "Daemon state: 1 for the current state, 0 for the others.")
    for known in KNOWN_STATES + ((state,) if state and state not in KNOWN_STATES else ()):
        b.sample("wan_daemon_state", int(known == state), {"state": known})

    b.family(
        "wan_daemon_paused",
        "gauge",
        "1 while new jobs are paused: a folder full, unwritable or missing (intake too), or an operator's pause.",
    )
    b.sample("wan_daemon_paused", int(bool(health.get("paused"))))
    b.family(
        "wan_daemon_operator_paused", "gauge", "1 while an operator's pause (wan-daemon pause) holds new jobs back."
    )
    b.sample("wan_daemon_operator_paused", int(bool(health.get("operator_pause"))))
    kind = (health.get("pause") or {}).get("kind")
    b.family("wan_daemon_pause_kind", "gauge", "Why intake and new jobs are paused: 1 for the current kind, else 0.")
    for known in PAUSE_KINDS + ((kind,) if kind and kind not in PAUSE_KINDS else ()):
        b.sample("wan_daemon_pause_kind", int(known == kind), {"kind": known})

    by_priority = health.get("queue_by_priority") or {}
    b.family("wan_daemon_queued_jobs", "gauge", "Jobs waiting in the queue, all priorities together.")
    b.sample("wan_daemon_queued_jobs", int(health.get("queue_depth", sum(int(n) for n in by_priority.values()))))
    b.family("wan_daemon_queue_depth", "gauge", "Jobs waiting in the queue, by priority.")
    depths = {**{str(p): 0 for p in known_priorities}, **{str(p): n for p, n in by_priority.items()}}
    for prio, n in sorted(depths.items(), key=lambda kv: _prio_key(kv[0])):
        b.sample("wan_daemon_queue_depth", int(n), {"priority": prio})

    b.family("wan_daemon_running_jobs", "gauge", "Jobs running now (one at most per worker).")
    running = health.get("running_jobs")
    b.sample("wan_daemon_running_jobs", len(running) if running is not None else (1 if health.get("running") else 0))

    b.family("wan_daemon_jobs_done_total", "counter", "Jobs published to the outbox.")
    b.sample("wan_daemon_jobs_done_total", int(counters.get("done_total", 0)))

    b.family("wan_daemon_jobs_failed_total", "counter", "Jobs failed for good, by error category.")
    for category, n in sorted((counters.get("failed_total_by_category") or {}).items()):
        b.sample("wan_daemon_jobs_failed_total", int(n), {"category": category})

    if gpus:
        b.family("wan_daemon_gpu_memory_used_bytes", "gauge", "GPU memory in use (all processes), from NVML.")
        for gpu in gpus:
            b.sample(
                "wan_daemon_gpu_memory_used_bytes",
                int(float(gpu["memory_used_mb"]) * _MIB),
                {"gpu": gpu["index"], "name": gpu.get("name", "")},
            )
        b.family("wan_daemon_gpu_memory_total_bytes", "gauge", "GPU memory installed, from NVML.")
        for gpu in gpus:
            b.sample(
                "wan_daemon_gpu_memory_total_bytes",
                int(float(gpu["memory_total_mb"]) * _MIB),
                {"gpu": gpu["index"], "name": gpu.get("name", "")},
            )

    b.family(
        "wan_daemon_job_duration_seconds", "histogram", "Time from start to publication of finished jobs, by model."
    )
    for model, buckets, total, count in durations.items():
        for le, n in zip((*DURATION_BUCKETS, math.inf), buckets, strict=True):
            b.sample("wan_daemon_job_duration_seconds_bucket", n, {"model": model, "le": _bound(le)})
        b.sample("wan_daemon_job_duration_seconds_sum", total, {"model": model})
        b.sample("wan_daemon_job_duration_seconds_count", count, {"model": model})
    return b.text()


def _prio_key(prio: str) -> tuple[int, float | str]:
    try:
        return (0, -float(prio))  # highest priority first
    except ValueError:
        return (1, prio)


def read_gpus(inventory: Any = None) -> list[dict[str, Any]]:
    """GPUs from a GPU inventory (default: NVML, daemon.ops.inventory) as render() takes them; [] without a driver."""
    from daemon.ops.inventory import NvmlInventory

    return [
        {"index": g.index, "name": g.name, "memory_total_mb": g.total_mb, "memory_used_mb": g.used_mb}
        for g in (inventory or NvmlInventory()).gpus()
    ]


class MetricsWriter:
    """Writes the metrics file atomically; node_exporter only ever sees a complete file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._priorities: set[str] = set()

    def write(
        self,
        health: dict[str, Any],
        counters: dict[str, Any],
        durations: DurationHistograms | list[tuple[str, float]],
        gpus: list[dict[str, Any]] | None = None,
    ) -> None:
        # A priority once seen stays a series (at 0 when none of its jobs wait): a graph drops to 0, it does not end.
        self._priorities.update(str(p) for p in (health.get("queue_by_priority") or {}))
        data = render(health, counters, durations, gpus, self._priorities).encode("utf-8")
        # atomic_write_bytes keeps the final suffix on its temp file; ".prom" temps would be scraped. Write a
        # ".tmp" name atomically first, then rename it over the real name (both in the same folder).
        staged = temp_path_for(self.path, ".tmp")
        try:
            atomic_write_bytes(staged, data)
            os.replace(staged, self.path)
        except BaseException:
            with contextlib.suppress(OSError):  # never raised over the error being handled
                os.unlink(staged)
            raise
        fsync_dir(self.path.parent)


__all__ = [
    "DURATION_BUCKETS",
    "KNOWN_STATES",
    "DurationHistograms",
    "MetricsWriter",
    "escape_label_value",
    "model_label",
    "read_gpus",
    "render",
]
