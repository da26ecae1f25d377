"""Operator control on the daemon side (daemon.runtime.control): the pause (drain, now, free_vram), a changed or
lifted pause, several daemons on one inbox obeying it, priority and cancel requests naming who asked, the history
from intake on, and what the health file, check-health, the metrics and ``run --until-idle`` say while paused.

Real daemons and worker processes with the stand-in backend (daemon.testing.CueBackend: ``sleep=S`` takes S
seconds in interruptible steps); one test renders the tiny model, to see a parked worker's pipeline dropped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
import time

import pytest
from conftest import wait_for

from daemon.control import PauseRequest, clear_pause, priority_dir, write_cancel, write_pause, write_priority
from daemon.jobs import JobState
from daemon.ops import commands
from daemon.runtime.daemon import Daemon
from daemon.runtime.health import format_status, read_health, verdict

CUE = "daemon.testing:CueBackend"
TINY = "model: tiny-ti2v-5b\nframes: 5\nsize: 96x64\nseed: 1\nsteps: 2\n"


def pause(h, **fields) -> PauseRequest:
    request = PauseRequest(**{"by": "alice@host", "at": time.time(), **fields})
    write_pause(h.settings.paths.state, request)
    return request


def record(h, job_id: str):
    return h.daemon.spool.load(job_id)


def queued(*harnesses) -> int:
    return sum(h.daemon.book.count(JobState.QUEUED) for h in harnesses)


def health(h) -> dict:
    return read_health(h.settings.health_path) or {}


def started_order(h, ids: list[str]) -> list[str]:
    started = {i: h.daemon.history.rows_for_id(i)[-1]["started_at"] for i in ids}
    return sorted(ids, key=lambda i: started[i])


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pause_drain_lets_running_jobs_finish_and_starts_nothing_new_until_resume(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("long.yaml", "prompt: sleep=2.0\n")
    wait_for(lambda: "long" in h.daemon.running, 30, what="the long job running")
    pause(h, reason="maintenance")
    wait_for(lambda: h.daemon.status.state == "pausing", 10, what="pausing while the long job drains")
    h.drop("next1.yaml", "prompt: sleep=0.1\n")
    h.drop("next2.yaml", "prompt: sleep=0.1\n")
    assert h.sidecar("long")["attempts"] == 1  # drain: it finished, once
    wait_for(lambda: queued(h) == 2 and h.daemon.status.state == "paused", 30, what="two queued, paused")
    time.sleep(0.6)  # rounds of the loop in which a job could have started
    for job in ("next1", "next2"):
        rec = record(h, job)
        assert rec.state is JobState.QUEUED and rec.started_at is None and rec.attempts == 0
        assert not (h.outbox / f"{job}.json").exists()
    doc = health(h)
    assert doc["state"] == "paused" and doc["operator_pause"]["reason"] == "maintenance"
    assert doc["pause"]["kind"] == "operator" and doc["paused"].startswith("paused by alice@host")
    clear_pause(h.settings.paths.state)
    assert h.sidecar("next1")["attempts"] == 1 and h.sidecar("next2")["attempts"] == 1
    wait_for(lambda: health(h).get("operator_pause") is None and health(h).get("paused") is None, 10)


def test_pause_now_sends_the_running_job_back_with_its_attempt_and_resume_runs_it_at_attempt_1(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("again.yaml", "prompt: sleep=3.0\n")
    wait_for(lambda: (job := h.daemon.running.get("again")) is not None and job.step > 0, 30, what="running")
    pause(h, mode="now")
    wait_for(lambda: record(h, "again").state is JobState.QUEUED, 30, what="the job back in the queue")
    rec = record(h, "again")
    assert rec.attempts == 0  # interrupted by us, not by the job
    assert rec.events[-1]["note"] == "paused by alice@host"
    time.sleep(0.6)
    assert record(h, "again").state is JobState.QUEUED and "again" not in h.daemon.running
    clear_pause(h.settings.paths.state)
    side = h.sidecar("again")
    assert side["attempts"] == 1
    ops = [o["op"] for o in h.daemon.history.operations()]
    assert ops[:2] == ["resume", "pause"]


def test_free_vram_parks_the_idle_worker_and_resume_starts_it_again(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("warm.yaml", "prompt: sleep=0.1\n")
    h.sidecar("warm")
    worker = h.daemon.workers["cpu"]
    wait_for(lambda: worker.ready and worker.warm, 30, what="a warm worker")
    old = worker.worker_pid
    pause(h, free_vram=True)
    wait_for(lambda: worker.status.state == "parked", 30, what="the worker parked")
    assert worker.worker_pid is None and worker.status.pid is None and worker.warm == []
    assert old not in [p.pid for p in multiprocessing.active_children()] and pid_gone(old)
    h.drop("after.yaml", "prompt: sleep=0.1\n")
    wait_for(lambda: queued(h) == 1, 30, what="the job taken in while parked")
    time.sleep(1.0)  # not respawned: a parked worker is not a crashed one
    assert worker.status.state == "parked" and worker.worker_pid is None
    doc = wait_for(lambda: (d := health(h)).get("queue_depth") == 1 and d, 10)
    assert doc["workers"]["cpu"]["state"] == "parked" and doc["workers"]["cpu"]["warm_models"] == []
    assert "parked" in format_status(doc)
    clear_pause(h.settings.paths.state)
    assert h.sidecar("after")["attempts"] == 1
    assert worker.worker_pid not in (None, old)


def test_a_parked_worker_loads_its_model_afresh_after_resume(harness_factory):
    h = harness_factory().start()  # the real backend, on the tiny model
    h.drop("first.yaml", TINY + "prompt: one\n")
    assert h.sidecar("first", 180)["model_used"]["cache"] == "loaded"
    h.drop("second.yaml", TINY + "prompt: two\n")
    assert h.sidecar("second", 180)["model_used"]["cache"] == "cached"  # warm: the baseline
    pause(h, free_vram=True)
    wait_for(lambda: h.daemon.workers["cpu"].status.state == "parked", 30, what="the worker parked")
    clear_pause(h.settings.paths.state)
    h.drop("third.yaml", TINY + "prompt: three\n")
    assert h.sidecar("third", 180)["model_used"]["cache"] == "loaded"


def test_a_changed_pause_is_applied_drain_then_now(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("slow.yaml", "prompt: sleep=4.0\n")
    wait_for(lambda: (job := h.daemon.running.get("slow")) is not None and job.step > 0, 30, what="running")
    pause(h, mode="drain")
    wait_for(lambda: h.daemon.status.state == "pausing", 10)
    assert "slow" in h.daemon.running
    pause(h, mode="now", by="bob@host")  # the same file, rewritten
    wait_for(lambda: record(h, "slow").state is JobState.QUEUED, 30, what="interrupted by the changed pause")
    assert record(h, "slow").events[-1]["note"] == "paused by bob@host"
    pauses = [o for o in h.daemon.history.operations() if o["op"] == "pause"]
    assert [(o["by"], o["detail"]["mode"], o["detail"]["changed"]) for o in pauses] == [
        ("bob@host", "now", True),
        ("alice@host", "drain", False),
    ]
    clear_pause(h.settings.paths.state)
    assert h.sidecar("slow", 60)["attempts"] == 1


def test_two_daemons_sharing_one_inbox_both_obey_a_pause(harness_factory, tmp_path):
    a = harness_factory(tmp_path, backend=CUE, instance={"id": "alpha"}).start()
    b = harness_factory(tmp_path, backend=CUE, instance={"id": "beta"}).start()
    pause(a)
    wait_for(lambda: a.daemon.control.paused and b.daemon.control.paused, 10, what="both paused")
    for n in range(6):
        a.drop(f"s{n}.yaml", "prompt: sleep=0.1\n")
    wait_for(lambda: queued(a, b) == 6, 30, what="all six taken in")
    time.sleep(1.0)
    assert not list(a.outbox.glob("*.json")) and not a.daemon.running and not b.daemon.running
    assert a.daemon.status.state == b.daemon.status.state == "paused"
    clear_pause(a.settings.paths.state)
    sides = [a.sidecar(f"s{n}") for n in range(6)]
    assert all(s["attempts"] == 1 for s in sides)
    for h in (a, b):
        assert [o["op"] for o in h.daemon.history.operations()] == ["resume", "pause"]


def test_a_priority_request_reorders_the_queue_and_a_bad_one_is_refused(harness_factory):
    h = harness_factory(backend=CUE).start()
    state = h.settings.paths.state
    pause(h)
    wait_for(lambda: h.daemon.control.paused, 10)
    ids = [f"p{n}" for n in range(4)]
    for job in ids:
        h.drop(f"{job}.yaml", "prompt: sleep=0.05\n")
    wait_for(lambda: queued(h) == 4, 30, what="four queued")
    write_priority(state, "p3", 5, by="bob@host")
    write_priority(state, "p2", 3, by="bob@host")
    write_priority(state, "p0", 5000, by="bob@host")  # out of range
    write_priority(state, "elsewhere", 7, by="bob@host")  # no daemon here holds it: left alone
    wait_for(lambda: sorted(p.name for p in priority_dir(state).iterdir()) == ["elsewhere"], 30, what="applied")
    recs = {job: record(h, job) for job in ids}
    assert [recs[j].priority for j in ids] == [0, 0, 3, 5]
    assert recs["p3"].events[-1]["note"] == "priority 0 -> 5 by bob@host"
    assert all(r.state is JobState.QUEUED for r in recs.values())
    by_seq = sorted(ids, key=lambda j: recs[j].seq)
    expected = ["p3", "p2", *[j for j in by_seq if j not in ("p3", "p2")]]
    clear_pause(state)
    for job in ids:
        h.sidecar(job)
    assert started_order(h, ids) == expected
    ops = {o["job_id"]: o for o in h.daemon.history.operations() if o["op"] == "priority"}
    assert ops["p3"]["by"] == "bob@host" and ops["p3"]["detail"]["applied"] is True
    assert ops["p3"]["detail"]["priority"] == 5 and ops["p3"]["detail"]["was"] == 0
    assert ops["p0"]["detail"]["applied"] is False and "outside" in ops["p0"]["detail"]["error"]
    assert "elsewhere" not in ops


def test_intake_records_every_job_in_the_history_and_a_cancel_names_who_asked(harness_factory, capsys):
    h = harness_factory(backend=CUE).start()
    state = h.settings.paths.state
    pause(h)
    wait_for(lambda: h.daemon.control.paused, 10)
    h.drop("batch.yaml", "jobs:\n  - {id: b1, prompt: sleep=0.05}\n  - {id: b2, prompt: sleep=0.05}\n")
    h.drop("single.yaml", "prompt: sleep=0.05\n")
    wait_for(lambda: queued(h) == 3, 30, what="three queued")
    for job in ("b1", "b2", "single"):
        rows = h.daemon.history.rows_for_id(job)
        assert [r["status"] for r in rows] == ["queued"], job
        assert rows[0]["file"] and rows[0]["queued_at"]
    # What a user saw before: the health file said "3 queued" while `tasks --status queued` printed nothing.
    capsys.readouterr()
    tasks_args = argparse.Namespace(outbox=None, last=20, status="queued", json=True)
    assert commands.tasks(tasks_args, h.settings) == 0
    assert sorted(r["id"] for r in json.loads(capsys.readouterr().out)) == ["b1", "b2", "single"]
    wait_for(lambda: health(h).get("queue_depth") == 3, 10, what="the health file says 3 queued")
    write_cancel(state, "b2", by="carol@host")
    failure = h.failure("b2")
    assert failure["error_category"] == "cancelled"
    assert failure["message"] == "cancelled by request of carol@host before it started"
    # The history follows the failure record (written first, the durable outcome): waited for, not raced.
    wait_for(lambda: h.daemon.history.rows_for_id("b2")[-1]["status"] == "failed", 10, what="b2 failed in history")
    cancels = wait_for(lambda: [o for o in h.daemon.history.operations("b2") if o["op"] == "cancel"], 10)
    assert [(o["by"], o["instance"]) for o in cancels] == [("carol@host", h.settings.owner)]
    clear_pause(state)
    h.sidecar("b1")
    h.sidecar("single")


def test_a_daemon_started_while_paused_stays_paused_and_says_so_everywhere(harness_factory, tmp_path):
    prom = tmp_path / "metrics" / "wan.prom"
    prom.parent.mkdir()
    h = harness_factory(backend=CUE, metrics={"textfile": str(prom), "interval_seconds": 0.2})
    pause(h, reason="GPU for a demo")
    h.start()
    assert h.daemon.control.paused  # from the start: nothing could have been dispatched before the first round
    h.drop("held.yaml", "prompt: sleep=0.05\n")
    doc = wait_for(lambda: (d := health(h)).get("queue_depth") == 1 and d.get("state") == "paused" and d, 30)
    time.sleep(0.6)
    assert record(h, "held").state is JobState.QUEUED and not (h.outbox / "held.json").exists()
    assert doc["operator_pause"]["by"] == "alice@host" and doc["operator_pause"]["reason"] == "GPU for a demo"
    assert doc["operator_pause"]["since"] == doc["operator_pause"]["at"]
    assert doc["pause"]["kind"] == "operator" and doc["pause"]["folder"] is None
    assert doc["paused"] == doc["pause"]["reason"] and "GPU for a demo" in doc["paused"]
    answer = verdict(doc, max_age=60, now=time.time(), health_path=h.settings.health_path, folders=[])
    assert answer.startswith("healthy: paused by alice@host"), answer
    assert "PAUSED (operator): paused by alice@host" in format_status(doc)
    assert "PAUSED: paused by alice@host" in h.daemon.status.status_line()
    wait_for(lambda: prom.exists() and "wan_daemon_operator_paused{" in prom.read_text(), 10)
    wait_for(lambda: 'kind="operator"} 1' in prom.read_text(), 10, what="the operator pause in the metrics")
    clear_pause(h.settings.paths.state)
    h.sidecar("held")
    wait_for(lambda: health(h).get("operator_pause") is None, 10)
    wait_for(lambda: 'wan_daemon_operator_paused{instance_id="' in (t := prom.read_text()) and '"} 0' in t, 10)


def test_run_until_idle_while_paused_returns_and_leaves_the_queue_in_the_spool(harness_factory):
    h = harness_factory(backend=CUE)
    pause(h)
    h.settings.paths.inbox.mkdir(parents=True, exist_ok=True)
    (h.settings.paths.inbox / "held.yaml").write_text("prompt: sleep=0.05\n")
    d = Daemon(h.settings, backend=CUE)
    run = threading.Thread(target=d.run, kwargs={"until_idle": True}, daemon=True)
    run.start()
    run.join(120)
    if run.is_alive():  # hanging: stop it so that the test fails, not the session
        d.request_stop()
        run.join(60)
        pytest.fail("run --until-idle did not return while paused")
    assert d.book.count(JobState.QUEUED) == 1 and d.done == 0
    (kept,) = (h.settings.paths.state / "owners").glob("*/jobs/held/job.json")
    assert json.loads(kept.read_text())["state"] == "queued"


def test_a_rejected_jobs_result_names_its_failure_record(harness_factory):
    h = harness_factory(backend=CUE).start()
    pause(h)  # the twin stays queued, so a second job with its id is a duplicate
    h.drop("twin.yaml", "prompt: sleep=0.05\n")
    wait_for(lambda: queued(h) == 1, 30)
    h.drop("bad.yaml", "prompt: x\nframes: -3\n")
    h.drop("copy.yaml", "id: twin\nprompt: sleep=0.05\n")
    h.failure("bad")
    wait_for(lambda: len(h.daemon.results) == 2, 30, what="both rejections")
    results = {r["id"]: r for r in h.daemon.results}
    assert results["bad"] == {"id": "bad", "status": "failed", "failure": str(h.outbox / "failed" / "bad.json")}
    twin = results["twin"]["failure"]
    assert twin != str(h.outbox / "failed" / "twin.json") and os.path.exists(twin)
    assert json.loads(open(twin).read())["error_category"] == "duplicate_job"
    clear_pause(h.settings.paths.state)
    h.sidecar("twin")


def test_shutdown_while_paused_drains_and_a_restart_while_paused_parks_at_once(harness_factory):
    h = harness_factory(backend=CUE).start()
    h.drop("long.yaml", "prompt: sleep=3.0\n")
    wait_for(lambda: (job := h.daemon.running.get("long")) is not None and job.step > 0, 30, what="running")
    pause(h, free_vram=True)
    wait_for(lambda: h.daemon.status.state == "pausing", 10)
    h.stop()  # SIGTERM while paused: the running job goes back to the queue, as at any shutdown
    rec = record(h, "long")
    assert rec.state is JobState.QUEUED and rec.attempts == 0 and rec.events[-1]["note"] == "interrupted by shutdown"
    h.start()  # started while paused, free_vram: its worker is parked before it takes a job
    worker = h.daemon.workers["cpu"]
    wait_for(lambda: worker.status.state == "parked", 30, what="parked from the start")
    time.sleep(0.6)
    assert record(h, "long").state is JobState.QUEUED and worker.worker_pid is None
    clear_pause(h.settings.paths.state)
    assert h.sidecar("long", 60)["attempts"] == 1


class _Stub:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


def test_the_pause_file_is_read_again_only_when_it_changed_and_a_damaged_one_still_pauses(tmp_path, monkeypatch):
    from daemon.config import load_settings
    from daemon.control import pause_path
    from daemon.runtime import control as control_module

    settings = load_settings(None, {"paths": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")}})
    ops: list[tuple] = []
    book = _Stub(record_operation=lambda op, by, job_id=None, **detail: ops.append((op, by, detail.get("mode"))))
    placement = _Stub(workers={}, running={})
    status = _Stub(state="idle", changed=lambda: None)
    reads: list[int] = []
    real_read = control_module.read_pause
    monkeypatch.setattr(control_module, "read_pause", lambda state: reads.append(1) or real_read(state))
    control = control_module.OperatorControl(settings, book, placement, status=status, clock=time.time)  # type: ignore[arg-type]
    state = settings.paths.state
    for _ in range(50):
        control.check_pause()
    assert not control.paused and reads == []  # no file: a stat per round, nothing read
    write_pause(state, PauseRequest(mode="drain", by="alice@host", at=1.0))
    for _ in range(50):
        control.check_pause()
    assert control.paused and len(reads) == 1 and ops == [("pause", "alice@host", "drain")]
    write_pause(state, PauseRequest(mode="drain", by="alice@host", at=1.0))  # rewritten, the same
    control.check_pause()
    assert len(reads) == 2 and len(ops) == 1  # read again (a new file), but nothing changed
    write_pause(state, PauseRequest(mode="now", by="bob@host", at=2.0))
    control.check_pause()
    assert control.pause.mode == "now" and ops[-1] == ("pause", "bob@host", "now")
    pause_path(state).write_text("{not json")  # damaged: still paused, the safest reading
    control.check_pause()
    assert control.paused and control.pause.mode == "drain" and control.pause.reason == "unreadable pause file"
    clear_pause(state)
    control.check_pause()
    assert not control.paused and ops[-1][0] == "resume" and status.state == "idle"


def strict_json(text: str):
    """JSON as the standard has it: Python's json accepts NaN and Infinity, which other parsers refuse."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} in JSON output"))


def _stub_control(tmp_path, *, records=None, workers=None):
    from daemon.config import load_settings
    from daemon.runtime import control as control_module

    settings = load_settings(None, {"paths": {"inbox": str(tmp_path / "in"), "outbox": str(tmp_path / "out")}})
    ops: list[tuple] = []
    book = _Stub(
        records=records or {},
        record_operation=lambda op, by, job_id=None, **detail: ops.append((op, by, job_id, detail)),
        amend=lambda rec, note, **changes: ops.append(("amend", note, rec.id, changes)),
        on_write_error=lambda exc: None,
    )
    placement = _Stub(workers=workers or {}, running={}, idle_workers=lambda: list(workers or {}))
    status = _Stub(state="idle", changed=lambda: None)
    control = control_module.OperatorControl(settings, book, placement, status=status, clock=time.time)  # type: ignore[arg-type]
    return control, settings.paths.state, ops


@pytest.mark.parametrize(
    "at", ["10" + "0" * 400, "1e999", "-1e999", "NaN", "1e20", '"yesterday"', "true"], ids=lambda a: a[:8]
)
def test_a_pause_file_with_a_damaged_time_still_pauses_and_breaks_nothing(tmp_path, capsys, at):
    """A hand-edited pause file: the daemon stays paused and running, what it says about the pause is valid JSON,
    and the CLI reads it without a traceback (resume lifts it)."""
    from daemon.cli import main
    from daemon.control import pause_path

    control, state, _ = _stub_control(tmp_path)
    pause_path(state).parent.mkdir(parents=True)
    pause_path(state).write_text('{"mode": "now", "by": "vi@host", "at": ' + at + "}")
    control.check_pause()
    assert control.paused and control.pause.mode == "now" and control.pause.at == 0.0
    assert "paused by vi@host at ?" in control.reason
    json.dumps(control.view(), allow_nan=False)
    args = ["--inbox", str(tmp_path / "in"), "--outbox", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(["queue", "--json", *args]) == 0
    strict_json(capsys.readouterr().out)
    assert main(["pause", "--json", *args]) == 0  # replaces it, saying what it replaced
    assert strict_json(capsys.readouterr().out)["replaces"]["by"] == "vi@host"
    pause_path(state).write_text('{"mode": "now", "by": "vi@host", "at": ' + at + "}")
    assert main(["resume", "--json", *args]) == 0 and not pause_path(state).exists()
    strict_json(capsys.readouterr().out)


def test_a_pause_file_that_could_not_be_read_is_read_again_next_round(tmp_path, monkeypatch):
    from daemon.runtime import control as control_module

    control, state, _ = _stub_control(tmp_path)
    write_pause(state, PauseRequest(mode="drain", by="alice@host", at=1.0))
    real = control_module.read_pause

    def flaky(folder):
        monkeypatch.setattr(control_module, "read_pause", real)
        raise OSError(5, "Input/output error")  # EIO on a share, once

    monkeypatch.setattr(control_module, "read_pause", flaky)
    control.check_pause()
    assert not control.paused
    control.check_pause()
    assert control.paused and control.pause.by == "alice@host"


def test_a_priority_request_written_while_one_is_applied_is_kept_for_the_next_round(tmp_path, monkeypatch):
    from daemon.runtime import control as control_module

    rec = _Stub(id="j", state=JobState.QUEUED, priority=0, received_at=0.0)
    control, state, ops = _stub_control(tmp_path, records={"j": rec})
    write_priority(state, "j", 5, by="a@host")
    real = control_module.read_request

    def read_then_another_arrives(path):
        request = real(path)
        write_priority(state, "j", 7, by="b@host")  # renamed into place while the first is being applied
        return request

    monkeypatch.setattr(control_module, "read_request", read_then_another_arrives)
    control.apply_priorities()
    monkeypatch.setattr(control_module, "read_request", real)
    assert [o[3] for o in ops if o[0] == "amend"] == [{"priority": 5}]
    assert (priority_dir(state) / "j").exists()
    control.apply_priorities()
    assert [o[3] for o in ops if o[0] == "amend"] == [{"priority": 5}, {"priority": 7}]
    assert os.listdir(priority_dir(state)) == []


def test_a_pause_changed_to_keep_the_gpus_starts_parked_workers_again(tmp_path):
    parked: list[str] = []
    worker = _Stub(status=_Stub(state="ready"))
    worker.park = lambda: (parked.append("park"), setattr(worker.status, "state", "parked"))
    worker.unpark = lambda: worker.status.state == "parked" and setattr(worker.status, "state", "stopped")
    control, state, _ = _stub_control(tmp_path, workers={"gpu0": worker})
    write_pause(state, PauseRequest(mode="drain", free_vram=True, by="a@host", at=1.0))
    control.tick()
    assert worker.status.state == "parked" and parked == ["park"]
    write_pause(state, PauseRequest(mode="drain", free_vram=False, by="a@host", at=2.0))
    control.tick()
    assert worker.status.state == "stopped" and control.paused  # started by its next poll; nothing dispatched


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_parked_worker_is_never_respawned_until_unparked(tmp_path, executor):
    """Both executors: poll() respawns a worker in backoff, never a parked one (no process or actor is started
    here: the parked worker's poll must not try)."""
    from daemon.config import RayConfig
    from daemon.worker.process import LocalProcessExecutor
    from daemon.worker.protocol import WorkerConfig
    from daemon.worker.ray_executor import RayExecutor

    config = WorkerConfig(worker_name="gpu0", device="cpu", models_dir=str(tmp_path), backend=CUE)
    if executor == "local":
        worker = LocalProcessExecutor(config, clock=time.time, stall_timeout_seconds=10, start_timeout_seconds=10)
    else:
        worker = RayExecutor(config, ray_config=RayConfig(), clock=time.time, stall_timeout_seconds=10)
    started: list[str] = []
    worker.start = lambda: started.append("start")  # type: ignore[method-assign]
    worker.status.state, worker.status.restarts, worker.warm = "backoff", 2, ["tiny-ti2v-5b"]
    worker.park()
    assert worker.status.state == "parked" and worker.status.restarts == 2 and worker.warm == []
    assert worker.status.pid is None and not worker.ready and not worker.failing_to_start
    for _ in range(3):
        assert worker.poll() == []
    assert started == [] and worker.event_handle is None
    worker.unpark()
    assert worker.status.state == "stopped" and started == []  # started by the next poll, as any respawn
    assert worker.poll() == [] and started == ["start"]
    worker.status.state = "ready"
    worker.unpark()  # not parked: nothing to do
    assert worker.status.state == "ready" and started == ["start"]
