"""Chaos run: N jobs through D daemons sharing one inbox, with K random `kill -9`s of daemons and workers.

Prints lost, duplicated and partial outputs (each must be 0) and a histogram of attempts.

    .venv/bin/python bench/chaos.py                                   # 200 jobs, 3 daemons, 50 kills, stand-in
    .venv/bin/python bench/chaos.py --backend real --jobs 12 --kills 6   # the real tiny Wan2.2 pipeline

With the stand-in backend (daemon.testing.CueBackend) each job only sleeps, standing in for the GPU, so
that hundreds of jobs and dozens of kills fit in a minute or two; `--backend real` runs the real tiny
diffusers pipelines and encodes real MP4s.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def daemon_config(root: Path, instance: str, models_dir: Path) -> dict:
    return {
        "paths": {"inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "models": str(models_dir)},
        "watch": {"settle_seconds": 0.2, "rescan_interval_seconds": 1.0},
        "worker": {
            "max_attempts": 12,
            "retry_base_seconds": 0.2,
            "retry_cap_seconds": 2.0,
            "overlap_encoding": "on",
        },  # so that kills land while a job is being encoded, too
        "instance": {
            "id": instance,
            "heartbeat_seconds": 0.5,
            "lease_grace_seconds": 3.0,
            "takeover_check_seconds": 0.5,
        },
        "models": {"default": "tiny-ti2v-5b"},
        "limits": {"min_free_mb": 0},
        "logging": {"level": "INFO"},
    }


class Fleet:
    def __init__(self, root: Path, daemons: int, backend: str, models_dir: Path) -> None:
        self.root = root
        self.backend = backend
        self.procs: dict[str, subprocess.Popen] = {}
        self.configs: dict[str, Path] = {}
        for i in range(daemons):
            name = f"d{i}"
            cfg = root / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump(daemon_config(root, name, models_dir)))
            self.configs[name] = cfg

    def start(self, name: str) -> None:
        cmd = [sys.executable, str(ROOT / "bench" / "chaos_daemon.py"), "--config", str(self.configs[name])]
        if self.backend == "cue":
            cmd += ["--backend", "daemon.testing:CueBackend"]
        log = open(self.root / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def worker_pid(self, name: str) -> int | None:
        try:
            health = json.loads((self.root / "inbox" / ".wan-daemon" / "health" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        if health.get("pid") != self.procs[name].pid:
            return None
        return (health.get("device") or {}).get("pid")

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


def drop_jobs(inbox: Path, n: int, backend: str, sleep: float) -> list[str]:
    inbox.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        job_id = f"job{i:04d}"
        text = (
            f"id: {job_id}\nprompt: sleep={sleep}\n"
            if backend == "cue"
            else f"id: {job_id}\nprompt: chaos {i}\nsteps: 20\nseed: {i}\n"
        )
        tmp = inbox / f".{job_id}.tmp"
        tmp.write_text(text)
        os.rename(tmp, inbox / f"{job_id}.yaml")
        ids.append(job_id)
    return ids


def audit(root: Path, ids: list[str]) -> dict:
    outbox = root / "outbox"
    lost, duplicated, partial, failed = [], [], [], []
    attempts = collections.Counter()
    published = collections.Counter()
    for log in root.glob("d*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "job.published id=" in line:
                published[line.split("job.published id=")[1].split()[0]] += 1
    for job_id in ids:
        video, side, fail = outbox / f"{job_id}.mp4", outbox / f"{job_id}.json", outbox / "failed" / f"{job_id}.json"
        if side.exists():
            data = json.loads(side.read_text())
            attempts[data["attempts"]] += 1
            if not video.exists():
                partial.append(job_id)
            elif (
                "sha256" in data["video"] and hashlib.sha256(video.read_bytes()).hexdigest() != data["video"]["sha256"]
            ):
                duplicated.append(job_id)  # the video was replaced after its sidecar was published
            elif data["job_token"] not in video.read_text(errors="replace") and "sha256" not in data["video"]:
                duplicated.append(job_id)
            if published[job_id] > 1:
                duplicated.append(job_id)
        elif fail.exists():
            failed.append(job_id)
        else:
            lost.append(job_id)
        if video.exists() and not side.exists():
            partial.append(job_id)
    temps = [p.name for p in outbox.iterdir() if p.name.startswith(".wan-tmp")]
    left_in_inbox = [p.name for p in (root / "inbox").glob("*.yaml")]
    return {
        "lost": lost,
        "duplicated": sorted(set(duplicated)),
        "partial": partial + temps,
        "failed": failed,
        "attempts": dict(sorted(attempts.items())),
        "inbox_left": left_in_inbox,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--daemons", type=int, default=3)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--backend", choices=["cue", "real"], default="cue")
    ap.add_argument("--sleep", type=float, default=0.3, help="seconds per stand-in job")
    ap.add_argument("--interval", type=float, default=0.6, help="seconds between kills")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="wan-chaos-"))
    models_dir = Path(os.path.expanduser("~/.cache/wan-daemon/models"))
    if args.backend == "real":
        sys.path.insert(0, str(ROOT))
        from daemon.worker.tiny import build_tiny

        build_tiny("tiny-ti2v-5b", models_dir)
    fleet = Fleet(root, args.daemons, args.backend, models_dir)
    t0 = time.monotonic()
    for name in fleet.configs:
        fleet.start(name)
    ids = drop_jobs(root / "inbox", args.jobs, args.backend, args.sleep)
    kills = collections.Counter()
    deadline = t0 + args.timeout

    def finished() -> int:
        return sum(
            1
            for j in ids
            if (root / "outbox" / f"{j}.json").exists() or (root / "outbox" / "failed" / f"{j}.json").exists()
        )

    while kills["daemon"] + kills["worker"] < args.kills and finished() < len(ids) and time.monotonic() < deadline:
        time.sleep(args.interval)
        name = rng.choice(list(fleet.procs))
        proc = fleet.procs[name]
        if rng.random() < 0.5:
            pid = fleet.worker_pid(name)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills["worker"] += 1
                except ProcessLookupError:
                    pass
        elif proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the daemon and its worker, as a power cut would
            proc.wait()
            kills["daemon"] += 1
            time.sleep(rng.uniform(0, 2.0))
            fleet.start(name)
    while finished() < len(ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    wall = time.monotonic() - t0
    fleet.stop_all()
    result = audit(root, ids)
    print(f"chaos run: {args.jobs} jobs, {args.daemons} daemons sharing one inbox, backend={args.backend}")
    print(f"  kill -9: {kills['daemon']} daemons (with their workers), {kills['worker']} workers; wall {wall:.1f}s")
    print(f"  done {args.jobs - len(result['lost']) - len(result['failed'])}, failed {len(result['failed'])}")
    print(f"  lost        {len(result['lost'])}  {result['lost'][:10]}")
    print(f"  duplicated  {len(result['duplicated'])}  {result['duplicated'][:10]}")
    print(f"  partial     {len(result['partial'])}  {result['partial'][:10]}")
    print(f"  left in inbox {len(result['inbox_left'])}")
    print("  attempts histogram: " + ", ".join(f"{k}: {v}" for k, v in result["attempts"].items()))
    print(f"  work folder: {root}")
    bad = result["lost"] or result["duplicated"] or result["partial"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
