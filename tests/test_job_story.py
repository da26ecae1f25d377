"""``wan-daemon status JOB_ID`` (daemon.ops.job_story): one job's story from the spools, the outbox (a sidecar
whose name is not the id, a failure record, the records a retry kept aside) and this host's history."""

from __future__ import annotations

import argparse
import json

import pytest

from daemon.config import load_settings
from daemon.jobs import JobState
from daemon.ops import job_story
from daemon.ops.history import History
from daemon.runtime.spool import Spool
from daemon.testing import make_record

NOW = 1_700_000_000.0


@pytest.fixture
def settings(tmp_path):
    s = load_settings(
        None,
        {"paths": {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox")}, "instance": {"id": "a"}},
    )
    (s.paths.outbox / "failed").mkdir(parents=True)
    return s


def spool(settings, instance: str = "a") -> Spool:
    return Spool(settings.paths.state / "owners" / instance, instance, clock=lambda: NOW)


def queued(settings, job_id: str, instance: str = "a", **kw):
    rec = make_record(job_id, state=None, received_at=NOW - 20, queued_at=NOW - 20, source_name="batch.yaml", **kw)
    return spool(settings, instance).transition(rec, JobState.QUEUED, "taken in", durable=False)


def sidecar(settings, job_id: str, basename: str, token: str = "t-done") -> dict:
    doc = {
        "id": job_id,
        "job_token": token,
        "status": "done",
        "file": "batch.yaml",
        "spec": {"prompt": "x", "priority": 4},
        "parameters": {"basename": basename, "steps": 2},
        "model_used": {"name": "tiny-ti2v-5b", "architecture": "wan2.2-ti2v-5b"},
        "timings": {"queue_wait": 1.5, "total": 12.0},
        "generation_time_seconds": 12.0,
        "degradations": [{"fallback": "lower_resolution"}],
        "attempts": 2,
        "earlier_attempts": [
            {"attempt": 1, "category": "out_of_memory", "message": "CUDA OOM", "at": "2023-11-14T22:13:00+00:00"}
        ],
        "video": {"file": f"{basename}.mp4"},
        "poster": f"{basename}.jpg",
        "instance": "b",
        "host": "h2",
        "worker": "gpu1",
        "timestamps": {
            "received_at": "2023-11-14T22:12:00+00:00",
            "queued_at": "2023-11-14T22:12:01+00:00",
            "started_at": "2023-11-14T22:12:02+00:00",
            "finished_at": "2023-11-14T22:12:14+00:00",
        },
    }
    path = settings.paths.outbox / f"{basename}.json"
    path.write_text(json.dumps(doc))
    (settings.paths.outbox / f"{basename}.mp4").write_bytes(b"")
    return doc


def failure(path, job_id: str, category: str = "invalid_input", message: str = "no such image") -> dict:
    doc = {
        "id": job_id,
        "status": "failed",
        "file": "batch.yaml",
        "error_category": category,
        "message": message,
        "recovery_suggestions": ["check the image path"],
        "attempts": 1,
        "spec": {"prompt": "x"},
        "failed_at": "2023-11-14T22:13:20+0000",
        "host": "h",
        "errors": [{"error_category": category, "message": message, "attempt": 1, "at": NOW - 5}],
        "model": {"name": "tiny-ti2v-5b"},
    }
    path.write_text(json.dumps(doc))
    return doc


def status(settings, job_id: str, *, as_json: bool = True) -> int:
    return job_story.job_status_command(argparse.Namespace(job_id=job_id, json=as_json), settings)


def test_a_queued_job_is_told_from_its_spool_record(settings, capsys):
    queued(settings, "q1", instance="b", priority=3, params={"basename": "clip"})
    story = job_story.job_story(settings, "q1")
    assert story is not None
    assert (story["state"], story["instance"], story["priority"], story["file"]) == ("queued", "b", 3, "batch.yaml")
    assert story["model"] == "tiny-ti2v-5b" and story["attempts"] == 0 and story["progress"] is None
    assert [(e["state"], e["note"]) for e in story["events"]] == [("queued", "taken in")]
    assert story["outputs"]["will_be"]["video"] == str(settings.paths.outbox / "clip.mp4")
    assert status(settings, "q1") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "queued"
    assert status(settings, "q1", as_json=False) == 0
    text = capsys.readouterr().out
    assert text.startswith("job q1: queued (daemon b)") and "batch.yaml" in text


def test_a_queued_job_is_placed_where_the_queue_command_places_it(settings, capsys):
    """Against ``queue``'s own listing (the independent view of the order): same position, same estimates."""
    from daemon.ops.queue_view import queue_rows

    for n, priority in enumerate([0, 5, 0, 9]):
        queued(settings, f"j{n}", instance="b", priority=priority, seq=n + 1)
    queued(settings, "elsewhere", instance="c", priority=9)
    listing = {r["id"]: r for r in queue_rows(settings, now=NOW)}
    for job_id in ("j0", "j1", "j2", "j3"):
        q = job_story.job_story(settings, job_id, now=NOW)["queue"]
        assert (q["position"], q["of"], q["est_start"]) == (
            listing[job_id]["position"],
            4,
            listing[job_id]["est_start"],
        )
        assert q["effective_priority"] == listing[job_id]["effective_priority"]
    assert [job_story.job_story(settings, i)["queue"]["position"] for i in ("j3", "j1", "j0", "j2")] == [1, 2, 3, 4]
    assert status(settings, "j1", as_json=False) == 0
    assert "position     2 of 4" in capsys.readouterr().out


def test_a_running_job_shows_its_progress_from_its_daemons_health_file(settings):
    rec = queued(settings, "r1")
    spool(settings).transition(rec, JobState.RUNNING, durable=False, attempts=1, worker="gpu0", started_at=NOW - 4)
    health = settings.health_path.parent
    health.mkdir(parents=True)
    run = {"id": "r1", "worker": "gpu0", "phase": "denoising", "step": 3, "total": 12, "attempt": 1}
    (health / "a.json").write_text(json.dumps({"instance": "a", "updated_at": NOW, "running_jobs": [run]}))
    story = job_story.job_story(settings, "r1")
    assert story["state"] == "running" and story["worker"] == "gpu0" and story["attempts"] == 1
    assert story["progress"]["step"] == 3 and story["progress"]["fraction"] == 0.25
    assert story["timings"]["queue_wait_seconds"] == pytest.approx(16.0)


def test_a_done_job_is_found_by_its_sidecar_whose_name_is_not_its_id(settings, capsys):
    sidecar(settings, "d1", basename="sunset-take-3")
    sidecar(settings, "someone-else", basename="d1")  # <outbox>/d1.json is another job's: not taken
    story = job_story.job_story(settings, "d1")
    assert story["state"] == "done" and story["source"] == "outbox"
    assert story["outputs"]["video"] == str(settings.paths.outbox / "sunset-take-3.mp4")
    assert story["outputs"]["sidecar"] == str(settings.paths.outbox / "sunset-take-3.json")
    assert story["errors"] == [
        {"attempt": 1, "category": "out_of_memory", "message": "CUDA OOM", "at": "2023-11-14T22:13:00+00:00"}
    ]
    assert story["degradations"] == [{"fallback": "lower_resolution"}]
    assert story["timings"]["generation_seconds"] == 12.0 and story["instance"] == "b" and story["priority"] == 4
    assert [e["state"] for e in story["events"]] == ["received", "queued", "running", "done"]
    assert status(settings, "d1", as_json=False) == 0
    assert "sunset-take-3.mp4" in capsys.readouterr().out


def test_the_history_names_the_sidecar_without_a_scan(settings, monkeypatch):
    doc = sidecar(settings, "d2", basename="renamed", token="tok-2")
    with History(settings.history.path) as history:
        history.record(
            {
                "id": "d2",
                "token": "tok-2",
                "status": "done",
                "output_sidecar": str(settings.paths.outbox / "renamed.json"),
            }
        )
    monkeypatch.setattr(job_story, "scan_sidecars", lambda *a: pytest.fail("scanned the outbox"))
    story = job_story.job_story(settings, "d2")
    assert story["state"] == "done" and story["token"] == doc["job_token"] and story["earlier"] == []


def test_a_failed_job_is_told_from_its_failure_record(settings):
    failure(settings.paths.outbox / "failed" / "f1.json", "f1")
    story = job_story.job_story(settings, "f1")
    assert story["state"] == "failed" and story["outputs"] == {"failure": str(settings.paths.outbox / "failed/f1.json")}
    assert story["last_error"]["error_category"] == "invalid_input"
    assert story["errors"][0]["category"] == "invalid_input" and story["errors"][0]["message"] == "no such image"
    assert story["events"][-1] == {"state": "failed", "at": "2023-11-14T22:13:20+0000", "note": None}


def test_a_retried_job_keeps_its_earlier_series_and_the_record_retry_kept_aside(settings):
    retried = settings.paths.outbox / "failed" / "retried"
    retried.mkdir()
    failure(retried / "x1.1700000000.json", "x1", "cancelled", "cancelled by me@h")
    failure(retried / "x1.v2.1700000000.json", "x1.v2")  # job x1.v2's: its name starts "x1." too
    queued(settings, "x1", token="tok-new")
    with History(settings.history.path) as history:
        history.record({"id": "x1", "token": "tok-old", "status": "failed", "error_category": "cancelled"})
        history.record({"id": "x1", "token": "tok-new", "status": "queued"})
        history.record_operation("retry", by="me@h", at=NOW, job_id="x1", detail={"from": "failed"})
    story = job_story.job_story(settings, "x1")
    assert story["state"] == "queued" and story["token"] == "tok-new"
    assert [(e["token"], e["status"], e["error_category"]) for e in story["earlier"]] == [
        ("tok-old", "failed", "cancelled")
    ]
    assert [(r["category"], r["message"]) for r in story["retried"]] == [("cancelled", "cancelled by me@h")]
    assert [(o["op"], o["by"], o["detail"]) for o in story["operations"]] == [("retry", "me@h", {"from": "failed"})]


def test_a_job_still_in_an_inbox_file_is_found_there_and_says_no_daemon_took_it_in(settings, capsys):
    settings.paths.inbox.mkdir(parents=True, exist_ok=True)
    (settings.paths.inbox / "later.yaml").write_text(
        "jobs:\n  - {prompt: a}\n  - {id: fox, prompt: b, output: {basename: f}}\n"
    )
    assert status(settings, "fox") == 0
    story = json.loads(capsys.readouterr().out)
    assert (story["state"], story["source"], story["file"]) == (
        "inbox",
        "inbox",
        str(settings.paths.inbox / "later.yaml"),
    )
    assert story["outputs"]["will_be"]["video"] == str(settings.paths.outbox / "f.mp4")
    assert status(settings, "later-1", as_json=False) == 0  # a default id, made from the file's name as intake does
    out = capsys.readouterr().out
    assert out.startswith("job later-1: inbox") and "not taken in by a daemon yet" in out


def test_the_inbox_is_read_for_ids_up_to_a_bound(tmp_path, monkeypatch):
    from daemon.jobspec import spec
    from daemon.ops import spool_view

    for n in range(30):
        (tmp_path / f"j{n:02}.yaml").write_text(f"prompt: job {n}\n")
    (tmp_path / ".hidden.yaml").write_text("prompt: x\n")
    (tmp_path / "writing.yaml.tmp").write_text("prompt: x\n")
    parsed: list[str] = []
    real = spec.parse_job_file
    monkeypatch.setattr(spec, "parse_job_file", lambda data, name, **kw: parsed.append(name) or real(data, name, **kw))
    found = spool_view.inbox_jobs(tmp_path, max_bytes=1 << 20, limit=10)
    assert [j.id for j in found.jobs] == [f"j{n:02}" for n in range(10)] and len(parsed) == 10
    assert (found.files, found.unread) == (30, 20)


def test_a_job_nowhere_is_one_line_on_stderr_and_exit_1(settings, capsys):
    queued(settings, "exists")
    assert status(settings, "missing") == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("no job 'missing' queued, running, done or failed in ")
    assert str(settings.paths.outbox) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("hostile", ["../x", "..", ".x", "a/b", "x\n", ""])
def test_an_id_that_is_no_job_id_is_never_looked_up_as_a_path(settings, capsys, hostile):
    # What a path lookup of "../x" would find: a sidecar beside the outbox, a record beside the jobs folder.
    decoy = {"id": hostile, "status": "done", "job_token": "t", "timestamps": {}}
    (settings.paths.outbox.parent / "x.json").write_text(json.dumps(decoy))
    (settings.paths.outbox / "failed" / "x.json").write_text(json.dumps({**decoy, "status": "failed"}))
    (settings.paths.outbox / "b.json").write_text(json.dumps(decoy))
    rec = queued(settings, "x")
    (settings.paths.state / "owners" / "a" / "x").mkdir()
    (settings.paths.state / "owners" / "a" / "x" / "job.json").write_text(rec.model_dump_json())
    assert job_story.job_story(settings, hostile) is None
    assert status(settings, hostile) == 1
    assert "no job" in capsys.readouterr().err
