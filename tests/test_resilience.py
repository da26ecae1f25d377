"""Nothing lost, nothing done twice: the out-of-memory ladder, several daemons on one inbox, leases and
takeover, the claim race, a full disk, and an fsync error."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from conftest import fast_settings, spool_root, wait_for
from factories import make_params

from daemon.errors import Category, JobError
from daemon.jobs import JobState
from daemon.policy import decide
from daemon.runtime import outbox as outbox_module
from daemon.runtime.daemon import Daemon
from daemon.runtime.spool import Spool

CUE = "daemon.testing:CueBackend"


def params(**kw):
    return make_params(
        **{"width": 1280, "height": 704, "frames": 121, "offload": "none", "vae_tiling": False, "seed": 1, **kw}
    )


def oom(p, fallback=(), device="cuda", model="wan2.2-ti2v-5b"):
    return decide(
        JobError(Category.OUT_OF_MEMORY, "oom"),
        1,
        params=p,
        model=model,
        fallback=list(fallback),
        device=device,
        max_attempts=3,
        base_seconds=1,
        cap_seconds=10,
        rng=random.Random(0),
    )


@pytest.mark.parametrize(
    "p,fallback,device,changes,degradation",
    [
        (params(), [], "cuda", {"offload": "model"}, None),
        (params(offload="model"), [], "cuda", {"offload": "group"}, None),
        (params(offload="group"), [], "cuda", {"offload": "sequential"}, None),
        (params(offload="sequential"), [], "cuda", {"vae_tiling": True}, None),
        (params(), [], "cpu", {"vae_tiling": True}, None),  # offload means nothing on a CPU
        (
            params(vae_tiling=True),
            ["lower_resolution"],
            "cpu",
            {"width": 960, "height": 512},
            {"kind": "lower_resolution", "from": "1280x704", "to": "960x512"},
        ),
        (
            params(vae_tiling=True),
            ["fewer_frames", "lower_resolution"],
            "cpu",
            {"frames": 61},
            {"kind": "fewer_frames", "from": 121, "to": 61},
        ),
        (
            params(vae_tiling=True, frames=5),
            ["fewer_frames", "lower_resolution"],
            "cpu",
            {"width": 960, "height": 512},
            {"kind": "lower_resolution", "from": "1280x704", "to": "960x512"},
        ),
    ],
)
def test_oom_ladder_climbs_one_rung_per_retry(p, fallback, device, changes, degradation):
    d = oom(p, fallback, device)
    assert d.retry and d.changes == changes and d.degradation == degradation and d.delay_seconds == 0


def test_oom_ladder_smaller_model_and_exhaustion():
    d = oom(params(vae_tiling=True, offload="sequential"), ["smaller_model"], model="wan2.2-t2v-a14b")
    assert d.changes == {"model": "wan2.2-ti2v-5b"} and d.degradation["kind"] == "smaller_model"
    done = oom(
        params(vae_tiling=True, offload="sequential", width=32, height=32, frames=5),
        ["lower_resolution", "fewer_frames", "smaller_model"],
    )
    assert not done.retry and "every allowed measure" in done.reason
    assert not oom(params(vae_tiling=True, offload="sequential")).retry  # no fallback allowed: fail


def test_disk_full_is_retried_without_limit():
    d = decide(JobError(Category.DISK_FULL, "ENOSPC"), 50, max_attempts=3, base_seconds=1, cap_seconds=5)
    assert d.retry and d.delay_seconds <= 5


# ---- end to end with the stand-in backend (faults on cue) ------------------------------------------


def test_oom_retries_degrade_only_as_allowed_and_record_it(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("fits.yaml", "prompt: oom_above=4096\nsize: 96x96\nfallback: [lower_resolution]\n")
    h.drop("nofit.yaml", "prompt: oom_above=4096\nsize: 96x96\n")
    side = h.sidecar("fits")
    assert side["parameters"]["width"] == 64 and side["parameters"]["height"] == 64
    assert side["degradations"] == [{"kind": "lower_resolution", "from": "96x96", "to": "64x64"}]
    assert "vae_tiling" in side["optimizations_applied"]
    assert side["attempts"] == 3
    failed = h.failure("nofit")
    assert failed["error_category"] == "out_of_memory" and "every allowed measure" in failed["decision"]
    assert failed["attempts"] == 2 and not (h.outbox / "nofit.mp4").exists()


def test_vae_tiling_alone_can_rescue_a_job(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("tiled.yaml", "prompt: oom_unless_tiled\n")
    side = h.sidecar("tiled")
    assert side["degradations"] == [] and side["optimizations_applied"] == ["vae_tiling"]


def test_real_pipeline_decodes_with_vae_tiling(harness_factory):
    """The measure the ladder reaches for, through the real tiny pipeline: a tiled decode is a valid video."""
    h = harness_factory(models={"vae_tiling": True}).start()
    h.drop("big.yaml", "model: tiny-t2v-a14b\nprompt: tiled\nsize: 320x288\nframes: 5\nsteps: 2\n")
    side = h.sidecar("big", timeout=120)
    assert side["optimizations_applied"] == ["vae_tiling"]
    assert (side["video"]["width"], side["video"]["height"], side["video"]["frames"]) == (320, 288, 5)


# ---- several daemons, one inbox --------------------------------------------------------------------


def test_two_daemons_share_an_inbox_and_each_job_runs_once(harness_factory, tmp_path):
    a = harness_factory(tmp_path, backend=CUE, instance={"id": "alpha"}).start()
    b = harness_factory(tmp_path, backend=CUE, instance={"id": "beta"}).start()
    for n in range(24):
        a.drop(f"j{n}.yaml", "prompt: sleep=0.1\n")
    sides = [a.sidecar(f"j{n}") for n in range(24)]
    runs = {s["instance"] for s in sides}
    assert runs == {"alpha", "beta"}, runs
    assert all(s["attempts"] == 1 for s in sides)
    a.idle()
    b.idle()
    assert a.daemon.done + b.daemon.done == 24


def _write_stale_owner(tmp_path, models_dir, owner: str, jobs: int, running: int | None = None) -> Path:
    """A daemon that claimed jobs, then died (its lease stops beating): built with the real spool and intake."""
    settings = fast_settings(tmp_path, models_dir, instance={"id": owner})
    dead = Daemon(settings, backend=CUE)
    dead.lease.acquire()
    for n in range(jobs):
        (settings.paths.inbox / f"{owner}{n}.yaml").write_text("prompt: sleep=0.05\n")
        dead.claims.take_in(dead.spool.claim(settings.paths.inbox / f"{owner}{n}.yaml"))
    if running is not None:
        rec = dead.records[f"{owner}{running}"]
        dead.spool.transition(rec, JobState.RUNNING, attempts=1)
    dead.lease.release()
    old = time.time() - 3600
    os.utime(dead.lease.lease_file, (old, old))
    return spool_root(settings)


def test_a_dead_daemons_jobs_are_taken_over_by_exactly_one_other(harness_factory, tmp_path, models_dir):
    dead_spool = _write_stale_owner(tmp_path, models_dir, "ghost", jobs=5, running=2)
    fast = {"lease_grace_seconds": 2.0, "heartbeat_seconds": 0.3, "takeover_check_seconds": 0.2}
    b = harness_factory(tmp_path, backend=CUE, instance={"id": "bravo", **fast}).start()
    c = harness_factory(tmp_path, backend=CUE, instance={"id": "charlie", **fast}).start()
    sides = [b.sidecar(f"ghost{n}") for n in range(5)]
    assert len({s["instance"] for s in sides}) == 1, "the spool must be taken over whole, by one daemon"
    assert sides[2]["attempts"] == 2 and all(s["attempts"] == 1 for i, s in enumerate(sides) if i != 2)
    assert not dead_spool.exists()
    wait_for(lambda: not any((tmp_path / "inbox" / ".wan-daemon" / "takeover").iterdir()), 10)
    assert b.daemon.done + c.daemon.done == 5


def test_an_owner_that_lost_its_lease_does_not_publish(harness_factory, tmp_path):
    # alpha stops heartbeating (a frozen or partitioned host) while its job runs; bravo takes over.
    a = harness_factory(
        tmp_path,
        backend=CUE,
        instance={
            "id": "alpha",
            "heartbeat_seconds": 1000,
            "lease_grace_seconds": 3000,
            "takeover_check_seconds": 1000,
        },
    ).start()
    a.drop("slow.yaml", "prompt: sleep=4\n")
    wait_for(lambda: getattr(a.daemon.progress("slow"), "step", 0) >= 1, 30, what="alpha running the job")
    b = harness_factory(
        tmp_path,
        backend=CUE,
        instance={"id": "bravo", "lease_grace_seconds": 1.0, "heartbeat_seconds": 0.2, "takeover_check_seconds": 0.2},
    ).start()
    side = b.sidecar("slow", timeout=60)
    assert side["instance"] == "bravo" and side["attempts"] == 2
    wait_for(lambda: not a.daemon.running, 30, what="alpha to drop its job")
    assert a.daemon.done == 0 and "slow" not in a.daemon.records
    assert json.loads((b.outbox / "slow.json").read_text())["instance"] == "bravo"
    assert not list(b.outbox.glob(".wan-tmp*"))
    assert a.thread.is_alive() and not a.daemon.records  # alpha carries on, with a fresh, empty spool


def _claimer(state: str, inbox: str, owner: str, out: str) -> None:
    spool = Spool(Path(state) / "owners" / owner, owner)
    won = []
    names = sorted(os.listdir(inbox))
    random.Random(owner).shuffle(names)
    for name in names:
        if spool.claim(Path(inbox) / name) is not None:
            won.append(name)
    Path(out).write_text("\n".join(won))


def test_claim_race_2000_files_8_claimers_no_double_no_loss(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n in range(2000):
        (inbox / f"f{n:04d}.yaml").write_text("prompt: x\n")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_claimer, args=(str(tmp_path / "state"), str(inbox), f"c{i}", str(tmp_path / f"won{i}")))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    won = [n for i in range(8) for n in (tmp_path / f"won{i}").read_text().split("\n") if n]
    assert len(won) == len(set(won)) == 2000
    on_disk = [p.name.split(".", 2)[2] for p in (tmp_path / "state" / "owners").glob("*/files/*")]
    assert sorted(on_disk) == sorted(won)
    assert not list(inbox.iterdir())


# ---- the disk and the filesystem ---------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs for the outbox (needs root; visibly skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave_bytes: int) -> Path:
    filler = folder / "filler.bin"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as fh:
        fh.truncate(0)
        remaining = max(0, free - leave_bytes)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            fh.write(b"\0" * chunk)
            remaining -= chunk
    return filler


@pytest.mark.parametrize("min_free_mb", [1, 0], ids=["guard-pauses", "real-ENOSPC"])
def test_full_outbox_pauses_loses_nothing_and_finishes_once_space_returns(
    harness_factory, tmp_path, small_fs, min_free_mb
):
    outbox = small_fs / "outbox"
    outbox.mkdir()
    filler = _fill(small_fs, leave_bytes=8 << 10)
    h = harness_factory(tmp_path, limits={"min_free_mb": min_free_mb}, paths={"outbox": str(outbox)}).start()
    for n in range(3):
        h.drop(f"d{n}.yaml", f"model: tiny-ti2v-5b\nprompt: disk full {n}\nsize: 128x128\nframes: 9\nsteps: 2\n")
    wait_for(lambda: json.loads(h.settings.health_path.read_text()).get("paused"), 60, what="pause for disk full")
    assert not list(outbox.glob("*.json")), "nothing can have been published on a full disk"
    assert not list(outbox.glob("failed/*.json")), "a full disk must not fail a job"
    filler.unlink()
    sides = [h.sidecar(f"d{n}", timeout=120) for n in range(3)]
    assert all(s["status"] == "done" for s in sides)
    h.idle()
    assert sorted(p.name for p in outbox.glob("*.mp4")) == ["d0.mp4", "d1.mp4", "d2.mp4"]
    assert not [p for p in outbox.iterdir() if p.name.startswith(".wan-tmp")]
    assert not list((outbox / "failed").glob("*.json"))
    assert json.loads(h.settings.health_path.read_text())["paused"] is None


def test_an_fsync_error_never_marks_a_job_done(harness_factory, monkeypatch):
    real = outbox_module.write_new_file  # how the outbox writes a sidecar before publishing it
    failures = []

    def failing_once(path, data):
        if not failures and b'"status": "done"' in data:
            failures.append(path)
            raise OSError(errno.EIO, "Input/output error (fsync)")
        return real(path, data)

    monkeypatch.setattr(outbox_module, "write_new_file", failing_once)
    h = harness_factory(backend=CUE).start()
    h.drop("io.yaml", "prompt: sleep=0.05\n")
    side = h.sidecar("io")
    assert failures and side["attempts"] == 2
    # The first attempt's sidecar write failed: that attempt was not marked done, the second was.
    wait_for(lambda: h.daemon.records.get("io") is None or h.daemon.records["io"].state is JobState.DONE, 10)
    assert h.daemon.done == 1 and h.daemon.failed == 0


def test_a_job_that_kills_its_worker_every_time_is_quarantined_others_go_on(harness_factory):
    h = harness_factory(backend=CUE, worker={"max_attempts": 3, "retry_base_seconds": 0.0}).start()
    h.drop("poison.yaml", "prompt: crash_always\n")
    h.drop("flaky.yaml", "prompt: crash_once\n")
    h.drop("fine.yaml", "prompt: sleep=0.05\n")
    record = h.failure("poison", timeout=120)
    assert record["error_category"] == "worker_crashed" and record["attempts"] == 3
    assert "gave up after 3 attempts" in record["decision"] and len(record["errors"]) == 3
    assert h.sidecar("flaky")["attempts"] == 2
    assert h.sidecar("fine")["status"] == "done"
    assert h.daemon.workers["cpu"].status.restarts >= 4


def test_two_active_jobs_cannot_write_the_same_output_name(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("a.yaml", "id: first\nprompt: sleep=1\noutput: {basename: shared}\n")
    h.drop("b.yaml", "id: second\nprompt: sleep=0\noutput: {basename: shared}\n")
    assert h.sidecar("shared")["id"] == "first"
    dup = wait_for(
        lambda: next((json.loads(p.read_text()) for p in (h.outbox / "failed").glob("second*.json")), None),
        30,
        what="the duplicate's record",
    )
    assert dup["error_category"] == "duplicate_job" and "shared.mp4" in dup["message"]
