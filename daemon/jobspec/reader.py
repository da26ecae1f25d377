"""The hardened YAML reader for job files: ``safe_load`` semantics without aliases, anchors, duplicate keys,
deep nesting or huge node counts, and every refusal as a precise ``JobError(invalid_spec)``."""

from __future__ import annotations

from typing import Any

import yaml

from daemon.errors import Category, JobError

MAX_DEPTH = 16
MAX_NODES = 50_000


class _Refused(yaml.YAMLError):
    """Well-formed YAML that we refuse to read (aliases, anchors, too deep, too many nodes)."""


_FastLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present (PyPI wheels ship it)


class _HardenedLoader(_FastLoader):  # type: ignore[valid-type,misc]  # one of two loader classes
    """safe_load semantics, minus the dangerous parts: no aliases or anchors (YAML bombs), no duplicate
    keys, bounded nesting and node count. Unknown tags (``!!python/...``) fail as in SafeLoader.

    With libyaml the document is parsed and composed in C (several times faster than PyYAML's Python
    composer); the pre-scan (:func:`_prescan`) has then already refused aliases, anchors, depth and node
    floods, and :meth:`compose_node` below, which repeats those checks, serves the pure-Python fallback."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"aliases (*{event.anchor}) are not allowed in job files (line {event.start_mark.line + 1})")
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(f"anchors (&{anchor}) are not allowed in job files (line {event.start_mark.line + 1})")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"too many YAML nodes (more than {MAX_NODES})")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"YAML nested deeper than {MAX_DEPTH} levels")
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
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain values", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()] or [level + 1])
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value] or [level + 1])
    return level


def _line(event: yaml.Event) -> int | str:
    """The 1-based line an event starts on (the parser always sets the mark; "?" if it ever does not)."""
    mark = event.start_mark
    return mark.line + 1 if mark is not None else "?"


def _prescan(text: str) -> None:
    """Walk the parser's events (in C with libyaml) and refuse, before anything is built, what a job file
    never needs: anchors and aliases (YAML bombs), deep nesting, too many nodes. Stops at the first one."""
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_FastLoader):
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"aliases (*{event.anchor}) are not allowed in job files (line {_line(event)})")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(f"anchors (&{anchor}) are not allowed in job files (line {_line(event)})")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"YAML nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise _Refused(f"too many YAML nodes (more than {MAX_NODES})")


def load_yaml_bytes(data: bytes, *, max_bytes: int) -> Any:
    """Decode and parse job-file bytes. Raises JobError(invalid_spec) with a precise reason."""
    if len(data) > max_bytes:
        raise JobError(
            Category.INVALID_SPEC,
            f"job file is {len(data)} bytes; the limit is {max_bytes} (limits.max_job_file_bytes)",
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise JobError(Category.INVALID_SPEC, f"job file contains a NUL byte at offset {nul}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError(Category.INVALID_SPEC, f"job file is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        _prescan(text)
        loader = _HardenedLoader(text)
        try:
            value = loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as exc:
        raise JobError(Category.INVALID_SPEC, f"job file refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise JobError(Category.INVALID_SPEC, f"malformed YAML: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise JobError(Category.INVALID_SPEC, f"YAML nested deeper than {MAX_DEPTH} levels") from None
    if _depth(value) > MAX_DEPTH:
        raise JobError(Category.INVALID_SPEC, f"YAML nested deeper than {MAX_DEPTH} levels")
    return value
