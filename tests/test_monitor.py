"""``wan-daemon monitor`` (daemon.ops.monitor): every worker and every running job of every daemon, an operator's
pause, a plain snapshot when stdout is not a terminal, and no log line drawn into the view."""

from __future__ import annotations

import io
import json
import time

import pytest
from loguru import logger

from daemon import control
from daemon.ops import inventory, monitor


def health(folder, instance: str, workers: dict, running: list, **extra) -> None:
    doc = {
        "instance": instance,
        "host": f"host-{instance}",
        "state": "running",
        "updated_at": time.time(),
        "queue_depth": 3,
        "done": 1,
        "failed": 0,
        "paused": None,
        "workers": workers,
        "running": running[0] if running else None,
        "running_jobs": running,
        **extra,
    }
    (folder / f"{instance}.json").write_text(json.dumps(doc))


@pytest.fixture
def farm(tmp_path):
    folder = tmp_path / "health"
    folder.mkdir()
    w = {"state": "busy", "gpu": 0, "device": "cuda:0", "warm_models": ["tiny-ti2v-5b"], "restarts": 0, "pid": 11}
    pause = {"mode": "drain", "free_vram": True, "by": "ops@h", "at": 0.0, "reason": "client render"}
    health(
        folder,
        "alpha",
        {
            "gpu0": w,
            "gpu1": {**w, "gpu": 1, "device": "cuda:1", "pid": 12},
            "gpu2": {**w, "state": "parked", "gpu": 2, "device": None, "warm_models": [], "pid": None},
        },
        [
            {
                "id": "job-on-gpu0",
                "worker": "gpu0",
                "model": "tiny-ti2v-5b",
                "phase": "denoising",
                "step": 2,
                "total": 8,
                "attempt": 1,
                "started_at": time.time() - 3,
            },
            {
                "id": "job-on-gpu1",
                "worker": "gpu1",
                "model": "tiny-ti2v-5b",
                "phase": "loading",
                "step": 0,
                "total": 8,
                "attempt": 2,
                "started_at": time.time() - 1,
            },
        ],  # fmt: skip
        operator_pause=pause,
    )
    health(folder, "beta", {"cpu": {"state": "ready", "gpu": None, "device": "cpu", "warm_models": []}}, [])
    return folder


def sections(text: str) -> dict[str, list[list[str]]]:
    """The snapshot's tables by title, each a list of tab-split lines (header first)."""
    out: dict[str, list[list[str]]] = {}
    for block in text.strip().split("\n\n"):
        title, *lines = block.splitlines()
        assert title.startswith("# wan-daemon ")
        out[title.removeprefix("# wan-daemon ")] = [line.split("\t") for line in lines]
    return out


@pytest.fixture
def log_lines(monkeypatch):
    """Every loguru line from here on, and NVML readings that log one each time (as on a host without NVML)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG")

    def no_nvml():
        raise ImportError("no pynvml here")

    monkeypatch.setattr(inventory, "_import_pynvml", no_nvml)
    yield lines
    logger.remove(sink)


def test_a_piped_snapshot_lists_every_worker_and_every_running_job(farm, capsys):
    monitor.run(farm, 0.0, iterations=5)  # capsys: stdout is not a terminal, so one snapshot and no waiting
    s = sections(capsys.readouterr().out)
    assert set(s) == {"daemons", "workers", "running", "gpus"}
    workers = {(r[0], r[1]): r for r in s["workers"][1:]}
    assert set(workers) == {("alpha", "gpu0"), ("alpha", "gpu1"), ("alpha", "gpu2"), ("beta", "cpu")}
    header = s["workers"][0]
    assert workers[("alpha", "gpu2")][header.index("state")] == "parked"
    assert workers[("alpha", "gpu0")][header.index("warm_models")] == "tiny-ti2v-5b"
    assert workers[("alpha", "gpu1")][header.index("job")] == "job-on-gpu1"
    assert [r[1] for r in s["running"][1:]] == ["job-on-gpu0", "job-on-gpu1"]
    daemons = {r[0]: r for r in s["daemons"][1:]}
    paused = daemons["alpha"][s["daemons"][0].index("paused")]
    assert "ops@h" in paused and "client render" in paused
    assert daemons["alpha"][s["daemons"][0].index("running")] == "2"
    assert daemons["beta"][s["daemons"][0].index("paused")] == "-"


def test_a_pause_written_but_not_yet_applied_is_shown(farm, tmp_path):
    state = tmp_path / "state"
    control.write_pause(state, control.PauseRequest(by="late@h", reason="maintenance"))
    out = io.StringIO()
    monitor.run(farm, 0.0, iterations=1, state=state, out=out, tty=False)
    daemons = sections(out.getvalue())["daemons"]
    beta = next(r for r in daemons[1:] if r[0] == "beta")
    assert "not yet applied" in beta[daemons[0].index("paused")] and "late@h" in beta[daemons[0].index("paused")]


def test_no_log_line_reaches_the_view_and_logging_comes_back_after(farm, capsys, log_lines):
    monitor.run(farm, 0.0, iterations=1)
    out, err = capsys.readouterr()
    assert log_lines == [] and err == ""
    assert "alpha" in out
    monitor.gpu_rows()  # the same reading outside the monitor logs as before
    assert any("inventory.nvml_unavailable" in line for line in log_lines)


def test_the_live_view_draws_every_worker_and_job_and_no_log_line(farm, log_lines, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: rich folds long cells on a narrow one
    out = io.StringIO()
    monitor.run(farm, 0.0, iterations=2, out=out, tty=True)
    text = out.getvalue()
    for name in ("gpu0", "gpu1", "gpu2", "parked", "job-on-gpu0", "job-on-gpu1", "beta", "ops@h"):
        assert name in text
    assert log_lines == []
