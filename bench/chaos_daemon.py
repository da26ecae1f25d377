"""One daemon for bench/chaos.py: `wan-daemon run`, with the stand-in backend injected when asked.

The stand-in (daemon.testing.CueBackend) sleeps or fails on cue in place of a GPU and is only reachable
from code like this; the product's CLI always runs the real diffusers backend.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import logs  # noqa: E402
from daemon.config import load_settings  # noqa: E402
from daemon.runtime.daemon import Daemon  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--backend", default=None, help="module:Factory of a stand-in backend (default: real)")
    args = p.parse_args()
    settings = load_settings(Path(args.config))
    logs.setup(settings.logging.level)
    daemon = Daemon(settings, backend=args.backend)
    seen = []

    def on_signal(signum, _frame):
        seen.append(signum)
        if len(seen) == 1:
            daemon.request_stop()
        else:
            daemon.kill_workers()
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
