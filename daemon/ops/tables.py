"""Tables the operator commands print: aligned for people on a terminal, tab-separated for programs when stdout
is not one (every id and path whole, one row per line, a header line first), so ``| cut -f1`` or ``| head``
keeps the ids. ``--json`` is each command's own."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # at most 3 decimals, no trailing zeros: 12.0 -> 12, 0.95 -> 0.95
        text = f"{value:.3f}".rstrip("0").rstrip(".") if "." in f"{value:.3f}" else f"{value:.3f}"
        return "0" if text == "-0" else text
    # A tab or newline inside a value would break the row apart: shown escaped.
    return str(value).replace("\t", "\\t").replace("\n", "\\n")


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], *, out: TextIO | None = None, tty: bool | None = None
) -> None:
    """``columns`` and ``rows`` as text. On a terminal, columns are padded to their widest cell (never cut);
    otherwise tab-separated."""
    out = out or sys.stdout
    tty = out.isatty() if tty is None else tty
    cells = [[cell(v) for v in row] for row in rows]
    if not tty:
        out.write("\t".join(columns) + "\n")
        for row in cells:
            out.write("\t".join(row) + "\n")
        return
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
