"""Thousands of jobs at a size CI affords: the work a restart does is bounded by what is missing, not by the
queue (bench/scale.py measures the times at 10,000 and 100,000)."""

from __future__ import annotations

import threading

from conftest import fast_settings, wait_for

from daemon.jobs import JobState
from daemon.runtime.daemon import Daemon

CUE = "daemon.testing:CueBackend"


def batch(first: int, n: int, *, bad: int | None = None) -> str:
    lines = ["jobs:"]
    for i in range(first, first + n):
        frames = 10 if i == bad else 9  # 10 is not 4n+1: that job is rejected
        lines.append(f"  - {{id: j{i}, prompt: 'sleep=600', frames: {frames}}}")
    return "\n".join(lines) + "\n"


def take_in(d: Daemon, inbox, files: dict[str, str], n: int) -> None:
    for name, text in files.items():
        (inbox / name).write_text(text)
    d.watcher.scan()
    deadline_ticks = 0
    while len(d.records) + d.failed < n:
        d.tick()
        deadline_ticks += 1
        assert deadline_ticks < 10_000, "intake did not finish"


def test_a_restart_takes_in_again_only_the_files_whose_jobs_are_not_all_in_the_spool(tmp_path, models_dir):
    settings = fast_settings(tmp_path, models_dir, watch={"settle_seconds": 0.0})
    first = Daemon(settings, backend=CUE)
    first.lease.acquire()
    first.recovery.recover()
    files = {f"b{k}.yaml": batch(k * 500, 500) for k in range(3)}
    files["mixed.yaml"] = batch(1500, 20, bad=1507)
    take_in(first, settings.paths.inbox, files, 1520)
    assert first.book.count(JobState.QUEUED) == 1519 and first.failed == 1
    first.kill_workers()  # no shutdown: as after kill -9, which also lets go of the lease's lock
    first.lease.release()

    second = Daemon(settings, backend=CUE)
    parsed: list[str] = []
    real_process = second.intake.process

    def counting(claimed):
        parsed.append(claimed.name.split(".", 2)[2])
        return real_process(claimed)

    second.intake.process = counting  # type: ignore[method-assign]  # counts the files a restart parses
    second.lease.acquire()
    second.recovery.recover()
    assert second.book.count(JobState.QUEUED) == 1519
    # The three complete batches are not parsed again; the one with a rejected job is (idempotently), and
    # rejects that job again without a second failure record.
    assert parsed == ["mixed.yaml"]
    assert sorted(p.name for p in (settings.paths.outbox / "failed").iterdir()) == ["j1507.json"]


def test_a_long_recovery_reports_progress_and_the_first_job_starts_when_it_ends(tmp_path, models_dir):
    settings = fast_settings(tmp_path, models_dir, watch={"settle_seconds": 0.0})
    first = Daemon(settings, backend=CUE)
    first.lease.acquire()
    first.recovery.recover()
    take_in(first, settings.paths.inbox, {"b.yaml": batch(0, 800)}, 800)
    first.kill_workers()
    first.lease.release()

    seen: list[tuple[int, int]] = []
    second = Daemon(settings, backend=CUE)
    second.recovery.per_record = lambda: seen.append(second.status.recovery or (0, 0))
    thread = threading.Thread(target=second.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: second.book.count(JobState.RUNNING) == 1, 60, what="the first job to start")
        # "recovering n/N" for every record read (the seam runs just before each record is counted)
        assert len(seen) == 800 and seen[1:] == [(n, 800) for n in range(1, 800)]
        assert second.status.recovery is None  # and no more once it is over
    finally:
        second.kill_workers()
        second.request_stop()
        thread.join(60)
