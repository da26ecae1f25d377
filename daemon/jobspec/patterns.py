"""The patterns of the job language, each written once for the daemon and for the JSON Schema, and the
``not_before`` time format.

Each pattern is read the same way by Python's ``re`` (the daemon, and ``jsonschema``, which uses
``re.search``) and by ECMA-262 engines (editors): no ``\\s``, ``\\d`` or ``\\Z``, whose meanings differ, and
``$(?!\\n)`` for the end, because Python's ``$`` also matches before a final newline. The daemon matches
the ``*_CHARS`` forms with ``fullmatch``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

_END = r"$(?!\n)"
ID_CHARS = r"(?!\.)[A-Za-z0-9._-]{1,128}"
ID_PATTERN = f"^{ID_CHARS}{_END}"
SIZE_CHARS = r" *([0-9]{1,5}) *[xX×] *([0-9]{1,5}) *"
SIZE_PATTERN = f"^{SIZE_CHARS}{_END}"
_BLANKS = r"\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NONBLANK_PATTERN = f"[^{_BLANKS}]"  # what counts as blank: whitespace to Python or to ECMA-262
_DATE = r"([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_TIME = r"([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9])(?:\.([0-9]{1,6}))?)?"
_ZONE = r"([Zz]|([+-])([01][0-9]|2[0-3]):?([0-5][0-9]))"
NOT_BEFORE_CHARS = f"{_DATE}(?:[Tt ]{_TIME}{_ZONE}?)?"
NOT_BEFORE_PATTERN = f"^{NOT_BEFORE_CHARS}{_END}"
_NOT_BEFORE_RE = re.compile(NOT_BEFORE_CHARS)


def parse_not_before(value: str) -> datetime:
    """A ``not_before`` string (ISO 8601 / RFC 3339 date-time, zone optional, or a date) as a datetime; no zone
    means UTC. Raises ValueError for anything else, or a day the calendar lacks (2021-02-30)."""
    m = _NOT_BEFORE_RE.fullmatch(value)
    if not m:
        raise ValueError(
            f"{value!r} must be a date (2026-05-01) or a date and time (2026-05-01T18:30, "
            "2026-05-01T18:30:00+02:00); no zone means UTC"
        )
    y, mo, d, h, mi, sec, frac, zone, sign, zh, zm = m.groups()
    tz = timezone.utc
    if zone and zone not in "Zz":
        offset = timedelta(hours=int(zh), minutes=int(zm))
        tz = timezone(-offset if sign == "-" else offset)
    micro = int((frac or "0").ljust(6, "0"))
    return datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(sec or 0), micro, tzinfo=tz)


def kind_of(value: Any) -> str:
    """What a YAML value is, in words (not a Python type name)."""
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a yes/no value)"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"text ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a value of another kind"
