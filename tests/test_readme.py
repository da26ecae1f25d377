"""The README's settings are the code's: every `section.key` it names exists, and every default it quotes
next to a key is the code's default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from daemon.config import SettingsFile

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SECTIONS = set(SettingsFile.model_fields)
KEY = r"`((?:" + "|".join(sorted(SECTIONS)) + r")\.[a-z_][a-z0-9_.]*)`"
NUMBER_DEFAULT = re.compile(KEY + r"[^`\n]{0,30}?\bdefault:?\s*`?(-?\d+(?:\.\d+)?|true|false|null)(?![\w%.])")
ON_OFF_DEFAULT = re.compile(KEY + r",? (?:is )?(on|off) by default")


def lookup(dotted: str) -> tuple[bool, Any]:
    """(exists, default) of a dotted setting in SettingsFile."""
    model: Any = SettingsFile()
    for part in dotted.split("."):
        if not isinstance(model, BaseModel) or part not in type(model).model_fields:
            return False, None
        model = getattr(model, part)
    return True, model


def test_every_setting_the_readme_names_exists():
    named = sorted({key for key in re.findall(KEY, README) if not key.endswith(".py")})  # not `models.py`
    assert len(named) > 30  # the check reads the README's settings, not nothing
    missing = [key for key in named if not lookup(key)[0]]
    assert missing == [], f"the README names settings the code does not have: {missing}"


def quoted_defaults() -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for key, raw in NUMBER_DEFAULT.findall(README):
        value: Any = {"true": True, "false": False, "null": None}.get(raw, raw)
        found.append((key, float(value) if isinstance(value, str) else value))
    found += [(key, word == "on") for key, word in ON_OFF_DEFAULT.findall(README)]
    return found


def test_the_readme_quotes_defaults_the_check_can_read():
    keys = {key for key, _ in quoted_defaults()}
    assert {"health.interval_seconds", "shutdown.timeout_seconds", "models.auto_download"} <= keys


@pytest.mark.parametrize(("key", "quoted"), quoted_defaults())
def test_every_default_the_readme_quotes_is_the_codes(key, quoted):
    exists, default = lookup(key)
    assert exists, key
    actual = float(default) if isinstance(default, int | float) and not isinstance(default, bool) else default
    assert actual == quoted, f"README says {key} defaults to {quoted}, the code says {default}"
