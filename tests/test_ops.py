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
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    messages: list[str] = []

    def receive_until(pred, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
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


def test_metrics_textfile_is_written_by_the_running_daemon(harness_factory, tmp_path):
    prom = tmp_path / "textfile" / "wan-daemon.prom"
    prom.parent.mkdir()
    h = harness_factory(metrics={"textfile": str(prom), "interval_seconds": 0.2}).start()
    h.drop("m.yaml", "prompt: measured\nsteps: 2\n")
    h.drop("bad.yaml", "prompt: x\nframes: 2\n")
    h.sidecar("m")
    h.failure("bad")

    def counted():
        text = prom.read_text() if prom.exists() else ""
        done = f'wan_daemon_jobs_done_total{{instance_id="{h.settings.owner}"}} 1' in text
        return text if done and 'category="invalid_spec"' in text else None

    text = wait_for(counted, 20, what="metrics with the finished jobs")
    lines = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines() if line and line[0] != "#"}
    instance = h.settings.owner
    assert lines[f'wan_daemon_jobs_done_total{{instance_id="{instance}"}}'] == "1"
    assert lines[f'wan_daemon_jobs_failed_total{{instance_id="{instance}",category="invalid_spec"}}'] == "1"
    assert any(k.startswith("wan_daemon_job_duration_seconds_count") and 'model="tiny-ti2v-5b"' in k for k in lines)
    assert not [p for p in prom.parent.iterdir() if p.name != prom.name]


def test_doctor_report_and_monitor_on_a_real_outbox(harness_factory, tmp_path, capsys):
    from daemon.cli import main

    h = harness_factory().start()
    h.drop("r.yaml", "prompt: <b>for the report</b>\nsteps: 2\n")
    h.drop("f.yaml", "prompt: x\nsize: 100x100\n")
    h.sidecar("r")
    h.failure("f")
    args = ["--inbox", str(h.inbox), "--outbox", str(h.outbox)]
    code = main(["doctor", *args])
    out = capsys.readouterr().out
    assert code in (0, 1) and "video encoding" in out and "python" in out
    assert main(["report", *args]) == 0
    html = (h.outbox / "report.html").read_text()
    assert "r.jpg" in html and "&lt;b&gt;for the report&lt;/b&gt;" in html and "invalid_spec" in html
    assert main(["monitor", *args, "--interval", "0.1", "--iterations", "1"]) == 0
    assert "wan-daemon" in capsys.readouterr().out


def test_history_is_filled_by_real_runs_and_read_by_tasks_and_analysis(harness_factory, capsys, monkeypatch):
    from daemon.cli import main
    from daemon.ops.history import History

    h = harness_factory().start()
    h.drop("ok.yaml", "defaults: {steps: 2}\njobs:\n  - prompt: one\n  - prompt: two\n")
    h.drop("bad.yaml", "prompt: x\nframes: 6\n")
    h.sidecar("ok-1")
    h.sidecar("ok-2")
    h.failure("bad")
    h.idle()
    with History(h.settings.history.path) as history:
        rows = {r["id"]: r for r in history.tasks(last=10)}
    assert rows["ok-1"]["status"] == "done" and rows["ok-1"]["generation_time_seconds"] > 0
    assert rows["ok-1"]["model_used"] == "tiny-ti2v-5b" and rows["ok-1"]["resolution"] == "64x64"
    assert rows["ok-1"]["output_video"].endswith("ok-1.mp4") and rows["ok-1"]["peak_rss_mb"] > 0
    assert rows["bad"]["status"] == "failed" and rows["bad"]["error_category"] == "invalid_spec"
    args = ["--inbox", str(h.inbox), "--outbox", str(h.outbox)]
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "200")  # rich fits tables to the terminal; make the test's one wide
    assert main(["tasks", *args, "--last", "5"]) == 0
    out = capsys.readouterr().out
    assert "ok-1" in out and "bad" in out
    assert main(["tasks", *args, "--status", "failed", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["bad"]
    assert main(["analysis", *args, "--hours", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["done"] == 2 and result["failed"] == 1 and result["failure_categories"] == {"invalid_spec": 1}
    assert main(["analysis", *args]) == 0
    assert "tiny-ti2v-5b" in capsys.readouterr().out
