"""End to end through the real tiny Wan2.2 pipelines: a job file dropped into a running daemon's inbox
becomes a readable MP4 with the requested frames, size and fps, and a complete sidecar."""

from __future__ import annotations

import json
import os
import time

import imageio_ffmpeg
import pytest
from conftest import spool_root, wait_for
from PIL import Image

SIDECAR_KEYS = {
    "id",
    "status",
    "spec",
    "parameters",
    "model_used",
    "device",
    "timings",
    "generation_time_seconds",
    "peak_vram_usage_mb",
    "peak_rss_mb",
    "optimizations_applied",
    "attempts",
    "video",
    "versions",
    "host",
    "timestamps",
    "job_token",
}


def read_video(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    frames = sum(1 for _ in reader)
    return meta, frames


def make_image(path, size=(64, 64)):
    Image.new("RGB", size, (220, 40, 30)).save(path)


@pytest.mark.parametrize(
    "model,task,extra,fps",
    [
        ("tiny-t2v-a14b", "t2v", "", 16),
        ("tiny-i2v-a14b", "i2v", "image: start.png\n", 16),
        ("tiny-ti2v-5b", "ti2v", "", 24),
        ("tiny-t2v-1.3b", "t2v", "", 16),
    ],
)
def test_job_file_becomes_video_with_requested_frames_size_fps(harness, model, task, extra, fps):
    make_image(harness.inbox / "start.png")
    harness.drop(
        "job.yaml",
        f"model: {model}\ntask: {task}\nprompt: a small test\nframes: 13\nsize: 96x64\nsteps: 2\nseed: 3\n{extra}",
    )
    side = harness.sidecar("job")
    assert SIDECAR_KEYS <= set(side)
    assert side["status"] == "done" and side["id"] == "job"
    video = harness.outbox / "job.mp4"
    meta, frames = read_video(video)
    assert frames == 13
    assert tuple(meta["size"]) == (96, 64)
    assert meta["fps"] == fps
    assert side["video"]["frames"] == 13 and side["video"]["width"] == 96 and side["video"]["height"] == 64
    assert side["video"]["bytes"] == video.stat().st_size
    p = side["parameters"]
    assert (p["width"], p["height"], p["frames"], p["fps"], p["steps"], p["seed"]) == (96, 64, 13, fps, 2, 3)
    assert p["task"] == task
    assert side["model_used"]["name"] == model and side["model_used"]["tiny_random_weights"] is True
    assert "noise" in side["note"]
    for phase in ("queue_wait", "model_load", "denoise", "vae_decode", "encode"):
        assert side["timings"][phase] >= 0
    assert side["peak_vram_usage_mb"] is None and side["device"]["type"] == "cpu"
    assert side["resources"]["samples"] >= 1 and side["resources"]["rss_mb_peak"] > 100
    with Image.open(harness.outbox / side["poster"]) as poster:
        assert poster.format == "JPEG" and poster.size == (96, 64)
    assert side["versions"]["diffusers"] and side["versions"]["torch"]
    # The job file left the inbox and the spool only after its result was durable.
    assert not (harness.inbox / "job.yaml").exists()
    wait_for(lambda: not list((spool_root(harness.settings) / "files").iterdir()), 10)
    assert not any(p.name.startswith(".wan-tmp") for p in harness.outbox.iterdir())


def test_ti2v_5b_with_an_image_runs_image_to_video_on_the_same_weights(harness):
    make_image(harness.inbox / "frame.png")
    harness.drop("a.yaml", "model: tiny-ti2v-5b\nprompt: text only\n")
    harness.drop("b.yaml", "model: tiny-ti2v-5b\nprompt: with an image\nimage: frame.png\n")
    a, b = harness.sidecar("a"), harness.sidecar("b")
    assert a["parameters"]["pipeline"] == "t2v" and b["parameters"]["pipeline"] == "i2v"
    # from_pipe shares the loaded components: the second job loads nothing.
    assert sorted([a["model_used"]["cache"], b["model_used"]["cache"]]) == ["cached", "loaded"]


def test_two_jobs_with_the_same_model_load_it_once(harness):
    harness.drop("batch.yaml", "defaults: {model: tiny-t2v-a14b, steps: 2}\njobs:\n  - prompt: one\n  - prompt: two\n")
    first, second = harness.sidecar("batch-1"), harness.sidecar("batch-2")
    assert first["model_used"]["cache"] == "loaded" and first["timings"]["model_load"] > 0
    assert second["model_used"]["cache"] == "cached" and second["timings"]["model_load"] == 0
    assert first["worker_pid"] == second["worker_pid"]


def test_batch_file_gives_stem_numbered_ids_and_explicit_ids(harness):
    harness.drop(
        "shots.yaml",
        "defaults:\n  model: tiny-ti2v-5b\n  steps: 2\njobs:\n"
        "  - prompt: first\n  - prompt: second\n    priority: 3\n"
        "  - id: named\n    prompt: third\n    output: {basename: named-out}\n",
    )
    assert harness.sidecar("shots-1")["spec"]["prompt"] == "first"
    assert harness.sidecar("shots-2")["parameters"]["prompt"] == "second"
    named = harness.sidecar("named-out")
    assert named["id"] == "named" and (harness.outbox / "named-out.mp4").exists()


def test_file_present_before_start_is_taken(harness_factory, tmp_path):
    h = harness_factory()
    h.inbox.mkdir(parents=True, exist_ok=True)
    (h.inbox / "early.yaml").write_text("prompt: I was here first\nsteps: 2\n")
    h.start()
    assert h.sidecar("early")["status"] == "done"


def test_file_renamed_into_the_inbox_is_taken(harness, tmp_path):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("prompt: moved in\nsteps: 2\n")
    os.rename(outside, harness.inbox / "moved.yaml")
    assert harness.sidecar("moved")["status"] == "done"


def test_slow_in_place_write_is_not_taken_early(harness):
    text = "model: tiny-ti2v-5b\nprompt: written slowly, line by line\nsteps: 2\nframes: 9\nseed: 1\n"
    path = harness.inbox / "slow.yaml"
    with open(path, "w") as fh:
        for line in text.splitlines(keepends=True):
            fh.write(line)
            fh.flush()
            time.sleep(0.15)  # shorter than settle_seconds (0.3): each write restarts the wait
    side = harness.sidecar("slow")
    assert side["spec"]["seed"] == 1 and side["spec"]["frames"] == 9
    assert not (harness.outbox / "failed" / "slow.json").exists()


INVALID_JOBS = [
    ("broken", "prompt: [unclosed\n", "invalid_spec", ["malformed YAML"]),
    ("unknown", "prompt: hi\ncolour: blue\n", "invalid_spec", ["colour", "unknown field"]),
    ("frames", "prompt: hi\nframes: 80\n", "invalid_spec", ["frames", "4n+1", "80"]),
    ("size", "prompt: hi\nsize: 100x64\n", "invalid_spec", ["width", "100", "multiple of 32"]),
    ("huge", "prompt: hi\nsize: 8192x64\n", "invalid_spec", ["width", "8192", "max_side"]),
    ("task", "model: tiny-t2v-a14b\ntask: i2v\nimage: x.png\nprompt: hi\n", "invalid_spec", ["task", "i2v"]),
    ("noimage", "model: tiny-i2v-a14b\nprompt: hi\nimage: missing.png\n", "invalid_input", ["missing.png"]),
    ("escape", "model: tiny-i2v-a14b\nprompt: hi\nimage: ../../etc/passwd.png\n", "invalid_input", [".."]),
    ("notimage", "model: tiny-i2v-a14b\nprompt: hi\nimage: fake.png\n", "invalid_input", ["not a readable image"]),
    ("nomodel", "model: no-such-model\nprompt: hi\n", "model_not_found", ["no-such-model"]),
    ("bomb", "a: &a [x, x]\nb: &b [*a, *a]\nprompt: hi\n", "invalid_spec", ["anchors"]),
    ("python", "prompt: !!python/object/apply:os.system [echo pwned]\n", "invalid_spec", ["python"]),
    ("longmodel", "model: " + "m" * 300 + "\nprompt: hi\n", "invalid_spec", ["cannot be used"]),
    ("longimage", "model: tiny-i2v-a14b\nprompt: hi\nimage: " + "i" * 300 + ".png\n", "invalid_input", ["image"]),
]


def test_invalid_jobs_get_precise_failure_records_and_the_daemon_goes_on(harness):
    (harness.inbox / "fake.png").write_text("not a png")
    for name, text, _, _ in INVALID_JOBS:
        harness.drop(f"{name}.yaml", text)
    for name, _, category, needles in INVALID_JOBS:
        record = harness.failure(name)
        assert record["error_category"] == category, (name, record)
        for needle in needles:
            assert needle in record["message"], (name, record["message"])
        assert record["recovery_suggestions"] and record["file"] == f"{name}.yaml"
        assert not (harness.inbox / f"{name}.yaml").exists()
    harness.drop("after.yaml", "prompt: still alive\nsteps: 2\n")
    assert harness.sidecar("after")["status"] == "done"
    assert harness.daemon.failed == len(INVALID_JOBS)


def test_hostile_bytes_are_rejected_and_the_daemon_goes_on(harness):
    (harness.inbox / "nul.yaml").write_bytes(b"prompt: a\x00b\n")
    (harness.inbox / "latin1.yaml").write_bytes(b"prompt: caf\xe9\n")
    (harness.inbox / "big.yaml").write_bytes(b"prompt: " + b"a" * (2 << 20) + b"\n")
    assert "NUL" in harness.failure("nul")["message"]
    assert "UTF-8" in harness.failure("latin1")["message"]
    assert "limit" in harness.failure("big")["message"]
    harness.drop("ok.yaml", "prompt: fine\nsteps: 2\n")
    assert harness.sidecar("ok")["status"] == "done"


def test_one_bad_job_in_a_batch_does_not_stop_the_others(harness):
    harness.drop(
        "mixed.yaml",
        "defaults: {steps: 2}\njobs:\n  - prompt: good\n  - prompt: bad\n    frames: 10\n  - prompt: also good\n",
    )
    assert harness.sidecar("mixed-1")["status"] == "done"
    assert harness.sidecar("mixed-3")["status"] == "done"
    assert harness.failure("mixed-2")["error_category"] == "invalid_spec"


def test_worker_killed_mid_job_is_respawned_and_the_job_completes(harness):
    harness.drop("long.yaml", "model: tiny-ti2v-5b\nprompt: long one\nsteps: 150\nseed: 9\n")
    d = harness.daemon
    wait_for(lambda: getattr(d.progress("long"), "step", 0) >= 2, 60, what="job to be denoising")
    pid = d.workers["cpu"].worker_pid
    os.kill(pid, 9)
    side = harness.sidecar("long", timeout=120)
    assert side["attempts"] == 2
    assert side["worker_pid"] != pid
    assert d.workers["cpu"].status.restarts == 1
    assert len(list(harness.outbox.glob("long*.mp4"))) == 1


def test_a_job_id_already_published_is_not_done_twice(harness):
    harness.drop("once.yaml", "prompt: only once\nsteps: 2\n")
    first = harness.sidecar("once")
    harness.drop("once.yaml", "prompt: only once\nsteps: 2\n")
    dup = json.loads(
        wait_for(
            lambda: next((p.read_text() for p in (harness.outbox / "failed").glob("once.dup*")), None),
            60,
            what="duplicate record",
        )
    )
    assert dup["error_category"] == "duplicate_job"
    assert json.loads((harness.outbox / "once.json").read_text())["job_token"] == first["job_token"]


def test_health_file_shows_the_running_job_and_counts(harness):
    harness.drop("watched.yaml", "prompt: watch me\nsteps: 60\n")

    def running_in_health():
        h = json.loads(harness.settings.health_path.read_text())
        r = h.get("running") or {}
        return h if r.get("id") == "watched" and r.get("step", 0) >= 1 else None

    h = wait_for(running_in_health, 60, interval=0.1, what="health to show progress")
    assert h["state"] == "busy" and h["running"]["total"] == 60 and h["running"]["phase"] == "denoising"
    assert h["pid"] == os.getpid() and h["device"]["device"] == "cpu"
    harness.sidecar("watched")
    wait_for(lambda: json.loads(harness.settings.health_path.read_text())["done"] == 1, 10)
