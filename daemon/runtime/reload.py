"""SIGHUP: read the configuration again and apply what can change while jobs run, as nginx or postfix do.

Every setting is in one of three kinds (``KINDS``):
- live: applied at once (log level and format, limits, retries and timeouts, schedules, priorities and aging,
  model options, metrics, the health interval, speed defaults);
- at the next worker start: the worker process's own settings (warm cache size and budget, CPU threads,
  encoding overlap): each worker is told now and uses them when it is next started;
- restart: what the daemon is built around (folders, instance identity and lease timing, the watcher's mode,
  GPUs, the history database, the executor): a changed value is logged as needing a restart and the running
  value is kept, so that nothing in the daemon ever sees half of a change.

A config that fails validation is refused with one line in the log and the old one stays. The reload runs on
the daemon's decision thread (Daemon.tick), never in the signal handler, so nothing races the scheduler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from loguru import logger

from daemon import logs
from daemon.config import Settings
from daemon.config_sources import flatten
from daemon.errors import WanDaemonError
from daemon.runtime.metrics import MetricsWriter
from daemon.runtime.schedules import CronSubmitter

if TYPE_CHECKING:
    from daemon.runtime.daemon import Daemon

Kind = Literal["live", "worker", "restart"]

# By section, then by key where a section mixes kinds; the most specific entry wins (see kind_of).
KINDS: dict[str, Kind] = {
    "paths": "restart",
    "instance": "restart",
    "hardware": "restart",
    "history": "restart",
    "health.path": "restart",
    "watch.mode": "restart",
    "watch.poll_interval_seconds": "restart",  # the polling observer's, set when it starts
    "worker.device": "restart",
    "worker.executor": "restart",
    "ray": "restart",
    "worker.max_cached_pipelines": "worker",
    "worker.cache_budget_mb": "worker",
    "worker.cpu_threads": "worker",
    "worker.overlap_encoding": "worker",
    "worker.allow_cpu_for_real_models": "worker",
}

# Worker settings and the WorkerConfig field each one becomes (daemon.runtime.placement.make_workers).
WORKER_FIELDS = {
    "worker.max_cached_pipelines": "max_cached_pipelines",
    "worker.cache_budget_mb": "cache_budget_mb",
    "worker.cpu_threads": "cpu_threads",
    "worker.overlap_encoding": "overlap_encoding",
    "worker.allow_cpu_for_real_models": "allow_cpu_for_real_models",
    "logging.level": "log_level",
    "logging.format": "log_format",
}


def kind_of(key: str) -> Kind:
    """The kind of a dotted setting: its own entry, else its section's, else live."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = KINDS.get(".".join(parts[:n]))
        if found is not None:
            return found
    return "live"


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    kind: Kind


@dataclass(frozen=True)
class ReloadPlan:
    changes: tuple[Change, ...]
    applied: Settings  # the new settings with every restart-only value kept as it runs now

    def of(self, kind: Kind) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """What changed between the running settings and the file's, by kind, and the settings to run on now."""
    before, after = flatten(old.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    changes = tuple(
        Change(key, before.get(key), after.get(key), kind_of(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    )
    # Start from the file's settings and put back every restart-only value as it runs now.
    updates: dict[str, Any] = {}
    for c in changes:
        if c.kind != "restart":
            continue
        section, _, rest = c.key.partition(".")
        field = rest.split(".")[0]
        if not field or kind_of(section) == "restart":
            updates[section] = getattr(old, section)  # the whole section is the daemon's frame
        elif updates.get(section) is not getattr(old, section):
            current = updates.get(section, getattr(new, section))
            updates[section] = current.model_copy(update={field: getattr(getattr(old, section), field)})
    applied = new.model_copy(update=updates) if updates else new
    return ReloadPlan(changes, applied)


def worker_config_updates(changes: Iterable[Change]) -> dict[str, Any]:
    """WorkerConfig fields to give the workers for their next start."""
    return {WORKER_FIELDS[c.key]: c.new for c in changes if c.key in WORKER_FIELDS}


def updated_worker_config(config: Any, updates: dict[str, Any]) -> Any:
    """A frozen dataclass config with ``updates`` applied to the fields it has."""
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in updates.items() if k in fields})


def describe(plan: ReloadPlan) -> str:
    """One line: what was applied now, at the next worker start, and what needs a restart."""

    def keys(kind: Kind) -> str:
        return ",".join(c.key for c in plan.of(kind)) or "-"

    return f"live={keys('live')} next_worker_start={keys('worker')} needs_restart={keys('restart')}"


WHEN = {"live": "now", "worker": "at the next worker start", "restart": "after a restart (running value kept)"}


def reload_daemon(daemon: Daemon) -> ReloadPlan | None:
    """Read the configuration again (``daemon.reload_settings``), log each change and when it applies, and
    apply it; a configuration that fails validation is refused with one line and the running one stays."""
    if daemon.reload_settings is None:
        logger.warning("config.reload_unavailable: this daemon was started without a config source")
        return None
    try:
        new = daemon.reload_settings()
    except WanDaemonError as exc:
        logger.error("config.reload_refused: {}; the running config stays", "; ".join(str(exc).splitlines()))
        return None
    plan = plan_reload(daemon.settings, new)
    for c in plan.changes:
        logger.info("config.changed key={} old={} new={} applies={}", c.key, c.old, c.new, WHEN[c.kind])
    if plan.changes:
        _apply(daemon, plan)
    logger.info("config.reloaded {}", describe(plan) if plan.changes else "unchanged")
    return plan


def _apply(daemon: Daemon, plan: ReloadPlan) -> None:
    old, new = daemon.settings, plan.applied
    # Every component holding the running settings, and those they hold (placement's admission, say).
    components: list[Any] = [daemon]
    for value in vars(daemon).values():
        components.append(value)
        components.extend(getattr(value, "__dict__", {}).values())
    for component in components:
        if getattr(component, "settings", None) is old:
            component.settings = new
    daemon.disk.min_free = new.limits.min_free_mb * (1 << 20)
    daemon.downloads.min_free_mb = new.limits.min_free_mb
    daemon.status.health.interval = new.health.interval_seconds
    daemon.watcher.config = new.watch  # settle and rescan timings (its mode is kept: a restart-only setting)
    if new.metrics != old.metrics:
        daemon.status.metrics = MetricsWriter(new.metrics.textfile) if new.metrics.textfile else None
    if new.schedules != old.schedules:
        paths = new.paths
        daemon.cron = CronSubmitter(list(new.schedules), state_dir=paths.state, inbox=paths.inbox, clock=daemon.clock)
    if new.logging != old.logging:
        logs.setup(new.logging.level, new.logging.format)
    updates = worker_config_updates(plan.changes)
    for worker in daemon.placement.workers.values():
        config = getattr(worker, "config", None)
        if updates and config is not None and dataclasses.is_dataclass(config):
            worker.config = updated_worker_config(config, updates)  # type: ignore[attr-defined]
