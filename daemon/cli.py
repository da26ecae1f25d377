"""``wan-daemon``: the command line. The only layer that reads the environment and installs signal handlers.

Exit codes:
  0    success
  1    unhealthy / stale or missing health file / operation failed (an id no daemon holds, a refused submit,
       a file or folder that cannot be read or written) / ``submit --wait`` timed out
  2    usage error
  3    invalid job file(s) (validate, submit, retry) or some job failed (``run --until-idle``, ``submit --wait``)
  4    configuration error
  5    the daemon's lease is held: another live daemon uses the same instance id on this state folder
  130  interrupted (Ctrl-C)
  141  stdout closed by its reader (``wan-daemon queue | head -1``: 128 + SIGPIPE), quietly
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

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INVALID, EXIT_CONFIG, EXIT_LEASE = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED, EXIT_PIPE = 130, 128 + signal.SIGPIPE


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
    inventory = _inventory(settings)
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
            else:  # the record's path; the folder only when the daemon could not say which file
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


def _checked(name: str) -> Callable[[argparse.Namespace], int]:
    """A command of daemon.ops.submitting or .queue_control that checks job files as the daemon would (given
    the settings and the default model)."""

    def run(args: argparse.Namespace) -> int:
        from daemon.ops import queue_control, submitting

        settings = _settings(args)
        module = queue_control if name == "retry" else submitting
        return getattr(module, name)(args, settings, _default_model(settings))

    return run


def _ops(name: str) -> Callable[[argparse.Namespace], int]:
    """An operator command of daemon.ops.commands (tasks, analysis, doctor, report, monitor) or of
    daemon.ops.queue_control (pause, resume, priority, cancel: a request file written in the state folder)."""

    def run(args: argparse.Namespace) -> int:
        from daemon.ops import commands, queue_control

        module = queue_control if hasattr(queue_control, name) else commands
        return getattr(module, name)(args, _settings(args))

    return run


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.runtime.health import format_status, missing_folder, read_health

    settings = _settings(args)
    if args.job_id:  # one job's story (daemon.ops.job_story)
        from daemon.ops.job_story import job_status_command

        return job_status_command(args, settings)
    h = read_health(settings.health_path)
    if h is None:
        gone = missing_folder([settings.paths.inbox, settings.paths.state, settings.paths.outbox])
        why = f"{gone} is missing (an unmounted share or a deleted folder?)" if gone else "is the daemon running?"
        print(f"no health file at {settings.health_path}: {why}", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(h, indent=2) if args.json else format_status(h))
    return EXIT_OK


def cmd_queue(args: argparse.Namespace) -> int:
    from daemon.ops.queue_view import queue_command

    return queue_command(args, _settings(args))


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
    healthy = answer.startswith("healthy")
    print(json.dumps({"healthy": healthy, "message": answer}) if args.json else answer)
    return EXIT_OK if healthy else EXIT_FAIL


def cmd_models(args: argparse.Namespace) -> int:
    from daemon.hub.commands import models
    from daemon.worker import tiny  # the tiny models are built with the worker's code (torch, lazily)

    return models(args, _settings(args), build_tiny=tiny.build_all, tiny_is_built=tiny.is_built)


def cmd_resubmit(args: argparse.Namespace) -> int:
    """Render a published video again from its sidecar alone: a job file with every resolved parameter, submitted
    (validated first) like ``submit``."""
    from daemon.jobspec.params import job_from_sidecar

    settings = _settings(args)
    try:
        sidecar = json.loads(Path(args.sidecar).read_bytes())
        new_id = args.id or f"{sidecar['id']}-re{int(time.time())}"[-128:].lstrip(".")
        job = job_from_sidecar(sidecar, new_id)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"wan-daemon: {args.sidecar} is not a sidecar ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EXIT_FAIL
    folder = settings.paths.state / "resubmit"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{new_id}.yaml"
    # JSON is YAML 1.2: every value is written exactly (a prompt "yes" stays a string, a seed stays a number).
    header = f"# re-render of {sidecar['id']} from {Path(args.sidecar).name}"
    path.write_text(header + "\n" + json.dumps(job, indent=2) + "\n")
    args.files, args.no_validate = [str(path)], False
    return _checked("submit")(args)


def cmd_schema(args: argparse.Namespace) -> int:
    from daemon.jobspec.schema import json_schema

    text = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return EXIT_OK


def _duration(text: str) -> float:
    from daemon.ops.queue_control import parse_duration

    return parse_duration(text)


def _options() -> argparse.ArgumentParser:
    """The options every subcommand takes, before or after its name. Their defaults are SUPPRESS: a subcommand
    that is not given one leaves the value given before it (``wan-daemon --config x status``) in place."""
    o = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    o.add_argument(
        "--config",
        help="YAML config file (default: $WAN_DAEMON_CONFIG, else /etc/wan-daemon/config.yaml, else "
        "$XDG_CONFIG_HOME/wan-daemon/config.yaml; WAN_DAEMON_<SECTION>__<KEY> variables override it)",
    )
    o.add_argument("--inbox", help="inbox folder (overrides the config)")
    o.add_argument("--state", help="state folder (default <inbox>/.wan-daemon)")
    o.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="overrides logging.level")
    return o


def build_parser() -> argparse.ArgumentParser:
    from daemon import __version__

    # tasks and analysis read their own --outbox: "from the outbox instead of the history" (ops.outbox_rows).
    readers = argparse.ArgumentParser(add_help=False, parents=[_options()])
    readers.add_argument(
        "--outbox",
        nargs="?",
        const="",
        default=argparse.SUPPRESS,
        help="list the jobs finished in the outbox (every daemon's, from sidecars and failure records) instead "
        "of this host's history; a DIR names the outbox",
    )
    common = _options()
    common.add_argument("--outbox", default=argparse.SUPPRESS, help="outbox folder (overrides the config)")
    p = argparse.ArgumentParser(
        prog="wan-daemon",
        description=__doc__.split("\n")[0].replace("`", ""),
        epilog="exit codes:\n" + __doc__.split("Exit codes:\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"wan-daemon {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], text: str, parents=(common,), with_json=False):
        c = sub.add_parser(name, parents=list(parents), help=text, description=text)
        if with_json:
            c.add_argument("--json", action="store_true", help="one JSON document on stdout")
        c.set_defaults(func=func)
        return c

    r = command("run", cmd_run, "run the daemon")
    r.add_argument("--until-idle", action="store_true", help="exit once the inbox and the queue are empty")

    v = command("validate", _checked("validate"), "check job files; exit 0 when all are valid", with_json=True)
    v.add_argument("files", nargs="+")

    s = command(
        "submit", _checked("submit"), "check job files, drop them into the inbox, print their job ids", with_json=True
    )
    s.add_argument("files", nargs="+")
    s.add_argument("--no-validate", action="store_true", help="skip the checks (ids held or published still refused)")

    st = command("status", cmd_status, "what the daemon is doing (its health file), or one job's story", with_json=True)
    st.add_argument("job_id", nargs="?", metavar="JOB_ID", help="a job id: where it is and what happened to it")
    command("queue", cmd_queue, "every job the daemons on this inbox hold, in the order they will run", with_json=True)

    ch = command("check-health", cmd_check_health, "exit 0 when the health file is fresh, else 1", with_json=True)
    ch.add_argument("--max-age", type=float, default=30.0, help="seconds (default 30)")

    pa = command("pause", _ops("pause"), "every daemon on this inbox starts nothing new until resume", with_json=True)
    mode = pa.add_mutually_exclusive_group()
    mode.add_argument("--drain", action="store_true", help="running jobs finish (the default)")
    mode.add_argument("--now", action="store_true", help="running jobs go back to the queue, attempt given back")
    pa.add_argument("--free-vram", action="store_true", help="stop the workers once idle: the GPUs are freed")
    pa.add_argument("--reason", help="shown by status, queue and the logs")
    command("resume", _ops("resume"), "lift the pause", with_json=True)

    pr = command("priority", _ops("priority"), "set a queued job's priority (higher runs first)", with_json=True)
    pr.add_argument("job_id", metavar="JOB_ID")
    pr.add_argument("priority", type=int, metavar="N", help="-1000 ... 1000")

    ca = command(
        "cancel",
        _ops("cancel"),
        "cancel queued or running jobs: by id, by file, model, or all queued",
        with_json=True,
    )
    ca.add_argument("ids", nargs="*", metavar="JOB_ID")
    ca.add_argument("--file", metavar="NAME", help="the jobs of this job file (its name as dropped)")
    ca.add_argument("--model", metavar="M", help="the jobs of this model")
    ca.add_argument("--all-queued", action="store_true", help="every queued or waiting job (not the running ones)")
    ca.add_argument("--dry-run", action="store_true", help="list what would be cancelled, write nothing")

    rt = command("retry", _checked("retry"), "put failed or cancelled jobs back in the queue", with_json=True)
    rt.add_argument("ids", nargs="*", metavar="JOB_ID")
    rt.add_argument("--failed-since", type=_duration, metavar="DURATION", help="e.g. 30m, 1h, 2d")
    rt.add_argument("--category", metavar="C", help="only failures of this error_category")
    rt.add_argument("--dry-run", action="store_true", help="list what would be retried, write nothing")

    m = command("models", cmd_models, "model management")
    msub = m.add_subparsers(dest="models_cmd", required=True, metavar="VERB")
    msub.add_parser("build-tiny", parents=[common], help="build the tiny random-weight test models")
    ml = msub.add_parser(
        "list", parents=[common], help="every registry model and local folder: present or not, size, revision, path"
    )
    ml.add_argument("--json", action="store_true", help="one JSON document on stdout")
    for verb, text in (
        ("download", "download a model's needed files into the Hugging Face cache (resumable)"),
        ("verify", "check every needed file's size and sha256 against the hub (or the manifest)"),
        ("remove", "delete a model from the Hugging Face cache"),
    ):
        mp = msub.add_parser(verb, parents=[common], help=text)
        mp.add_argument("name", help="registry name (wan2.2-ti2v-5b, ...) or a hub repo id")
        if verb != "remove":
            mp.add_argument("--revision")

    tk = command("tasks", _ops("tasks"), "recent jobs from the history database (or the outbox)", (readers,), True)
    tk.add_argument("--last", type=int, default=20)
    tk.add_argument("--status", choices=["waiting_for_model", "queued", "running", "done", "failed"])
    an = command("analysis", _ops("analysis"), "success rate, timings, failures, recommendations", (readers,), True)
    an.add_argument("--hours", type=float, default=24.0)
    command("doctor", _ops("doctor"), "check and explain the environment (exit 1 on a failure)", with_json=True)
    rp = command("report", _ops("report"), "write a static HTML page of the outbox")
    rp.add_argument("--output", "-o", help="default: <outbox>/report.html")
    mo = command("monitor", _ops("monitor"), "live terminal view of the daemons on this inbox")
    mo.add_argument("--interval", type=float, default=1.0)
    mo.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)

    rs = command(
        "resubmit", cmd_resubmit, "render a published video again from its sidecar (as submit)", with_json=True
    )
    rs.add_argument("sidecar", help="outbox/<name>.json")
    rs.add_argument("--id", help="the new job's id and output name (default: <id>-re<unix time>)")
    for c in (s, rs):
        c.add_argument("--force", action="store_true", help="rename ids held or published (<id>-2, ...), not refuse")
        c.add_argument("--wait", action="store_true", help="until every job ended: exit 0 all done, 3 any failed")
        c.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S seconds (exit 1)")

    cf = command("config", cmd_config, "the effective configuration and where each value came from", with_json=True)
    cf.add_argument("action", choices=["show"])
    sc = command("schema", cmd_schema, "print the job-file JSON Schema (jobs/schema.json)")
    sc.add_argument("--output", "-o")
    co = command("completion", cmd_completion, 'print a shell completion script: eval "$(wan-daemon completion bash)"')
    co.add_argument("shell", choices=["bash", "zsh"])
    return p


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends with one ``wan-daemon: ...`` line on stderr and a documented exit
    code (module docstring), never a traceback."""
    from daemon.config import ConfigError
    from daemon.errors import WanDaemonError
    from daemon.runtime.leases import LeaseError

    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, a usage error (argparse printed it)
            sys.stdout.flush()
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone away is seen here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader left (`| head -1`): say nothing more. Python's advice: point stdout at devnull, so that
        # the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE
    except KeyboardInterrupt:
        print("wan-daemon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"wan-daemon: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except LeaseError as exc:
        print(f"wan-daemon: {_one_line(exc)}", file=sys.stderr)
        return EXIT_LEASE
    except (OSError, WanDaemonError) as exc:
        print(f"wan-daemon: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    raise SystemExit(main())
