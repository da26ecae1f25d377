"""SIGHUP reloads the configuration: what changes live, what waits for the next worker start, what needs a
restart (and keeps running as it is), a refused config, and a real daemon process reloaded under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import fast_settings, wait_for
from loguru import logger

from daemon.config import ConfigError
from daemon.runtime.reload import kind_of, plan_reload

CUE = "daemon.testing:CueBackend"


@pytest.fixture
def log_lines():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def test_each_setting_has_a_kind():
    assert kind_of("worker.max_attempts") == "live"
    assert kind_of("limits.max_frames") == "live"
    assert kind_of("logging.level") == "live"
    assert kind_of("scheduler.aging_bound_seconds") == "live"
    assert kind_of("worker.max_cached_pipelines") == "worker"
    assert kind_of("paths.inbox") == "restart"
    assert kind_of("instance.lease_grace_seconds") == "restart"
    assert kind_of("watch.mode") == "restart" and kind_of("watch.settle_seconds") == "live"


def test_a_plan_applies_live_changes_and_keeps_restart_only_values_as_they_run(tmp_path):
    old = fast_settings(tmp_path, tmp_path / "models")
    new = fast_settings(
        tmp_path,
        tmp_path / "models",
        paths={"inbox": str(tmp_path / "elsewhere")},
        worker={"max_attempts": 7, "max_cached_pipelines": 1},
        watch={"mode": "polling", "settle_seconds": 2.0},
        instance={"lease_grace_seconds": 999.0},
        limits={"max_frames": 33},
    )
    plan = plan_reload(old, new)
    kinds = {c.key: c.kind for c in plan.changes}
    assert kinds["worker.max_attempts"] == "live" and kinds["limits.max_frames"] == "live"
    assert kinds["worker.max_cached_pipelines"] == "worker"
    assert kinds["paths.inbox"] == kinds["watch.mode"] == kinds["instance.lease_grace_seconds"] == "restart"
    run = plan.applied
    assert run.worker.max_attempts == 7 and run.limits.max_frames == 33 and run.watch.settle_seconds == 2.0
    assert run.worker.max_cached_pipelines == 1
    assert run.paths == old.paths and run.watch.mode == old.watch.mode
    assert run.instance == old.instance
    assert plan_reload(old, old).changes == ()


def test_a_reload_applies_to_a_running_daemon_without_touching_its_job(harness_factory, tmp_path, log_lines):
    h = harness_factory(backend=CUE).start()
    d = h.daemon
    wait_for(d.workers_ready, 60, what="worker")
    h.drop("long.yaml", "prompt: sleep=1.5\n")
    wait_for(lambda: "long" in d.running, 30, what="the job to run")
    worker = next(iter(d.placement.workers.values()))
    pid_before = worker.status.pid
    models = d.settings.paths.models
    changed = fast_settings(
        tmp_path,
        models,
        worker={"max_attempts": 9, "max_cached_pipelines": 1},
        limits={"max_frames": 41},
        watch={"settle_seconds": 0.7, "mode": "polling"},
        paths={"outbox": str(tmp_path / "other-outbox")},
        logging={"level": "INFO"},
    )
    d.reload_settings = lambda: changed
    d.request_reload()
    wait_for(lambda: any(m.startswith("config.reloaded") for m in log_lines), 10, what="the reload")
    assert d.settings.worker.max_attempts == 9 and d.book.settings is d.settings
    assert d.intake.settings.limits.max_frames == 41 and d.placement.settings is d.settings
    assert d.settings.paths.outbox == h.outbox  # a restart-only change: kept as it runs
    assert d.watcher.config.settle_seconds == 0.7 and d.watcher.config.mode == "inotify"  # mode: restart-only
    assert any("key=paths.outbox" in m and "after a restart" in m for m in log_lines)
    assert worker.config.max_cached_pipelines == 1  # for its next start
    side = h.sidecar("long")
    assert side["attempts"] == 1  # the running job was neither interrupted nor restarted
    assert pid_before is not None and worker.status.pid == pid_before

    def refuse():
        raise ConfigError("invalid config /etc/x.yaml:\n  worker.max_attempts: Input should be greater than 0")

    d.reload_settings = refuse
    d.request_reload()
    wait_for(lambda: any(m.startswith("config.reload_refused") for m in log_lines), 10, what="the refusal")
    refused = next(m for m in log_lines if m.startswith("config.reload_refused"))
    assert "\n" not in refused and "worker.max_attempts" in refused
    assert d.settings.worker.max_attempts == 9
    h.drop("after.yaml", "prompt: sleep=0.01\n")
    assert h.sidecar("after")["attempts"] == 1


def test_sighup_reloads_a_daemon_process_under_load_and_loses_nothing(models_dir, tmp_path):
    """The real command line: three tiny-model jobs, a SIGHUP while the first runs (with a changed config),
    another with a broken config; the process keeps running, each job is done once at its first attempt."""
    settings = fast_settings(tmp_path, models_dir)
    doc = json.loads(settings.model_dump_json())
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    log = tmp_path / "daemon.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "NO_COLOR": "1"},
        )
    try:
        inbox = settings.paths.inbox
        wait_for(lambda: "daemon.started" in log.read_text() or "worker.ready" in log.read_text(), 60, what="start")
        for n in range(3):
            (inbox / f".h{n}.tmp").write_text(f"prompt: reload {n}\nsteps: 8\nframes: 9\n")
            os.rename(inbox / f".h{n}.tmp", inbox / f"h{n}.yaml")
        wait_for(lambda: "job.running id=h" in log.read_text(), 60, what="a job to run")
        doc["worker"]["max_attempts"] = 5
        doc["logging"]["level"] = "INFO"
        config.write_text(yaml.safe_dump(doc))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config.reloaded" in log.read_text(), 30, what="the reload")
        config.write_text("worker: {max_attempts: 0}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config.reload_refused" in log.read_text(), 30, what="the refusal")
        outbox = settings.paths.outbox
        wait_for(lambda: all((outbox / f"h{n}.json").exists() for n in range(3)), 180, what="all three jobs")
        assert proc.poll() is None, "SIGHUP stopped the daemon"
        sides = [json.loads((outbox / f"h{n}.json").read_text()) for n in range(3)]
        assert [s["attempts"] for s in sides] == [1, 1, 1]
        assert not (outbox / "failed").exists() or not list((outbox / "failed").iterdir())
        text = log.read_text()
        assert "config.changed key=worker.max_attempts old=3 new=5 applies=now" in text
        assert text.count("worker.spawned") == 1  # the worker was not restarted
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            time.sleep(0.5)
