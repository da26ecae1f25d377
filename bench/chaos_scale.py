"""Chaos at scale: two daemons on one inbox, thousands of stand-in jobs, the daemon holding most of them
restarted (kill -9, then started again at once: its recovery runs with thousands of records) several times,
and frozen (SIGSTOP) once for longer than the lease grace.

Counts what must stay 0: jobs lost, duplicated, partial or failed, and takeovers of a live daemon (a daemon is
taken over legitimately only after it was dead or frozen for about the grace). The frozen one must be taken
over once and, when it wakes, drop its records without writing failure records.

    python bench/chaos_scale.py [--jobs 10000] [--restarts 3] [--grace 10]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import Fleet, audit, daemon_config  # noqa: E402

ADOPTED = re.compile(r"^(\S+ \S+) \| .*lease\.adopted from=(\S+) jobs=(\d+)")


def drop_batches(inbox: Path, n: int, sleep: float) -> list[str]:
    """n stand-in jobs in batch files of 1,000 (renamed in, as careful tools do)."""
    inbox.mkdir(parents=True, exist_ok=True)
    ids = []
    for b in range(0, n, 1000):
        lines = ["jobs:"]
        for i in range(b, min(n, b + 1000)):
            ids.append(f"job{i:05d}")
            lines.append(f"  - {{id: job{i:05d}, prompt: 'sleep={sleep}'}}")
        tmp = inbox / f".batch{b // 1000:03d}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.rename(tmp, inbox / f"batch{b // 1000:03d}.yaml")
    return ids


def queued_by(root: Path, name: str) -> int:
    try:
        health = yaml.safe_load((root / "inbox" / ".wan-daemon" / "health" / f"{name}.json").read_text())
        return int(health.get("queue_depth") or 0)
    except (OSError, ValueError, AttributeError):
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per stand-in job")
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wan-chaos-scale-"))
    models_dir = Path(os.path.expanduser("~/.cache/wan-daemon/models"))
    fleet = Fleet(root, 2, "cue", models_dir)
    for name, cfg in fleet.configs.items():
        config = daemon_config(root, name, models_dir)
        config["instance"].update(
            heartbeat_seconds=args.heartbeat, lease_grace_seconds=args.grace, takeover_check_seconds=args.heartbeat
        )
        config["worker"]["max_attempts"] = 5
        cfg.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    ids = drop_batches(root / "inbox", args.jobs, args.sleep)  # before the daemons start: d0 claims most
    fleet.start("d0")
    time.sleep(3)
    fleet.start("d1")
    down: dict[str, list[tuple[float, float]]] = {"d0": [], "d1": []}  # wall-clock spans a daemon was not alive

    def finished() -> int:
        out = root / "outbox"
        return sum(1 for j in ids if (out / f"{j}.json").exists() or (out / "failed" / f"{j}.json").exists())

    def busiest() -> str:
        return max(fleet.procs, key=lambda n: queued_by(root, n))

    for _ in range(args.restarts):
        time.sleep(args.grace / 2)
        name = busiest()
        os.killpg(fleet.procs[name].pid, signal.SIGKILL)
        fleet.procs[name].wait()
        killed = time.time()
        fleet.start(name)  # at once: the restart's recovery must keep the lease
        down[name].append((killed, time.time()))
    time.sleep(args.grace / 2)
    frozen = busiest()
    stopped = time.time()
    os.killpg(fleet.procs[frozen].pid, signal.SIGSTOP)
    time.sleep(args.grace * 2)
    os.killpg(fleet.procs[frozen].pid, signal.SIGCONT)
    down[frozen].append((stopped, time.time()))
    deadline = t0 + args.timeout
    while finished() < len(ids) and time.monotonic() < deadline:
        time.sleep(1)
    wall = time.monotonic() - t0
    fleet.stop_all()
    result = audit(root, ids)
    takeovers, live = [], []
    for log in sorted(root.glob("d*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = ADOPTED.match(line)
            if not m:
                continue
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            victim = m.group(2)
            takeovers.append((victim, m.group(3)))
            legit = any(end - start >= args.grace * 0.9 and start <= at for start, end in down.get(victim, []))
            if not legit:
                live.append((victim, m.group(1)))
    print(
        f"chaos at scale: {args.jobs} jobs, 2 daemons, {args.restarts} kill -9 + restart of the busier one, "
        f"one SIGSTOP of {args.grace * 2:.0f} s (grace {args.grace:g} s); wall {wall:.0f} s"
    )
    print(
        f"  done {args.jobs - len(result['lost']) - len(result['failed'])}, failed {len(result['failed'])}, "
        f"lost {len(result['lost'])}, duplicated {len(result['duplicated'])}, partial {len(result['partial'])}"
    )
    print(f"  takeovers {len(takeovers)} {takeovers}; of a live daemon {len(live)} {live}")
    print(f"  work folder: {root}")
    bad = result["lost"] or result["duplicated"] or result["partial"] or result["failed"] or live
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
