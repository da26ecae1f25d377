"""One frozen settings object, made of sub-configs, loaded from YAML; the CLI applies flag overrides.

With no config file at all the daemon runs on ``./inbox`` and ``./outbox``. Where the file, environment
overrides and flags come from is daemon.config_sources (the CLI's); components receive their sub-config and
read no environment variables. One default here depends on the host: the job history lives on this host's own
disk (``local_state``), never on a shared inbox.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from daemon.errors import WanDaemonError
from daemon.jobspec.reader import parse_yaml
from daemon.speed import SpeedConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Frozen):
    inbox: Path = Field(Path("inbox"), description="Folder watched for job files (*.yaml, *.yml).")
    outbox: Path = Field(Path("outbox"), description="Videos, sidecars, and failed/ records appear here.")
    state: Path | None = Field(
        None,
        description="Spool and health file. Default: <inbox>/.wan-daemon (it must be on the inbox's filesystem so "
        "that claiming a job is an atomic rename).",
    )
    models: Path = Field(Path("~/.cache/wan-daemon/models"), description="Where the tiny test models are built.")
    input_roots: list[Path] = Field(
        default_factory=list, description="Folders that job `image:` paths may point into. Default: [inbox]."
    )
    model_roots: list[Path] = Field(default_factory=list, description="Folders searched for local model folders.")
    lora_roots: list[Path] = Field(
        default_factory=list, description="Folders job `loras:` paths may point into. Default: [./loras]."
    )

    def resolved(self) -> ResolvedPaths:
        def r(p: Path) -> Path:
            return Path(p).expanduser().resolve()

        inbox = r(self.inbox)
        return ResolvedPaths(
            inbox=inbox,
            outbox=r(self.outbox),
            state=r(self.state) if self.state else inbox / ".wan-daemon",
            models=r(self.models),
            input_roots=[r(p) for p in self.input_roots] or [inbox],
            model_roots=[r(p) for p in self.model_roots] or [Path.cwd()],
            lora_roots=[r(p) for p in self.lora_roots] or [Path.cwd() / "loras"],
        )


class WatchConfig(_Frozen):
    mode: Literal["inotify", "polling"] = Field(
        "inotify", description="polling is required on NFS/SMB shares written by other hosts."
    )
    poll_interval_seconds: float = Field(1.0, gt=0)
    rescan_interval_seconds: float = Field(10.0, gt=0, description="Full rescan: the source of truth.")
    settle_seconds: float = Field(
        0.5,
        ge=0,
        description="inotify: a file written in place is taken once its writer closed it and its size and mtime "
        "stayed unchanged for this long.",
    )
    poll_settle_seconds: float = Field(
        5.0,
        ge=0,
        description="polling (no close events): a file written in place is taken once its size and mtime stayed "
        "unchanged for this long; long enough for a slow writer over NFS/SMB. Renamed-in files are taken at once.",
    )


class LimitsConfig(_Frozen):
    max_job_file_bytes: int = Field(1 << 20, gt=0)
    max_input_bytes: int = Field(64 << 20, gt=0)
    max_input_pixels: int = Field(40_000_000, gt=0, description="Largest input image (width x height).")
    max_side: int = Field(2048, gt=0, description="Largest width or height a job may ask for.")
    max_frames: int = Field(481, gt=0)
    max_steps: int = Field(500, gt=0)
    min_free_mb: int = Field(
        256,
        ge=0,
        description="Below this much free space on the outbox or spool filesystem, intake and new "
        "jobs pause (nothing is failed); they resume once space returns.",
    )


class HardwareConfig(_Frozen):
    gpus: list[int] | None = Field(None, description="CUDA indices to use (after CUDA_VISIBLE_DEVICES). Default: all.")
    vram_limit_gb: float | None = Field(None, gt=0, description="Use at most this much of each GPU's memory.")


class SchedulerConfig(_Frozen):
    aging_bound_seconds: float = Field(
        3600.0, gt=0, description="A low-priority job waits at most about this long behind higher priorities."
    )


class ModelsConfig(_Frozen):
    offload: Literal["auto", "none", "model", "group", "sequential"] = Field(
        "auto", description="auto: the fastest mode whose memory estimate fits the GPU's free memory."
    )
    allow_lossy: bool = Field(False, description="Allow FP8 weight storage when nothing else fits.")
    auto_download: bool = Field(
        True,
        description="A job whose registry model is not downloaded waits (waiting_for_model) while the daemon "
        "downloads it in the background; other jobs keep running.",
    )
    vae_tiling: bool = Field(
        False,
        description="Decode every video with VAE tiling (lower peak memory, a little "
        "slower). Out-of-memory retries turn it on per job anyway.",
    )
    default: str = Field(
        "auto",
        description="Model for jobs that name none. auto: wan2.2-ti2v-5b when its weights are in the Hugging Face "
        "cache and a GPU is present, else the tiny random-weight test model (logged as such).",
    )


class WorkerConfig(_Frozen):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_cpu_for_real_models: bool = Field(
        False, description="Real Wan2.2 models on a CPU take hours per video; refused unless this is true."
    )
    max_attempts: int = Field(3, ge=1, description="Attempts (counted on disk) before a job is failed for good.")
    retry_base_seconds: float = Field(2.0, ge=0)
    retry_cap_seconds: float = Field(300.0, ge=0)
    stall_timeout_seconds: float = Field(
        1800.0, gt=0, description="A worker silent for this long (no step, no load progress) is killed."
    )
    start_timeout_seconds: float = Field(300.0, gt=0)
    max_cached_pipelines: int = Field(2, ge=1, description="Pipelines kept warm in the worker (LRU).")
    cache_budget_mb: float | None = Field(
        None,
        gt=0,
        description="Memory warm pipelines may hold; the least recently used are evicted when a new "
        "one would not fit. Default: 90% of the GPU's memory, or half the host's RAM on a CPU.",
    )
    overlap_encoding: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Encode a finished job's MP4 on a worker thread while the device generates the next "
        "job. auto: on for a GPU; off on a CPU, where the encoder would take cores from the generation.",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Torch threads of a worker that computes on the CPU. Default: the host's cores "
        "shared equally among the daemon's workers (OpenMP threads of two workers on the same cores slow both "
        "down many times over).",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="local: one worker process per GPU of this host. ray: one Ray actor per GPU of a Ray cluster "
        "(the `ray:` section; needs `pip install 'wan-daemon[ray]'`); the spool, scheduler and outbox stay here.",
    )


class RayConfig(_Frozen):
    """Workers as Ray actors (worker.executor: ray). Ray reads its auth token from the environment
    (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, set on every node): it never appears in this file."""

    address: str | None = Field(
        None,
        description="The cluster to join: 'auto' (the one `ray start` runs on this host), 'HOST:6379', or "
        "'ray://HOST:10001'. None: start a private Ray instance on this host.",
    )
    namespace: str = Field("wan-daemon", description="Ray namespace of the daemon's actors.")
    object_store_memory_mb: int | None = Field(
        None,
        gt=0,
        description="Object-store budget of a private instance (address: None); a cluster's own is set by "
        "`ray start --object-store-memory`. Finished videos pass through it: leave room for the largest.",
    )
    start_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="An actor that is not placed and ready within this long is given up (an actor no node can "
        "place fails to start instead of waiting forever).",
    )
    actors: int | None = Field(
        None, ge=1, description="How many actors to run. Default: one per GPU of the cluster when the daemon starts."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor needs (to pin actors to labelled nodes)."
    )


class InstanceConfig(_Frozen):
    """Identity of this daemon among those sharing one inbox (one host or several, NFS/SMB)."""

    id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Unique per daemon on a shared inbox. Default: the host name.",
    )
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often the lease file is touched.")
    lease_grace_seconds: float = Field(
        120.0,
        gt=0,
        description="A daemon silent for this long is presumed dead and its jobs are taken over. "
        "Keep it above the NFS attribute-cache time (acregmax, 60 s by default) plus clock skew.",
    )
    takeover_check_seconds: float = Field(15.0, gt=0)

    @model_validator(mode="after")
    def _grace_outlasts_heartbeats(self) -> InstanceConfig:
        # The heartbeat thread beats only while the main loop reported progress within half the grace
        # (daemon.runtime.heartbeat.stuck_after_for): that half must hold more than one heartbeat.
        if self.lease_grace_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError(
                f"lease_grace_seconds ({self.lease_grace_seconds:g}) must be more than twice "
                f"heartbeat_seconds ({self.heartbeat_seconds:g}), or live daemons take each other over "
                "(a daemon whose loop makes no progress for half the grace stops heartbeating)"
            )
        return self


class ShutdownConfig(_Frozen):
    timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM the running job is interrupted at its next step and requeued; a "
        "worker that has not stopped by then is killed.",
    )


class HealthConfig(_Frozen):
    path: Path | None = Field(None, description="Default: <state>/health/<instance id>.json")
    interval_seconds: float = Field(5.0, gt=0)


class MetricsConfig(_Frozen):
    textfile: Path | None = Field(
        None,
        description="Prometheus text file for node_exporter's textfile collector, e.g. "
        "/var/lib/node_exporter/textfile_collector/wan-daemon.prom. Off when null.",
    )
    interval_seconds: float = Field(15.0, gt=0)


class HistoryConfig(_Frozen):
    enabled: bool = True
    path: Path | None = Field(
        None,
        description="SQLite job history. Default: on this host's own disk, never on a shared inbox (SQLite's WAL "
        "does not work over NFS/SMB): $STATE_DIRECTORY/history/<instance id>.sqlite under systemd, else "
        "$XDG_STATE_HOME/wan-daemon/history/<instance id>.sqlite (~/.local/state/…).",
    )


class Schedule(_Frozen):
    """A cron batch (daemon.runtime.schedules submits it)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    cron: str = Field(..., description="Five-field crontab expression, e.g. '0 2 * * *'.")
    timezone: str = Field("UTC", description="IANA zone the cron expression is read in.")
    job: Path | None = Field(None, description="A job file (YAML) to submit at each fire.")
    template: str | None = Field(None, description="Inline job YAML, with {date}-style substitutions.")
    misfire: Literal["skip", "run_once", "run_all"] = "run_once"
    misfire_grace_seconds: float = Field(300.0, ge=0)
    enabled: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> Schedule:
        if (self.job is None) == (self.template is None):
            raise ValueError("give exactly one of `job` (a file) or `template` (inline YAML)")
        try:
            self.trigger()  # an invalid cron expression or zone fails at load time, not at 2 a.m.
        except Exception as exc:  # ValueError for cron fields, ZoneInfoNotFoundError (a KeyError) for zones
            raise ValueError(f"schedule {self.name!r}: {exc}") from None
        return self

    def trigger(self):
        from apscheduler.triggers.cron import CronTrigger

        return CronTrigger.from_crontab(self.cron, timezone=self.timezone)


class LoggingConfig(_Frozen):
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field(
        "text",
        description="text: one readable line per record; json: one JSON object per line, with the event name "
        "and its fields as keys. Under systemd each line starts with its syslog priority (journalctl -p err).",
    )


class SettingsFile(_Frozen):
    """What a config file (plus flag overrides) says. Paths may be relative and some are left to defaults that
    depend on others; :func:`resolve` turns it into :class:`Settings`, which everything else receives."""

    paths: PathsConfig = PathsConfig()
    watch: WatchConfig = WatchConfig()
    limits: LimitsConfig = LimitsConfig()
    models: ModelsConfig = ModelsConfig()
    worker: WorkerConfig = WorkerConfig()
    ray: RayConfig = RayConfig()
    health: HealthConfig = HealthConfig()
    logging: LoggingConfig = LoggingConfig()
    instance: InstanceConfig = InstanceConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    schedules: list[Schedule] = Field(default_factory=list, description="Cron batches (daemon.runtime.schedules).")
    metrics: MetricsConfig = MetricsConfig()
    history: HistoryConfig = HistoryConfig()
    hardware: HardwareConfig = HardwareConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speed: SpeedConfig = SpeedConfig()


class ResolvedPaths(PathsConfig):
    """Every path absolute; the state folder and the roots filled in."""

    state: Path


class ResolvedInstance(InstanceConfig):
    id: str


class ResolvedHealth(HealthConfig):
    path: Path


class ResolvedHistory(HistoryConfig):
    path: Path


class Settings(SettingsFile):
    """The resolved settings: absolute paths everywhere (relative ones taken from the current directory),
    the instance id, the health and history paths. Nothing downstream checks for a missing value."""

    paths: ResolvedPaths
    instance: ResolvedInstance
    health: ResolvedHealth
    history: ResolvedHistory

    @property
    def owner(self) -> str:
        return self.instance.id

    @property
    def health_path(self) -> Path:
        return self.health.path


def default_owner_id() -> str:
    return sanitize_owner(socket.gethostname())


def sanitize_owner(raw: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:64]
    return cleaned or "daemon"


def resolve(file: SettingsFile, local_state: Path | None = None) -> Settings:
    """What the file says -> what the daemon runs on. ``local_state``: this host's own state folder
    (daemon.config_sources.local_state_dir); the job history's default lives there."""
    paths = file.paths.resolved()
    instance_id = file.instance.id or default_owner_id()
    health_path = (
        Path(file.health.path).expanduser().resolve()
        if file.health.path
        else paths.state / "health" / f"{instance_id}.json"
    )
    history_path = (
        Path(file.history.path).expanduser().resolve()
        if file.history.path
        else (local_state or paths.state).expanduser().resolve() / "history" / f"{instance_id}.sqlite"
    )
    metrics = file.metrics
    if metrics.textfile is not None:
        metrics = metrics.model_copy(update={"textfile": Path(metrics.textfile).expanduser().resolve()})
    schedules = [
        sc.model_copy(update={"job": Path(sc.job).expanduser().resolve()}) if sc.job else sc for sc in file.schedules
    ]
    fields = {name: getattr(file, name) for name in SettingsFile.model_fields}
    fields.update(
        paths=paths,
        instance=ResolvedInstance(**{**file.instance.model_dump(), "id": instance_id}),
        health=ResolvedHealth(**{**file.health.model_dump(), "path": health_path}),
        history=ResolvedHistory(**{**file.history.model_dump(), "path": history_path}),
        metrics=metrics,
        schedules=schedules,
    )
    return Settings(**fields)


class ConfigError(WanDaemonError):
    """The configuration cannot be read or is invalid."""


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's mapping (an empty file: no settings)."""
    try:
        loaded = parse_yaml(Path(path).read_text(), str(path)) or {}  # YAML 1.2, as job files
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return loaded


def settings_from(data: dict[str, Any], label: str | None = None, *, local_state: Path | None = None) -> Settings:
    """Validate and resolve a merged config mapping; ``label`` names its source in errors."""
    try:
        return resolve(SettingsFile.model_validate(data), local_state)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"invalid config{f' {label}' if label else ''}:\n" + "\n".join(lines)) from None


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load settings from a YAML file (optional) and apply nested overrides, then resolve paths. The history's
    local folder comes from the environment as for the CLI (daemon.config_sources.local_state_dir)."""
    import os

    from daemon.config_sources import local_state_dir

    data = read_config_file(path) if path is not None else {}
    if overrides:
        data = _deep_merge(data, overrides)
    return settings_from(data, str(path) if path else None, local_state=local_state_dir(os.environ))
