"""GPU workers as Ray actors (worker.executor: ray, daemon.worker.ray_executor): real daemons drive actors on one
local Ray cluster with two fake GPUs (Ray resources), the stand-in backend inside the actors, and one real tiny
Wan pipeline end to end. Skipped, with the reason, only where ray is not installed (`pip install
'wan-daemon[ray]'`; `make venv` installs it)."""

from __future__ import annotations

import json

import pytest
from conftest import wait_for
from rayhelpers import RAY_INIT, RayDaemons, actor_of, sha256

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'wan-daemon[ray]')")


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    """One Ray instance for the module: two CPUs, two fake GPUs."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, **RAY_INIT)
    yield
    ray.shutdown()


@pytest.fixture
def daemons(tmp_path):
    made = RayDaemons(tmp_path)
    yield made
    made.stop_all()


def test_a_queue_of_four_jobs_is_published_once_each_with_the_hash_the_actor_computed(daemons):
    # Overlap on: an actor takes its next job while it encodes the last, so two streams of one actor interleave.
    h = daemons.start(ray={"actors": 2}, worker={"overlap_encoding": "on"})
    wait_for(h.daemon.workers_ready, 60, what="two actors")
    for n in range(4):
        h.drop(f"q{n}.yaml", f"prompt: sleep=0.2 encode_sleep=0.3\nseed: {n}\n")
    sides = [h.sidecar(f"q{n}") for n in range(4)]
    for n, side in enumerate(sides):
        video = h.outbox / f"q{n}.mp4"
        assert side["video"]["sha256"] == sha256(video)  # hashed on the node, checked here on the bytes it sent
        assert video.read_bytes().startswith(f"cue-backend output for {side['id']} ".encode())
        assert side["attempts"] == 1
        assert actor_of(side)["actor_id"] and actor_of(side)["host"]
        assert side["device"]["actor"] == actor_of(side)["actor_id"] and side["device"]["host"]
    assert sorted(p.name for p in h.outbox.glob("*.mp4")) == [f"q{n}.mp4" for n in range(4)]
    workers = h.daemon.workers.values()
    assert {actor_of(s)["actor_id"] for s in sides} == {w.placed.actor_id for w in workers}
    assert all(w.status.info.actor == w.placed.actor_id and w.status.info.host for w in workers)
    health = json.loads(h.settings.health_path.read_text())
    assert {w["actor"] for w in health["workers"].values()} == {w.placed.actor_id for w in workers}
    h.idle()
    assert not list(h.outbox.glob(".*"))  # no temp left behind


def test_a_crash_mid_job_is_retried_on_a_fresh_actor(daemons):
    h = daemons.start()
    h.drop("warm.yaml", "prompt: sleep=0.1\n")
    first = actor_of(h.sidecar("warm"))
    h.drop("crash.yaml", "prompt: sleep=0.5 crash_once\n")
    side = h.sidecar("crash")
    assert side["attempts"] == 2
    again = actor_of(side)
    assert again["actor_id"] != first["actor_id"]  # a new actor process: nothing of the old one's cache
    assert again["restarts"] == 1 and h.daemon.workers["ray0"].status.restarts == 1


def test_a_hung_job_times_out_its_actor_is_killed_and_the_job_retried(daemons):
    h = daemons.start()
    h.drop("stuck.yaml", "prompt: hang=60\ntimeout: 1.5\n")
    side = h.sidecar("stuck", timeout=60)
    assert side["attempts"] == 2
    assert actor_of(side)["restarts"] == 1


def test_cancel_mid_job_interrupts_it_and_leaves_the_actor_warm(daemons):
    from daemon.cli import main

    h = daemons.start()
    h.drop("long.yaml", "prompt: sleep=60\n")
    wait_for(lambda: getattr(h.daemon.progress("long"), "step", 0) >= 2, 60, what="long to run")
    actor = h.daemon.workers["ray0"].placed.actor_id
    assert main(["cancel", "--inbox", str(h.inbox), "long"]) == 0
    record = h.failure("long", timeout=30)
    assert record["error_category"] == "cancelled" and "while it was running" in record["message"]
    h.drop("after.yaml", "prompt: sleep=0.1\n")
    side = h.sidecar("after")
    assert side["attempts"] == 1
    assert actor_of(side)["actor_id"] == actor and actor_of(side)["restarts"] == 0


def test_an_actor_no_node_can_place_fails_to_start_instead_of_waiting(daemons):
    h = daemons.start(ray={"resources": {"wan_test_no_such_node": 1}, "start_timeout_seconds": 2})
    worker = h.daemon.workers["ray0"]
    wait_for(lambda: worker.failing_to_start, 30, what="the actor to be given up")
    assert not worker.ready
    assert "no Ray node could place the actor" in (worker.status.last_fatal or "")
    assert "wan_test_no_such_node" in worker.status.last_fatal


def test_a_job_on_a_real_tiny_model_through_an_actor(daemons, models_dir):
    from PIL import Image

    h = daemons.start(backend=None, models=models_dir)
    Image.new("RGB", (64, 64), (220, 40, 30)).save(h.inbox / "start.png")
    h.drop(
        "real.yaml",
        "model: tiny-ti2v-5b\ntask: ti2v\nimage: start.png\nprompt: a red square\nframes: 9\nsize: 64x64\nsteps: 2\n",
    )
    failed = h.outbox / "failed" / "real.json"
    wait_for(lambda: (h.outbox / "real.json").exists() or failed.exists(), 240, what="the job to end")
    assert not failed.exists(), failed.read_text()
    side = h.sidecar("real")
    video = h.outbox / "real.mp4"
    assert side["status"] == "done" and side["video"]["sha256"] == sha256(video)
    assert side["video"]["frames"] == 9 and (side["video"]["width"], side["video"]["height"]) == (64, 64)
    assert (h.outbox / "real.jpg").stat().st_size > 0  # the poster came back through the object store too
    assert side["model_used"]["path"].startswith(str(models_dir))  # found by name in the node's models folder
    assert actor_of(side)["actor_id"] == h.daemon.workers["ray0"].placed.actor_id
