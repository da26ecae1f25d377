"""Where the configuration comes from, as operators expect it (the CLI calls this; see daemon.config):

1. the file: ``--config``, else ``$WAN_DAEMON_CONFIG``, else ``/etc/wan-daemon/config.yaml``, else
   ``$XDG_CONFIG_HOME/wan-daemon/config.yaml`` (``~/.config/…``), the first that exists; none: the defaults;
2. the environment: every setting as ``WAN_DAEMON_<SECTION>__<KEY>`` (``WAN_DAEMON_WORKER__MAX_ATTEMPTS=5``,
   ``WAN_DAEMON_PATHS__INBOX=/srv/wan/inbox``), for containers; lists and mappings as JSON;
3. command-line flags (``--inbox``, ``--log-level`` …).

A later layer wins. :func:`load_effective` returns the settings and, for ``wan-daemon config show``, where
each value came from. The environment's values are strings that pydantic validates like the file's.

Local folders for what must not live on a shared inbox (the job history: SQLite's WAL does not work over
NFS/SMB) come from systemd's ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/wan-daemon``
(``~/.local/state/wan-daemon``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import ConfigError, Settings, SettingsFile, read_config_file, settings_from

ENV_PREFIX = "WAN_DAEMON_"
ENV_NESTING = "__"
CONFIG_ENV = "WAN_DAEMON_CONFIG"
SYSTEM_CONFIG = Path("/etc/wan-daemon/config.yaml")


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def user_config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(_home(env) / ".config")
    return Path(base) / "wan-daemon" / "config.yaml"


def local_state_dir(env: Mapping[str, str]) -> Path:
    """A folder on this host's own disk: systemd's StateDirectory (its first entry), else XDG state."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or str(_home(env) / ".local" / "state")
    return Path(base) / "wan-daemon"


def find_config(
    explicit: str | Path | None, env: Mapping[str, str], *, system_config: Path = SYSTEM_CONFIG
) -> tuple[Path | None, str]:
    """The config file to read and why that one. A path named by ``--config`` or ``$WAN_DAEMON_CONFIG`` must
    exist (read_config_file says so); the default places are used only when they hold a file."""
    if explicit:
        return Path(explicit), "--config"
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), f"${CONFIG_ENV}"
    for path in (system_config, user_config_path(env)):
        if path.is_file():
            return path, "default location"
    return None, "none found"


def _env_value(raw: str) -> Any:
    """A JSON list, mapping or null as such; anything else as the string (pydantic converts it)."""
    text = raw.strip()
    if text[:1] in "[{" or text == "null":
        try:
            return json.loads(text)
        except ValueError:
            raise ConfigError(f"not valid JSON: {raw!r}") from None
    return raw


def env_overrides(env: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``{"worker.max_attempts": ("WAN_DAEMON_WORKER__MAX_ATTEMPTS", "5"), …}``. A name that is no setting
    is an error, not silently ignored: a typo in a container's environment would otherwise go unnoticed."""
    found: dict[str, tuple[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split(ENV_NESTING)]
        model: Any = SettingsFile
        for i, part in enumerate(parts):
            fields = getattr(model, "model_fields", None)
            if fields is None or part not in fields:
                where = ".".join(parts[:i]) or "the top level"
                known = ", ".join(sorted(fields)) if fields else "none (not a section)"
                raise ConfigError(f"{name}: no setting {part!r} in {where} (known: {known})")
            model = fields[part].annotation
        try:
            found[".".join(parts)] = (name, _env_value(raw))
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return found


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: ``{"worker": {"max_attempts": 3}}`` -> ``{"worker.max_attempts": 3}``."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class Effective:
    """The settings and where each value came from: ``origins`` lists (dotted key, source) layer by layer
    (file, environment, flags), so the last entry that covers a key is the one that won."""

    settings: Settings
    file: Path | None
    file_reason: str
    origins: list[tuple[str, str]] = field(default_factory=list)

    def rows(self) -> list[tuple[str, Any, str]]:
        """(key, value, origin) for every setting, in the config's order."""
        values = flatten(self.settings.model_dump(mode="json"))
        rows = []
        for key, value in values.items():
            origin = next(
                (o for k, o in reversed(self.origins) if key == k or key.startswith(k + ".")),
                "default (derived)" if key in DERIVED else "default",
            )
            rows.append((key, value, origin))
        return rows


# Defaults computed from other settings at resolve time, not written in the config's models.
DERIVED = frozenset(
    {"paths.state", "paths.input_roots", "paths.model_roots", "paths.lora_roots", "instance.id", "health.path"}
    | {"history.path"}
)


def load_effective(
    explicit: str | Path | None,
    flags: Mapping[str, Any] | None,
    env: Mapping[str, str],
    *,
    system_config: Path = SYSTEM_CONFIG,
) -> Effective:
    path, reason = find_config(explicit, env, system_config=system_config)
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    origins = [(key, str(path)) for key in flatten(data) if key] if path is not None else []
    from_env = env_overrides(env)
    data = _merge(data, _nest({k: v for k, (_, v) in from_env.items()}))
    origins += [(k, f"env {name}") for k, (name, _) in from_env.items()]
    if flags:
        data = _merge(data, flags)
        origins += [(k, "command line") for k in flatten(dict(flags)) if k]
    label = str(path) if path is not None else ("the environment" if from_env else None)
    settings = settings_from(data, label, local_state=local_state_dir(env))
    return Effective(settings, path, reason, origins)
