"""The sidecar tells the whole story: why every earlier attempt ended and every degradation, sub-second RFC 3339
timestamps, what ran (pipeline class, each component's compute dtype, the scheduler and its settings), the
versions down to ffmpeg, the device and its threads; and the video can be made again from the sidecar alone
(``wan-daemon resubmit``), frame for frame."""

from __future__ import annotations

import re
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import yaml

from daemon.cli import EXIT_OK, main

CUE = "daemon.testing:CueBackend"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


def _frames(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def test_a_crash_and_an_out_of_memory_before_success_are_in_the_sidecar(harness_factory):
    h = harness_factory(backend=CUE, worker={"max_attempts": 6}).start()
    h.drop("story.yaml", "prompt: crash_once oom_above=3000\nsize: 64x64\nfallback: [lower_resolution]\n")
    side = h.sidecar("story", timeout=120)
    earlier = side["earlier_attempts"]
    assert [e["attempt"] for e in earlier] == list(range(1, side["attempts"]))
    categories = [e["category"] for e in earlier]
    assert categories[0] == "worker_crashed" and "out_of_memory" in categories
    assert all(e["message"] and RFC3339_UTC.match(e["at"]) for e in earlier)
    assert [d["kind"] for d in side["degradations"]] == ["lower_resolution"]
    assert all(RFC3339_UTC.match(t) for t in side["timestamps"].values()), side["timestamps"]


def test_sidecar_says_what_ran_and_resubmitting_it_renders_the_same_frames(harness_factory, tmp_path):
    h = harness_factory().start()
    h.drop("orig.yaml", "model: tiny-ti2v-5b\nprompt: yes\nframes: 5\nsize: 64x32\nsteps: 2\n")
    side = h.sidecar("orig", timeout=120)

    pipeline = side["pipeline"]
    assert pipeline["class"] == "WanPipeline"
    assert pipeline["scheduler"]["class"] and pipeline["scheduler"]["config"]["flow_shift"] == 5.0
    assert pipeline["compute_dtypes"]["transformer"] == "float32" and "vae" in pipeline["compute_dtypes"]
    for name in ("torch", "diffusers", "transformers", "imageio_ffmpeg", "ffmpeg", "wan_daemon"):
        assert side["versions"][name], name
    assert side["device"]["name"] and side["device"]["cpu_threads"] >= 1
    assert "pipeline" not in side["resources"] and side["earlier_attempts"] == []
    assert all(RFC3339_UTC.match(t) for t in side["timestamps"].values()), side["timestamps"]
    assert side["parameters"]["seed_was_drawn"]  # the seed was drawn: only the sidecar knows it

    # Submitted into a folder of its own, then dropped into the daemon's inbox as a tool does (temp + rename):
    # `submit` publishes with link(), which inotify reports as a create without a close, and the watcher then
    # waits UNCLOSED_SETTLE_SECONDS (60 s) before taking the file.
    staging, config = tmp_path / "staging", tmp_path / "config.yaml"
    paths = {"inbox": str(staging), "outbox": str(h.outbox), "models": str(h.settings.paths.models)}
    config.write_text(yaml.safe_dump({"paths": paths, "models": {"default": "tiny-ti2v-5b"}}))
    assert main(["resubmit", "--config", str(config), "--id", "again", str(h.outbox / "orig.json")]) == EXIT_OK
    h.drop("again.yaml", (staging / "again.yaml").read_text())
    again = h.sidecar("again", timeout=120)
    assert again["parameters"]["seed"] == side["parameters"]["seed"] and not again["parameters"]["seed_was_drawn"]
    assert again["spec"]["prompt"] == "yes"
    assert np.array_equal(_frames(h.outbox / "orig.mp4"), _frames(h.outbox / "again.mp4"))
