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
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2, 3, 4


def _settings(args: argparse.Namespace):
    return _effective(args).settings


def _effective(args: argparse.Namespace):
    """The config file (--config, $WAN_DAEMON_CONFIG, /etc/wan-daemon/config.yaml, XDG config home), then
    WAN_DAEMON_<SECTION>__<KEY> variables, then these flags (daemon.config_sources)."""
    from daemon.config_sources import load_effective

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
    return load_effective(getattr(args, "config", None), overrides, os.environ)


def cmd_config(args: argparse.Namespace) -> int:
    from daemon.ops.commands import config_show

    return config_show(args, _effective(args))


def cmd_run(args: argparse.Namespace) -> int:
    from daemon import logs
    from daemon.runtime.daemon import Daemon
    from daemon.runtime.notify import SystemdNotifier

    settings = _settings(args)
    logs.setup(settings.logging.level, settings.logging.format)
    # systemd's notify socket is for the main process only: the worker must not inherit it.
    notifier = SystemdNotifier(os.environ.pop("NOTIFY_SOCKET", None), os.environ.get("WATCHDOG_USEC"))
    from daemon.ops.inventory import NvmlInventory

    inventory = NvmlInventory(
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        allowed=settings.hardware.gpus,
        vram_limit_gb=settings.hardware.vram_limit_gb,
    )
    daemon = Daemon(
        settings,
        cuda_available=bool(inventory.gpus()),
        notifier=notifier,
        inventory=inventory,
        reload_settings=lambda: _settings(args),  # the same sources, read again (SIGHUP)
    )
    signals_seen = []

    def on_signal(signum, _frame):
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            daemon.request_stop()  # drain: stop intake, requeue the running job, exit
        else:
            daemon.kill_workers()  # second signal: leave now; the spool still holds every job
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGHUP (systemctl reload): re-read the config on the loop's thread; nothing stops (daemon.runtime.reload).
    signal.signal(signal.SIGHUP, lambda _signum, _frame: daemon.request_reload())
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
        if not daemon.done and not daemon.failed:
            print(f"nothing to do: no job files in {settings.paths.inbox}")
        return EXIT_INVALID if daemon.failed else EXIT_OK
    return EXIT_OK


def _inventory(settings):
    """The GPUs this daemon may use, as NVML reports them through CUDA_VISIBLE_DEVICES and the config
    (what ``run`` passes the daemon)."""
    from daemon.ops.inventory import NvmlInventory

    return NvmlInventory(
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        allowed=settings.hardware.gpus,
        vram_limit_gb=settings.hardware.vram_limit_gb,
    )


def _default_model(settings) -> Callable[[], str]:
    """The model for jobs that name none, as the daemon resolves ``models.default`` (looked up once, and only
    when a job names no model: ``auto`` asks NVML for a GPU only when the real TI2V-5B weights are here)."""
    chosen: list[str] = []

    def name() -> str:
        if not chosen:
            from daemon.models import REGISTRY, TI2V_5B, default_model, hub_snapshot

            configured = settings.models.default
            repo_id = REGISTRY[TI2V_5B].repo_id
            assert repo_id is not None  # a real registry model
            cuda = configured == "auto" and hub_snapshot(repo_id) is not None and bool(_inventory(settings).gpus())
            chosen.append(default_model(configured, cuda_available=cuda))
        return chosen[0]

    return name


def _validate_file(path: Path, settings, default_model: Callable[[], str]) -> list[str]:
    """Problems with one job file, exactly as the daemon's intake would reject it (empty: valid). Checks
    that depend on what the daemon holds (an id already queued, a video already published) are not made."""
    from daemon.errors import JobError
    from daemon.jobspec.resolve import resolve_job, unusable_path
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
        try:
            resolve_job(e, settings, default_model)
        except JobError as err:
            problems.append(f"job {e.id}: {err.message}")
        except OSError as exc:  # the disk's fault (EIO): the daemon would try again later
            problems.append(f"job {e.id}: {unusable_path(exc).message}")
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    default_model = _default_model(settings)
    bad = 0
    for f in args.files:
        problems = _validate_file(Path(f), settings, default_model)
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
    default_model = _default_model(settings)
    status = EXIT_OK
    for f in args.files:
        src = Path(f)
        problems = [] if args.no_validate else _validate_file(src, settings, default_model)
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
    from daemon.runtime.health import format_status, missing_folder, read_health

    settings = _settings(args)
    h = read_health(settings.health_path)
    if h is None:
        gone = missing_folder([settings.paths.inbox, settings.paths.state, settings.paths.outbox])
        why = f"{gone} is missing (an unmounted share or a deleted folder?)" if gone else "is the daemon running?"
        print(f"no health file at {settings.health_path}: {why}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(h, indent=2) if args.json else format_status(h))
    return EXIT_OK


def cmd_check_health(args: argparse.Namespace) -> int:
    from daemon.runtime.health import read_health, verdict

    settings = _settings(args)
    paths = settings.paths
    answer = verdict(
        read_health(settings.health_path),
        max_age=args.max_age,
        now=time.time(),
        health_path=settings.health_path,
        folders=[paths.inbox, paths.state, paths.outbox],
    )
    print(answer)
    return EXIT_OK if answer.startswith("healthy") else EXIT_FAIL


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.hub.commands import models
    from daemon.worker import tiny  # the tiny models are built with the worker's code (torch, lazily)

    return models(args, _settings(args), build_tiny=tiny.build_all, tiny_is_built=tiny.is_built)


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


def cmd_tasks(args: argparse.Namespace) -> int:
    from daemon.ops.commands import tasks

    return tasks(args, _settings(args))


def cmd_analysis(args: argparse.Namespace) -> int:
    from daemon.ops.commands import analysis

    return analysis(args, _settings(args))


def cmd_doctor(args: argparse.Namespace) -> int:
    from daemon.ops.commands import doctor

    return doctor(args, _settings(args))


def cmd_report(args: argparse.Namespace) -> int:
    from daemon.ops.commands import report

    return report(args, _settings(args))


def cmd_monitor(args: argparse.Namespace) -> int:
    from daemon.ops.commands import monitor

    return monitor(args, _settings(args))


def cmd_resubmit(args: argparse.Namespace) -> int:
    """Render a published video again from its sidecar alone: a job file with every resolved parameter, submitted
    (validated first) like ``submit``."""
    from daemon.jobspec.params import job_from_sidecar

    settings = _settings(args)
    sidecar = json.loads(Path(args.sidecar).read_text())
    new_id = args.id or f"{sidecar['id']}-re{int(time.time())}"[-128:].lstrip(".")
    job = job_from_sidecar(sidecar, new_id)
    folder = settings.paths.state / "resubmit"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{new_id}.yaml"
    # JSON is YAML 1.2: every value is written exactly (a prompt "yes" stays a string, a seed stays a number).
    header = f"# re-render of {sidecar['id']} from {Path(args.sidecar).name}"
    path.write_text(header + "\n" + json.dumps(job, indent=2) + "\n")
    args.files, args.no_validate = [str(path)], False
    return cmd_submit(args)


def cmd_schema(args: argparse.Namespace) -> int:
    from daemon.jobspec.schema import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wan-daemon",
        description=__doc__.split("\n")[0].strip("`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        help="YAML config file (default: $WAN_DAEMON_CONFIG, else /etc/wan-daemon/config.yaml, else "
        "$XDG_CONFIG_HOME/wan-daemon/config.yaml; WAN_DAEMON_<SECTION>__<KEY> variables override it)",
    )
    common.add_argument("--inbox", help="inbox folder (overrides the config)")
    common.add_argument("--state", help="state folder (default <inbox>/.wan-daemon)")
    # tasks and analysis read their own --outbox: "from the outbox instead of the history" (ops.outbox_rows).
    readers = argparse.ArgumentParser(add_help=False, parents=[common])
    readers.add_argument(
        "--outbox",
        nargs="?",
        const="",
        help="list the jobs finished in the outbox (every daemon's, from sidecars and failure records) instead "
        "of this host's history; a DIR names the outbox",
    )
    common.add_argument("--outbox", help="outbox folder (overrides the config)")
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
    msub.add_parser(
        "list", parents=[common], help="every registry model and local folder: present or not, size, revision, path"
    )
    for verb, text in (
        ("download", "download a model's needed files into the Hugging Face cache (resumable)"),
        ("verify", "check every needed file's size and sha256 against the hub (or the manifest)"),
        ("remove", "delete a model from the Hugging Face cache"),
    ):
        mp = msub.add_parser(verb, parents=[common], help=text)
        mp.add_argument("name", help="registry name (wan2.2-ti2v-5b, ...) or a hub repo id")
        if verb != "remove":
            mp.add_argument("--revision")
    m.set_defaults(func=cmd_models)

    tk = sub.add_parser("tasks", parents=[readers], help="recent jobs from the history database (or the outbox)")
    tk.add_argument("--last", type=int, default=20)
    tk.add_argument("--status", choices=["waiting_for_model", "queued", "running", "done", "failed"])
    tk.add_argument("--json", action="store_true")
    tk.set_defaults(func=cmd_tasks)

    an = sub.add_parser("analysis", parents=[readers], help="success rate, timings, failures and recommendations")
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

    rs = sub.add_parser("resubmit", parents=[common], help="render a published video again from its sidecar")
    rs.add_argument("sidecar", help="outbox/<name>.json")
    rs.add_argument("--id", help="the new job's id and output name (default: <id>-re<unix time>)")
    rs.set_defaults(func=cmd_resubmit)

    cf = sub.add_parser(
        "config", parents=[common], help="show the effective configuration and where each value came from"
    )
    cf.add_argument("action", choices=["show"])
    cf.add_argument("--json", action="store_true", help="one JSON document")
    cf.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    cf.set_defaults(func=cmd_config)
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
