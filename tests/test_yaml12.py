"""Job files are read as YAML 1.2 (core schema), as editors read them: checked scalar by scalar against
ruamel.yaml, an independent YAML 1.2 reader, and against the YAML 1.2.2 spec where ruamel goes beyond it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from daemon.jobspec.reader import MAX_DEPTH, MAX_NODES, YAML_VERSION, parse_yaml
from daemon.jobspec.schema import json_schema
from daemon.jobspec.spec import parse_job_file

ROOT = Path(__file__).resolve().parent.parent

# Plain scalars on which YAML 1.1 (PyYAML) and YAML 1.2 disagree or that sit on a boundary of the core schema.
SCALARS = [
    "010", "0o10", "0o7", "0x1F", "0x1f", "08", "09.5", "1:30", "1:30:00", "190:20:30",
    "yes", "no", "Yes", "NO", "on", "off", "y", "n", "true", "True", "TRUE", "false", "False", "FALSE", "tRue",
    "~", "null", "Null", "NULL", "nULL", "",
    "0", "-0", "+12", "-7", "1e3", "1E3", "1.5e3", "1.0e+3", "12e03", ".5", "-.5", "5.", "0.", ".e3",
    ".inf", "-.Inf", "+.INF", ".nan", ".NaN", ".NAN", "0X1F", "0o8", "1,000", "1.2.3",
    "7.0", "4294967295", "99999999999999999999", "0b", "x010",
]  # fmt: skip
# ruamel.yaml reads these as YAML 1.1 would (binary, underscores, signed octal/hex, dates, merge and value
# keys); the YAML 1.2.2 core schema, like the `yaml` package behind yaml-language-server, reads strings.
RUAMEL_EXTENSIONS = ("0b101", "1_000", "+0o7", "-0x1", "0x_1", "2020-01-01", "2020-01-01T10:00:00Z", "=", "<<")


def _ruamel(text: str):
    return YAML(typ="safe", pure=True).load(text)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("scalar", SCALARS)
def test_scalars_read_as_ruamel_reads_yaml_1_2(scalar):
    text = f"k: {scalar}\n"
    ours, theirs = parse_yaml(text)["k"], _ruamel(text)["k"]
    assert _same(ours, theirs), (scalar, ours, theirs)


@pytest.mark.parametrize("scalar", RUAMEL_EXTENSIONS)
def test_what_ruamel_adds_to_the_core_schema_stays_a_string(scalar):
    assert parse_yaml(f"k: {scalar}\n")["k"] == scalar


@pytest.mark.parametrize(
    "text,expected",
    [
        ("seed: 010\n", 10),  # YAML 1.1: 8
        ("seed: 0o10\n", 8),
        ("seed: 1:30\n", "1:30"),  # YAML 1.1: 90
        ("id: NO\n", "NO"),  # YAML 1.1: False
        ("prompt: yes\n", "yes"),  # YAML 1.1: True
        ("compile: on\n", "on"),
    ],
)
def test_the_issue_examples_differ_from_yaml_1_1(text, expected):
    key = text.split(":")[0]
    assert parse_yaml(text)[key] == expected
    assert yaml.safe_load(text)[key] != expected  # what the daemon read before


def test_a_seed_of_010_renders_seed_10_and_yes_is_a_prompt():
    entries, err = parse_job_file(b"prompt: yes\nid: NO\nseed: 010\n", "j.yaml", max_bytes=4096)
    assert err is None and entries[0].error is None
    spec = entries[0].spec
    assert (spec.prompt, spec.id, spec.seed) == ("yes", "NO", 10)


def test_quoted_and_tagged_scalars_and_tags_outside_the_core_schema():
    assert parse_yaml("a: '010'\nb: !!int '010'\nc: !!str 010\nd: !!float 1\n") == {
        "a": "010",
        "b": 10,
        "c": "010",
        "d": 1.0,
    }
    for tag in ("!!timestamp 2020-01-01", "!!binary aGk=", "!!set {a}", "!!bool yes", "!!python/name:os.system"):
        with pytest.raises(yaml.YAMLError, match=r"f\.yaml, line 1, column 4"):
            parse_yaml(f"k: {tag}\n", "f.yaml")


def test_readme_and_schema_state_the_yaml_version_and_the_limits_the_code_enforces():
    readme = (ROOT / "README.md").read_text()
    assert f"YAML {YAML_VERSION}" in readme
    assert f"YAML {YAML_VERSION}" in json_schema()["description"]
    limits = re.search(r"nesting deeper than (\d+) levels, more than ([\d,]+) nodes", readme)
    assert limits, "README's hardened-YAML line moved"
    assert (int(limits.group(1)), int(limits.group(2).replace(",", ""))) == (MAX_DEPTH, MAX_NODES)
    assert f"{MAX_NODES:,} nodes" in json_schema()["description"]
