"""``wan-daemon``: the command line. The only layer that reads the environment and installs signal handlers.

Exit codes:
  0  success
  1  unhealthy / stale or missing health file / operation failed
  2  usage error
  3  invalid job file(s) (validate, submit) or, for ``run --until-idle``, some job failed
  4  configuration error
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2, 3, 4
DEFAULT_CONFIG_NAMES = ("configs/local.yaml",)


def _settings(args: argparse.Namespace):
    from daemon.config import load_settings

    overrides: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for name in ("inbox", "outbox", "state"):
        value = getattr(args, name, None)
        if value:
            paths[name] = value
    if paths:
        overrides["paths"] = paths
    if getattr(args, "log_level", None):
        overrides["logging"] = {"level": args.log_level}
    config = args.config or os.environ.get("WAN_DAEMON_CONFIG")
    return load_settings(Path(config) if config else None, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from daemon import logs
    from daemon.runtime.daemon import Daemon

    from daemon.runtime.notify import SystemdNotifier

    settings = _settings(args)
    logs.setup(settings.logging.level)
    # systemd's notify socket is for the main process only: the worker must not inherit it.
    notifier = SystemdNotifier(os.environ.pop("NOTIFY_SOCKET", None), os.environ.get("WATCHDOG_USEC"))
    from daemon.ops.inventory import NvmlInventory

    inventory = NvmlInventory(visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                              allowed=settings.hardware.gpus, vram_limit_gb=settings.hardware.vram_limit_gb)
    daemon = Daemon(settings, cuda_available=bool(inventory.gpus()), notifier=notifier, inventory=inventory)
    signals_seen = []

    def on_signal(signum, _frame):
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            daemon.request_stop()  # drain: stop intake, requeue the running job, exit
        else:
            daemon.executor.kill()  # second signal: leave now; the spool still holds every job
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.run(until_idle=args.until_idle)
    if args.until_idle:
        for r in daemon.results:
            if r["status"] == "done":
                print(f"done    {r['id']}: {r['video']}  (sidecar {r['sidecar']})")
            else:
                print(f"failed  {r['id']}: {r.get('failure') or settings.paths.outbox / 'failed'}")
        if daemon.worker_unavailable:
            print(f"stopped: the worker cannot start: {daemon.worker_unavailable}", file=sys.stderr)
            return EXIT_FAIL
        if not daemon.results:
            print(f"nothing to do: no job files in {settings.paths.inbox}")
        return EXIT_INVALID if any(r["status"] == "failed" for r in daemon.results) else EXIT_OK
    return EXIT_OK


def _validate_file(path: Path, settings) -> list[str]:
    """Problems with one job file, as the daemon would report them (empty: valid)."""
    from daemon.errors import JobError
    from daemon.models import REGISTRY, locate
    from daemon.jobspec.params import resolve_params
    from daemon.jobspec.spec import parse_job_file

    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"cannot read: {exc.strerror}"]
    entries, file_error = parse_job_file(data, path.name, max_bytes=settings.limits.max_job_file_bytes)
    if file_error:
        return [file_error.message]
    problems = []
    for e in entries:
        if e.error:
            problems.append(f"job {e.id}: {e.error.message}")
            continue
        assert e.spec is not None
        model = e.spec.model or "tiny-ti2v-5b"
        try:
            info = REGISTRY[model] if model in REGISTRY else locate(
                model, models_dir=settings.paths.models, model_roots=settings.paths.model_roots).info
            lim = settings.limits
            resolve_params(e.spec, info, max_side=lim.max_side, max_frames=lim.max_frames, max_steps=lim.max_steps)
        except JobError as err:
            problems.append(f"job {e.id}: {err.message}")
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    bad = 0
    for f in args.files:
        problems = _validate_file(Path(f), settings)
        if problems:
            bad += 1
            print(f"INVALID {f}")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"ok      {f}")
    return EXIT_INVALID if bad else EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from daemon.fsutil import atomic_copy

    settings = _settings(args)
    inbox = settings.paths.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    status = EXIT_OK
    for f in args.files:
        src = Path(f)
        problems = [] if args.no_validate else _validate_file(src, settings)
        if problems:
            print(f"not submitted (invalid): {f}", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            status = EXIT_INVALID
            continue
        dest = inbox / src.name
        try:
            atomic_copy(src, dest, max_bytes=settings.limits.max_job_file_bytes)
        except FileExistsError:
            print(f"not submitted: {dest} already exists in the inbox", file=sys.stderr)
            status = EXIT_FAIL
            continue
        print(f"submitted {dest}")
    return status


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.runtime.health import format_status, read_health

    settings = _settings(args)
    h = read_health(settings.health_path)
    if h is None:
        print(f"no health file at {settings.health_path}: is the daemon running?", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(h, indent=2) if args.json else format_status(h))
    return EXIT_OK


def cmd_check_health(args: argparse.Namespace) -> int:
    from daemon.runtime.health import health_age, read_health

    settings = _settings(args)
    h = read_health(settings.health_path)
    if h is None:
        print(f"unhealthy: no health file at {settings.health_path}")
        return EXIT_FAIL
    age = health_age(h, time.time())
    if age > args.max_age:
        print(f"unhealthy: health file is {age:.1f}s old (max {args.max_age}s); state was {h.get('state')}")
        return EXIT_FAIL
    if h.get("state") == "stopped":
        print("unhealthy: the daemon has stopped")
        return EXIT_FAIL
    print(f"healthy: {h.get('state')}, updated {age:.1f}s ago, {h.get('queue_depth', 0)} queued")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.models_cmd == "build-tiny":
        from daemon.worker.tiny import build_all

        for path in build_all(settings.paths.models):
            print(f"built {path}  (random weights: test model, the videos are noise)")
        return EXIT_OK
    if args.models_cmd == "list":
        return _models_list(settings)
    from daemon.hub.downloads import DownloadError, download, needed_patterns, remove, verify
    from daemon.models import REGISTRY

    info = REGISTRY.get(args.name)
    repo = info.repo_id if info is not None else args.name
    if info is not None and info.tiny:
        print(f"{args.name} is a tiny test model built locally: `wan-daemon models build-tiny`", file=sys.stderr)
        return EXIT_USAGE
    patterns = needed_patterns(info.architecture) if info is not None else None
    token = os.environ.get("HF_TOKEN")
    try:
        if args.models_cmd == "download":
            path = download(repo, revision=args.revision, allow_patterns=patterns, token=token,
                            progress=_print_progress, min_free_mb=settings.limits.min_free_mb)
            print(f"downloaded {repo} to {path}")
            return EXIT_OK
        if args.models_cmd == "verify":
            report = verify(repo, revision=args.revision, allow_patterns=patterns, token=token)
            for problem in report.problems:
                print(f"  - {problem}")
            print(f"{'ok' if report.ok else 'BROKEN'}: {repo}, {report.checked} files checked ({report.source})")
            return EXIT_OK if report.ok else EXIT_FAIL
        if args.models_cmd == "remove":
            freed = remove(repo)
            print(f"removed {repo}: {freed / 1e9:.2f} GB freed")
            return EXIT_OK
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_USAGE


_last_progress = [0.0]


def _print_progress(p: dict) -> None:
    """Progress lines for logs and pipes (a terminal also gets huggingface_hub's bar); at most one a second."""
    now = time.time()
    if now - _last_progress[0] < 1.0 and p.get("phase") == "downloading":
        return
    _last_progress[0] = now
    total = p.get("total_bytes") or 0
    done = p.get("downloaded_bytes") or 0
    pct = f"{100 * done / total:5.1f}%" if total else "  ?  "
    print(f"{p.get('phase', 'downloading'):11} {p.get('repo')}: {pct} {done / 1e9:.2f}/{total / 1e9:.2f} GB, "
          f"{p.get('files_done', 0)}/{p.get('files_total', 0)} files", file=sys.stderr, flush=True)


def _models_list(settings) -> int:
    from daemon.hub.downloads import list_cached
    from daemon.models import REGISTRY, hub_snapshot, tiny_model_dir
    from daemon.worker.tiny import is_built

    cached = {c["repo_id"]: c for c in list_cached()}
    for info in REGISTRY.values():
        if info.tiny:
            folder = tiny_model_dir(settings.paths.models, info.name)
            where = f"present  {folder}" if is_built(folder) else "absent   (built on first use)"
        else:
            snap = hub_snapshot(info.repo_id)
            entry = cached.get(info.repo_id, {})
            size = f"{entry.get('size_on_disk', 0) / 1e9:.1f} GB" if entry else ""
            where = (f"present  {size} rev {snap[1][:12]} {snap[0]}" if snap
                     else f"absent   (wan-daemon models download {info.name})")
        print(f"{info.name:18} {info.width}x{info.height} {info.frames}f@{info.fps:<3} {where}")
    for root in settings.paths.model_roots:
        for index in sorted(Path(root).glob("*/model_index.json")):
            print(f"{index.parent.name:18} local folder      present  {index.parent}")
    known = {i.repo_id for i in REGISTRY.values() if i.repo_id}
    for repo, entry in sorted(cached.items()):
        if repo not in known:
            print(f"{repo:18} hub cache         present  {entry.get('size_on_disk', 0) / 1e9:.1f} GB {entry.get('path')}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Ask the daemon holding each job to cancel it: a queued job at once, a running one at its next step."""
    from daemon.fsutil import atomic_write_json

    settings = _settings(args)
    cancel_dir = settings.paths.state / "cancel"
    cancel_dir.mkdir(parents=True, exist_ok=True)
    status = EXIT_OK
    for job_id in args.ids:
        held = list((settings.paths.state / "owners").glob(f"*/jobs/{job_id}/job.json"))
        if not held:
            print(f"no queued or running job {job_id!r} in {settings.paths.state}", file=sys.stderr)
            status = EXIT_FAIL
            continue
        atomic_write_json(cancel_dir / job_id, {"id": job_id, "requested_at": time.time()})
        print(f"cancel requested: {job_id} (its failure record will say cancelled)")
    return status


def _history(settings):
    from daemon.ops.history import History

    if not settings.history.path.exists():
        print(f"no job history at {settings.history.path} yet (the daemon writes it as jobs run)", file=sys.stderr)
        return None
    return History(settings.history.path)


def cmd_tasks(args: argparse.Namespace) -> int:
    from rich.console import Console

    from daemon.ops.analysis import render_tasks

    history = _history(_settings(args))
    if history is None:
        return EXIT_FAIL
    with history:
        rows = history.tasks(last=args.last, status=args.status)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        Console().print(render_tasks(rows))
    return EXIT_OK


def cmd_analysis(args: argparse.Namespace) -> int:
    from rich.console import Console

    from daemon.ops.analysis import analyse, render_analysis

    history = _history(_settings(args))
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from daemon.ops.doctor import exit_code, format_checks, run_checks

    settings = _settings(args)
    checks = run_checks(settings)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        print(format_checks(checks))
    return exit_code(checks)


def cmd_report(args: argparse.Namespace) -> int:
    from daemon.ops.report import build_report

    settings = _settings(args)
    output = Path(args.output) if args.output else settings.paths.outbox / "report.html"
    path = build_report(settings.paths.outbox, output)
    print(f"report written: {path}")
    return EXIT_OK


def cmd_monitor(args: argparse.Namespace) -> int:
    from daemon.ops import monitor

    settings = _settings(args)
    monitor.run(settings.health_path.parent, args.interval, iterations=args.iterations)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from daemon.jobspec.spec import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wan-daemon", description=__doc__.split("\n")[0].strip("`"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (default: $WAN_DAEMON_CONFIG, else built-in defaults)")
    common.add_argument("--inbox", help="inbox folder (overrides the config)")
    common.add_argument("--outbox", help="outbox folder (overrides the config)")
    common.add_argument("--state", help="state folder (default <inbox>/.wan-daemon)")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", parents=[common], help="run the daemon")
    r.add_argument("--until-idle", action="store_true", help="exit once the inbox and the queue are empty")
    r.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", parents=[common], help="check job files; exit 0 when all are valid")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("submit", parents=[common], help="validate and copy job files atomically into the inbox")
    s.add_argument("files", nargs="+")
    s.add_argument("--no-validate", action="store_true")
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", parents=[common], help="show what the daemon is doing (from its health file)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    ch = sub.add_parser("check-health", parents=[common], help="exit 0 when the health file is fresh, else 1")
    ch.add_argument("--max-age", type=float, default=30.0, help="seconds (default 30)")
    ch.set_defaults(func=cmd_check_health)

    m = sub.add_parser("models", help="model management")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("build-tiny", parents=[common], help="build the tiny random-weight test models")
    msub.add_parser("list", parents=[common], help="every registry model and local folder: present or not, size, "
                    "revision, path")
    for verb, text in (("download", "download a model's needed files into the Hugging Face cache (resumable)"),
                       ("verify", "check every needed file's size and sha256 against the hub (or the manifest)"),
                       ("remove", "delete a model from the Hugging Face cache")):
        mp = msub.add_parser(verb, parents=[common], help=text)
        mp.add_argument("name", help="registry name (wan2.2-ti2v-5b, ...) or a hub repo id")
        if verb != "remove":
            mp.add_argument("--revision")
    m.set_defaults(func=cmd_models)

    tk = sub.add_parser("tasks", parents=[common], help="recent jobs from the history database")
    tk.add_argument("--last", type=int, default=20)
    tk.add_argument("--status", choices=["waiting_for_model", "queued", "running", "done", "failed"])
    tk.add_argument("--json", action="store_true")
    tk.set_defaults(func=cmd_tasks)

    an = sub.add_parser("analysis", parents=[common], help="success rate, timings, failures and recommendations")
    an.add_argument("--hours", type=float, default=24.0)
    an.add_argument("--json", action="store_true")
    an.set_defaults(func=cmd_analysis)

    ca = sub.add_parser("cancel", parents=[common], help="cancel queued or running jobs by id")
    ca.add_argument("ids", nargs="+")
    ca.set_defaults(func=cmd_cancel)

    d = sub.add_parser("doctor", parents=[common], help="check and explain the environment (exit 1 on a failure)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    rp = sub.add_parser("report", parents=[common], help="write a static HTML page of the outbox")
    rp.add_argument("--output", "-o", help="default: <outbox>/report.html")
    rp.set_defaults(func=cmd_report)

    mo = sub.add_parser("monitor", parents=[common], help="live terminal view of the daemons on this inbox")
    mo.add_argument("--interval", type=float, default=1.0)
    mo.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)
    mo.set_defaults(func=cmd_monitor)

    sc = sub.add_parser("schema", help="print the job-file JSON Schema (jobs/schema.json)")
    sc.add_argument("--output", "-o")
    sc.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    from daemon.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
