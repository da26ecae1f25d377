"""Nothing accepted that cannot finish: the extreme accepted value of every numeric field renders a video.

One daemon run on the tiny models renders one batch whose jobs, between them, take each numeric field to
both ends of what intake accepts: the JobSpec bounds, and the configured limits (set small here so that the
largest accepted size, frame count and step count stay cheap)."""

from __future__ import annotations

import json

from conftest import wait_for

from daemon.jobspec.spec import JobSpec

LIMITS = {"max_side": 96, "max_frames": 17, "max_steps": 4}
LOW = {"frames": 1, "fps": 1, "steps": 1, "guidance_scale": 0, "flow_shift": 1e-6, "seed": 0, "priority": -1000}
HIGH = {"frames": 17, "fps": 120, "steps": 4, "guidance_scale": 50, "flow_shift": 100, "seed": 2**32 - 1}
JOBS = [
    {"id": "low-5b", "model": "tiny-ti2v-5b", "size": "32x32", "output": {"quality": 0}, **LOW},
    {"id": "high-5b", "model": "tiny-ti2v-5b", "size": "96x96", "output": {"quality": 10}, **HIGH, "priority": 1000},
    {"id": "low-a14b", "model": "tiny-t2v-a14b", "size": "16x16", "guidance_scale_2": 0, **LOW},
    {"id": "high-a14b", "model": "tiny-t2v-a14b", "size": "96x96", "guidance_scale_2": 50, **HIGH},
]


def test_the_extremes_cover_every_numeric_field_at_both_ends():
    numeric = {
        name
        for name, field in JobSpec.model_fields.items()
        if any(t in str(field.annotation) for t in ("int", "float")) and name != "timeout"
    }
    assert numeric - {"width", "height"} <= set(LOW) | {"guidance_scale_2"}
    for job in JOBS:
        JobSpec.model_validate({"prompt": "p", **job})  # each is accepted as written
    assert JobSpec.model_fields["fps"].metadata and HIGH["fps"] == 120 and LOW["fps"] == 1


def test_every_accepted_extreme_renders_a_video(harness_factory):
    h = harness_factory(limits=LIMITS).start()
    h.drop("extremes.yaml", json.dumps({"defaults": {"prompt": "extremes"}, "jobs": JOBS}))
    ended = [h.outbox / f"{j['id']}.json" for j in JOBS] + [h.outbox / "failed" / f"{j['id']}.json" for j in JOBS]
    wait_for(lambda: sum(p.exists() for p in ended) >= len(JOBS), 240, what="every extreme job to end")
    failed = [json.loads(p.read_text())["message"] for p in (h.outbox / "failed").glob("*.json")]
    assert not failed, failed
    for job in JOBS:
        sidecar = h.sidecar(job["id"])
        video, params = sidecar["video"], sidecar["parameters"]
        width, height = (int(x) for x in job["size"].split("x"))
        assert (video["frames"], video["fps"]) == (job["frames"], job["fps"]), job["id"]
        assert (video["width"], video["height"]) == (width, height), job["id"]
        assert (params["steps"], params["seed"], params["quality"]) == (
            job["steps"],
            job["seed"],
            job.get("output", {}).get("quality", 8.0),
        )
        assert (h.outbox / f"{job['id']}.mp4").stat().st_size > 0
