"""Freezes and stalls with two daemons on one inbox: a long recovery keeps its lease, a stuck loop loses it
once and steps back quietly, a daemon frozen just before publishing never replaces what the daemon that took
its jobs over published; and the outbox never replaces an existing output.

The daemons run in this process on threads (real workers with the cue backend), with a heartbeat of 0.1 s and
a grace of 1 s; the stalls are injected through ``daemon.runtime.daemon.Seams``."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import DaemonHarness, fast_settings, wait_for
from loguru import logger

from daemon.fsutil import sha256_file, temp_path_for
from daemon.ops.lease_check import check_lease_grace
from daemon.runtime.daemon import Daemon, Seams
from daemon.runtime.heartbeat import Heartbeat
from daemon.runtime.leases import Lease
from daemon.runtime.outbox import Outbox
from daemon.runtime.recovery_figures import read_figures

CUE = "daemon.testing:CueBackend"
FAST = {"heartbeat_seconds": 0.1, "lease_grace_seconds": 1.0, "takeover_check_seconds": 0.1}


@pytest.fixture
def lease_log():
    """Every lease.* and heartbeat.* message logged while the test runs."""
    messages: list[str] = []
    sink = logger.add(
        lambda m: messages.append(m.record["message"]),
        level="DEBUG",
        format="{message}",
        filter=lambda r: r["message"].startswith(("lease.", "heartbeat.")),
    )
    yield messages
    logger.remove(sink)


@pytest.fixture
def unblock() -> list[threading.Event]:
    """Events a test blocks a daemon on: all set before the daemons are stopped, pass or fail."""
    return []


@pytest.fixture
def daemons(tmp_path, models_dir, unblock):
    made: list[DaemonHarness] = []

    def make(owner: str, seams: Seams | None = None) -> DaemonHarness:
        settings = fast_settings(tmp_path, models_dir, instance={"id": owner, **FAST})
        h = DaemonHarness(tmp_path, settings, CUE, seams=seams or Seams())
        made.append(h)
        return h

    yield make
    for event in unblock:
        event.set()
    for h in made:
        h.stop()
    for h in made:  # Daemon.shutdown stops the heartbeat thread
        assert h.daemon is None or not h.daemon.heartbeat.running
    assert not [t.name for t in threading.enumerate() if t.name.startswith("heartbeat-")]
    wait_for(lambda: not multiprocessing.active_children(), 15, what="worker processes to exit")


def fill_spool(settings, jobs: int, prompt: str) -> list[str]:
    """A spool left by an earlier run of ``settings.owner``: claimed and taken in with the real intake."""
    earlier = Daemon(settings, backend=CUE)
    ids = []
    for n in range(jobs):
        name = f"{settings.owner}{n}"
        (settings.paths.inbox / f"{name}.yaml").write_text(f"prompt: {prompt}\n")
        earlier.claims.take_in(earlier.spool.claim(settings.paths.inbox / f"{name}.yaml"))
        ids.append(name)
    if earlier.history is not None:
        earlier.history.close()
    return ids


def takeovers(log: list[str]) -> list[str]:
    return [m for m in log if m.startswith("lease.takeover ")]


def failures(outbox: Path) -> list[str]:
    return sorted(p.name for p in (outbox / "failed").glob("*.json"))


# ---- a. a long recovery that reports progress keeps its lease ------------------------------------------


def test_a_long_recovery_keeps_its_lease_and_is_not_taken_over(daemons, lease_log):
    recovering = threading.Event()

    def slow_record() -> None:  # 30 records: 3 s of recovery, three graces
        recovering.set()
        time.sleep(0.1)

    alpha = daemons("alpha", Seams(per_recovered_record=slow_record))
    ids = fill_spool(alpha.settings, 30, "sleep=0.02")
    starting = threading.Thread(target=alpha.start, name="alpha-start")
    began = time.monotonic()
    starting.start()
    assert recovering.wait(60), "alpha's recovery did not begin"
    beta = daemons("beta").start()  # checks for dead owners every 0.1 s, with a grace of 1 s
    starting.join(60)
    assert not starting.is_alive()
    assert time.monotonic() - began > 2 * FAST["lease_grace_seconds"]  # beyond the grace, in one start()
    assert alpha.daemon is not None
    assert takeovers(lease_log) == []
    assert alpha.daemon.lease.held(), "alpha's lease was taken during its recovery"
    assert sorted(alpha.daemon.records) == sorted(ids)
    sides = [alpha.sidecar(i, timeout=60) for i in ids]
    assert {s["instance"] for s in sides} == {"alpha"} and all(s["attempts"] == 1 for s in sides)
    assert beta.daemon is not None and not beta.daemon.done
    assert takeovers(lease_log) == []


# ---- b. a stuck loop loses its lease once, then steps back without a word ------------------------------


class Stall:
    """A before_tick seam: once armed, the next tick blocks until ``released`` is set."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> None:
        if self.armed.is_set() and not self.released.is_set():
            self.entered.set()
            self.released.wait(120)


def test_a_stuck_loop_is_taken_over_exactly_once_and_steps_back_quietly(daemons, lease_log, unblock):
    stall = Stall()
    unblock.append(stall.released)
    alpha = daemons("alpha", Seams(before_tick=stall))
    ids = fill_spool(alpha.settings, 3, "sleep=1")
    alpha.start()
    wait_for(lambda: alpha.daemon.running, 60, what="alpha running its first job")
    beta = daemons("beta").start()
    stall.armed.set()
    assert stall.entered.wait(30)
    # alpha's loop reports no progress: after half a grace its heartbeat stops, after a grace beta takes over.
    sides = [beta.sidecar(i, timeout=30) for i in ids]
    assert {s["instance"] for s in sides} == {"beta"}
    assert sorted(s["attempts"] for s in sides) == [1, 1, 2]  # the one alpha was running counts an attempt
    assert takeovers(lease_log) == ["lease.takeover owner=beta took over alpha"]
    assert any(m.startswith("heartbeat.withheld owner=alpha") for m in lease_log)

    stall.released.set()
    wait_for(lambda: any(m.startswith("lease.lost owner=alpha") for m in lease_log), 30, what="alpha to step back")
    wait_for(lambda: not alpha.daemon.records and not alpha.daemon.running, 30, what="alpha to drop its records")
    time.sleep(2.5)  # two graces and more than twenty takeover checks of alpha's, beside a live beta
    assert takeovers(lease_log) == ["lease.takeover owner=beta took over alpha"], "alpha took its taker over"
    assert failures(alpha.outbox) == []
    assert alpha.daemon.lease.held() and beta.daemon.lease.held()
    assert alpha.daemon.done == 0 and alpha.daemon.failed == 0 and not alpha.daemon.records
    assert len([m for m in lease_log if m.startswith("lease.lost")]) == 1
    assert alpha.thread is not None and alpha.thread.is_alive()


def test_no_takeover_check_for_a_grace_after_losing_the_lease(tmp_path):
    """Right after a loss a daemon's view of the others may be as stale as theirs was of it: it checks none."""
    settings = fast_settings(tmp_path, tmp_path / "models", instance={"id": "alpha", **FAST})
    now = [1000.0]
    alpha = Daemon(settings, backend=CUE, clock=lambda: now[0])
    alpha.lease.acquire()
    peer = Lease(settings.paths.state, "beta", grace_seconds=1.0, heartbeat_seconds=0.1)
    peer.acquire()
    old = time.time() - 60
    os.utime(peer.lease_file, (old, old))  # beta looks dead to anyone who checks
    try:
        alpha.recovery.lease_lost()
        for step in (0.0, 0.5, 0.95):
            now[0] = 1000.0 + step
            alpha.recovery.take_over_the_dead()
            assert (settings.paths.state / "owners" / "beta").is_dir(), f"took beta over {step}s after the loss"
        now[0] = 1001.1
        alpha.recovery.take_over_the_dead()
        assert not (settings.paths.state / "owners" / "beta").exists()  # a grace later, checks resume
    finally:
        alpha.lease.release()
        peer.release()
        if alpha.history is not None:
            alpha.history.close()


def test_heartbeat_beats_only_while_the_loop_makes_progress(tmp_path):
    lease = Lease(tmp_path / "state", "solo", grace_seconds=1.0, heartbeat_seconds=0.1)
    lease.acquire()
    now = [0.0]
    hb = Heartbeat(lease, interval=0.1, stuck_after=0.5, monotonic=lambda: now[0])
    assert hb.beat() and lease.progress_file.exists()
    marked = lease.progress_file.stat().st_mtime_ns
    now[0] = 0.4
    assert hb.beat()  # no new progress: the lease is refreshed, the marker is not
    assert lease.progress_file.stat().st_mtime_ns == marked
    now[0] = 0.6
    assert not hb.beat()  # stuck longer than stuck_after: no beat
    assert hb.progress() is True  # back from a stall: the loop is told so
    assert hb.beat() and not hb.lost
    os.rename(lease.mine, tmp_path / "taken")  # a peer took the spool over
    assert not hb.beat() and hb.lost
    lease.renew_after_loss()
    assert not hb.lost and hb.beat()
    lease.release()


# ---- c. frozen between the lease check and the outbox ------------------------------------------------


def test_a_daemon_frozen_before_publishing_leaves_the_takers_output_alone(daemons, lease_log, unblock):
    frozen, thaw = threading.Event(), threading.Event()
    unblock.append(thaw)

    def freeze_once(rec, video_tmp: Path) -> None:
        if frozen.is_set():
            return
        video_tmp.write_bytes(b"alpha's late copy\n")  # unlike beta's, so that a replacement would show
        frozen.set()
        thaw.wait(120)

    alpha = daemons("alpha", Seams(before_publish=freeze_once)).start()
    alpha.drop("late.yaml", "prompt: sleep=0.1\n")
    assert frozen.wait(60), "alpha never reached the outbox"
    beta = daemons("beta").start()
    side = beta.sidecar("late", timeout=60)
    assert side["instance"] == "beta" and side["attempts"] == 2
    video = alpha.outbox / "late.mp4"
    published = (video.stat().st_ino, video.read_bytes(), (alpha.outbox / "late.json").read_bytes())

    thaw.set()
    wait_for(lambda: any(m.startswith("lease.lost owner=alpha") for m in lease_log), 30, what="alpha to step back")
    wait_for(lambda: not alpha.daemon.records and not alpha.daemon.running, 30, what="alpha to drop its records")
    assert (video.stat().st_ino, video.read_bytes(), (alpha.outbox / "late.json").read_bytes()) == published
    assert sha256_file(video) == side["video"]["sha256"]
    assert json.loads((alpha.outbox / "late.json").read_text())["instance"] == "beta"
    assert failures(alpha.outbox) == []
    assert not list(alpha.outbox.glob(".wan-tmp-alpha~*"))
    assert alpha.daemon.done == 0 and alpha.daemon.failed == 0
    assert takeovers(lease_log) == ["lease.takeover owner=beta took over alpha"]


# ---- d. the outbox never replaces an output ------------------------------------------------------------


def _temps(outbox: Outbox, basename: str, video: bytes = b"ours", poster: bytes | None = b"our poster"):
    video_tmp = outbox.temp_video_path(basename)
    video_tmp.write_bytes(video)
    poster_tmp = None
    if poster is not None:
        poster_tmp = temp_path_for(outbox.poster_path(basename), owner=outbox.owner)
        poster_tmp.write_bytes(poster)
    return video_tmp, poster_tmp


def _state(outbox: Outbox) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in outbox.root.iterdir() if p.is_file()}


SIDECAR = {"id": "job", "job_token": "ours", "status": "done", "poster": "job.jpg"}


def test_publish_result_publishes_video_poster_then_sidecar(tmp_path):
    outbox = Outbox(tmp_path / "outbox", owner="me")
    video_tmp, poster_tmp = _temps(outbox, "job")
    assert outbox.publish_result("job", video_tmp, SIDECAR, poster_tmp) is True
    assert outbox.video_path("job").read_bytes() == b"ours"
    assert outbox.poster_path("job").read_bytes() == b"our poster"
    assert json.loads(outbox.sidecar_path("job").read_text()) == SIDECAR
    assert sorted(_state(outbox)) == ["job.jpg", "job.json", "job.mp4"]  # no temp left


@pytest.mark.parametrize("existing", ["video", "video+poster", "video+poster+sidecar", "sidecar"])
def test_publish_result_never_replaces_an_existing_video_or_sidecar(tmp_path, existing):
    outbox = Outbox(tmp_path / "outbox", owner="me", abandoned_after=3600)
    for part in existing.split("+"):
        path = {"video": outbox.video_path, "poster": outbox.poster_path, "sidecar": outbox.sidecar_path}[part]("job")
        path.write_bytes(f"theirs: {part}".encode())
    before = _state(outbox)
    video_tmp, poster_tmp = _temps(outbox, "job")
    assert outbox.publish_result("job", video_tmp, SIDECAR, poster_tmp) is False
    assert _state(outbox) == before  # theirs as they were, ours gone (no temp either)


def test_publish_result_never_replaces_an_existing_poster(tmp_path):
    outbox = Outbox(tmp_path / "outbox", owner="me", abandoned_after=3600)
    outbox.poster_path("job").write_bytes(b"a leftover poster")
    leftover = (outbox.poster_path("job").stat().st_ino, b"a leftover poster")
    video_tmp, poster_tmp = _temps(outbox, "job")
    assert outbox.publish_result("job", video_tmp, SIDECAR, poster_tmp) is True
    poster = outbox.poster_path("job")
    assert (poster.stat().st_ino, poster.read_bytes()) == leftover
    assert json.loads(outbox.sidecar_path("job").read_text())["poster"] is None  # not claimed as ours
    assert sorted(_state(outbox)) == ["job.jpg", "job.json", "job.mp4"]


def test_publish_result_loses_a_race_run_in_its_window(tmp_path):
    """A peer publishes the whole job between our "already published?" check and our first link (where a frozen
    daemon resumes): nothing of theirs is replaced."""
    outbox = Outbox(tmp_path / "outbox", owner="me", abandoned_after=3600)
    peer = Outbox(tmp_path / "outbox", owner="peer", abandoned_after=3600)
    their_video, their_poster = _temps(peer, "job", b"theirs", b"their poster")
    their_sidecar = {**SIDECAR, "job_token": "ours", "instance": "peer"}
    video_tmp, poster_tmp = _temps(outbox, "job")

    def peer_publishes() -> None:
        assert peer.publish_result("job", their_video, their_sidecar, their_poster) is True

    assert outbox.publish_result("job", video_tmp, SIDECAR, poster_tmp, before_link=peer_publishes) is False
    assert outbox.video_path("job").read_bytes() == b"theirs"
    assert outbox.poster_path("job").read_bytes() == b"their poster"
    assert json.loads(outbox.sidecar_path("job").read_text()) == their_sidecar
    assert sorted(_state(outbox)) == ["job.jpg", "job.json", "job.mp4"]


def test_an_abandoned_video_without_a_sidecar_is_removed_then_published_over(tmp_path):
    """A crash between the video's link and the sidecar's leaves a video no sidecar describes: once it is older
    than abandoned_after (the lease grace in the daemon), the job can be published."""
    outbox = Outbox(tmp_path / "outbox", owner="me", abandoned_after=0.0)
    outbox.video_path("job").write_bytes(b"an unfinished attempt")
    outbox.poster_path("job").write_bytes(b"its poster")
    video_tmp, poster_tmp = _temps(outbox, "job")
    assert outbox.publish_result("job", video_tmp, SIDECAR, poster_tmp) is True
    assert outbox.video_path("job").read_bytes() == b"ours"
    assert outbox.poster_path("job").read_bytes() == b"our poster"
    assert json.loads(outbox.sidecar_path("job").read_text()) == SIDECAR


def test_a_publication_that_fails_before_its_sidecar_is_undone(tmp_path, monkeypatch):
    """The sidecar cannot be written (EIO, ENOSPC): our video and poster do not stay behind to hold the name."""
    from daemon.runtime import outbox as outbox_module

    outbox = Outbox(tmp_path / "outbox", owner="me", abandoned_after=3600)
    real = outbox_module.write_new_file

    def failing(path, data):
        raise OSError(5, "Input/output error (fsync)")

    monkeypatch.setattr(outbox_module, "write_new_file", failing)
    video_tmp, poster_tmp = _temps(outbox, "job")
    with pytest.raises(OSError):
        outbox.publish_result("job", video_tmp, SIDECAR, poster_tmp)
    assert _state(outbox) == {}
    monkeypatch.setattr(outbox_module, "write_new_file", real)
    video_tmp, poster_tmp = _temps(outbox, "job")
    assert outbox.publish_result("job", video_tmp, SIDECAR, poster_tmp) is True  # the retry publishes


def test_a_publication_a_crash_cut_short_is_undone_at_the_next_start(tmp_path):
    """kill -9 between the video's link and the sidecar's: our temps are still the same files as the finals,
    which tells our unfinished publication from anyone else's; clean_temps (at start) undoes it."""
    outbox = Outbox(tmp_path / "outbox", owner="me", abandoned_after=3600)
    peer = Outbox(tmp_path / "outbox", owner="peer", abandoned_after=3600)
    video_tmp, _ = _temps(outbox, "mine", poster=None)
    poster_tmp = video_tmp.with_name(video_tmp.stem + ".poster.jpg")  # the worker's name for it
    poster_tmp.write_bytes(b"our poster")
    os.link(video_tmp, outbox.video_path("mine"))
    os.link(poster_tmp, outbox.poster_path("mine"))
    their_tmp, _ = _temps(peer, "theirs", poster=None)
    os.link(their_tmp, peer.video_path("theirs"))  # a live peer's, mid-publication
    done_tmp, _ = _temps(outbox, "done", poster=None)
    os.link(done_tmp, outbox.video_path("done"))
    outbox.sidecar_path("done").write_text("{}")  # finished; only its temp was left
    outbox.clean_temps()
    assert sorted(_state(outbox)) == sorted(["done.json", "done.mp4", "theirs.mp4", their_tmp.name])
    video_tmp, poster_tmp = _temps(outbox, "mine")
    assert outbox.publish_result("mine", video_tmp, SIDECAR, poster_tmp) is True


# ---- a daemon frozen in the middle of taking in a round of files --------------------------------------------


def test_a_daemon_frozen_during_intake_writes_no_failure_record_when_it_wakes(daemons, lease_log, unblock):
    """The incident: frozen during a batch's intake, a daemon woke after its peer had taken its spool over and
    wrote failure records for jobs the peer was running. Now what it had not taken in is the peer's."""
    frozen, released = threading.Event(), threading.Event()
    unblock.append(released)
    seen: list[str] = []

    def freeze_on_second_file(claimed: Path) -> None:
        seen.append(claimed.name)
        if len(seen) == 2:
            frozen.set()
            released.wait(120)  # no progress reported meanwhile: its heartbeat stops, its lease goes stale

    alpha = daemons("alpha", Seams(before_take_in=freeze_on_second_file)).start()
    beta = daemons("beta").start()
    wait_for(lambda: alpha.daemon.workers_ready() and beta.daemon.workers_ready(), 60, what="workers")
    staging = alpha.root / "staging"
    staging.mkdir()
    for n in range(5):
        (staging / f"f{n}.yaml").write_text(f"id: f{n}\nprompt: sleep=0.05\n")
    beta.daemon.watcher.stop()  # beta must not race alpha for the files: alpha claims all five in one round
    for n in range(5):
        os.rename(staging / f"f{n}.yaml", alpha.inbox / f"f{n}.yaml")
    assert frozen.wait(30), "alpha did not begin its round"
    sides = [beta.sidecar(f"f{n}", timeout=30) for n in range(5)]  # beta took the spool over and ran them all
    assert {s["instance"] for s in sides} == {"beta"}
    assert takeovers(lease_log) == ["lease.takeover owner=beta took over alpha"]
    released.set()
    wait_for(lambda: any(m.startswith("lease.lost owner=alpha") for m in lease_log), 30, what="alpha to step back")
    time.sleep(0.5)
    assert failures(alpha.outbox) == [], "alpha wrote failure records for jobs that were beta's"
    assert alpha.daemon.failed == 0 and not alpha.daemon.records
    assert sorted(p.name for p in alpha.outbox.glob("f*.mp4")) == [f"f{n}.mp4" for n in range(5)]


# ---- a daemon frozen in the middle of a claim: files renamed into its spool, not yet synced or taken in ------


def test_a_daemon_frozen_during_the_claim_loses_no_file_and_fails_nothing(daemons, lease_log, unblock):
    """Frozen between renaming files into its spool and taking them in: its peer adopts the spool, takes the
    claimed files in itself and runs them; the woken daemon writes no failure record for the files that moved,
    and the files still in the inbox are claimed and run exactly once."""
    frozen, released = threading.Event(), threading.Event()
    unblock.append(released)
    claimed: list[str] = []
    write_errors: list[str] = []
    sink = logger.add(
        lambda m: write_errors.append(m.record["message"]),
        format="{message}",
        filter=lambda r: r["message"].startswith("daemon.write_failed"),
    )

    mid_claim: list[str] = []  # job ids whose files were renamed into alpha's spool and not taken in

    def freeze_after_second_claim(dest: Path) -> None:
        claimed.append(dest.name)
        if len(claimed) == 2:
            taken_in = set(alpha.daemon.records)
            mid_claim.extend(i for i in (Path(n.split(".", 2)[2]).stem for n in claimed) if i not in taken_in)
            frozen.set()
            released.wait(120)  # files renamed into alpha's spool, not synced, not taken in

    gate_open, at_gate = threading.Event(), threading.Event()
    gate_open.set()

    def gate() -> None:  # alpha's loop waits here while the files are moved in: one round sees all five
        if not gate_open.is_set():
            at_gate.set()
            gate_open.wait(10)

    alpha = daemons("alpha", Seams(before_tick=gate, after_claim=freeze_after_second_claim)).start()
    beta = daemons("beta").start()
    wait_for(lambda: alpha.daemon.workers_ready() and beta.daemon.workers_ready(), 60, what="workers")
    staging = alpha.root / "staging"
    staging.mkdir()
    for n in range(5):
        (staging / f"c{n}.yaml").write_text(f"id: c{n}\nprompt: sleep=0.05\n")
    beta.daemon.watcher.stop()  # alpha alone sees the files
    gate_open.clear()
    assert at_gate.wait(10), "alpha's loop did not come round"
    for n in range(5):
        os.rename(staging / f"c{n}.yaml", alpha.inbox / f"c{n}.yaml")
    gate_open.set()  # well within half the grace: alpha's heartbeat never stopped
    assert frozen.wait(30), "alpha did not begin its claims"
    assert mid_claim, "alpha froze with nothing mid-claim"
    taken = [beta.sidecar(job_id, timeout=30) for job_id in mid_claim]  # adopted with alpha's spool
    assert {s["instance"] for s in taken} == {"beta"} and all(s["attempts"] == 1 for s in taken)
    assert takeovers(lease_log) == ["lease.takeover owner=beta took over alpha"]
    released.set()
    wait_for(lambda: any(m.startswith("lease.lost owner=alpha") for m in lease_log), 30, what="alpha to step back")
    sides = {f"c{n}": alpha.sidecar(f"c{n}", timeout=30) for n in range(5)}  # the other three: claimed again
    assert failures(alpha.outbox) == [], "a failure record for a file that moved to the peer"
    assert sorted(p.name for p in alpha.outbox.glob("c*.mp4")) == [f"c{n}.mp4" for n in range(5)]
    # A job alpha had already started when it froze is retried by beta (attempt 2); none is failed or lost.
    assert all(s["attempts"] in (1, 2) for s in sides.values())
    assert takeovers(lease_log) == ["lease.takeover owner=beta took over alpha"]  # and not back
    assert alpha.daemon.failed == 0 and beta.daemon.failed == 0
    logger.remove(sink)
    assert write_errors == [], "a taken-over spool reported as a failing disk"


def test_a_recovery_whose_steps_are_slow_for_the_grace_says_so(daemons, tmp_path):
    """Each record takes 0.15 s to read: half the 1 s grace holds fewer than four such steps. The start-up
    warns, the figures are kept in the state folder, and doctor's check says the same."""
    warnings: list[str] = []
    sink = logger.add(
        lambda m: warnings.append(m.record["message"]),
        format="{message}",
        filter=lambda r: r["message"].startswith("config.lease_grace_short"),
    )
    alpha = daemons("alpha", Seams(per_recovered_record=lambda: time.sleep(0.15)))
    fill_spool(alpha.settings, 3, "sleep=0.01")
    alpha.start()
    logger.remove(sink)
    assert len(warnings) == 1 and "at least" in warnings[0]
    worst = read_figures(alpha.settings.paths.state)["worst"]
    assert worst.records == 3 and worst.longest_step_seconds >= 0.15
    assert check_lease_grace(alpha.settings).status == "warn"
