"""How long the job-file reader takes to refuse each file of the hostile corpus (tests/test_hostile.py bounds
the work; the time is measured here, where a loaded machine does not fail a build).

Baseline, measured in the same run: reading an ordinary single-job file, and PyYAML's plain ``safe_load`` of
the same hostile bytes where that finishes (it has no limits: for the deep nesting it recurses until Python's
limit). Medians of ``--repeat`` runs.

    python bench/hostile.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_hostile import CORPUS, LIMIT  # noqa: E402

from daemon.jobspec.spec import parse_job_file  # noqa: E402

ORDINARY = b"id: fox\nprompt: A red fox trotting through fresh snow at dawn\nseed: 42\nsize: 1280x704\nframes: 121\n"


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def plain_safe_load(data: bytes) -> None:
    try:
        yaml.safe_load(data)
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError, ValueError):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    base = median_ms(lambda: parse_job_file(ORDINARY, "fox.yaml", max_bytes=LIMIT), args.repeat)
    print(f"ordinary job file: {base:.2f} ms (baseline)")
    print(f"{'file':<16} {'refused in':>11} {'x baseline':>11} {'plain safe_load':>16}")
    for name, (data, _needle, _bound) in CORPUS.items():
        ms = median_ms(lambda data=data: parse_job_file(data, "evil.yaml", max_bytes=LIMIT), args.repeat)
        plain = median_ms(lambda data=data: plain_safe_load(data), 1) if len(data) < (1 << 20) else float("nan")
        print(f"{name:<16} {ms:>9.2f} ms {ms / base:>10.1f}x {plain:>13.1f} ms")


if __name__ == "__main__":
    main()
