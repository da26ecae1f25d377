"""Operating the daemon, end to end through the real daemon and the tiny models: systemd notify, history,
metrics, the analysis commands, doctor and the report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import yaml

from conftest import fast_settings, wait_for


def test_daemon_speaks_sd_notify_ready_status_watchdog_and_stopping(tmp_path, models_dir):
    settings = fast_settings(tmp_path, models_dir)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    messages: list[str] = []

    def receive_until(pred, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
            if pred():
                return True
        raise AssertionError(f"not received; got {messages[-10:]}")

    try:
        receive_until(lambda: any(m.startswith("READY=1") for m in messages))
        (settings.paths.inbox / "n.yaml").write_text("prompt: notify me\nsteps: 2\n")
        receive_until(lambda: any("STATUS=" in m and "1 done" in m for m in messages))
        receive_until(lambda: sum(m == "WATCHDOG=1" for m in messages) >= 3)  # every 0.5 s from the loop
        proc.send_signal(signal.SIGTERM)
        receive_until(lambda: "STOPPING=1" in messages and any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    ready = next(m for m in messages if m.startswith("READY=1"))
    assert "STATUS=" in ready and "queued" in ready
