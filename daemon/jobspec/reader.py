"""The hardened YAML reader for job files (and the config): YAML 1.2, core schema, as editors read it.

Scalars resolve as in the YAML 1.2 core schema (yaml-language-server, ruamel.yaml and the ``yaml`` npm
package read them the same way), not as PyYAML's YAML 1.1 does: only ``true``/``false`` (any of ``true True
TRUE``) are booleans, so ``yes``, ``no``, ``on``, ``NO`` stay strings; ``010`` is 10 and ``0o10`` is 8;
``1:30`` is the string "1:30"; ``2020-01-01`` is a string; ``1_000`` is a string. Only the core schema's
tags are constructed (``!!str !!int !!float !!bool !!null !!map !!seq``); ``!!timestamp``, ``!!binary``,
``!!set`` and ``!!python/...`` are refused.

libyaml parses and composes (``CSafeLoader``); the 1.2 resolvers are set on a subclass of it. Before
anything is built, a pre-scan of the parser's events refuses what a job file never needs: anchors and
aliases (YAML bombs), nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_NODES` nodes. Duplicate
keys are refused while constructing. Every refusal names the file and the line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from daemon.errors import Category, JobError

MAX_DEPTH = 16
MAX_NODES = 50_000
YAML_VERSION = "1.2"

_SUGGEST_SYNTAX = (
    "Fix the YAML at the line named: indentation, a missing `: ` after a key, or an unclosed bracket or quote. "
    "An editor with the YAML language server shows such mistakes as you type."
)
_SUGGEST_HOSTILE = "Write every value out: job files take no anchors, aliases or tags, and nest at most 16 levels."


class Refused(yaml.YAMLError):
    """Well-formed YAML that we refuse to read (aliases, anchors, too deep, too many nodes)."""


# The YAML 1.2.2 core schema (spec section 10.3.2), exactly.
_NULL = r"~|null|Null|NULL|"
_BOOL = r"true|True|TRUE|false|False|FALSE"
_INT = r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
_FLOAT = r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
_CORE = {
    "tag:yaml.org,2002:null": (_NULL, list("~nN") + [""]),
    "tag:yaml.org,2002:bool": (_BOOL, list("tTfF")),
    "tag:yaml.org,2002:int": (_INT, list("-+0123456789")),
    "tag:yaml.org,2002:float": (_FLOAT, list("-+.0123456789")),
}
_FULL = {tag: re.compile(f"(?:{pattern})") for tag, (pattern, _) in _CORE.items()}

_FastLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present (PyPI wheels ship it)


def _scalar(loader: SafeConstructor, node: yaml.Node, tag: str) -> str:
    value = loader.construct_scalar(node)  # type: ignore[arg-type]
    assert isinstance(value, str)
    if not _FULL[tag].fullmatch(value):
        kind = tag.rsplit(":", 1)[-1]
        raise ConstructorError(None, None, f"{value!r} is not a YAML 1.2 {kind}", node.start_mark)
    return value


def _construct_null(loader: SafeConstructor, node: yaml.Node) -> None:
    _scalar(loader, node, "tag:yaml.org,2002:null")
    return None


def _construct_bool(loader: SafeConstructor, node: yaml.Node) -> bool:
    return _scalar(loader, node, "tag:yaml.org,2002:bool").lower() == "true"


def _construct_int(loader: SafeConstructor, node: yaml.Node) -> int:
    value = _scalar(loader, node, "tag:yaml.org,2002:int")
    if value.startswith("0o"):
        return int(value[2:], 8)
    if value.startswith("0x"):
        return int(value[2:], 16)
    return int(value, 10)  # leading zeros are decimal in YAML 1.2: 010 is 10


def _construct_float(loader: SafeConstructor, node: yaml.Node) -> float:
    value = _scalar(loader, node, "tag:yaml.org,2002:float").lower()
    if value.endswith(".inf"):
        return float("-inf") if value.startswith("-") else float("inf")
    if value == ".nan":
        return float("nan")
    return float(value)


class _HardenedLoader(_FastLoader):  # type: ignore[valid-type,misc]  # one of two loader classes
    """safe_load with the YAML 1.2 core schema, minus the dangerous parts: no aliases or anchors, no
    duplicate keys, bounded nesting and node count, only the core schema's tags.

    With libyaml the pre-scan (:func:`_prescan`) has already refused aliases, anchors, depth and node floods
    before this loader runs; :meth:`compose_node`, which repeats those checks, serves the pure-Python
    fallback."""

    yaml_implicit_resolvers: dict[Any, Any] = {}
    yaml_constructors = {
        "tag:yaml.org,2002:null": _construct_null,
        "tag:yaml.org,2002:bool": _construct_bool,
        "tag:yaml.org,2002:int": _construct_int,
        "tag:yaml.org,2002:float": _construct_float,
        "tag:yaml.org,2002:str": SafeConstructor.construct_yaml_str,
        "tag:yaml.org,2002:seq": SafeConstructor.construct_yaml_seq,
        "tag:yaml.org,2002:map": SafeConstructor.construct_yaml_map,
        None: SafeConstructor.construct_undefined,
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise Refused(f"aliases (*{event.anchor}) are not allowed (line {_line(event)})")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise Refused(f"anchors (&{anchor}) are not allowed (line {_line(event)})")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise Refused(f"too many YAML nodes (more than {MAX_NODES:,})")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise Refused(f"nested deeper than {MAX_DEPTH} levels (line {_line(event)})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise ConstructorError(None, None, "mapping keys must be plain values", key_node.start_mark) from None
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


for _tag, (_pattern, _first) in _CORE.items():
    _HardenedLoader.add_implicit_resolver(_tag, re.compile(f"(?:{_pattern})\\Z"), _first)


def _line(event: yaml.Event) -> int | str:
    """The 1-based line an event starts on (the parser always sets the mark; "?" if it ever does not)."""
    mark = event.start_mark
    return mark.line + 1 if mark is not None else "?"


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()] or [level + 1])
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value] or [level + 1])
    return level


def _prescan(text: str) -> None:
    """Walk the parser's events (in C with libyaml) and refuse, before anything is built, what a job file
    never needs: anchors and aliases (YAML bombs), deep nesting, too many nodes. Stops at the first one."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_FastLoader):
        if isinstance(event, yaml.AliasEvent):
            raise Refused(f"aliases (*{event.anchor}) are not allowed (line {_line(event)})")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise Refused(f"anchors (&{anchor}) are not allowed (line {_line(event)})")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise Refused(f"nested deeper than {MAX_DEPTH} levels (line {_line(event)})")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise Refused(f"too many YAML nodes (more than {MAX_NODES:,}, line {_line(event)})")


def describe_yaml_error(exc: yaml.YAMLError, name: str) -> str:
    """A YAML error as one line that names the file, the line and the column (PyYAML's own text says
    ``in "<unicode string>"`` and spreads over several lines)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"{name}: {exc}"
    mark = exc.problem_mark or exc.context_mark
    where = f"{name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else name
    text = exc.problem or exc.context or "unreadable YAML"
    if exc.context and exc.problem:
        started = exc.context_mark
        text += f" ({exc.context}" + (f" at line {started.line + 1})" if started is not None else ")")
    return f"{where}: {text}"


def parse_yaml(text: str, name: str = "<string>") -> Any:
    """Parse YAML 1.2 (core schema) with the hardening above. Raises :class:`yaml.YAMLError` (a
    :class:`Refused` for what is refused) whose ``str`` names ``name`` and the line; for the config loader
    as for job files."""
    try:
        _prescan(text)
        loader = _HardenedLoader(text)
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
    except Refused as exc:
        raise Refused(f"{name}: {exc}") from None
    except yaml.YAMLError as exc:
        raise yaml.YAMLError(describe_yaml_error(exc, name)) from None
    except RecursionError:
        raise Refused(f"{name}: nested deeper than {MAX_DEPTH} levels") from None
    if _depth(value) > MAX_DEPTH:
        raise Refused(f"{name}: nested deeper than {MAX_DEPTH} levels")
    return value


def _line_at(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def load_yaml_bytes(data: bytes, *, max_bytes: int, name: str = "job file") -> Any:
    """Decode and parse job-file bytes. Raises JobError(invalid_spec) naming ``name`` and the line."""
    if len(data) > max_bytes:
        raise JobError(
            Category.INVALID_SPEC,
            f"{name} is {len(data):,} bytes; the limit is {max_bytes:,} (limits.max_job_file_bytes)",
            ["Split the jobs over several files, or raise limits.max_job_file_bytes in the config."],
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise JobError(
            Category.INVALID_SPEC,
            f"{name}, line {_line_at(data, nul)}: the file contains a NUL byte (at byte {nul})",
            ["Save the file as plain UTF-8 text (it may be UTF-16, or not a text file at all)."],
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError(
            Category.INVALID_SPEC,
            f"{name}, line {_line_at(data, exc.start)}: the file is not valid UTF-8 (byte {exc.start}: {exc.reason})",
            ["Save the file as UTF-8."],
        ) from None
    try:
        return parse_yaml(text, name)
    except Refused as exc:
        raise JobError(Category.INVALID_SPEC, f"job file refused: {exc}", [_SUGGEST_HOSTILE]) from None
    except yaml.YAMLError as exc:
        raise JobError(Category.INVALID_SPEC, f"malformed YAML: {exc}", [_SUGGEST_SYNTAX]) from None
