"""VRAM-aware scheduling end to end: one worker per GPU of a static two-GPU inventory (the workers run the
real tiny pipelines on this CPU), model affinity, admission, not_before and cancel."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timedelta, timezone

from conftest import wait_for

from daemon.cli import main
from daemon.ops.history import History
from daemon.ops.inventory import GpuInfo, StaticInventory

TWO_GPUS = [
    GpuInfo(index=0, name="Fake 24 GiB", total_mb=24576, used_mb=0, free_mb=24576),
    GpuInfo(index=1, name="Fake 80 GiB", total_mb=81920, used_mb=0, free_mb=81920),
]


def test_two_workers_run_jobs_concurrently_one_per_gpu(harness_factory):
    h = harness_factory(inventory=StaticInventory(TWO_GPUS)).start()
    assert sorted(h.daemon.workers) == ["gpu0", "gpu1"]
    wait_for(h.daemon.workers_ready, 60, what="both workers")
    h.drop("pair.yaml", "defaults: {model: tiny-ti2v-5b, steps: 30}\njobs:\n  - prompt: one\n  - prompt: two\n")
    sides = [h.sidecar("pair-1"), h.sidecar("pair-2")]
    assert {s["worker"] for s in sides} == {"gpu0", "gpu1"}
    h.idle()
    # The history keeps start and finish to the microsecond (the sidecar's ISO stamps stop at the second).
    with History(h.settings.history.path) as history:
        spans = [(r["started_at"], r["finished_at"]) for r in history.tasks(last=10) if r["id"].startswith("pair-")]
    assert len(spans) == 2
    assert max(start for start, _ in spans) < min(end for _, end in spans), f"ran one after the other: {spans}"
    health = json.loads(h.settings.health_path.read_text())
    assert set(health["workers"]) == {"gpu0", "gpu1"}


def test_workers_sharing_the_cpu_split_its_cores_between_them(harness_factory):
    # Here the "GPUs" are computed on the CPU: two workers each spinning all cores' OpenMP threads slowed
    # both many times over (a two-job test took minutes on two cores instead of seconds).
    h = harness_factory(inventory=StaticInventory(TWO_GPUS)).start()
    wait_for(h.daemon.workers_ready, 60, what="both workers")
    share = max(1, (os.cpu_count() or 1) // 2)
    assert [w.status.info.cpu_threads for w in h.daemon.workers.values()] == [share, share]
    h.stop()
    one = harness_factory(worker={"cpu_threads": 1}).start()
    wait_for(one.daemon.workers_ready, 60, what="worker")
    assert one.daemon.workers["cpu"].status.info.cpu_threads == 1


def test_mixed_queue_loads_each_model_once_thanks_to_affinity(harness_factory):
    h = harness_factory(worker={"max_cached_pipelines": 1}).start()
    wait_for(h.daemon.workers_ready, 60, what="worker")
    jobs = "".join(
        f"  - model: {'tiny-t2v-a14b' if n % 2 else 'tiny-ti2v-5b'}\n    prompt: job {n}\n" for n in range(10)
    )
    h.drop("mixed.yaml", "defaults: {steps: 2}\njobs:\n" + jobs)
    sides = [h.sidecar(f"mixed-{n}") for n in range(1, 11)]
    loads = [s["model_used"]["name"] for s in sides if s["model_used"]["cache"] == "loaded"]
    assert sorted(loads) == ["tiny-t2v-a14b", "tiny-ti2v-5b"], loads  # 10 without affinity


def test_each_model_loaded_at_most_once_per_worker_on_two_gpus(harness_factory):
    h = harness_factory(inventory=StaticInventory(TWO_GPUS), worker={"max_cached_pipelines": 1}).start()
    wait_for(h.daemon.workers_ready, 60, what="workers")
    jobs = "".join(
        f"  - model: {'tiny-t2v-a14b' if n % 2 else 'tiny-ti2v-5b'}\n    prompt: job {n}\n" for n in range(10)
    )
    h.drop("alt.yaml", "defaults: {steps: 2}\njobs:\n" + jobs)
    sides = [h.sidecar(f"alt-{n}") for n in range(1, 11)]
    loads = [(s["worker"], s["model_used"]["name"]) for s in sides if s["model_used"]["cache"] == "loaded"]
    assert len(loads) == len(set(loads)), loads


def test_a_job_that_fits_no_gpu_fails_at_once_with_the_numbers(harness_factory, tmp_path, models_dir):
    shutil.copytree(models_dir / "tiny-t2v-a14b", tmp_path / "big-a14b")
    h = harness_factory(inventory=StaticInventory(TWO_GPUS)).start()
    h.drop("huge.yaml", "model: big-a14b\nprompt: too big\nsize: 2048x2048\nframes: 481\n")
    record = h.failure("huge")
    assert record["error_category"] == "insufficient_vram" and record["attempts"] == 0
    assert "MiB" in record["message"] and "81920" in record["message"].replace(",", "")
    h.drop("small.yaml", "prompt: fits\nsteps: 2\n")
    assert h.sidecar("small")["status"] == "done"


def test_not_before_holds_a_job_until_its_time(harness):
    start = datetime.now(timezone.utc) + timedelta(seconds=4)
    harness.drop("later.yaml", f"prompt: later\nsteps: 2\nnot_before: '{start.isoformat()}'\n")
    harness.drop("now.yaml", "prompt: now\nsteps: 2\n")
    assert harness.sidecar("now")["status"] == "done"
    side = harness.sidecar("later")
    assert datetime.fromisoformat(side["timestamps"]["started_at"]) >= start.replace(microsecond=0)


def test_cancel_a_queued_and_a_running_job(harness_factory, capsys):
    h = harness_factory().start()
    wait_for(h.daemon.workers_ready, 60, what="worker")
    h.drop("first.yaml", "prompt: long running\nsteps: 400\n")
    wait_for(lambda: getattr(h.daemon.progress("first"), "step", 0) >= 2, 60, what="first to run")
    h.drop("second.yaml", "prompt: waiting\nsteps: 2\n")
    wait_for(lambda: "second" in h.daemon.records, 30, what="second to be queued")
    args = ["--inbox", str(h.inbox)]
    assert main(["cancel", *args, "second"]) == 0
    assert h.failure("second")["error_category"] == "cancelled"
    t0 = time.monotonic()
    assert main(["cancel", *args, "first"]) == 0
    record = h.failure("first")
    assert record["error_category"] == "cancelled" and "while it was running" in record["message"]
    assert time.monotonic() - t0 < 20
    assert not (h.outbox / "first.mp4").exists() and not (h.outbox / "second.mp4").exists()
    assert main(["cancel", *args, "nosuchjob"]) == 1
    h.drop("after.yaml", "prompt: after\nsteps: 2\n")
    assert h.sidecar("after")["attempts"] == 1  # the worker was not killed: same process, still warm


def test_a_job_silent_past_its_timeout_is_killed_and_retried(harness_factory):
    h = harness_factory(backend="daemon.testing:CueBackend").start()
    h.drop("stuck.yaml", "prompt: hang=60\ntimeout: 1.5\n")
    side = h.sidecar("stuck", timeout=60)
    assert side["attempts"] == 2
    assert h.daemon.workers["cpu"].status.restarts == 1
