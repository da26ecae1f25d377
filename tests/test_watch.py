"""The inbox watcher on real OS notifications (inotify) and real polling, in a temp folder."""

from __future__ import annotations

import os
import time

import pytest
from conftest import wait_for

from daemon.config import WatchConfig
from daemon.fsutil import atomic_create
from daemon.runtime.watch import InboxWatcher, is_job_file_name


@pytest.fixture(params=["inotify", "polling"])
def watcher(request, tmp_path):
    w = InboxWatcher(
        tmp_path,
        WatchConfig(
            mode=request.param,
            settle_seconds=0.4,
            poll_settle_seconds=0.4,
            rescan_interval_seconds=60,
            poll_interval_seconds=0.1,
        ),
        clock=time.monotonic,
    )
    w.start()
    w.scan()
    yield w
    w.stop()


@pytest.mark.parametrize(
    "name,ok",
    [
        ("a.yaml", True),
        ("b.YML", True),
        (".a.yaml", False),
        ("a.yaml.tmp", False),
        ("a.yaml.part", False),
        ("a.json", False),
        ("notes.txt", False),
    ],
)
def test_only_visible_yaml_files_are_job_files(name, ok):
    assert is_job_file_name(name) is ok


def test_renamed_in_file_is_ready_at_once(watcher, tmp_path):
    tmp = tmp_path / ".x.yaml.tmp"
    tmp.write_text("prompt: a\n")
    os.rename(tmp, tmp_path / "x.yaml")
    ready = wait_for(watcher.ready_files, 5, interval=0.02, what="renamed file")
    assert ready == [tmp_path / "x.yaml"]


def test_file_written_in_place_waits_until_it_settles(watcher, tmp_path):
    path = tmp_path / "slow.yaml"
    with open(path, "w") as fh:
        start = time.monotonic()
        while time.monotonic() - start < 1.2:
            fh.write("# still writing\n")
            fh.flush()
            assert watcher.ready_files() == [], "taken while still being written"
            time.sleep(0.1)
    done_at = time.monotonic()
    wait_for(watcher.ready_files, 5, interval=0.02, what="settled file")
    assert time.monotonic() - done_at >= 0.3


def test_ignored_names_never_become_ready(watcher, tmp_path):
    for name in (".hidden.yaml", "x.yaml.tmp", "x.yaml.part", "x.txt"):
        (tmp_path / name).write_text("prompt: a\n")
    time.sleep(0.8)
    watcher.scan()
    assert watcher.ready_files() == []
    assert watcher.pending == 0


def test_rescan_finds_files_that_produced_no_event(tmp_path):
    (tmp_path / "before.yaml").write_text("prompt: a\n")
    w = InboxWatcher(tmp_path, WatchConfig(settle_seconds=0.1, rescan_interval_seconds=0.2), clock=time.monotonic)
    # Not started: no events at all. The periodic rescan alone must find the file.
    wait_for(w.ready_files, 5, interval=0.05, what="file found by rescan")


def test_a_file_dropped_right_after_a_claim_is_seen_at_once(tmp_path):
    # A claim renames a job file out of the inbox: an IN_MOVED_FROM that never gets its pair. watchdog
    # held it (and every event behind it) for 0.5 s, so the next file was seen 450 ms late; the rescan
    # is the only other way in, and it is minutes away here.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    w = InboxWatcher(inbox, WatchConfig(mode="inotify", rescan_interval_seconds=600), clock=time.monotonic)
    w.start()
    w.scan()
    try:
        for n in range(3):
            (inbox / f".{n}.tmp").write_text("prompt: a\n")
            os.rename(inbox / f".{n}.tmp", inbox / f"{n}.yaml")
            deadline = time.monotonic() + 0.3
            ready = []
            while not ready and time.monotonic() < deadline:
                w.wait_for_hint(0.05)
                ready = w.ready_files()
            assert ready == [inbox / f"{n}.yaml"], f"file {n} not seen within 0.3 s of its rename"
            os.rename(inbox / f"{n}.yaml", tmp_path / f"claimed-{n}.yaml")  # the claim
            w.forget(inbox / f"{n}.yaml")
    finally:
        w.stop()


def test_a_file_moved_in_from_another_folder_is_ready_at_once(tmp_path):
    # inotify reports a move from an unwatched folder as a bare IN_MOVED_TO; without full events watchdog calls it
    # a create, which for a file written in place means "wait for its close": a close that never comes.
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    inbox.mkdir()
    staging.mkdir()
    w = InboxWatcher(
        inbox, WatchConfig(mode="inotify", settle_seconds=600, rescan_interval_seconds=600), clock=time.monotonic
    )
    w.start()
    w.scan()
    try:
        (staging / "m.yaml").write_text("prompt: a\n")
        os.rename(staging / "m.yaml", inbox / "m.yaml")
        ready = wait_for(lambda: w.wait_for_hint(0.05) or w.ready_files(), 5, what="the moved-in file")
        assert ready == [inbox / "m.yaml"]
    finally:
        w.stop()


def test_a_submitted_file_is_ready_once_settled_not_after_the_unclosed_fallback(tmp_path):
    """``wan-daemon submit`` places files with atomic_create (temp, then link): a create with no close under the
    new name, which the watcher would otherwise hold for UNCLOSED_SETTLE_SECONDS."""
    inbox, src = tmp_path / "inbox", tmp_path / "job.yaml"
    inbox.mkdir()
    src.write_text("prompt: submitted\n")
    w = InboxWatcher(
        inbox, WatchConfig(mode="inotify", settle_seconds=0.2, rescan_interval_seconds=600), clock=time.monotonic
    )
    w.start()
    w.scan()
    try:
        atomic_create(inbox / "job.yaml", src.read_bytes())
        ready = wait_for(lambda: w.wait_for_hint(0.05) or w.ready_files(), 10, what="the submitted file")
        assert ready == [inbox / "job.yaml"]
    finally:
        w.stop()
