"""Scheduling figures: pickup latency (inotify and polling), model loads for a mixed queue with and without
model affinity, the scheduler's decision time with 1,000 to 100,000 queued jobs, and how long ``wan-daemon
queue`` takes to list 10,000 queued jobs.

    .venv/bin/python bench/scheduling.py [--drops 10] [--decisions-only] [--queue-only]

Pickup latency is measured through the real daemon (watcher, claim, intake, dispatch) with the stand-in
backend (daemon.testing.CueBackend), from the rename into the inbox to the job's hand-over to a worker.
Model loads are counted by replaying the daemon's dispatch decisions (daemon.scheduler.assign, which prefers
a warm model) against plain FIFO order (pick_next), with one worker that keeps one model warm.
Decision time: assign() on the list of queued records (ranks all of them: the baseline) against
assign_from() on a ReadyQueue (reads a bounded window), p50 and p95, in the same run.
Queue listing: 10,000 queued records written by the daemon's own Spool.transition, two workers in a health
file and per-model timings in a history (so every estimate is computed); queue_rows() in-process and
``wan-daemon queue --json`` as a subprocess, against a bare scan (list and json-parse every record) in the
same run, and against the interpreter's start with the CLI imported (``wan-daemon queue --help``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config import load_settings  # noqa: E402
from daemon.jobs import JobRecord  # noqa: E402
from daemon.memory import JobDemand, plan_for  # noqa: E402
from daemon.scheduler import ReadyQueue, Slot, assign, assign_from, pick_next  # noqa: E402
from daemon.testing import make_record  # noqa: E402


def pickup_latency(mode: str, drops: int) -> list[float]:
    from daemon import logs
    from daemon.runtime.daemon import Daemon

    logs.setup("WARNING")
    root = Path(tempfile.mkdtemp(prefix=f"wan-pickup-{mode}-"))
    settings = load_settings(
        None,
        {
            "paths": {"inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "models": str(root / "models")},
            "watch": {"mode": mode, "poll_interval_seconds": 1.0},
            "models": {"default": "tiny-ti2v-5b"},
            "logging": {"level": "WARNING"},
        },
    )
    daemon = Daemon(settings, backend="daemon.testing:CueBackend")
    daemon.start()
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    while not daemon.workers_ready():
        time.sleep(0.05)
    latencies = []
    for n in range(drops):
        job_id = f"p{n}"
        tmp = settings.paths.inbox / f".{job_id}.tmp"
        tmp.write_text(f"id: {job_id}\nprompt: sleep=0\n")
        t0 = time.time()
        os.rename(tmp, settings.paths.inbox / f"{job_id}.yaml")
        while True:
            rec = daemon.records.get(job_id)
            if rec is not None and rec.started_at:
                latencies.append(rec.started_at - t0)
                if os.environ.get("BENCH_DEBUG"):
                    print(
                        f"    intake {1000 * (rec.received_at - t0):.1f} ms, "
                        f"dispatch {1000 * (rec.started_at - rec.received_at):.1f} ms"
                    )
                break
            if (settings.paths.outbox / f"{job_id}.json").exists():
                import json

                started = json.loads((settings.paths.outbox / f"{job_id}.json").read_text())["timings"]
                latencies.append(time.time() - t0 - started["total"])
                break
            time.sleep(0.002)
        while daemon.running:
            time.sleep(0.01)
        time.sleep(0.3)
    daemon.request_stop()
    thread.join(30)
    return latencies


def record(n: int, model: str, priority: int = 0, queued_at: float = 0.0) -> JobRecord:
    return make_record(
        f"j{n}",
        seq=n,
        model=model,
        architecture="wan2.2-ti2v-5b",
        priority=priority,
        params={"steps": 2},
        received_at=queued_at,
        queued_at=queued_at,
        token=f"t{n}",
        source="s",
        source_name="s.yaml",
    )


def model_loads(n_jobs: int, models: list[str], affinity: bool) -> int:
    queued = [record(n, models[n % len(models)]) for n in range(n_jobs)]
    warm: str | None = None
    loads = 0
    while queued:
        if affinity:
            slot = Slot("gpu0", 0, 81920, frozenset([warm]) if warm else frozenset(), 81920)
            demand = lambda r: JobDemand("wan2.2-ti2v-5b", 64, 64, 9, tiny=True)  # noqa: E731
            [a] = assign(
                queued, [slot], 1.0, aging_bound_seconds=3600, demand=demand, plan=lambda d, free: plan_for(d, free)
            )
            rec = a.record
        else:
            rec = pick_next(queued, 1.0)
        queued.remove(rec)
        if rec.model.name != warm:
            loads += 1
            warm = rec.model.name
    return loads


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))]


def decision_times(n: int, free_gpus: int = 2) -> dict[str, list[float]]:
    """Seconds per decision with ``n`` queued jobs (11 priorities, 3 models, one intake a second) and
    ``free_gpus`` free 80 GiB GPUs, one of them warm: ``assign`` on the list (the baseline, which ranks the
    whole queue) against ``assign_from`` on a ReadyQueue (the window). ``now`` moves on between decisions."""
    queued = [record(i, f"model-{i % 3}", priority=i % 11 - 5, queued_at=float(i)) for i in range(n)]
    queue = ReadyQueue()
    for r in queued:
        queue.add(r)
    slots = [Slot(f"gpu{i}", i, 81920, frozenset({"model-1"} if i == 0 else ()), 81920) for i in range(free_gpus)]
    demand = lambda r: JobDemand("wan2.2-ti2v-5b", 1280, 704, 121)  # noqa: E731
    kw = dict(aging_bound_seconds=3600.0, demand=demand, plan=lambda d, free: plan_for(d, free))
    times: dict[str, list[float]] = {"assign(list)": [], "assign_from(queue)": []}
    list_runs = max(5, min(50, 200_000 // max(n, 1)))
    for name, runs, call in (
        ("assign(list)", list_runs, lambda now: assign(queued, slots, now, **kw)),
        ("assign_from(queue)", 500, lambda now: assign_from(queue, slots, now, **kw)),
    ):
        call(float(n))  # warm-up (the queue's first decision makes every job ready: O(n log n), once)
        for k in range(runs):
            now = float(n) + 0.001 * (k + 1)
            t0 = time.perf_counter()
            out = call(now)
            times[name].append(time.perf_counter() - t0)
            assert len(out) == free_gpus
    return times


def decision_table(sizes: tuple[int, ...] = (1_000, 10_000, 100_000)) -> None:
    print("  scheduler decision, 2 free GPUs (one warm), 11 priorities, 3 models (ms):")
    print(f"    {'queued':>8} | {'assign(list) p50':>16} {'p95':>8} | {'assign_from(queue) p50':>22} {'p95':>8}")
    for n in sizes:
        t = decision_times(n)
        a, b = t["assign(list)"], t["assign_from(queue)"]
        print(
            f"    {n:>8,} | {statistics.median(a) * 1e3:>16.3f} {percentile(a, 0.95) * 1e3:>8.3f} | "
            f"{statistics.median(b) * 1e3:>22.3f} {percentile(b, 0.95) * 1e3:>8.3f}"
        )


def queue_state(root: Path, n: int) -> Path:
    """A state folder holding ``n`` queued jobs (11 priorities, 3 models, waits up to an hour) as the daemon writes
    them, a health file with two ready workers, and a history with timings of each model; returns a config file."""
    from daemon.jobs import JobState
    from daemon.ops.history import History
    from daemon.runtime.spool import Spool

    now = time.time()
    state = root / "inbox" / ".wan-daemon"
    spool = Spool(state / "owners" / "bench", "bench", clock=lambda: now)
    models = ("tiny-ti2v-5b", "tiny-t2v-a14b", "tiny-i2v-a14b")
    for i in range(n):
        rec = record(i, models[i % 3], priority=i % 11 - 5, queued_at=now - i % 3600)
        spool.transition(rec.model_copy(update={"state": None}), JobState.QUEUED, durable=False)
    (state / "health").mkdir(parents=True)
    workers = {f"gpu{i}": {"state": "ready", "gpu": i, "warm_models": []} for i in range(2)}
    health = {"instance": "bench", "state": "running", "updated_at": now, "workers": workers}
    (state / "health" / "bench.json").write_text(json.dumps(health))  # queue_listing keeps it fresh
    with History(root / "history.sqlite") as history:
        for k in range(30):
            row = {"id": f"h{k}", "token": f"h{k}", "status": "done", "model_used": models[k % 3]}
            history.record({**row, "generation_time_seconds": 60.0 + k, "finished_at": now - 100 + k})
    config = root / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "paths": {"inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "state": str(state)},
                "instance": {"id": "bench"},
                "history": {"path": str(root / "history.sqlite")},
            }
        )
    )
    return config


def bare_scan(state: Path) -> int:
    """The baseline: list every spool and json-parse every record, nothing else."""
    n = 0
    for owner in os.listdir(state / "owners"):
        jobs = state / "owners" / owner / "jobs"
        for name in os.listdir(jobs):
            with open(jobs / name / "job.json", "rb") as fh:
                json.loads(fh.read())
            n += 1
    return n


def queue_listing(n: int = 10_000, runs: int = 5) -> None:
    from daemon import logs
    from daemon.ops.queue_view import queue_rows

    logs.setup("WARNING")
    root = Path(tempfile.mkdtemp(prefix="wan-queue-bench-"))
    t0 = time.perf_counter()
    config = queue_state(root, n)
    built = time.perf_counter() - t0
    settings = load_settings(config)
    state = settings.paths.state
    health = state / "health" / "bench.json"

    def fresh() -> None:  # as a running daemon does: a stale health file (> 30 s) would hold every estimate
        health.write_text(json.dumps({**json.loads(health.read_text()), "updated_at": time.time()}))

    def p50(call) -> float:
        times = []
        for _ in range(runs):
            fresh()
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    scan = p50(lambda: bare_scan(state))
    fresh()
    rows = queue_rows(settings, now=time.time())
    assert len(rows) == n and rows[0]["est_finish"] is not None
    listing = p50(lambda: queue_rows(settings, now=time.time()))
    env = {**os.environ, "NO_COLOR": "1"}
    has_queue = subprocess.run([sys.executable, "-m", "daemon", "queue", "--help"], capture_output=True, env=env)
    if has_queue.returncode == 0:
        label, cmd = (
            "wan-daemon queue --json",
            [sys.executable, "-m", "daemon", "queue", "--json", "--config", str(config)],
        )
    else:  # the CLI has no `queue` yet: the same function through python -c
        code = (
            "import argparse; from daemon.config import load_settings; from daemon.ops.queue_view import queue_command;"
            f"queue_command(argparse.Namespace(json=True), load_settings({str(config)!r}))"
        )
        label, cmd = "python -c queue_command(--json) (no `queue` subcommand yet)", [sys.executable, "-c", code]

    outputs: list[bytes] = []
    cli = p50(lambda: outputs.append(subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT, check=True).stdout))
    assert len(json.loads(outputs[-1])["jobs"]) == n
    startup = p50(lambda: subprocess.run([sys.executable, "-m", "daemon", "queue", "--help"], capture_output=True))
    load = os.getloadavg()[0]
    print(f"  queue listing, {n:,} queued jobs (3 models, 11 priorities, 2 workers), p50 of {runs} (ms); built in "
          f"{built:.1f} s; load average {load:.2f}:")  # fmt: skip
    print(f"    bare scan (list + json-parse every record)   {scan * 1e3:8.0f}")
    print(f"    queue_rows() in-process (order + estimates)  {listing * 1e3:8.0f}")
    print(f"    {label:<45}{cli * 1e3:8.0f}   (interpreter + imports alone: {startup * 1e3:.0f})")
    shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drops", type=int, default=10)
    ap.add_argument("--decisions-only", action="store_true", help="only the scheduler decision table")
    ap.add_argument("--queue-only", action="store_true", help="only the queue listing figure")
    args = ap.parse_args()
    print(f"wan-daemon scheduling benchmark ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')})")
    if args.decisions_only:
        decision_table()
        return 0
    if args.queue_only:
        queue_listing()
        return 0
    for mode in ("inotify", "polling"):
        lat = sorted(pickup_latency(mode, args.drops))
        p95 = lat[min(len(lat) - 1, int(round(0.95 * len(lat))) - 1)]
        print(
            f"  pickup latency, {mode:8} (file renamed in -> job handed to a worker), {len(lat)} drops: "
            f"p50 {statistics.median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms"
        )
    for n_models in (2, 3):
        models = [f"model-{i}" for i in range(n_models)]
        with_aff, without = model_loads(60, models, True), model_loads(60, models, False)
        print(
            f"  model loads, 60 queued jobs alternating {n_models} models, one worker keeping one warm: "
            f"{with_aff} with affinity, {without} in plain FIFO order"
        )
    decision_table()
    queue_listing()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
