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
