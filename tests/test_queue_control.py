"""Queue control from the command line, in this process on made-up spools and outboxes: pause/resume, priority,
bulk cancel, retry, submit (ids, duplicates, --force, --wait). The daemon's side of each request (applying it) is
tested with the daemon; here, what each command reads, refuses and writes."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from daemon import control
from daemon.cli import EXIT_FAIL, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from daemon.config import load_settings
from daemon.errors import Category, JobError
from daemon.jobs import JobState
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool
from daemon.testing import make_record

TINY = "model: tiny-ti2v-5b\nframes: 5\nsize: 96x64\nsteps: 2\n"


class Farm:
    """An inbox, an outbox and a state folder as daemons would leave them, without a daemon."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.yaml"
        paths = {"inbox": str(root / "inbox"), "outbox": str(root / "outbox")}
        self.config.write_text(yaml.safe_dump({"paths": paths, "models": {"default": "tiny-ti2v-5b"}}))
        self.settings = load_settings(self.config)
        self.inbox, self.outbox, self.state = (
            self.settings.paths.inbox,
            self.settings.paths.outbox,
            self.settings.paths.state,
        )
        self.failed = self.outbox / "failed"
        self.seq = 0

    def cli(self, *args: str) -> int:
        return main([*args, "--config", str(self.config)])

    def hold(self, job_id: str, state=JobState.QUEUED, *, instance="a", file="f.yaml", model="tiny-ti2v-5b", **kw):
        """A job record in daemon ``instance``'s spool, written as the daemon writes it."""
        self.seq += 1
        spool = Spool(self.state / "owners" / instance, instance)
        first = JobState.WAITING_FOR_MODEL if state is JobState.WAITING_FOR_MODEL else JobState.QUEUED
        rec = make_record(job_id, seq=self.seq, model=model, state=None, source_name=file, **kw)
        rec = spool.transition(rec, first)
        if state is JobState.RUNNING:
            rec = spool.transition(rec, JobState.RUNNING)
        return rec

    def fail(self, job_id: str | None, spec: dict | None, *, category=Category.CANCELLED, name=None, file="f.yaml"):
        """A failure record written as the daemon writes it."""
        path = Outbox(self.outbox).write_failure(
            name or job_id,
            JobError(category, f"{category.value} on cue"),
            job_id=job_id,
            source_name=file,
            spec=spec,
            attempts=1,
        )
        return path

    def publish(self, basename: str, job_id: str) -> None:
        self.outbox.mkdir(parents=True, exist_ok=True)
        (self.outbox / f"{basename}.mp4").write_bytes(b"video")
        (self.outbox / f"{basename}.json").write_text(json.dumps({"id": job_id, "status": "done"}))

    def draft(self, name: str, text: str) -> Path:
        path = self.root / "drafts" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path


@pytest.fixture
def farm(tmp_path) -> Farm:
    return Farm(tmp_path)


def out_json(capsys):
    return json.loads(capsys.readouterr().out)


# ---- pause / resume ----------------------------------------------------------------------------------------


def test_pause_writes_the_request_every_daemon_reads_and_resume_removes_it(farm, capsys):
    assert farm.cli("pause", "--now", "--free-vram", "--reason", "client render") == EXIT_OK
    line = capsys.readouterr().out
    assert "running jobs go back to the queue" in line and "GPUs are freed" in line and "resume" in line
    asked = control.read_pause(farm.state)
    assert asked is not None and (asked.mode, asked.free_vram, asked.reason) == ("now", True, "client render")
    assert asked.by == control.requester() and abs(asked.at - time.time()) < 60
    assert farm.cli("pause", "--json") == EXIT_OK  # drain by default, replacing the first
    data = out_json(capsys)
    assert data["mode"] == "drain" and data["replaces"]["reason"] == "client render"
    assert farm.cli("resume") == EXIT_OK
    assert "lifted the pause" in capsys.readouterr().out and control.read_pause(farm.state) is None
    assert farm.cli("resume", "--json") == EXIT_OK
    assert out_json(capsys)["resumed"] is False


def test_pause_drain_and_now_exclude_each_other(farm, capsys):
    assert farm.cli("pause", "--drain", "--now") == EXIT_USAGE
    assert control.read_pause(farm.state) is None


# ---- priority ----------------------------------------------------------------------------------------------


def test_priority_is_asked_of_the_daemon_holding_the_job_within_the_bounds(farm, capsys):
    farm.hold("q1", instance="b", priority=3)
    assert farm.cli("priority", "q1", "40") == EXIT_OK
    assert "3 -> 40" in capsys.readouterr().out
    request = control.read_request(control.priority_dir(farm.state) / "q1")
    assert request["priority"] == 40 and request["by"] == control.requester()
    assert farm.cli("priority", "q1", "-1000", "--json") == EXIT_OK
    assert out_json(capsys)["instance"] == "b"
    assert farm.cli("priority", "q1", "1001") == EXIT_USAGE
    assert farm.cli("priority", "nobody", "5") == EXIT_FAIL
    assert "no queued or running job 'nobody'" in capsys.readouterr().err
    assert sorted(p.name for p in control.priority_dir(farm.state).iterdir()) == ["q1"]


# ---- cancel ------------------------------------------------------------------------------------------------


def cancels(farm) -> list[str]:
    folder = control.cancel_dir(farm.state)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_bulk_cancel_selects_by_file_model_and_queued_and_a_dry_run_writes_nothing(farm, capsys):
    farm.hold("d1", file="drop.yaml")
    farm.hold("d2", JobState.RUNNING, file="drop.yaml", instance="b")
    farm.hold("k1", file="keep.yaml")
    farm.hold("o1", file="other.yaml", model="tiny-t2v-a14b")
    farm.hold("w1", JobState.WAITING_FOR_MODEL, file="other.yaml", model="wan2.2-t2v-a14b")
    capsys.readouterr()
    assert farm.cli("cancel", "--file", "drop.yaml", "--dry-run", "--json") == EXIT_OK
    dry = out_json(capsys)
    assert dry["dry_run"] and [(j["id"], j["state"], j["instance"]) for j in dry["jobs"]] == [
        ("d1", "queued", "a"),
        ("d2", "running", "b"),
    ]
    assert dry["jobs"][0]["model"] == "tiny-ti2v-5b" and dry["jobs"][0]["file"] == "drop.yaml"
    assert cancels(farm) == []
    assert farm.cli("cancel", "--all-queued", "--dry-run") == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("\t") == ["id", "state", "instance", "model", "file"]
    assert sorted(r.split("\t")[0] for r in table[1:]) == ["d1", "k1", "o1", "w1"]  # not d2: it runs
    assert cancels(farm) == []
    assert farm.cli("cancel", "--file", "other.yaml", "--model", "tiny-t2v-a14b") == EXIT_OK
    assert cancels(farm) == ["o1"]
    assert farm.cli("cancel", "--file", "drop.yaml") == EXIT_OK
    assert cancels(farm) == ["d1", "d2", "o1"]
    assert control.read_request(control.cancel_dir(farm.state) / "d2")["by"] == control.requester()
    assert "cancel requested: d1" in capsys.readouterr().out


def test_cancel_by_id_refuses_one_no_daemon_holds_and_needs_something_to_cancel(farm, capsys):
    farm.hold("here")
    assert farm.cli("cancel", "here", "gone") == EXIT_FAIL
    err = capsys.readouterr().err
    assert "no queued or running job 'gone'" in err
    assert cancels(farm) == ["here"]
    assert farm.cli("cancel") == EXIT_USAGE


# ---- retry -------------------------------------------------------------------------------------------------


def test_retry_drops_the_stored_job_into_the_inbox_and_keeps_the_old_record_aside(farm, capsys):
    spec = {"prompt": "a cancelled fox", "model": "tiny-ti2v-5b", "frames": 5, "size": "96x64", "seed": 7}
    record = farm.fail("fox", spec)
    # Requests left for the failed run (written as it ended) are not for the new one: retry takes them back.
    control.write_cancel(farm.state, "fox", by="late@host")
    control.write_priority(farm.state, "fox", 9, by="late@host")
    assert farm.cli("retry", "fox") == EXIT_OK
    assert capsys.readouterr().out.split() == ["fox"]
    assert not (control.cancel_dir(farm.state) / "fox").exists()
    assert not (control.priority_dir(farm.state) / "fox").exists()
    [job_file] = farm.inbox.glob("fox.retry-*.yaml")
    text = job_file.read_text()
    assert text.startswith("# retry of fox by " + control.requester())
    assert yaml.safe_load(text) == {**spec, "id": "fox"}  # the id, even where the file's stem gave it
    assert main(["validate", "--config", str(farm.config), str(job_file)]) == EXIT_OK
    assert not record.exists()
    [kept] = (farm.failed / "retried").glob("fox.*.json")
    assert json.loads(kept.read_text())["spec"] == spec
    assert [p for p in farm.inbox.glob(".*") if p != farm.state] == []  # no temp left behind (the state folder is)


def test_retry_refuses_active_ids_missing_records_and_whole_file_rejections(farm, capsys):
    farm.fail("busy", {"prompt": "x", "model": "tiny-ti2v-5b"})
    farm.hold("busy")
    farm.fail(None, None, category=Category.INVALID_SPEC, name="broken", file="broken.yaml")
    for job_id, why in (("busy", "is queued (daemon a)"), ("nothing", "no failure record"), ("broken", "whole file")):
        assert farm.cli("retry", job_id) == EXIT_FAIL
        assert why in capsys.readouterr().err
    assert not list(farm.inbox.glob("*.y*ml"))
    assert (farm.failed / "busy.json").exists() and (farm.failed / "broken.json").exists()


def test_retry_refuses_a_job_that_no_longer_validates_or_is_published(farm, capsys):
    farm.fail("odd", {"prompt": "x", "model": "tiny-ti2v-5b", "frames": 10})
    assert farm.cli("retry", "odd") == EXIT_INVALID
    assert "4n+1" in capsys.readouterr().err
    farm.fail("shown", {"prompt": "x", "model": "tiny-ti2v-5b"})
    farm.publish("shown", "shown")
    assert farm.cli("retry", "shown") == EXIT_FAIL
    assert "already published" in capsys.readouterr().err
    assert not list(farm.inbox.glob("*.y*ml"))


def _age(path: Path, hours: float) -> None:
    data = json.loads(path.read_text())
    data["failed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - hours * 3600))
    path.write_text(json.dumps(data))


def test_retry_failed_since_and_category_select_records_and_a_dry_run_writes_nothing(farm, capsys):
    job = {"prompt": "x", "model": "tiny-ti2v-5b"}
    _age(farm.fail("old", job, category=Category.TIMEOUT), 3)
    farm.fail("new-timeout", job, category=Category.TIMEOUT)
    farm.fail("new-cancel", job)
    farm.fail("new-cancel", job, name="new-cancel.duplicate-000000000004.a.f")  # another job's duplicate
    farm.fail(None, None, category=Category.INVALID_SPEC, name="wholefile", file="wholefile.yaml")
    assert farm.cli("retry", "--failed-since", "1h", "--dry-run") == EXIT_OK
    assert sorted(capsys.readouterr().out.split()) == ["new-cancel", "new-timeout"]
    assert not list(farm.inbox.glob("*.y*ml")) and not (farm.failed / "retried").exists()
    assert farm.cli("retry", "--failed-since", "4h", "--category", "timeout", "--dry-run", "--json") == EXIT_OK
    data = out_json(capsys)
    assert data["dry_run"] and sorted(r["id"] for r in data["retried"]) == ["new-timeout", "old"]
    assert farm.cli("retry", "--failed-since", "2h", "--category", "timeout") == EXIT_OK
    assert capsys.readouterr().out.split() == ["new-timeout"]
    assert [p.name.split(".retry-")[0] for p in farm.inbox.glob("*.yaml")] == ["new-timeout"]
    assert (farm.failed / "old.json").exists() and not (farm.failed / "new-timeout.json").exists()
    assert farm.cli("retry", "--failed-since", "soon") == EXIT_USAGE
    assert farm.cli("retry") == EXIT_USAGE


def test_retry_leaves_a_record_that_changed_since_it_was_read(farm, monkeypatch, capsys):
    from daemon.ops import queue_control

    path = farm.fail("fox", {"prompt": "x", "model": "tiny-ti2v-5b"})
    drop = queue_control.atomic_create

    def and_the_daemon_fails_it_again(dest, data):
        drop(dest, data)
        farm.fail("fox", {"prompt": "x", "model": "tiny-ti2v-5b"}, category=Category.TIMEOUT)

    monkeypatch.setattr(queue_control, "atomic_create", and_the_daemon_fails_it_again)
    assert farm.cli("retry", "fox", "--json") == EXIT_OK
    assert out_json(capsys)["retried"][0]["archived"] is None
    assert json.loads(path.read_text())["error_category"] == "timeout"  # the new record stays where it is
    assert not (farm.failed / "retried").exists() or not list((farm.failed / "retried").iterdir())


def test_retry_records_the_operation_in_the_history(farm, capsys):
    from daemon.ops.history import History

    History(farm.settings.history.path).close()  # a history the daemon created
    farm.fail("fox", {"prompt": "x", "model": "tiny-ti2v-5b"})
    assert farm.cli("retry", "fox") == EXIT_OK
    import sqlite3

    with sqlite3.connect(farm.settings.history.path) as conn:
        rows = conn.execute("SELECT * FROM operations").fetchall()
    assert any("retry" in row and "fox" in row for row in rows), rows


# ---- submit ------------------------------------------------------------------------------------------------


BATCH = (
    "defaults: {model: tiny-ti2v-5b, frames: 5, size: 96x64}\njobs:\n  - {prompt: one}\n  - {id: two, prompt: two}\n"
)


def test_submit_prints_every_job_id_it_creates(farm, capsys):
    src = farm.draft("batch.yaml", BATCH)
    assert farm.cli("submit", str(src)) == EXIT_OK
    assert capsys.readouterr().out.split() == ["batch-1", "two"]
    assert (farm.inbox / "batch.yaml").read_text() == BATCH  # unchanged when nothing is renamed
    other = farm.draft("solo.yaml", TINY + "prompt: x\noutput: {basename: clip}\n")
    assert farm.cli("submit", "--json", str(other)) == EXIT_OK
    assert out_json(capsys) == [
        {"id": "solo", "file": str(other), "basename": "clip", "inbox_path": str(farm.inbox / "solo.yaml")}
    ]


@pytest.mark.parametrize("where", ["queued", "running", "published"])
def test_submit_refuses_ids_held_or_published_and_writes_nothing(farm, capsys, where):
    if where == "published":
        farm.publish("two", "two")
    else:
        farm.hold("two", JobState.RUNNING if where == "running" else JobState.QUEUED, instance="b")
    src = farm.draft("batch.yaml", BATCH)
    capsys.readouterr()
    assert farm.cli("submit", str(src)) == EXIT_FAIL
    captured = capsys.readouterr()
    assert captured.out == "" and "two" in captured.err and "--force" in captured.err
    assert where in captured.err
    assert not list(farm.inbox.glob("*.y*ml"))


def test_submit_refuses_an_id_waiting_in_an_inbox_file_no_daemon_took_in_and_force_renames_past_it(farm, capsys):
    """No daemon runs: the first file's jobs are still in the inbox. The second file's ``two`` (an id) and
    ``batch-1`` (a default id from a file name, as intake makes it) would be rejected as duplicates."""
    farm.inbox.mkdir(parents=True)
    (farm.inbox / "batch.yaml").write_text(BATCH)
    (farm.inbox / "broken.yaml").write_text("jobs: [unclosed")  # read, refused by intake later: no ids taken
    src = farm.draft("again.yaml", BATCH.replace("{prompt: one}", "{id: batch-1, prompt: one}"))
    capsys.readouterr()
    assert farm.cli("submit", str(src)) == EXIT_FAIL
    err = capsys.readouterr().err
    assert "job two is already waiting in the inbox in batch.yaml" in err and "job batch-1 is already" in err
    assert sorted(p.name for p in farm.inbox.iterdir()) == ["batch.yaml", "broken.yaml"]
    assert farm.cli("submit", "--force", str(src)) == EXIT_OK
    assert capsys.readouterr().out.split() == ["batch-1-2", "two-2"]


def test_submit_force_renames_taken_ids_and_output_names_and_the_file_still_validates(farm, capsys):
    farm.hold("two", instance="b")
    farm.hold("two-2")
    farm.publish("clip", "someone")
    src = farm.draft("batch.yaml", BATCH + "  - {id: three, prompt: three, output: {basename: clip}}\n")
    capsys.readouterr()
    assert farm.cli("submit", "--force", "--json", str(src)) == EXIT_OK
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(r["id"], r["basename"], r.get("renamed_from")) for r in rows] == [
        ("batch-1", "batch-1", None),
        ("two-3", "two-3", "two"),
        ("three", "clip-2", None),
    ]
    assert "two -> two-3" not in captured.out and "submitted as two-3" in captured.err
    written = farm.inbox / "batch.yaml"
    assert written.read_text().startswith("# batch.yaml, submitted by ")
    assert main(["validate", "--config", str(farm.config), str(written)]) == EXIT_OK
    doc = yaml.safe_load(written.read_text())
    assert doc["jobs"][1]["id"] == "two-3" and doc["jobs"][2]["output"]["basename"] == "clip-2"


def test_submit_refuses_an_unreadable_file_in_one_line(farm, capsys):
    assert farm.cli("submit", str(farm.root / "missing.yaml")) == EXIT_FAIL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0] and "No such file" in err[0]


def _later(delay: float, action) -> threading.Thread:
    def run():
        time.sleep(delay)
        action()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_submit_wait_reports_each_outcome_and_exits_by_them(farm, capsys):
    src = farm.draft("batch.yaml", BATCH)
    old = farm.fail("two", {"prompt": "earlier"})  # an earlier run's record: not this submit's outcome

    def finish():
        farm.publish("batch-1", "batch-1")
        time.sleep(0.5)
        assert old.exists()
        farm.fail("two", {"prompt": "two"}, category=Category.OUT_OF_MEMORY)  # replaced: a new file

    t = _later(0.5, finish)
    assert farm.cli("submit", "--wait", "--timeout", "30", str(src)) == EXIT_INVALID
    t.join()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["batch-1", "two"]
    assert f"done batch-1 {farm.outbox / 'batch-1.mp4'}" in lines
    assert f"failed two {farm.failed / 'two.json'}" in lines


def test_submit_wait_exits_0_when_all_are_done_and_1_on_timeout(farm, capsys):
    src = farm.draft("solo.yaml", TINY + "prompt: x\n")
    t = _later(0.4, lambda: farm.publish("solo", "solo"))
    assert farm.cli("submit", "--wait", "--json", str(src)) == EXIT_OK
    t.join()
    assert out_json(capsys)[0]["status"] == "done"
    slow = farm.draft("slow.yaml", TINY + "prompt: x\n")
    started = time.monotonic()
    assert farm.cli("submit", "--wait", "--timeout", "0.6", str(slow)) == EXIT_FAIL
    assert time.monotonic() - started < 10
    assert "not finished: slow" in capsys.readouterr().err


def test_submit_wait_sees_duplicate_and_whole_file_rejections(farm, capsys):
    farm.fail("dup", {}, category=Category.DUPLICATE_JOB, name="dup.duplicate-000000000001.a.old")  # not ours
    dup = farm.draft("dup.yaml", TINY + "prompt: x\n")
    name = "dup.duplicate-000000000009.a.dup"
    t = _later(0.4, lambda: farm.fail("dup", {}, category=Category.DUPLICATE_JOB, name=name, file="dup.yaml"))
    assert farm.cli("submit", "--wait", "--timeout", "30", str(dup)) == EXIT_INVALID
    t.join()
    assert f"failed dup {farm.failed / (name + '.json')}" in capsys.readouterr().out
    whole = farm.draft("whole.yaml", BATCH.replace("batch", "whole"))
    t = _later(0.4, lambda: farm.fail(None, None, category=Category.INVALID_SPEC, name="whole", file="whole.yaml"))
    assert farm.cli("submit", "--wait", "--timeout", "30", str(whole)) == EXIT_INVALID
    t.join()
    out = capsys.readouterr().out
    assert f"failed whole-1 {farm.failed / 'whole.json'}" in out and f"failed two {farm.failed / 'whole.json'}" in out


def test_resubmit_gets_submit_s_refusal_of_a_published_id(farm, capsys):
    sidecar = farm.root / "orig.json"
    farm.publish("again", "again")
    params = {
        "task": "t2v",
        "prompt": "x",
        "negative_prompt": "",
        "width": 96,
        "height": 64,
        "frames": 5,
        "fps": 24,
        "steps": 2,
        "guidance_scale": 5.0,
        "guidance_scale_2": None,
        "flow_shift": 5.0,
        "seed": 3,
        "quality": 8,
    }
    sidecar.write_text(json.dumps({"id": "orig", "parameters": params, "model_used": {"name": "tiny-ti2v-5b"}}))
    assert farm.cli("resubmit", "--id", "again", str(sidecar)) == EXIT_FAIL
    assert "already published" in capsys.readouterr().err
    assert farm.cli("resubmit", "--id", "again", "--force", str(sidecar)) == EXIT_OK
    assert capsys.readouterr().out.split() == ["again-2"]
    assert farm.cli("resubmit", str(farm.root / "nope.json")) == EXIT_FAIL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wan-daemon: ") and "nope.json" in err[0]


def test_the_history_is_left_alone_when_there_is_none(farm, capsys):
    src = farm.draft("solo.yaml", TINY + "prompt: x\n")
    assert farm.cli("submit", str(src)) == EXIT_OK
    assert not farm.settings.history.path.exists()
    assert os.listdir(farm.inbox) == ["solo.yaml"]
