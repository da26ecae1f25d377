"""Nothing lost, nothing done twice: restarts recover from the spool alone, kill -9 included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import fast_settings, spool_root, wait_for

from daemon.jobs import JobState
from daemon.runtime.daemon import Daemon


def queued_job(root: Path, models_dir: Path, text: str, name: str = "job.yaml"):
    """Take a job in with the real intake, as a daemon would, then drop the daemon without a shutdown."""
    settings = fast_settings(root, models_dir)
    d = Daemon(settings)
    (settings.paths.inbox / name).write_text(text)
    d.claims.take_in(d.spool.claim(settings.paths.inbox / name))
    return d, settings


def test_claimed_but_never_taken_in_file_is_run_after_a_restart(harness_factory, tmp_path, models_dir):
    settings = fast_settings(tmp_path, models_dir)
    d = Daemon(settings)
    (settings.paths.inbox / "c.yaml").write_text("prompt: claimed then crash\nsteps: 2\n")
    d.spool.claim(settings.paths.inbox / "c.yaml")  # crash right after the claim rename
    h = harness_factory().start()
    assert h.sidecar("c")["attempts"] == 1


def test_job_running_when_the_daemon_died_is_queued_again_and_completes(harness_factory, tmp_path, models_dir):
    d, _ = queued_job(tmp_path, models_dir, "prompt: interrupted\nsteps: 2\n")
    rec = d.records["job"]
    d.spool.transition(rec, JobState.RUNNING, attempts=1, started_at=time.time())
    h = harness_factory().start()
    side = h.sidecar("job")
    assert side["attempts"] == 2
    assert side["job_token"] == rec.token


def test_job_published_just_before_a_crash_is_marked_done_not_run_again(harness_factory, tmp_path, models_dir):
    d, settings = queued_job(tmp_path, models_dir, "prompt: published\nsteps: 2\n")
    rec = d.spool.transition(d.records["job"], JobState.RUNNING, attempts=1, started_at=time.time())
    video_tmp = d.outbox.temp_video_path("job")
    video_tmp.write_bytes(b"the video")
    d.outbox.publish_result("job", video_tmp, {"id": "job", "job_token": rec.token, "status": "done"})
    # ... crash before the DONE transition was persisted.
    h = harness_factory().start()
    wait_for(lambda: not list((spool_root(settings) / "files").iterdir()), 30, what="source released")
    h.idle()
    assert h.daemon.done == 0, "the job was run a second time"
    assert (settings.paths.outbox / "job.mp4").read_bytes() == b"the video"
    assert json.loads((settings.paths.outbox / "job.json").read_text())["job_token"] == rec.token
    assert not (spool_root(settings) / "jobs" / "job").exists()


def test_job_that_kills_its_worker_every_time_fails_after_max_attempts(harness_factory, tmp_path, models_dir):
    d, _ = queued_job(tmp_path, models_dir, "prompt: poison\nsteps: 2\n")
    rec = d.records["job"]
    for attempt in (1, 2):  # two earlier attempts died with their daemon
        rec = d.spool.transition(rec, JobState.RUNNING, attempts=attempt)
        if attempt == 1:
            rec = d.spool.transition(rec, JobState.QUEUED)
    h = harness_factory(worker={"max_attempts": 2}).start()
    record = h.failure("job")
    assert record["error_category"] == "worker_crashed"
    assert record["attempts"] == 2 and "gave up after 2 attempts" in record["decision"]
    assert not list(h.outbox.glob("job.mp4"))


def test_stale_temp_files_from_a_crash_are_removed_at_start(harness_factory, tmp_path, models_dir):
    h = harness_factory()
    h.outbox.mkdir(parents=True, exist_ok=True)
    mine = h.outbox / f".wan-tmp-{h.settings.owner}~x-1234.mp4"
    theirs = h.outbox / ".wan-tmp-otherdaemon~y-5678.mp4"  # another live daemon on a shared outbox
    abandoned = h.outbox / ".wan-tmp-gone~z-9999.mp4"
    for p in (mine, theirs, abandoned):
        p.write_bytes(b"half a video")
    old = time.time() - 2 * 86400
    os.utime(abandoned, (old, old))
    h.start()
    assert not mine.exists() and not abandoned.exists()
    assert theirs.exists(), "another daemon's temp file is in use: never delete it"


def wait_denoising(settings, job_id: str) -> dict:
    """Wait, through the health file alone, until job_id is at least two steps into denoising."""

    def denoising():
        try:
            h = json.loads(settings.health_path.read_text())
        except (OSError, ValueError):
            return None
        r = h.get("running") or {}
        return h if r.get("id") == job_id and r.get("step", 0) >= 2 else None

    return wait_for(denoising, 90, interval=0.1, what=f"{job_id} to be denoising")


def _start_daemon_process(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_kill_9_of_the_daemon_mid_job_loses_nothing_and_publishes_once(tmp_path, models_dir):
    settings = fast_settings(tmp_path, models_dir)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    inbox, outbox = settings.paths.inbox, settings.paths.outbox
    inbox.mkdir(parents=True)
    proc = _start_daemon_process(config)
    worker_pid = None
    try:
        (inbox / ".k.tmp").write_text("prompt: survive kill -9\nsteps: 120\nseed: 5\n")
        os.rename(inbox / ".k.tmp", inbox / "k.yaml")

        health = wait_denoising(settings, "k")
        worker_pid = health["device"]["pid"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The worker notices its daemon is gone and exits instead of holding the device.
        wait_for(lambda: not _alive(worker_pid), 10, what="orphaned worker to exit")
        # nothing published (the worker may have left its hidden temp file, which the next start removes)
        assert not [p for p in outbox.glob("*.mp4") if not p.name.startswith(".")]
        assert list((spool_root(settings) / "files").iterdir()), "the job file must still be spooled"
    finally:
        if proc.poll() is None:
            proc.kill()
    proc2 = _start_daemon_process(config, "--until-idle")
    out, _ = proc2.communicate(timeout=180)
    assert proc2.returncode == 0, out
    side = json.loads((outbox / "k.json").read_text())
    assert side["attempts"] == 2 and side["parameters"]["seed"] == 5
    assert [p.name for p in outbox.glob("*.mp4")] == ["k.mp4"]
    assert f"done    k: {outbox / 'k.mp4'}" in out
    assert not list((spool_root(settings) / "files").iterdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_drains_returns_the_running_job_to_the_queue_and_exits(tmp_path, models_dir):
    settings = fast_settings(tmp_path, models_dir)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    settings.paths.inbox.mkdir(parents=True)
    proc = _start_daemon_process(config)
    try:
        (settings.paths.inbox / "t.yaml").write_text("prompt: stop me politely\nsteps: 150\n")

        worker_pid = wait_denoising(settings, "t")["device"]["pid"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert time.monotonic() - t0 < 15
    assert not _alive(worker_pid)
    assert "interrupted by shutdown" in out
    health = json.loads(settings.health_path.read_text())
    assert health["state"] == "stopped"
    record = json.loads((spool_root(settings) / "jobs" / "t" / "job.json").read_text())
    assert record["state"] == "queued" and record["attempts"] == 0
    assert not list(settings.paths.outbox.glob("*.mp4"))
    assert not list(settings.paths.outbox.glob(".wan-tmp*"))
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--until-idle", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((settings.paths.outbox / "t.json").read_text())["attempts"] == 1
