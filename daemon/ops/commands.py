"""The operator commands of ``wan-daemon``: tasks, analysis, doctor, report, monitor, config show. Tables are
rich on a terminal and tab-separated (daemon.ops.tables) when stdout is not one. ``queue`` and ``status JOB_ID``
are in daemon.ops.queue_view and daemon.ops.job_story.

Each takes the parsed arguments and the loaded settings and returns the exit code (daemon.cli).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAIL = 0, 1  # daemon.cli's exit codes


def _history(settings):
    from daemon.ops.history import History

    if not settings.history.path.exists():
        print(f"no job history at {settings.history.path} yet (the daemon writes it as jobs run)", file=sys.stderr)
        return None
    return History(settings.history.path)


def tasks(args: argparse.Namespace, settings) -> int:
    from rich.console import Console

    from daemon.ops.analysis import print_tasks_plain, render_tasks

    if getattr(args, "outbox", None) is not None:  # every daemon's finished jobs, from the shared outbox
        from daemon.ops.outbox_rows import outbox_rows

        rows = [r for r in outbox_rows(settings.paths.outbox) if args.status in (None, r["status"])]
        rows = rows[: args.last] if args.last is not None else rows
    else:
        history = _history(settings)
        if history is None:
            return EXIT_FAIL
        with history:
            rows = history.tasks(last=args.last, status=args.status)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not sys.stdout.isatty():  # for a program: tab-separated, ids and paths whole
        print_tasks_plain(rows, sys.stdout)
    else:
        Console().print(render_tasks(rows))
    return EXIT_OK


def analysis(args: argparse.Namespace, settings) -> int:
    from rich.console import Console

    from daemon.ops.analysis import analyse, analyse_rows, print_analysis_plain, render_analysis

    now = time.time()
    if getattr(args, "outbox", None) is not None:
        from daemon.ops.outbox_rows import outbox_rows

        rows = outbox_rows(settings.paths.outbox, since=now - args.hours * 3600)
        result = analyse_rows(rows, hours=args.hours, now=now)
    else:
        history = _history(settings)
        if history is None:
            return EXIT_FAIL
        with history:
            result = analyse(history, args.hours, now)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif not sys.stdout.isatty():
        print_analysis_plain(result, sys.stdout)
    else:
        console = Console()
        for part in render_analysis(result):
            console.print(part)
    return EXIT_OK


def doctor(args: argparse.Namespace, settings) -> int:
    from daemon.ops.doctor import exit_code, format_checks, run_checks

    checks = run_checks(settings)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        print(format_checks(checks))
    return exit_code(checks)


def report(args: argparse.Namespace, settings) -> int:
    from daemon.ops.report import build_report

    output = Path(args.output) if args.output else settings.paths.outbox / "report.html"
    path = build_report(settings.paths.outbox, output)
    print(f"report written: {path}")
    return EXIT_OK


def monitor(args: argparse.Namespace, settings) -> int:
    from daemon.ops import monitor as live

    live.run(settings.health_path.parent, args.interval, iterations=args.iterations, state=settings.paths.state)
    return EXIT_OK


def config_show(args: argparse.Namespace, effective) -> int:
    """Every setting's effective value and where it came from (daemon.config_sources.Effective): aligned on a
    terminal, tab-separated when piped, one JSON document with ``--json``."""
    rows = effective.rows()
    if args.json:
        doc = {
            "file": str(effective.file) if effective.file else None,
            "file_reason": effective.file_reason,
            "settings": {key: {"value": value, "from": origin} for key, value, origin in rows},
        }
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    print(f"# config file: {effective.file or '(none)'} ({effective.file_reason})")
    width = max(len(key) for key, _, _ in rows)
    for key, value, origin in rows:
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        print(f"{key:<{width}}  {shown}  # {origin}" if sys.stdout.isatty() else f"{key}\t{shown}\t{origin}")
    return EXIT_OK
