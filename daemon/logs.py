"""Logging: one line per record on stderr, as text or as JSON, one record per lifecycle event.

- One line always: newlines inside a message or a traceback are written as ``\\n``, so that journald, grep and
  log shippers never split a record (journald files every line as an entry of its own).
- Under systemd (stderr is the stream named by ``JOURNAL_STREAM``) every line starts with its syslog priority,
  ``<3>`` for errors and so on, which journald reads (``SyslogLevelPrefix=``, on by default) so that
  ``journalctl -p err`` finds the errors. journald adds the time and the unit itself.
- ``logging.format: json``: one JSON object a line with ``event`` (e.g. ``job.queued``) and the message's
  ``key=value`` fields as keys, plus ``time`` (RFC 3339), ``level``, ``message`` and the bound context.
- Colours only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

from loguru import logger

# loguru's levels as syslog priorities (RFC 5424: 2 crit, 3 err, 4 warning, 5 notice, 6 info, 7 debug).
PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
TIME_FORMAT = "YYYY-MM-DD HH:mm:ss.SSS"
# An event name leads each message: "job.queued id=… attempts=0" (see ARCHITECTURE.md).
_EVENT = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?=[\s:]|$)")
# A field starts where a space is followed by ``key=``; its value runs to the next field.
_FIELD_START = re.compile(r"\s(?=[A-Za-z_][A-Za-z0-9_.]*=)")
_RESERVED = ("time", "level", "event", "message", "exception")
_LOGURU_DEFAULT_HANDLER = 0  # the stderr handler loguru installs at import
_installed: list[int] = []  # the handlers setup() added (removed by the next call)


class _DropStopRace(logging.Filter):
    """watchdog logs this when its inotify thread is stopped while reading: harmless, and alarming in a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


def one_line(text: str) -> str:
    """``text`` without line breaks: each is written as the two characters ``\\n`` (or ``\\r``)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def stream_is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journald stream systemd connected (``JOURNAL_STREAM=<device>:<inode>``):
    compared with the stream itself, since a child whose stderr was redirected still inherits the variable."""
    value = env.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError, TypeError):
        return False
    return st.st_dev == device and st.st_ino == inode


def wants_colour(stream: TextIO, env: Mapping[str, str]) -> bool:
    if env.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def event_fields(message: str) -> tuple[str | None, dict[str, str]]:
    """The event name and the ``key=value`` fields of a message such as
    ``job.failed id=a7 category=timeout error=no step for 60 s``: a value runs to the next `` key=``."""
    found = _EVENT.match(message)
    if found is None:
        return None, {}
    fields: dict[str, str] = {}
    rest = message[found.end() :]
    for part in _FIELD_START.split(rest)[1:]:
        key, _, value = part.partition("=")
        fields[key] = value.rstrip().rstrip(";,")
    return found.group(1), fields


def _exception_text(record: Mapping[str, Any]) -> str:
    exc = record.get("exception")
    if exc is None or exc.type is None:
        return ""
    return "".join(traceback.format_exception(exc.type, exc.value, exc.traceback)).rstrip()


def json_line(record: Mapping[str, Any], tag: str | None = None) -> str:
    """One record as one JSON object (no newline inside: json escapes them)."""
    message = str(record["message"])
    event, fields = event_fields(message)
    doc: dict[str, Any] = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "event": event,
        "message": message,
    }
    if tag:
        doc["process"] = tag
    for key, value in {**fields, **dict(record.get("extra") or {})}.items():
        doc[key if key not in _RESERVED else f"field_{key}"] = value
    exception = _exception_text(record)
    if exception:
        doc["exception"] = exception
    return json.dumps(doc, ensure_ascii=False, default=str)


def text_line(record: Mapping[str, Any], tag: str | None = None) -> str:
    """One record as one plain line (no colours): time, level, [tag,] message, then the traceback, if any."""
    exception = _exception_text(record)
    when = record["time"].strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    line = f"{when} | {record['level'].name: <7} | {f'{tag} | ' if tag else ''}{record['message']}"
    return one_line(f"{line} | {exception}" if exception else line)


def _priority_prefix(record: Mapping[str, Any]) -> str:
    return f"<{PRIORITY.get(record['level'].name, 6)}>"


def setup(
    level: str = "INFO",
    fmt: str = "text",
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
    tag: str | None = None,
) -> None:
    """Send the daemon's (or a worker's) records to ``stream`` (stderr) as described above. ``tag`` names the
    process in each line (a worker: ``worker[pid]``)."""
    stream = stream if stream is not None else sys.stderr
    env = env if env is not None else os.environ
    journal = stream_is_journal(stream, env)
    colour = not journal and fmt == "text" and wants_colour(stream, env)
    # Replace our own handler (a reload calls this again) and loguru's default one, nobody else's.
    for handler_id in (*_installed, _LOGURU_DEFAULT_HANDLER):
        with contextlib.suppress(ValueError):
            logger.remove(handler_id)
    _installed.clear()
    if colour:

        def coloured(record: Any) -> str:
            record["extra"]["_line"] = one_line(str(record["message"]))
            exception = _exception_text(record)
            record["extra"]["_exc"] = f" | {one_line(exception)}" if exception else ""
            record["extra"]["_tag"] = f"{tag} | " if tag else ""
            return (
                f"<green>{{time:{TIME_FORMAT}}}</green> | <level>{{level: <7}}</level> | "
                "{extra[_tag]}<level>{extra[_line]}</level>{extra[_exc]}\n"
            )

        _installed.append(
            logger.add(stream, level=level, format=coloured, colorize=True, backtrace=False, diagnose=False)
        )
    else:
        render = json_line if fmt == "json" else text_line

        def write(message: Any) -> None:
            record = message.record
            stream.write(f"{_priority_prefix(record) if journal else ''}{render(record, tag)}\n")
            stream.flush()

        _installed.append(
            logger.add(write, level=level, format="{message}", backtrace=False, diagnose=False, catch=True)
        )
    logging.getLogger("watchdog.observers.inotify").addFilter(_DropStopRace())
