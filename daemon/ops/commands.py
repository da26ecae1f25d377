"""The operator commands of ``wan-daemon``: tasks, analysis, doctor, report, monitor.

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

    from daemon.ops.analysis import render_tasks

    history = _history(settings)
    if history is None:
        return EXIT_FAIL
    with history:
        rows = history.tasks(last=args.last, status=args.status)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        Console().print(render_tasks(rows))
    return EXIT_OK


def analysis(args: argparse.Namespace, settings) -> int:
    from rich.console import Console

    from daemon.ops.analysis import analyse, render_analysis

    history = _history(settings)
    if history is None:
        return EXIT_FAIL
    with history:
        result = analyse(history, args.hours, time.time())
    if args.json:
        print(json.dumps(result, indent=2, default=str))
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

    live.run(settings.health_path.parent, args.interval, iterations=args.iterations)
    return EXIT_OK
