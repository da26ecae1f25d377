"""Queue control end to end: real ``wan-daemon run`` processes rendering the tiny models, driven only through the
command line (``submit``, ``queue``, ``status``, ``pause``, ``resume``, ``priority``, ``cancel``, ``retry``,
``check-health``), as an operator or a cron script would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import fast_settings, wait_for

TINY = "model: tiny-ti2v-5b\nframes: 5\nsize: 96x64\nseed: 1\n"


class Farm:
    """Daemon processes sharing one inbox (one config file each) and a way to run the CLI against them."""

    def __init__(self, root: Path, models_dir: Path) -> None:
        self.root = root
        self.models_dir = models_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.configs: dict[str, Path] = {}
        self.logs: dict[str, Path] = {}
        self.settings = self.config("a")
        self.inbox, self.outbox = self.settings.paths.inbox, self.settings.paths.outbox

    def config(self, instance: str):
        settings = fast_settings(self.root, self.models_dir, instance={"id": instance})
        doc = json.loads(settings.model_dump_json())
        path = self.root / f"config-{instance}.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.configs[instance] = path
        return settings

    def start(self, instance: str = "a") -> None:
        if instance not in self.configs:
            self.config(instance)
        log = self.root / f"daemon-{instance}.log"
        self.logs[instance] = log
        with open(log, "w") as err:
            self.procs[instance] = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--config", str(self.configs[instance])],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "NO_COLOR": "1"},
            )
        wait_for(lambda: "worker.ready" in log.read_text(), 120, what=f"daemon {instance} and its worker")

    def log(self, instance: str = "a") -> str:
        return self.logs[instance].read_text()

    def cli(self, *args: str, instance: str = "a", ok: tuple[int, ...] = (0,), timeout: float = 120):
        res = subprocess.run(
            [sys.executable, "-m", "daemon", *args, "--config", str(self.configs[instance])],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert res.returncode in ok, f"wan-daemon {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
        assert "Traceback" not in res.stderr, res.stderr
        return res

    def queue(self) -> list[dict]:
        return json.loads(self.cli("queue", "--json").stdout)["jobs"]

    def submit(self, name: str, text: str, *extra: str) -> list[str]:
        src = self.root / "drafts" / name
        src.parent.mkdir(exist_ok=True)
        src.write_text(text)
        res = self.cli("submit", *extra, str(src))
        return res.stdout.split()

    def sidecar(self, basename: str, timeout: float = 180) -> dict:
        path = self.outbox / f"{basename}.json"
        wait_for(path.exists, timeout, what=f"sidecar {path.name}")
        return json.loads(path.read_text())

    def dispatch_order(self, instance: str = "a") -> list[str]:
        return re.findall(r"job\.dispatched id=(\S+)", self.log(instance))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def farm(tmp_path, models_dir):
    f = Farm(tmp_path, models_dir)
    yield f
    f.stop()


def test_queue_lists_a_mixed_priority_queue_in_the_order_the_scheduler_runs_it(farm):
    farm.cli("pause")  # before the daemon starts: it starts paused, and the whole queue is there to compare
    farm.start()
    priorities = [0, 5, -3, 5, 10, 0, 2, -3, 7, 1]
    batch = "defaults:\n" + "".join(f"  {line}\n" for line in TINY.splitlines()) + "  steps: 2\njobs:\n"
    batch += "".join(f"  - {{id: q{n}, prompt: job {n}, priority: {p}}}\n" for n, p in enumerate(priorities))
    ids = farm.submit("mixed.yaml", batch)
    assert ids == [f"q{n}" for n in range(10)]  # submit prints every id it will create
    wait_for(lambda: len(farm.queue()) == 10, 60, what="all ten jobs taken in")
    listed = farm.queue()
    assert [row["position"] for row in listed] == list(range(1, 11))
    assert all(row["state"] == "queued" for row in listed)
    expected = sorted(range(10), key=lambda n: (-priorities[n], n))  # priority, then intake order
    assert [row["id"] for row in listed] == [f"q{n}" for n in expected]
    time.sleep(1.0)
    assert farm.dispatch_order() == []  # paused: nothing started
    farm.cli("resume")
    for n in range(10):
        farm.sidecar(f"q{n}")
    assert farm.dispatch_order() == [row["id"] for row in listed]


def test_pause_drains_frees_vram_and_resume_goes_on_and_pause_now_gives_the_attempt_back(farm):
    farm.start()
    farm.submit("warmup.yaml", TINY + "prompt: warm up\nsteps: 2\n")
    assert farm.sidecar("warmup")["model_used"]["cache"] == "loaded"
    farm.submit("long.yaml", TINY + "prompt: a long one\nsteps: 60\n")
    wait_for(lambda: any(r["state"] == "running" for r in farm.queue()), 60, what="the long job to run")
    farm.cli("pause", "--free-vram", "--reason", "a render for the client")
    farm.submit("later.yaml", TINY + "prompt: after the pause\nsteps: 2\n")
    long = farm.sidecar("long")
    assert long["attempts"] == 1  # drain: the running job finished
    status = json.loads(farm.cli("status", "--json").stdout)
    wait_for(
        lambda: all(
            w["state"] == "parked" for w in json.loads(farm.cli("status", "--json").stdout)["workers"].values()
        ),
        60,
        what="the worker parked",
    )
    status = json.loads(farm.cli("status", "--json").stdout)
    assert status["operator_pause"]["reason"] == "a render for the client"
    health = farm.cli("check-health")
    assert "paused" in health.stdout
    assert [r["id"] for r in farm.queue()] == ["later"]
    assert "later" not in farm.dispatch_order()
    story = json.loads(farm.cli("status", "later", "--json").stdout)
    assert story["state"] == "queued"
    farm.cli("resume")
    assert farm.sidecar("later")["model_used"]["cache"] == "loaded"  # the pipeline was dropped with the worker

    farm.submit("again.yaml", TINY + "prompt: now stop\nsteps: 60\n")
    wait_for(lambda: any(r["state"] == "running" for r in farm.queue()), 60, what="the job to run")
    farm.cli("pause", "--now")
    wait_for(lambda: [r["state"] for r in farm.queue()] == ["queued"], 60, what="the job back in the queue")
    story = json.loads(farm.cli("status", "again", "--json").stdout)
    assert story["state"] == "queued" and story["attempts"] == 0  # interrupted by us: the attempt given back
    farm.cli("resume")
    again = farm.sidecar("again")
    assert again["attempts"] == 1 and again["model_used"]["cache"] == "cached"
    story = json.loads(farm.cli("status", "again", "--json").stdout)
    assert story["state"] == "done" and story["outputs"]["video"].endswith("again.mp4")


def test_bulk_cancel_leaves_exactly_the_expected_jobs_and_retry_renders_a_cancelled_one(farm):
    farm.cli("pause")
    farm.start()
    farm.submit(
        "keep.yaml",
        "defaults: {model: tiny-ti2v-5b, frames: 5, size: 96x64, steps: 2}\njobs:\n"
        "  - {id: keep1, prompt: one}\n  - {id: keep2, prompt: two}\n",
    )
    farm.submit(
        "drop.yaml",
        "defaults: {model: tiny-ti2v-5b, frames: 5, size: 96x64, steps: 2}\njobs:\n"
        "  - {id: drop1, prompt: one}\n  - {id: drop2, prompt: two}\n",
    )
    farm.submit("other.yaml", "model: tiny-t2v-a14b\nframes: 5\nsize: 96x64\nsteps: 2\nprompt: three\nid: other1\n")
    wait_for(lambda: len(farm.queue()) == 5, 60, what="five jobs queued")
    dry = json.loads(farm.cli("cancel", "--file", "drop.yaml", "--dry-run", "--json").stdout)
    assert sorted(j["id"] for j in dry["jobs"]) == ["drop1", "drop2"]
    assert len(farm.queue()) == 5  # a dry run cancels nothing
    farm.cli("cancel", "--file", "drop.yaml")
    farm.cli("cancel", "--model", "tiny-t2v-a14b")
    wait_for(lambda: sorted(r["id"] for r in farm.queue()) == ["keep1", "keep2"], 60, what="the cancels applied")
    for job in ("drop1", "drop2", "other1"):
        record = json.loads((farm.outbox / "failed" / f"{job}.json").read_text())
        assert record["error_category"] == "cancelled"
    retried = farm.cli("retry", "drop2").stdout.split()
    assert retried == ["drop2"]
    wait_for(lambda: "drop2" in [r["id"] for r in farm.queue()], 60, what="the retried job queued")
    farm.cli("resume")
    for job in ("keep1", "keep2", "drop2"):
        farm.sidecar(job)
    assert not (farm.outbox / "failed" / "drop2.json").exists()  # the old record is kept aside, not in the way
    assert list((farm.outbox / "failed" / "retried").glob("drop2.*.json"))
    assert not (farm.outbox / "drop1.json").exists() and not (farm.outbox / "other1.json").exists()
    story = json.loads(farm.cli("status", "drop2", "--json").stdout)
    assert story["state"] == "done"


def test_submit_wait_prints_the_outcomes_and_exits_by_them(farm):
    farm.start()
    src = farm.root / "drafts" / "good.yaml"
    src.parent.mkdir(exist_ok=True)
    src.write_text(TINY + "prompt: a good one\nsteps: 2\n")
    res = farm.cli("submit", "--wait", "--timeout", "300", str(src))
    assert f"done good {farm.outbox / 'good.mp4'}" in res.stdout
    # Refused while published; --force renames it.
    again = farm.cli("submit", str(src), ok=(1,))
    assert "good" in again.stderr
    renamed = farm.cli("submit", "--force", "--wait", "--timeout", "300", str(src))
    assert f"done good-2 {farm.outbox / 'good-2.mp4'}" in renamed.stdout

    farm.cli("pause")
    doomed = farm.root / "drafts" / "doomed.yaml"
    doomed.write_text(TINY + "prompt: never runs\nsteps: 2\n")
    waiter = subprocess.Popen(
        [sys.executable, "-m", "daemon", "submit", "--wait", "--config", str(farm.configs["a"]), str(doomed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: [r["id"] for r in farm.queue()] == ["doomed"], 60, what="the doomed job queued")
    farm.cli("cancel", "doomed")
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 3, err
    assert f"failed doomed {farm.outbox / 'failed' / 'doomed.json'}" in out
    farm.cli("resume")


def test_two_daemons_sharing_one_inbox_both_obey_pause(farm):
    farm.start("a")
    farm.start("b")
    farm.cli("pause")
    for n in range(6):  # six files: either daemon may claim each
        farm.submit(f"s{n}.yaml", TINY + f"prompt: shared {n}\nsteps: 2\n")
    wait_for(lambda: len(farm.queue()) == 6, 60, what="the jobs taken in")
    for instance in ("a", "b"):
        wait_for(lambda i=instance: "daemon.paused" in farm.log(i), 30, what=f"daemon {instance} paused")
    time.sleep(1.5)
    assert farm.dispatch_order("a") == [] and farm.dispatch_order("b") == []
    farm.cli("resume")
    for n in range(6):
        farm.sidecar(f"s{n}")


def test_every_json_output_parses_and_piped_tables_keep_whole_ids(farm):
    long_id = "a-very-long-job-id-" + "x" * 100  # wider than any terminal table would keep
    farm.start()
    farm.submit("done.yaml", TINY + f"id: {long_id}\nprompt: done\nsteps: 2\n")
    farm.sidecar(long_id)
    farm.cli("pause")
    farm.submit("waiting.yaml", TINY + f"id: {long_id}-q\nprompt: waits\nsteps: 2\n")
    wait_for(lambda: len(farm.queue()) == 1, 60, what="the queued job")
    farm.cli("cancel", f"{long_id}-q", "--dry-run")
    good = farm.root / "drafts" / "waiting.yaml"
    commands = [
        ["queue"],
        ["status"],
        ["status", long_id],
        ["status", f"{long_id}-q"],
        ["tasks"],
        ["analysis"],
        ["config", "show"],
        ["validate", str(good)],
        ["check-health"],
        ["cancel", "--all-queued", "--dry-run"],
        ["retry", "--failed-since", "1h", "--dry-run"],
        ["pause"],
    ]
    for args in commands:
        res = farm.cli(*args, "--json", ok=(0, 1))
        json.loads(res.stdout)  # one document, nothing else on stdout
    for args, ids in ((["queue"], [f"{long_id}-q"]), (["tasks"], [long_id, f"{long_id}-q"])):
        res = farm.cli(*args)  # stdout is a pipe here
        rows = [line.split("\t") for line in res.stdout.splitlines() if line]
        assert all(len(r) == len(rows[0]) for r in rows), res.stdout  # a header, then rows of the same width
        for job_id in ids:
            assert any(job_id in r for r in rows), f"{args}: {job_id} not a whole field in\n{res.stdout}"
    snapshot = farm.cli("monitor").stdout  # piped: one plain snapshot, then it exits
    assert "\ta\t" in snapshot or snapshot.startswith("a\t") or "\na\t" in snapshot
    # The reader goes away before the writer is done: no traceback, no "Exception ignored" noise.
    gone = subprocess.run(
        f"{sys.executable} -m daemon config show --config {farm.configs['a']} | true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gone.stderr == ""
    farm.cli("resume")
