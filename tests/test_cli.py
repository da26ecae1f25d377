"""The command line: validate, submit, status, check-health, schema, models; exit codes as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.cli import EXIT_CONFIG, EXIT_FAIL, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from daemon.runtime.health import HealthWriter

ROOT = Path(__file__).resolve().parent.parent


def test_validate_exit_codes_and_messages(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("prompt: fine\nmodel: wan2.2-ti2v-5b\nsize: 1280x704\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: x\nframes: 10\n")
    badsize = tmp_path / "badsize.yaml"
    badsize.write_text("prompt: x\nmodel: wan2.2-ti2v-5b\nsize: 1280x720\n")
    assert main(["validate", str(good)]) == EXIT_OK
    assert main(["validate", str(good), str(bad), str(badsize)]) == EXIT_INVALID
    out = capsys.readouterr().out
    assert f"ok      {good}" in out and f"INVALID {bad}" in out and f"INVALID {badsize}" in out
    assert "4n+1" in out and "multiple of 32" in out


def test_examples_shipped_in_jobs_are_valid(tmp_path, capsys):
    """Valid as the daemon would take them in: the i2v example's image (relative to an input root, by default
    the inbox) must exist, as it must for the daemon."""
    from PIL import Image

    inbox = tmp_path / "inbox"
    examples = [str(p) for p in sorted((ROOT / "jobs" / "examples").glob("*.yaml"))]
    assert main(["validate", "--inbox", str(inbox), *examples]) == EXIT_INVALID
    assert "inputs/astronaut.png" in capsys.readouterr().out
    (inbox / "inputs").mkdir(parents=True)
    Image.new("RGB", (128, 72), (20, 20, 30)).save(inbox / "inputs" / "astronaut.png")
    assert main(["validate", "--inbox", str(inbox), *examples]) == EXIT_OK


def test_the_command_modules_return_the_documented_exit_codes():
    from daemon.hub import commands as hub_commands
    from daemon.ops import commands as ops_commands

    assert (hub_commands.EXIT_OK, hub_commands.EXIT_FAIL, hub_commands.EXIT_USAGE) == (EXIT_OK, EXIT_FAIL, EXIT_USAGE)
    assert (ops_commands.EXIT_OK, ops_commands.EXIT_FAIL) == (EXIT_OK, EXIT_FAIL)


def test_submit_validates_then_copies_atomically(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    src = tmp_path / "a.yaml"
    src.write_text("prompt: hello\n")
    assert main(["submit", "--inbox", str(inbox), str(src)]) == EXIT_OK
    assert (inbox / "a.yaml").read_text() == "prompt: hello\n"
    assert [p.name for p in inbox.iterdir()] == ["a.yaml"]  # no temp left behind
    assert main(["submit", "--inbox", str(inbox), str(src)]) == EXIT_FAIL  # never overwrites
    bad = tmp_path / "b.yaml"
    bad.write_text("prompt: x\nwhat: 1\n")
    assert main(["submit", "--inbox", str(inbox), str(bad)]) == EXIT_INVALID
    assert not (inbox / "b.yaml").exists()


def test_status_and_check_health(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    args = ["--inbox", str(inbox)]
    assert main(["check-health", *args]) == EXIT_FAIL  # missing
    assert main(["status", *args]) == EXIT_FAIL
    from daemon.config import load_settings

    health = load_settings(None, {"paths": {"inbox": str(inbox)}}).health_path
    writer = HealthWriter(health, interval=1)
    writer.maybe_write({"state": "idle", "queue_depth": 2, "version": "x", "running": None})
    capsys.readouterr()
    assert main(["check-health", *args, "--max-age", "30"]) == EXIT_OK
    assert "healthy: idle" in capsys.readouterr().out
    assert main(["status", *args]) == EXIT_OK
    assert "state: idle" in capsys.readouterr().out
    assert main(["status", *args, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["queue_depth"] == 2
    old = time.time() - 120
    os.utime(health, (old, old))
    data = json.loads(health.read_text())
    data["updated_at"] = old
    health.write_text(json.dumps(data))
    assert main(["check-health", *args, "--max-age", "30"]) == EXIT_FAIL
    assert "old" in capsys.readouterr().out


def test_bad_config_exits_with_the_config_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("watch: {mode: carrier-pigeon}\n")
    assert main(["status", "--config", str(cfg)]) == EXIT_CONFIG
    assert "watch.mode" in capsys.readouterr().err


def test_default_config_file_matches_the_built_in_defaults():
    from daemon.config import SettingsFile, load_settings, resolve
    from daemon.config_sources import local_state_dir

    assert load_settings(ROOT / "configs" / "default.yaml") == resolve(SettingsFile(), local_state_dir(os.environ))
    load_settings(ROOT / "configs" / "production.yaml")


def test_models_list_shows_tiny_models_and_missing_real_ones(models_dir, capsys, monkeypatch):
    cfg = models_dir.parent / "models-config.yaml"
    cfg.write_text(f"paths: {{models: {models_dir}}}\n")
    assert main(["models", "list", "--config", str(cfg)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "tiny-ti2v-5b" in out and str(models_dir / "tiny-ti2v-5b") in out
    assert "wan2.2-t2v-a14b" in out and "absent   (wan-daemon models download wan2.2-t2v-a14b)" in out


def test_models_list_json_says_the_same_as_the_table(models_dir, capsys):
    cfg = models_dir.parent / "models-config.yaml"
    cfg.write_text(f"paths: {{models: {models_dir}}}\n")
    assert main(["models", "list", "--json", "--config", str(cfg)]) == EXIT_OK
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    tiny = rows["tiny-ti2v-5b"]
    assert (tiny["kind"], tiny["tiny"], tiny["present"], tiny["path"]) == (
        "registry",
        True,
        True,
        str(models_dir / "tiny-ti2v-5b"),
    )
    real = rows["wan2.2-t2v-a14b"]
    assert real["present"] is False and real["repo_id"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers" and real["path"] is None
    assert main(["models", "list", "--config", str(cfg)]) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in table) == sorted(rows)


@pytest.mark.parametrize("cmd", [["--help"], ["run", "--help"], ["models", "build-tiny", "--help"]])
def test_console_script_help(cmd):
    exe = Path(sys.executable).parent / "wan-daemon"
    res = subprocess.run([str(exe), *cmd], capture_output=True, text=True)
    assert res.returncode == 0 and "usage: wan-daemon" in res.stdout


def test_run_until_idle_with_nothing_to_do_says_so(tmp_path, models_dir):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon",
            "run",
            "--until-idle",
            "--inbox",
            str(tmp_path / "in"),
            "--outbox",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "nothing to do" in res.stdout


def test_run_until_idle_gives_up_when_the_worker_cannot_start_and_keeps_the_job(tmp_path, models_dir):
    """device: cuda on a host without CUDA: a clear error and exit 1, and the job stays spooled."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"paths: {{inbox: {tmp_path / 'in'}, outbox: {tmp_path / 'out'}, models: {models_dir}}}\n"
        "worker: {device: cuda}\nmodels: {default: tiny-ti2v-5b}\n"
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "j.yaml").write_text("prompt: waiting for a GPU\n")
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--until-idle", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == EXIT_FAIL, res.stdout + res.stderr
    assert "no CUDA device" in res.stderr
    spooled = list((tmp_path / "in" / ".wan-daemon" / "owners").glob("*/jobs/*"))
    assert [p.name for p in spooled] == ["j"]
    assert not list((tmp_path / "out").glob("*.mp4"))


# ---- conventions shared by every command (issue 15) --------------------------------------------------------


def test_version(capsys):
    from daemon import __version__

    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"wan-daemon {__version__}"


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    paths = {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")}
    cfg.write_text(json.dumps({"paths": paths, "models": {"default": "tiny-ti2v-5b"}}))
    return cfg


def test_common_options_go_before_or_after_any_subcommand(tmp_path):
    from daemon.cli import build_parser

    parser = build_parser()
    given = ["--config", "c.yaml", "--inbox", "i", "--state", "s", "--outbox", "o", "--log-level", "DEBUG"]
    commands = [
        ["status"],
        ["schema"],
        ["models", "list"],
        ["models", "verify", "x"],
        ["queue"],
        ["pause"],
        ["retry", "x"],
        ["cancel", "x"],
        ["completion", "bash"],
        ["run"],
    ]
    for cmd in commands:
        for argv in ([*given, *cmd], [*cmd, *given], [*cmd[:1], *given, *cmd[1:]]):
            args = parser.parse_args(argv)
            seen = (args.config, args.inbox, args.state, args.outbox, args.log_level)
            assert seen == ("c.yaml", "i", "s", "o", "DEBUG"), argv
    # Given on both sides: the subcommand's wins; given before only: not reset by the subcommand's parser.
    assert parser.parse_args(["--inbox", "a", "status", "--inbox", "b"]).inbox == "b"
    assert not hasattr(parser.parse_args(["status"]), "inbox")
    assert parser.parse_args(["--outbox", "o", "tasks"]).outbox == "o"
    assert parser.parse_args(["tasks", "--outbox"]).outbox == ""  # tasks' own flag: read the outbox


def test_options_before_the_subcommand_reach_it(tmp_path, capsys):
    inbox = tmp_path / "in"
    assert main(["--inbox", str(inbox), "pause"]) == EXIT_OK
    assert (inbox / ".wan-daemon" / "control" / "pause.json").exists()
    capsys.readouterr()
    assert main(["--config", str(_config(tmp_path)), "--inbox", str(inbox), "resume", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["resumed"] is True


def test_every_json_output_parses(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path)
    good = tmp_path / "g.yaml"
    good.write_text("prompt: fine\n")
    commands = [
        ["validate", str(good)],
        ["check-health"],
        ["pause"],
        ["resume"],
        ["cancel", "--all-queued", "--dry-run"],
        ["cancel", "nobody"],
        ["retry", "--failed-since", "1h", "--dry-run"],
        ["submit", str(good)],
        ["config", "show"],
        ["status"],
    ]
    from daemon.runtime.health import HealthWriter

    HealthWriter(load_settings_for(cfg).health_path, interval=1).maybe_write({"state": "idle", "running": None})
    for argv in commands:
        capsys.readouterr()
        code = main([*argv, "--json", "--config", str(cfg)])
        out = capsys.readouterr().out
        assert code in (EXIT_OK, EXIT_FAIL), argv
        assert isinstance(json.loads(out), dict | list), argv  # one document, nothing else on stdout


def load_settings_for(cfg: Path):
    from daemon.config import load_settings

    return load_settings(cfg)


def test_queue_and_status_of_a_job_go_to_their_views(tmp_path, capsys, monkeypatch):
    """`queue` and `status JOB_ID` are daemon.ops.queue_view's and .job_story's, called with the settings."""
    import types

    seen = []
    for module, name in (("daemon.ops.queue_view", "queue_command"), ("daemon.ops.job_story", "job_status_command")):
        fake = types.ModuleType(module)
        setattr(fake, name, lambda args, settings, name=name: seen.append((name, args, settings)) or 0)
        monkeypatch.setitem(sys.modules, module, fake)
    cfg = _config(tmp_path)
    assert main(["queue", "--json", "--config", str(cfg)]) == EXIT_OK
    assert main(["status", "j1", "--config", str(cfg)]) == EXIT_OK
    assert [s[0] for s in seen] == ["queue_command", "job_status_command"]
    assert seen[0][1].json and seen[1][1].job_id == "j1" and not seen[1][1].json
    assert seen[0][2].paths.inbox == tmp_path / "in"


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("wan-daemon: "), lines
    return lines[0]


def test_errors_end_with_one_line_and_their_exit_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("watch: {mode: carrier-pigeon}\nworker: {max_attempts: -1}\n")
    assert main(["status", "--config", str(cfg)]) == EXIT_CONFIG
    assert "watch.mode" in _one_error_line(capsys)
    assert main(["schema", "--config", str(tmp_path / "nowhere.yaml")]) in (EXIT_OK, EXIT_CONFIG)
    capsys.readouterr()
    assert main(["resubmit", str(tmp_path / "missing.json"), "--config", str(_config(tmp_path))]) == EXIT_FAIL
    line = _one_error_line(capsys)
    assert "missing.json" in line and "No such file" in line
    assert main(["nonsense"]) == EXIT_USAGE


def test_a_held_lease_is_one_line_and_exit_5(tmp_path, capsys, monkeypatch):
    import fcntl
    import signal

    from daemon import logs
    from daemon.cli import EXIT_LEASE

    monkeypatch.setattr(logs, "setup", lambda *a, **k: None)  # the test process's loguru stays as it is
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # nor its signal handlers
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text()[:-1] + ', "instance": {"id": "twin"}}')
    owners = tmp_path / "in" / ".wan-daemon" / "owners"
    owners.mkdir(parents=True)
    fd = os.open(owners / ".twin.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the live daemon "twin"
        assert main(["run", "--until-idle", "--config", str(cfg)]) == EXIT_LEASE
    finally:
        os.close(fd)
    assert "twin" in _one_error_line(capsys)


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, capsys, monkeypatch):
    from daemon.cli import EXIT_PIPE

    read, write = os.pipe()
    os.close(read)  # `| head -1` has gone
    pipe = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        assert main(["config", "show", "--config", str(_config(tmp_path))]) == EXIT_PIPE == 141
        pipe.write("x" * 100_000)
        pipe.flush()  # stdout now goes to /dev/null: the interpreter's last flush cannot fail
    finally:
        monkeypatch.undo()
        pipe.close()
    assert "Traceback" not in capsys.readouterr().err


def test_completion_scripts_name_every_subcommand(capsys):
    from daemon.cli import build_parser

    names = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"queue", "pause", "resume", "retry", "priority", "cancel", "completion"} <= names
    for shell in ("bash", "zsh"):
        assert main(["completion", shell]) == EXIT_OK
        script = capsys.readouterr().out
        assert all(name in script for name in names), shell
        assert all(verb in script for verb in ("build-tiny", "download", "verify", "remove"))


def test_validate_json_and_check_health_json(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("prompt: fine\nmodel: wan2.2-ti2v-5b\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: x\nframes: 10\n")
    assert main(["validate", "--json", str(good), str(bad)]) == EXIT_INVALID
    results = json.loads(capsys.readouterr().out)
    assert [(r["file"], r["ok"]) for r in results] == [(str(good), True), (str(bad), False)]
    assert "4n+1" in results[1]["problems"][0]
    assert main(["check-health", "--json", "--inbox", str(tmp_path / "in")]) == EXIT_FAIL
    answer = json.loads(capsys.readouterr().out)
    assert answer["healthy"] is False and "no health file" in answer["message"]
