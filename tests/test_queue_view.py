"""``wan-daemon queue`` (daemon.ops.queue_view): the order is the scheduler's own (checked against a ReadyQueue, the
structure the daemon dispatches from), the estimates come from this host's history and the daemons' health files,
and ten thousand queued jobs cost one JSON parse each and one ranking."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from daemon import control
from daemon.config import load_settings
from daemon.jobs import JobRecord, JobState
from daemon.ops import queue_view, spool_view
from daemon.ops.history import History
from daemon.ranking import ReadyQueue
from daemon.runtime.spool import Spool
from daemon.testing import make_record

NOW = 1_000_000.0
BOUND = 100.0


@pytest.fixture
def settings(tmp_path):
    return load_settings(
        None,
        {
            "paths": {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox")},
            "scheduler": {"aging_bound_seconds": BOUND},
            "instance": {"id": "a"},
        },
    )


class Farm:
    """Job records written by the daemon's own Spool.transition, and health files as the daemons write them."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.spools: dict[str, Spool] = {}
        self.seq = 0

    def spool(self, instance: str) -> Spool:
        if instance not in self.spools:
            root = self.settings.paths.state / "owners" / instance
            self.spools[instance] = Spool(root, instance, clock=lambda: NOW)
        return self.spools[instance]

    def job(
        self, job_id: str, instance: str = "a", *, state: JobState = JobState.QUEUED, model: str = "tiny-ti2v-5b", **kw
    ) -> JobRecord:
        self.seq += 1
        fields: dict[str, Any] = {"received_at": NOW - 10, "queued_at": NOW - 10, "token": f"t-{job_id}", **kw}
        running = {k: fields.pop(k) for k in ("worker", "started_at") if k in fields}
        rec = make_record(job_id, seq=self.seq, state=None, model=model, source_name=f"{job_id}.yaml", **fields)
        spool = self.spool(instance)
        if state is JobState.WAITING_FOR_MODEL:
            return spool.transition(rec, state, durable=False)
        rec = spool.transition(rec, JobState.QUEUED, durable=False)
        if state is JobState.RUNNING:
            rec = spool.transition(rec, JobState.RUNNING, durable=False, attempts=1, **running)
        return rec

    def health(self, instance: str, workers: dict[str, str], running: list[dict] = (), **extra) -> None:
        folder = self.settings.health_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "instance": instance,
            "state": "running",
            "updated_at": NOW,
            "host": "h",
            "paused": None,
            "workers": {
                name: {"state": st, "gpu": i, "warm_models": []} for i, (name, st) in enumerate(workers.items())
            },
            "running_jobs": list(running),
            **extra,
        }
        (folder / f"{instance}.json").write_text(json.dumps(doc))

    def timings(self, model: str, *seconds: float) -> None:
        with History(self.settings.history.path) as history:
            for n, s in enumerate(seconds):
                history.record(
                    {"id": f"old-{model}-{n}", "token": f"old-{model}-{n}", "status": "done", "model_used": model}
                    | {"generation_time_seconds": s, "finished_at": NOW - 1000 + n}
                )


@pytest.fixture
def farm(settings):
    return Farm(settings)


def ids(rows, instance=None):
    return [r["id"] for r in rows if instance in (None, r["instance"])]


def scheduler_order(records: list[JobRecord], now: float) -> list[str]:
    """The oracle: the ready jobs in the order the daemon's own ReadyQueue hands them to the scheduler."""
    queue = ReadyQueue()
    for rec in records:
        if rec.state is JobState.QUEUED:
            queue.add(rec)
    return [r.id for r in queue.ranked(now, BOUND)]


def mixed_queue(farm: Farm, instance: str, prefix: str = "") -> tuple[list[JobRecord], dict[str, str]]:
    """Aging decides (priority 0 waited 90% of the bound, above fresh priority-10 jobs), two jobs tie on
    priority and wait (intake order), two wait out a not_before, one waits for its model, one runs."""
    p = prefix
    made = [
        farm.job(f"{p}aged", instance, priority=0, queued_at=NOW - 90),
        farm.job(f"{p}fresh-hi-1", instance, priority=10, queued_at=NOW - 1),
        farm.job(f"{p}fresh-hi-2", instance, priority=10, queued_at=NOW - 1),
        farm.job(f"{p}mid", instance, priority=5, queued_at=NOW - 50),
        farm.job(f"{p}low", instance, priority=-5, queued_at=NOW - 99),
        farm.job(f"{p}backoff-late", instance, priority=10, not_before=NOW + 60),
        farm.job(f"{p}backoff-soon", instance, priority=3, not_before=NOW + 30),
        farm.job(f"{p}download", instance, state=JobState.WAITING_FOR_MODEL),
        farm.job(f"{p}run", instance, state=JobState.RUNNING, worker="gpu0", started_at=NOW - 5),
    ]
    names = {"run": f"{p}run", "download": f"{p}download", "soon": f"{p}backoff-soon", "late": f"{p}backoff-late"}
    return made, names


def test_the_order_is_the_schedulers_own_with_aging_backoffs_ties_and_waiting_jobs(settings, farm):
    records, n = mixed_queue(farm, "a")
    rows = queue_view.queue_rows(settings, now=NOW)
    ready = scheduler_order(records, NOW)
    assert ready[:3] == ["aged", "mid", "fresh-hi-1"]  # aging reorders: not plain priority order
    assert ids(rows) == [n["run"], *ready, n["soon"], n["late"], n["download"]]
    assert [r["position"] for r in rows] == list(range(1, len(records) + 1))
    assert [r["state"] for r in rows][0] == "running" and rows[-1]["state"] == "waiting_for_model"
    by_id = {r["id"]: r for r in rows}
    assert by_id["aged"]["effective_priority"] == pytest.approx(0 + 90 / BOUND * 15)  # span: 10 - (-5)
    assert by_id["fresh-hi-1"]["waited"] == pytest.approx(1.0)
    assert by_id["backoff-soon"]["effective_priority"] is None and by_id["backoff-soon"]["not_before"]
    assert by_id["aged"]["file"] == "aged.yaml" and by_id["aged"]["model"] == "tiny-ti2v-5b"


def test_each_daemon_is_listed_in_its_own_order_with_its_own_positions(settings, farm):
    a, _ = mixed_queue(farm, "a", "a-")
    b, _ = mixed_queue(farm, "b", "b-")
    farm.job("b-extra", "b", priority=7, queued_at=NOW - 30)
    b = [*b, JobRecord.model_validate_json((farm.spool("b").jobs / "b-extra" / "job.json").read_bytes())]
    rows = queue_view.queue_rows(settings, now=NOW)
    for instance, records in (("a", a), ("b", b)):
        mine = [r for r in rows if r["instance"] == instance]
        ready = scheduler_order(records, NOW)
        assert ids(mine)[1 : 1 + len(ready)] == ready
        assert [r["position"] for r in mine] == list(range(1, len(records) + 1))
    assert ids(rows) == ids(rows, "a") + ids(rows, "b")


def test_estimates_follow_the_history_timings_and_the_unparked_workers(settings, farm):
    farm.timings("tiny-ti2v-5b", 100.0, 140.0, 120.0)  # median 120
    farm.timings("tiny-t2v-a14b", 10.0)
    farm.health("a", {"gpu0": "ready", "gpu1": "ready", "gpu2": "parked"})  # two take jobs
    for n in range(5):
        farm.job(f"q{n}", priority=0)
    farm.job("other", priority=-1, model="wan2.2-t2v-a14b")  # no timing for this one in the history
    farm.job("after", priority=-2)
    rows = {r["id"]: r for r in queue_view.queue_rows(settings, now=NOW)}
    assert [rows[f"q{n}"]["est_start_in"] for n in range(5)] == [0, 0, 120, 120, 240]
    assert [rows[f"q{n}"]["est_finish_in"] for n in range(5)] == [120, 120, 240, 240, 360]
    assert rows["q0"]["est_start"] and rows["q0"]["est_finish"]  # ISO 8601 as well
    assert rows["other"]["est_start_in"] == 240 and rows["other"]["est_finish_in"] is None
    assert "no timing" in rows["other"]["note"]
    assert rows["after"]["est_start_in"] == 360  # the other worker; the first one's end is unknown
    view = queue_view.queue_view(settings, now=NOW)
    assert view["model_timings"] == {"tiny-ti2v-5b": 120.0, "tiny-t2v-a14b": 10.0}
    assert view["daemons"][0]["active_workers"] == 2


def test_a_running_job_reports_its_progress_and_ends_when_its_progress_says(settings, farm):
    farm.timings("tiny-ti2v-5b", 300.0)
    farm.job("running", state=JobState.RUNNING, worker="gpu0", started_at=NOW - 50)
    farm.job("next")
    run = {"id": "running", "worker": "gpu0", "phase": "denoising", "step": 5, "total": 10, "started_at": NOW - 50}
    farm.health("a", {"gpu0": "busy"}, running=[run])
    rows = {r["id"]: r for r in queue_view.queue_rows(settings, now=NOW)}
    r = rows["running"]
    assert (r["state"], r["worker"], r["step"], r["total"], r["phase"]) == ("running", "gpu0", 5, 10, "denoising")
    assert r["progress"] == 0.5 and r["est_finish_in"] == 50  # 50 s for 5 of 10 steps: 50 s to go
    assert rows["next"]["est_start_in"] == 50 and rows["next"]["est_finish_in"] == 350


def test_a_paused_daemon_gives_no_estimates_but_its_draining_jobs_still_finish(settings, farm):
    farm.timings("tiny-ti2v-5b", 60.0)
    farm.job("running", state=JobState.RUNNING, worker="gpu0", started_at=NOW - 10)
    farm.job("waits")
    farm.health("a", {"gpu0": "busy"})
    control.write_pause(settings.paths.state, control.PauseRequest(mode="drain", by="me@h", at=NOW))
    rows = {r["id"]: r for r in queue_view.queue_rows(settings, now=NOW)}
    assert rows["waits"]["est_start"] is None and rows["waits"]["est_finish"] is None
    assert rows["waits"]["note"] == "paused"
    assert rows["running"]["est_finish_in"] == 50  # drain: it runs to its end
    control.write_pause(settings.paths.state, control.PauseRequest(mode="now", by="me@h", at=NOW))
    rows = {r["id"]: r for r in queue_view.queue_rows(settings, now=NOW)}
    assert rows["running"]["est_finish"] is None and rows["running"]["note"] == "paused"


def test_a_pause_the_daemon_reports_holds_its_estimates_too(settings, farm):
    farm.timings("tiny-ti2v-5b", 60.0)
    farm.job("waits")
    farm.health("a", {"gpu0": "parked"}, operator_pause={"mode": "drain", "by": "me@h", "free_vram": True})
    view = queue_view.queue_view(settings, now=NOW)
    assert view["jobs"][0]["est_start"] is None and view["jobs"][0]["note"] == "paused"
    assert view["daemons"][0]["operator_pause"]["by"] == "me@h" and view["daemons"][0]["workers"] == {"gpu0": "parked"}


def test_a_daemon_not_reporting_gives_no_estimates(settings, farm):
    farm.timings("tiny-ti2v-5b", 60.0)
    farm.job("orphan")
    rows = queue_view.queue_rows(settings, now=NOW)
    assert rows[0]["est_start"] is None and "not reporting" in rows[0]["note"]


def write_raw_records(settings, instance: str, n: int) -> None:
    """``n`` queued records, each the JSON of a real JobRecord (the daemon's format), written quickly."""
    template = make_record("x", state=JobState.QUEUED).model_dump(mode="json")
    jobs = settings.paths.state / "owners" / instance / "jobs"
    for i in range(n):
        doc = {**template, "id": f"j{i}", "seq": i, "priority": i % 11 - 5, "queued_at": NOW - i % 977}
        (jobs / f"j{i}").mkdir(parents=True)
        (jobs / f"j{i}" / "job.json").write_text(json.dumps(doc))


def test_ten_thousand_queued_jobs_cost_one_parse_each_and_one_ranking(settings, farm, monkeypatch):
    write_raw_records(settings, "a", 10_000)
    farm.health("a", {"gpu0": "ready"})
    parses, rankings = [], []
    real_loads, real_rank = json.loads, queue_view.rank

    class CountingJson:
        @staticmethod
        def loads(data, *a, **kw):
            parses.append(1)
            return real_loads(data, *a, **kw)

    monkeypatch.setattr(spool_view, "json", CountingJson)
    monkeypatch.setattr(queue_view, "rank", lambda *a, **kw: rankings.append(1) or real_rank(*a, **kw))

    def no_pydantic(*a, **kw):
        raise AssertionError("a pydantic model per record")

    monkeypatch.setattr(JobRecord, "model_validate", no_pydantic)
    monkeypatch.setattr(JobRecord, "model_validate_json", no_pydantic)
    rows = queue_view.queue_rows(settings, now=NOW)
    assert len(rows) == 10_000 and len(parses) == 10_000 and len(rankings) == 1
    effective = [r["effective_priority"] for r in rows]
    assert effective == sorted(effective, reverse=True) and rows[-1]["position"] == 10_000


def test_queue_json_is_one_document_with_jobs_daemons_and_the_inbox(settings, farm, capsys):
    farm.job("q1", queued_at=time.time())
    farm.health("a", {"gpu0": "ready"}, updated_at=time.time())
    settings.paths.inbox.mkdir(parents=True, exist_ok=True)
    for name in ("new.yaml", "other.yml", ".hidden.yaml", "being-written.yaml.tmp", "notes.txt"):
        (settings.paths.inbox / name).write_text("prompt: x\n")
    assert queue_view.queue_command(argparse.Namespace(json=True), settings) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"jobs", "daemons", "inbox_pending"}
    assert doc["inbox_pending"] == 2
    assert [j["id"] for j in doc["jobs"]] == ["q1"] and doc["daemons"][0]["instance"] == "a"


def test_piped_table_is_tab_separated_with_whole_ids(settings, farm, capsys):
    long_id = "a-very-long-job-id-" + "x" * 100
    farm.job(long_id, queued_at=time.time())
    farm.job("short", priority=-1, queued_at=time.time())
    assert queue_view.queue_command(argparse.Namespace(json=False), settings) == 0
    lines = capsys.readouterr().out.splitlines()  # capsys: stdout is not a terminal
    rows = [line.split("\t") for line in lines]
    assert rows[0] == list(queue_view.COLUMNS)
    assert all(len(r) == len(rows[0]) for r in rows)
    assert [r[1] for r in rows[1:]] == [long_id, "short"]


def test_the_view_never_creates_a_history(settings, farm):
    farm.job("q1")
    queue_view.queue_rows(settings, now=NOW)
    assert not Path(settings.history.path).exists()


# ---- the other read-only views, piped: tasks and analysis keep whole ids and paths ------------------------


def test_piped_tasks_and_analysis_are_tab_separated_with_whole_ids_and_paths(settings, capsys):
    from daemon.ops import commands

    long_id = "a-very-long-job-id-" + "y" * 100
    video = str(settings.paths.outbox / ("deep/" * 10) / f"{long_id}.mp4")
    done = {"id": long_id, "token": "t1", "status": "done", "model_used": "tiny-ti2v-5b", "output_video": video}
    failed = {"id": "bad", "token": "t2", "status": "failed", "error_category": "invalid_spec"}
    with History(settings.history.path) as history:
        history.record({**done, "generation_time_seconds": 12.25, "finished_at": time.time()})
        history.record({**failed, "finished_at": time.time()})
    args = argparse.Namespace(last=10, status=None, json=False, outbox=None, hours=1.0)
    assert commands.tasks(args, settings) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0][0] == "id" and all(len(r) == len(rows[0]) for r in rows)
    assert {r[0] for r in rows[1:]} == {long_id, "bad"}
    cells = rows[1] + rows[2]
    assert video in cells and "12.25" in cells and "invalid_spec" in cells
    assert commands.analysis(args, settings) == 0
    per_model = capsys.readouterr().out.split("# wan-daemon analysis: per model and resolution\n")[1]
    table = [line.split("\t") for line in per_model.split("\n\n")[0].splitlines()]
    assert table[0][:3] == ["model_used", "resolution", "count"]
    assert ["tiny-ti2v-5b", "?", "1", "1", "0", "1"] in [r[:6] for r in table[1:]]
