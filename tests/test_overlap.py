"""The CPU-side end of a job (MP4 encoding, reading it back, the poster) overlaps with the next job's
generation: the worker says ``device_free`` once a job's frames are off the device and takes the next job,
while a finisher thread encodes the previous one. Nothing is lost when the worker dies or the daemon stops
in the middle of it."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path

from conftest import wait_for

from daemon.jobspec.params import resolve_params
from daemon.jobspec.spec import JobSpec
from daemon.models import locate
from daemon.worker.main import worker_main
from daemon.worker.protocol import Done, Failed, JobPayload, WorkerConfig, event_from_wire, to_wire

CUE = "daemon.testing:CueBackend"
ON = {"overlap_encoding": "on"}  # the stand-in and these CPUs say "cpu": overlap is on for GPUs by default


def _payload(job_id: str, models_dir: Path, out: Path, steps: int = 3) -> JobPayload:
    located = locate("tiny-ti2v-5b", models_dir=models_dir, model_roots=[])
    params = resolve_params(
        JobSpec(prompt=f"overlap {job_id}", seed=1, steps=steps),
        located.info,
        max_side=4096,
        max_frames=1000,
        max_steps=1000,
    )
    params = params.model_copy(update=dict(basename=job_id, offload="none", vae_tiling=False, fp8=False))
    return JobPayload(
        id=job_id,
        token=f"t-{job_id}",
        attempt=1,
        model=located,
        params=params,
        input_image=None,
        video_tmp=str(out / f".{job_id}.tmp.mp4"),
    )


def _run_two_jobs_in_a_real_worker(models_dir: Path, out: Path, overlap: str) -> tuple[list, dict, int]:
    ctx = mp.get_context("spawn")
    jobs, events, interrupt = ctx.Queue(), ctx.Queue(), ctx.Event()
    config = WorkerConfig(
        worker_name="cpu",
        device="cpu",
        models_dir=str(models_dir),
        allow_cpu_for_real_models=False,
        max_cached_pipelines=1,
        cache_budget_mb=None,
        cpu_threads=1,
        overlap_encoding=overlap,
        log_level="INFO",
        backend=None,
        visible_device=None,
    )
    proc = ctx.Process(target=worker_main, args=(to_wire(config), jobs, events, interrupt), daemon=True)
    proc.start()
    try:
        for job_id in ("one", "two"):
            jobs.put(to_wire(_payload(job_id, models_dir, out)))
        jobs.put(None)
        seen: list[tuple[str, str]] = []
        results = {}
        deadline = time.monotonic() + 180
        while len(results) < 2 and time.monotonic() < deadline:
            try:
                ev = event_from_wire(events.get(timeout=1))
            except queue.Empty:
                continue
            if ev.type in ("started", "device_free", "done", "failed"):
                seen.append((ev.type, ev.id))
            if isinstance(ev, (Done, Failed)):
                results[ev.id] = ev
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    return seen, results, proc.exitcode


def test_the_real_worker_starts_the_next_job_before_the_previous_one_is_encoded(models_dir, tmp_path):
    seen, results, exitcode = _run_two_jobs_in_a_real_worker(models_dir, tmp_path, "on")
    assert {r.type for r in results.values()} == {"done"}, results
    # The device was handed the second job as soon as the first one's frames were off it, while the first
    # one was still being encoded; results still come in order.
    assert seen.index(("device_free", "one")) < seen.index(("started", "two")) < seen.index(("done", "one")), seen
    assert seen.index(("done", "one")) < seen.index(("done", "two"))
    for ev in results.values():
        r = ev.result
        assert Path(r.video_tmp).stat().st_size > 0 and r.video.frames == r.frames_generated
        assert {"encode", "verify", "poster", "denoise", "vae_decode"} <= set(r.timings)
    assert exitcode == 0  # it finished the last video before leaving


def test_a_worker_computing_on_the_cpu_takes_turns_by_default(models_dir, tmp_path):
    # On a CPU the encoder would take the cores the generation needs: auto keeps the two apart.
    seen, results, _ = _run_two_jobs_in_a_real_worker(models_dir, tmp_path, "auto")
    assert {r.type for r in results.values()} == {"done"}, results
    assert seen == [("started", "one"), ("done", "one"), ("started", "two"), ("done", "two")], seen


def test_the_daemon_dispatches_the_next_job_while_the_last_one_encodes(harness_factory):
    h = harness_factory(backend=CUE, worker=ON).start()
    wait_for(h.daemon.workers_ready, 60, what="worker")
    h.drop("slow.yaml", "prompt: sleep=0.2 encode_sleep=3\n")
    wait_for(
        lambda: getattr(h.daemon.running.get("slow"), "phase", None) == "encoding",
        30,
        interval=0.01,
        what="slow to be encoding",
    )
    h.drop("next.yaml", "prompt: sleep=0.2\n")
    # Both at once on one worker: one being encoded, the other on the device.
    both = wait_for(
        lambda: {i: job.on_device for i, job in h.daemon.running.items()} == {"slow": False, "next": True},
        30,
        interval=0.01,
        what="next on the device while slow encodes",
    )
    assert both
    assert h.sidecar("slow")["status"] == "done" and h.sidecar("next")["status"] == "done"


def _daemon_encoding(harness_factory, cues: str):
    """A daemon (stand-in backend, overlap on) whose job "enc" is being encoded."""
    h = harness_factory(backend=CUE, worker=ON).start()
    wait_for(h.daemon.workers_ready, 60, what="worker")
    h.drop("enc.yaml", f"prompt: {cues}\n")
    wait_for(
        lambda: "enc" in h.daemon.running and not h.daemon.running["enc"].on_device,
        30,
        interval=0.01,
        what="enc to be encoding",
    )
    return h


def test_a_worker_that_dies_while_encoding_loses_neither_job(harness_factory):
    h = _daemon_encoding(harness_factory, "sleep=0.1 encode_sleep=1 crash_encoding_once")
    h.drop("after.yaml", "prompt: sleep=2\n")
    enc, after = h.sidecar("enc"), h.sidecar("after")
    assert enc["attempts"] == 2 and after["status"] == "done"
    assert not list((h.outbox / "failed").glob("*.json"))


def test_shutdown_publishes_the_job_being_encoded_and_requeues_the_one_on_the_device(harness_factory):
    h = _daemon_encoding(harness_factory, "sleep=0.1 encode_sleep=2")
    h.drop("dev.yaml", "prompt: sleep=8\n")
    wait_for(lambda: getattr(h.daemon.running.get("dev"), "on_device", False), 30, interval=0.01, what="dev running")
    h.stop()
    assert (h.outbox / "enc.mp4").exists() and (h.outbox / "enc.json").exists()
    assert not (h.outbox / "dev.json").exists()
    restarted = harness_factory(backend=CUE, worker=ON).start()  # the interrupted one comes back from the spool
    assert restarted.sidecar("dev", timeout=90)["status"] == "done"
