"""Faults at the edges cost nothing: an unwritable outbox pauses the daemon (a read-only remount where the test can
mount, and the same fault injected behind daemon.fsutil where it cannot); a job file still being written is not
taken, and one that changes after its claim is never run on a stale copy; a vanished inbox is named and waited for.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DaemonHarness, fast_settings, wait_for
from factories import make_record

from daemon.config import WatchConfig, load_settings
from daemon.errors import Category, JobError
from daemon.fsutil import folder_problem, injected_faults, probe_write
from daemon.jobs import JobState
from daemon.ops.inventory import StaticInventory
from daemon.policy import decide
from daemon.runtime.autodownload import ModelDownloads
from daemon.runtime.book import JobBook
from daemon.runtime.daemon import Seams
from daemon.runtime.disk import DiskGuard
from daemon.runtime.health import format_status, verdict
from daemon.runtime.notify import SystemdNotifier
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool
from daemon.runtime.status import Status
from daemon.runtime.watch import InboxWatcher

CUE = "daemon.testing:CueBackend"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the guard, the policy and the book, without a daemon ------------------------------------------------


def test_injected_faults_fail_writes_under_their_folder_only(tmp_path):
    ro, ok = tmp_path / "ro", tmp_path / "ok"
    ro.mkdir()
    ok.mkdir()
    with injected_faults() as faults:
        faults.fail(ro, errno.EROFS)
        exc = probe_write(ro)
        assert exc is not None and exc.errno == errno.EROFS
        assert folder_problem(ro).errno == errno.EROFS
        assert probe_write(ok) is None and folder_problem(ok) is None
        faults.heal(ro)
        assert probe_write(ro) is None and folder_problem(ro) is None
    assert folder_problem(tmp_path / "gone").errno == errno.ENOENT


@pytest.mark.parametrize("err,kind", [(errno.EROFS, "unwritable"), (errno.EACCES, "unwritable")])
def test_an_unwritable_folder_pauses_and_a_write_that_works_again_resumes(tmp_path, err, kind):
    clock = Clock()
    guard = DiskGuard([tmp_path], min_free_mb=0, clock=clock)
    assert not guard.paused()
    with injected_faults() as faults:
        faults.fail(tmp_path, err)
        clock.now += 1
        assert guard.paused() and guard.kind == kind and str(tmp_path) in guard.reason
        faults.heal()
        clock.now += 1
        assert not guard.paused() and guard.pause is None


def test_a_missing_folder_pauses_with_its_name_and_resumes_when_it_is_back(tmp_path):
    clock = Clock()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    guard = DiskGuard([tmp_path], min_free_mb=0, clock=clock, present=[inbox])
    os.rename(inbox, tmp_path / "elsewhere")
    clock.now += 1
    assert guard.paused() and guard.kind == "folder_missing" and guard.folder_gone(inbox)
    assert "folder missing" in guard.reason and str(inbox) in guard.reason
    os.rename(tmp_path / "elsewhere", inbox)
    clock.now += 1
    assert not guard.paused()


def test_a_failure_met_on_an_unwritable_outbox_is_the_folders_not_the_jobs(tmp_path):
    guard = DiskGuard([tmp_path], min_free_mb=0, clock=Clock())
    met = JobError(Category.IO_ERROR, "OSError: [Errno 30] Read-only file system: '.wan-tmp-x.mp4'")
    assert guard.screen(met) is met and guard.pause is None  # the folder is fine: the job's own error
    with injected_faults() as faults:
        faults.fail(tmp_path, errno.EROFS)
        screened = guard.screen(met)
    assert screened.category is Category.UNWRITABLE and guard.kind == "unwritable"
    assert "Read-only file system: '.wan-tmp-x.mp4'" in screened.message  # the cause is kept
    assert guard.screen(screened) is screened  # screened once, reused as it is
    assert guard.screen(JobError(Category.CANCELLED, "by request")).category is Category.CANCELLED
    retry = decide(screened, 50, max_attempts=3, base_seconds=1, cap_seconds=5)
    assert retry.retry and "not counted" in retry.reason


def _book(tmp_path) -> JobBook:
    settings = load_settings(
        None,
        {
            "paths": {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox")},
            "instance": {"id": "me"},
            "worker": {"max_attempts": 3, "retry_base_seconds": 0.0},
        },
    )
    status = Status(settings, clock=lambda: 0.0, notifier=SystemdNotifier(None), inventory=StaticInventory([]))
    return JobBook(
        settings,
        Spool(tmp_path / "spool", "me"),
        Outbox(tmp_path / "outbox", owner="me"),
        status=status,
        history=None,
        disk=DiskGuard([tmp_path / "outbox"], min_free_mb=0, clock=Clock()),
        downloads=ModelDownloads(),
        clock=lambda: 0.0,
        rng=random.Random(0),
        on_change=lambda: None,
        device_of=lambda rec: "cpu",
    )


def test_a_failure_record_that_cannot_be_written_is_written_later_with_its_own_cause(tmp_path):
    book = _book(tmp_path)
    rec = book.spool.transition(make_record("j", state=JobState.QUEUED), JobState.RUNNING, attempts=1)
    book.add(rec)
    cause = JobError(Category.INTERNAL, "a bug met while running the job")
    with injected_faults() as faults:
        faults.fail(tmp_path / "outbox" / "failed", errno.EROFS)  # only the failure records' folder refuses
        with pytest.raises(OSError):
            book.fail_or_retry(rec, cause)
        assert book.records["j"].state is JobState.RUNNING  # nothing was decided on disk
        book.reconcile(set())  # still refused: kept, not lost
    assert book.records["j"].state is JobState.RUNNING
    book.reconcile(set())
    record = json.loads((tmp_path / "outbox" / "failed" / "j.json").read_text())
    assert record["error_category"] == "internal" and record["message"] == cause.message
    assert [e["error_category"] for e in record["errors"]] == ["internal"]


def test_a_job_sent_back_by_a_pause_gets_its_attempt_back(tmp_path):
    book = _book(tmp_path)
    rec = book.spool.transition(make_record("j", state=JobState.QUEUED), JobState.RUNNING, attempts=3)
    book.add(rec)
    with injected_faults() as faults:
        faults.fail(tmp_path / "outbox", errno.EROFS)
        book.fail_or_retry(rec, JobError(Category.IO_ERROR, "OSError: [Errno 30] Read-only file system"))
    again = book.records["j"]
    assert again.state is JobState.QUEUED and again.attempts == 2  # its 3rd attempt was the folders' fault
    assert again.last_error["error_category"] == "unwritable" and book.disk.kind == "unwritable"
    assert "Read-only file system" in again.last_error["message"]
    assert not (tmp_path / "outbox" / "failed" / "j.json").exists()


# ---- the daemon, with the stand-in backend --------------------------------------------------------------


@pytest.fixture
def seam_harness(tmp_path, models_dir):
    made: list[DaemonHarness] = []

    def make(seams: Seams, **overrides) -> DaemonHarness:
        h = DaemonHarness(tmp_path, fast_settings(tmp_path, models_dir, **overrides), CUE, seams=seams)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def health(h) -> dict:
    return json.loads(h.settings.health_path.read_text())


def read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_an_unwritable_outbox_pauses_says_why_and_the_job_finishes_once_writable(seam_harness, tmp_path):
    """The fault injected behind daemon.fsutil the moment the job is first published: the link is refused, and so
    is the clean-up of its temp (as a read-only remount would)."""
    with injected_faults() as faults:
        outbox = tmp_path / "outbox"
        hit = []

        def refuse_once(rec, video_tmp):
            if not hit:
                hit.append(rec.id)
                faults.fail(outbox, errno.EROFS)

        metrics = tmp_path / "metrics" / "wan-daemon.prom"
        metrics.parent.mkdir()
        h = seam_harness(
            Seams(before_publish=refuse_once), metrics={"textfile": str(metrics), "interval_seconds": 0.1}
        ).start()
        h.drop("ro.yaml", "prompt: sleep=0.05\n")
        wait_for(lambda: (health(h).get("pause") or {}).get("kind") == "unwritable", 30, what="paused: unwritable")
        doc = health(h)
        assert doc["pause"]["folder"] == str(outbox) and "refuses writes" in doc["paused"]
        assert "PAUSED (unwritable)" in format_status(doc)
        answer = verdict(doc, max_age=30, now=time.time(), health_path=h.settings.health_path, folders=[])
        assert answer.startswith("unhealthy: paused") and str(outbox) in answer
        wait_for(lambda: 'kind="unwritable"} 1' in read(metrics), 10, what="the pause in the metrics")
        assert "\nwan_daemon_paused{" in read(metrics)
        rec = h.daemon.records["ro"]
        assert rec.state is JobState.QUEUED and rec.attempts == 0  # back in the queue, its attempt given back
        assert rec.last_error["error_category"] == "unwritable"
        # The cause (the link of ro.mp4 refused), not the clean-up's own error, nor "could not be recorded".
        assert (
            f"the job met: io_error: OSError: [Errno 30] Read-only file system: '{outbox / 'ro.mp4'}'"
            in (rec.last_error["message"])
        )
        assert not list((outbox / "failed").iterdir()) and h.daemon.failed == 0
        faults.heal()
        side = h.sidecar("ro")
    assert side["attempts"] == 1 and hit == ["ro"]
    wait_for(lambda: health(h)["paused"] is None, 10, what="resumed")
    h.idle()
    assert not [p.name for p in outbox.iterdir() if p.name.startswith(".wan-tmp")]
    assert h.daemon.failed == 0 and not list((outbox / "failed").iterdir())


@pytest.fixture
def read_only_outbox(tmp_path):
    """The outbox bind-mounted onto itself, so that it can be remounted read-only and back (needs root)."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    res = subprocess.run(["mount", "--bind", str(outbox), str(outbox)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root and mount): {res.stderr.strip()}")

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode},bind", str(outbox)], check=True, capture_output=True)

    try:
        remount("ro")
        remount("rw")
    except subprocess.CalledProcessError as exc:
        subprocess.run(["umount", "-l", str(outbox)], check=False)
        pytest.skip(f"cannot remount a bind mount read-only here: {exc.stderr.strip()}")
    yield remount
    subprocess.run(["umount", "-l", str(outbox)], check=False)


@pytest.mark.parametrize("backend", ["cue", "tiny"])
def test_a_read_only_remount_of_the_outbox_pauses_and_nothing_fails(read_only_outbox, harness_factory, backend):
    """Remounted read-only while the job runs: its worker cannot write the video (the stand-in's write, or the real
    pipeline's ffmpeg encode), the job goes back to the queue, and it is published once the outbox is writable."""
    if backend == "cue":
        h = harness_factory(backend=CUE).start()
        h.drop("rm.yaml", "prompt: sleep=1.5\n")
    else:
        h = harness_factory().start()
        h.drop("rm.yaml", "model: tiny-ti2v-5b\nprompt: remount\nsize: 64x64\nframes: 5\nsteps: 40\n")
    wait_for(lambda: getattr(h.daemon.progress("rm"), "step", 0) >= 1, 120, what="the job running")
    read_only_outbox("ro")
    try:
        wait_for(lambda: (health(h).get("pause") or {}).get("kind") == "unwritable", 60, what="paused")
        wait_for(lambda: h.daemon.records["rm"].state is JobState.QUEUED, 60, what="the job back in the queue")
        assert h.daemon.records["rm"].attempts == 0 and h.daemon.failed == 0
    finally:
        read_only_outbox("rw")
    side = h.sidecar("rm", timeout=120)
    assert side["attempts"] == 1
    h.idle()
    assert h.daemon.failed == 0 and not list((h.outbox / "failed").iterdir())


# ---- only complete files are taken ----------------------------------------------------------------------

PARTS = ("prompt: sleep=0.05 a fox in the sn", "ow at dawn\nsize: 64x", "64\nframes: 5\n")


def write_slowly(path: Path, parts=PARTS, pause: float = 1.0) -> None:
    """A writer that opens the job file in the inbox and writes it in parts, pausing between them."""
    with open(path, "w") as fh:
        for n, part in enumerate(parts):
            if n:
                time.sleep(pause)
            fh.write(part)
            fh.flush()


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_a_file_written_slowly_in_place_runs_complete(harness_factory, mode):
    watch = {"mode": mode, "rescan_interval_seconds": 60.0}
    if mode == "polling":
        watch["poll_settle_seconds"] = 2.5  # above the writer's pauses (the default, 5 s, too)
    h = harness_factory(backend=CUE, watch=watch).start()
    write_slowly(h.inbox / "slow.yaml")
    side = h.sidecar("slow", timeout=60)
    assert side["spec"]["prompt"] == "sleep=0.05 a fox in the snow at dawn"
    assert side["spec"]["size"] == "64x64" and side["spec"]["frames"] == 5
    assert h.daemon.failed == 0


def test_a_claimed_file_rewritten_before_its_job_starts_is_not_run(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("busy.yaml", "prompt: sleep=1.5\n")
    wait_for(lambda: getattr(h.daemon.progress("busy"), "step", 0) >= 1, 30, what="the worker busy")
    h.drop("late.yaml", "prompt: sleep=0.05 first words\n")
    wait_for(lambda: getattr(h.daemon.records.get("late"), "state", None) is JobState.QUEUED, 30, what="queued")
    claimed = next(p for p in h.daemon.spool.files.iterdir() if p.name.endswith(".late.yaml"))
    with open(claimed, "a") as fh:  # the writer that still held the file when it was claimed writes on
        fh.write("frames: 9\n")
    record = h.failure("late")
    assert record["error_category"] == "invalid_spec" and "changed after it was claimed" in record["message"]
    assert "rename" in record["message"]
    assert h.sidecar("busy")["status"] == "done"
    h.idle()
    assert not (h.outbox / "late.json").exists()


# ---- a vanished inbox -----------------------------------------------------------------------------------


def test_an_inbox_deleted_and_made_again_is_watched_again(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    w = InboxWatcher(inbox, WatchConfig(mode="inotify", rescan_interval_seconds=600), clock=time.monotonic)
    w.start()
    try:
        w.scan()
        inbox.rmdir()
        w.scan()
        assert w.missing
        inbox.mkdir()  # another folder under the same name (a share mounted again)
        w.scan()
        assert not w.missing
        (inbox / ".a.tmp").write_text("prompt: a\n")
        os.rename(inbox / ".a.tmp", inbox / "a.yaml")
        ready = wait_for(lambda: w.wait_for_hint(0.05) or w.ready_files(), 5, what="an event from the new folder")
        assert ready == [inbox / "a.yaml"]
    finally:
        w.stop()


def test_a_vanished_inbox_pauses_says_so_and_resumes_with_nothing_failed(harness_factory, tmp_path):
    fast_lease = {"heartbeat_seconds": 0.1, "lease_grace_seconds": 1.0, "takeover_check_seconds": 0.1}
    h = harness_factory(backend=CUE, instance=fast_lease, watch={"rescan_interval_seconds": 60.0}).start()
    h.drop("running.yaml", "prompt: sleep=1.5\n")
    h.drop("waiting.yaml", "prompt: sleep=0.05\n")
    wait_for(lambda: getattr(h.daemon.progress("running"), "step", 0) >= 1, 30, what="a job running")
    inbox, away = h.inbox, tmp_path / "unmounted"
    os.rename(inbox, away)  # the share goes away (the state folder, inside it, with it)
    wait_for(lambda: h.daemon.disk.kind == "folder_missing", 10, what="paused: folder missing")
    assert h.daemon.disk.folder_gone(inbox) and str(inbox) in h.daemon.status.status_line()
    inbox.mkdir()  # the bare mount point
    wait_for(lambda: not h.daemon.running, 30, what="the running job to finish (its DONE cannot be written)")
    time.sleep(1.5)  # heartbeats, checks and ticks against the bare mount point (well over the lease grace)
    assert not list(inbox.iterdir()), "nothing may be built on a bare mount point"
    assert h.daemon.disk.kind == "folder_missing" and not h.daemon.heartbeat.lost
    inbox.rmdir()
    os.rename(away, inbox)  # mounted again
    assert h.sidecar("running")["attempts"] == 1
    assert h.sidecar("waiting")["attempts"] == 1
    h.drop("after.yaml", "prompt: sleep=0.05\n")
    assert h.sidecar("after")["status"] == "done"
    h.idle()
    assert health(h)["paused"] is None and h.daemon.failed == 0
    assert not list((h.outbox / "failed").iterdir())


def test_a_cancel_asked_while_the_outbox_is_unwritable_is_applied_once_it_is_writable(seam_harness, tmp_path):
    """The cancel request is forgotten only once the cancellation is recorded: while the failure record cannot
    be written the request stays, and the job is cancelled (never run) once the outbox takes writes again."""
    with injected_faults() as faults:
        outbox = tmp_path / "outbox"
        h = seam_harness(Seams()).start()
        h.drop("busy.yaml", "prompt: sleep=2.0\n")
        wait_for(lambda: getattr(h.daemon.progress("busy"), "step", 0) >= 1, 30, what="the worker busy")
        h.drop("doomed.yaml", "prompt: sleep=0.01\n")
        wait_for(lambda: getattr(h.daemon.records.get("doomed"), "state", None) is JobState.QUEUED, 30, what="queued")
        faults.fail(outbox / "failed", errno.EROFS)  # where the cancellation's record goes
        (h.settings.paths.state / "cancel").mkdir(exist_ok=True)
        (h.settings.paths.state / "cancel" / "doomed").write_text("")
        time.sleep(1.0)  # rounds in which the record cannot be written
        assert (h.settings.paths.state / "cancel" / "doomed").exists()
        faults.heal()
        record = h.failure("doomed")
    assert record["error_category"] == "cancelled"
    assert h.sidecar("busy")["status"] == "done"
    h.idle()
    assert not (outbox / "doomed.mp4").exists() and not (h.settings.paths.state / "cancel" / "doomed").exists()
