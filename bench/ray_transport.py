"""What Ray costs as the worker transport (worker.executor: ray) against a local worker process, on this machine.

The two executors are driven directly, as the daemon's placement drives them (submit, then wait on
``event_handle`` and ``poll`` until the job's Done), with the same backend and the same jobs:

- ``ray.init`` and ``ray.shutdown`` of a private instance; RSS of Ray's own processes once it is up;
- start until Ready: a Ray actor and a local worker process, with the stand-in backend and with the real one
  (which imports torch and diffusers);
- per-job transport: stand-in jobs that do nothing (submit -> Done), medians;
- tiny-job time: the real tiny TI2V-5B, 64x64, 9 frames, 4 steps, warm, alternated rounds, medians, Ray/local;
- failure detection and respawn: SIGKILL of the worker mid-job -> the synthetic Failed; -> Ready again;
- bytes through the object store: a stand-in job whose video is 256 MB (read on the node, carried by the
  object store, written and fsynced into the outbox's temp), less the same job with an empty video.

    .venv/bin/python bench/ray_transport.py [--jobs 20] [--rounds 3] [--big-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config import RayConfig  # noqa: E402
from daemon.testing import CueBackend, make_model, make_params  # noqa: E402
from daemon.worker.process import LocalProcessExecutor  # noqa: E402
from daemon.worker.protocol import Done, Failed, JobPayload, JobResult, VideoFacts, WorkerConfig  # noqa: E402

CUE = "daemon.testing:CueBackend"
BIG = "bench.ray_transport:BigBackend"


class BigBackend(CueBackend):
    """The stand-in whose "video" is ``big=MB`` megabytes (cue in the prompt) of incompressible bytes."""

    def finish(self, generated: Any) -> JobResult:
        result = super().finish(generated)
        mb = int(self._cues(generated.payload).get("big", 0))
        if mb:
            out = Path(generated.payload.video_tmp)
            with open(out, "wb") as fh:
                for _ in range(mb):
                    fh.write(os.urandom(2**20))
                os.fsync(fh.fileno())
            assert result.video is not None
            result.video = VideoFacts(mb * 2**20, "-", 1, 1.0, 64, 64)
        return result


def config(name: str, models: Path, backend: str | None) -> WorkerConfig:
    return WorkerConfig(
        worker_name=name, device="cpu", models_dir=str(models), cpu_threads=2, backend=backend, log_level="WARNING"
    )


def local(models: Path, backend: str | None) -> LocalProcessExecutor:
    cfg = config("local", models, backend)
    return LocalProcessExecutor(cfg, clock=time.monotonic, stall_timeout_seconds=600, start_timeout_seconds=600)


def remote(models: Path, backend: str | None) -> Any:
    from daemon.worker.ray_executor import RayExecutor

    cfg = config("ray", models, backend)
    rc = RayConfig(start_timeout_seconds=600)
    return RayExecutor(cfg, ray_config=rc, clock=time.monotonic, stall_timeout_seconds=600, num_gpus=0)


def pump(ex: Any, until: Any, timeout: float = 600) -> Any:
    """Poll ``ex`` the way the daemon's loop does until ``until(event)`` (or the executor is ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handle = ex.event_handle
        if handle is not None:
            wait([handle], timeout=0.02)
        else:
            time.sleep(0.02)
        for ev in ex.poll():
            if until(ev):
                return ev
        if until(None):
            return None
    raise TimeoutError(f"{ex.name}: nothing after {timeout}s")


def started(ex: Any) -> float:
    t0 = time.perf_counter()
    ex.start()
    pump(ex, lambda ev: ex.ready)
    return time.perf_counter() - t0


_n = 0


def job(ex: Any, outbox: Path, model: Any, prompt: str, **params: Any) -> tuple[float, Any]:
    global _n
    _n += 1
    job_id = f"j{_n}"
    payload = JobPayload(
        id=job_id,
        token="t",
        attempt=1,
        model=model,
        params=make_params(prompt=prompt, basename=job_id, **params),
        video_tmp=str(outbox / f".tmp-{job_id}.mp4"),
    )
    t0 = time.perf_counter()
    ex.submit(payload)
    ev = pump(ex, lambda e: isinstance(e, (Done, Failed)) and e.id == job_id)
    seconds = time.perf_counter() - t0
    for tmp in (Path(payload.video_tmp), Path(payload.poster_tmp)):
        tmp.unlink(missing_ok=True)
    return seconds, ev


def ray_rss_mb() -> dict[str, float]:
    import psutil

    out: dict[str, float] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            name, rss = p.name(), p.memory_info().rss / 2**20
        except psutil.Error:
            continue
        out[name] = out.get(name, 0.0) + rss
    return out


def kill_mid_job(ex: Any, outbox: Path, model: Any) -> tuple[float, float]:
    """SIGKILL the worker at its first step; seconds until the synthetic Failed, then until it is ready again."""
    payload = JobPayload(
        id="victim",
        token="t",
        attempt=1,
        model=model,
        params=make_params(prompt="sleep=10", basename="victim"),
        video_tmp=str(outbox / ".tmp-victim.mp4"),
    )
    ex.submit(payload)
    pump(ex, lambda ev: ev is not None and getattr(ev, "type", "") == "progress")
    pid = ex.status.pid
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    ev = pump(ex, lambda e: isinstance(e, Failed) and e.synthetic)
    detected = time.perf_counter() - t0
    assert ev.error.error_category.value == "worker_crashed", ev
    pump(ex, lambda e: ex.ready)
    return detected, time.perf_counter() - t0 - detected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20, help="jobs per round and executor")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=256)
    args = ap.parse_args()
    import ray

    from daemon.models import locate
    from daemon.worker.tiny import build_all

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    models, outbox = work / "models", work / "outbox"
    outbox.mkdir(parents=True)
    build_all(models)
    tiny = locate("tiny-ti2v-5b", models_dir=models, model_roots=[])
    cue_model = make_model()
    fig: dict[str, Any] = {}

    t0 = time.perf_counter()
    ray.init(num_cpus=2, object_store_memory=(args.big_mb * 2 + 200) * 2**20, include_dashboard=False)
    fig["ray_init_s"] = time.perf_counter() - t0
    time.sleep(3)  # let its prestarted workers settle
    fig["ray_rss_mb"] = ray_rss_mb()

    cue_l, cue_r = local(models, BIG), remote(models, BIG)
    fig["start_cue_local_s"], fig["start_cue_ray_s"] = started(cue_l), started(cue_r)
    fig["ray_rss_with_actor_mb"] = ray_rss_mb()
    transport: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(args.rounds):
        for name, ex in (("local", cue_l), ("ray", cue_r)):
            transport[name] += [job(ex, outbox, cue_model, "x")[0] for _ in range(args.jobs)]
    fig["transport_ms"] = {k: statistics.median(v) * 1000 for k, v in transport.items()}

    big: dict[str, float] = {}
    for name, ex in (("local", cue_l), ("ray", cue_r)):
        empty = statistics.median(job(ex, outbox, cue_model, "big=0")[0] for _ in range(3))
        full = statistics.median(job(ex, outbox, cue_model, f"big={args.big_mb}")[0] for _ in range(3))
        big[name] = full - empty
    fig["big_result_extra_s"] = big
    fig["object_store_MBps"] = args.big_mb / max(1e-6, big["ray"] - big["local"])

    for name, ex in (("local", cue_l), ("ray", cue_r)):
        fig[f"kill_detect_{name}_s"], fig[f"respawn_{name}_s"] = kill_mid_job(ex, outbox, cue_model)
    cue_l.stop()
    cue_r.stop()

    real_l, real_r = local(models, None), remote(models, None)
    fig["start_real_local_s"], fig["start_real_ray_s"] = started(real_l), started(real_r)
    fig["torch_threads"] = {"local": real_l.status.info.cpu_threads, "ray": real_r.status.info.cpu_threads}
    real = {"steps": 4, "width": 64, "height": 64, "frames": 9}
    for ex in (real_l, real_r):
        job(ex, outbox, tiny, "warm up", **real)
    tiny_s: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(args.rounds):
        for name, ex in (("local", real_l), ("ray", real_r)):
            tiny_s[name] += [job(ex, outbox, tiny, f"a fox {n}", **real)[0] for n in range(max(3, args.jobs // 4))]
    fig["tiny_job_s"] = {k: statistics.median(v) for k, v in tiny_s.items()}
    fig["tiny_ratio_ray_over_local"] = fig["tiny_job_s"]["ray"] / fig["tiny_job_s"]["local"]
    real_l.stop()
    real_r.stop()

    t0 = time.perf_counter()
    ray.shutdown()
    fig["ray_shutdown_s"] = time.perf_counter() - t0
    print(json.dumps(fig, indent=1, default=lambda x: round(x, 4)))


if __name__ == "__main__":
    main()
