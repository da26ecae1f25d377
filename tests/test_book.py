"""The job book's indexes (by state, by claimed file, by active output name, the ranked queue) against the truth
recomputed from its records after every change, over random sequences of the operations the daemon performs.

The indexes are what keeps intake, recovery, health and dispatch from scanning every record (bench/scale.py
measures that); here they must simply never disagree with the records.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from factories import make_params, make_record

from daemon.config import load_settings
from daemon.errors import Category, JobError
from daemon.jobs import JobRecord, JobState
from daemon.ops.inventory import StaticInventory
from daemon.runtime.autodownload import ModelDownloads
from daemon.runtime.book import JobBook
from daemon.runtime.disk import DiskGuard
from daemon.runtime.notify import SystemdNotifier
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool
from daemon.runtime.status import Status


def make_book(tmp_path, seed: int) -> JobBook:
    settings = load_settings(
        None,
        {
            "paths": {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox")},
            "instance": {"id": "me"},
            "worker": {"max_attempts": 2, "retry_base_seconds": 0.0},
        },
    )
    clock = iter(range(10**9)).__next__
    spool = Spool(tmp_path / "spool", "me", clock=lambda: float(clock()))
    status = Status(settings, clock=lambda: 0.0, notifier=SystemdNotifier(None), inventory=StaticInventory([]))
    return JobBook(
        settings,
        spool,
        Outbox(tmp_path / "outbox", owner="me"),
        status=status,
        history=None,
        disk=DiskGuard([tmp_path], min_free_mb=0),
        downloads=ModelDownloads(),
        clock=lambda: 0.0,
        rng=random.Random(seed),
        on_change=lambda: None,
        device_of=lambda rec: "cpu",
    )


def check_indexes(book: JobBook) -> None:
    recs = list(book.records.values())
    for state in [None, *JobState]:
        assert {r.id for r in book.in_state(state)} == {r.id for r in recs if r.state is state}, state
        assert book.count(state) == sum(r.state is state for r in recs)
    by_source: dict[str, set[str]] = {}
    for r in recs:
        by_source.setdefault(r.source, set()).add(r.id)
    for source, ids in by_source.items():
        assert book.has_records_from(source)
        assert {r.id for r in book.records.values() if r.source == source} == ids
    active = {r.params.basename for r in recs if r.state is not None and r.state.active}
    for r in recs:
        assert book.is_active_basename(r.params.basename) == (r.params.basename in active)
    queued = [r for r in recs if r.state is JobState.QUEUED]
    assert len(book.queue) == len(queued) and all(r.id in book.queue for r in queued)
    assert book.queued_by_priority() == dict(Counter(r.priority for r in queued))
    assert book.has_waiting_work() == any(r.state in (JobState.QUEUED, JobState.WAITING_FOR_MODEL) for r in recs)


@pytest.mark.parametrize("seed", range(12))
def test_indexes_agree_with_the_records_after_every_change(tmp_path, seed):
    rnd = random.Random(seed)
    book = make_book(tmp_path, seed)
    n = 0
    for _ in range(250):
        op = rnd.choice(["intake", "intake", "start", "finish", "fail", "retry", "release", "reload", "amend"])
        active = [r for r in book.records.values() if r.state is not None and r.state.active]
        if op == "intake" or not book.records:
            n += 1
            source = f"{n // 3:06d}.me.f{n // 3}.yaml"  # about three jobs per claimed file
            rec = make_record(
                f"j{n}",
                seq=n,
                source=source,
                priority=rnd.choice([-5, 0, 0, 3]),
                state=None,
                params={"basename": f"out{rnd.randrange(40)}"},
            )
            if book.is_active_basename(rec.params.basename):
                continue  # intake refuses a second active job writing the same name
            book.set(rec, JobState.QUEUED)
        elif op == "start":
            queued = book.in_state(JobState.QUEUED)
            if queued:
                rec = rnd.choice(queued)
                book.set(rec, JobState.RUNNING, attempts=rec.attempts + 1)
        elif op == "finish":
            running = book.in_state(JobState.RUNNING)
            if running:
                book.set(rnd.choice(running), JobState.DONE)
        elif op in ("fail", "retry"):
            running = book.in_state(JobState.RUNNING)
            if running:
                category = Category.INVALID_INPUT if op == "fail" else Category.WORKER_CRASHED
                book.fail_or_retry(rnd.choice(running), JobError(category, "on cue"))
        elif op == "release":
            for source in {r.source for r in book.records.values()}:
                book.release_if_finished(source)
        elif op == "amend" and active:
            # an operator's new priority (daemon.runtime.control): persisted, state unchanged, re-ranked
            rec = rnd.choice(active)
            updated = book.amend(rec, "priority", priority=rnd.choice([-5, 0, 3, 9]))
            assert updated.state is rec.state and book.spool.load(rec.id) == updated
        elif op == "reload" and active:
            # a record found in the spool again (recovery, adoption) replaces the one in the book
            rec = rnd.choice(active)
            book.add(rec.model_copy(update={"params": make_params(basename=rec.params.basename)}))
        check_indexes(book)
    book.drop_all()
    check_indexes(book)
    assert not book.records and not book.queue


def test_a_record_leaving_the_queue_leaves_the_ranked_queue(tmp_path):
    book = make_book(tmp_path, 0)
    rec = book.set(make_record("a", state=None), JobState.QUEUED)
    assert "a" in book.queue and book.newly_queued == [rec]
    book.set(rec, JobState.RUNNING)
    assert "a" not in book.queue
    assert isinstance(book.records["a"], JobRecord)


def test_status_says_recovering_n_of_n_while_the_spool_is_read(tmp_path):
    from daemon.runtime.health import format_status

    book = make_book(tmp_path, 0)
    status = book.status
    status.book, status.disk = book, book.disk
    status.placement = type("NoJobsRunning", (), {"running": {}})()  # type: ignore[assignment]
    status.recovery = (1200, 10000)
    assert status.status_line().startswith("recovering 1200/10000;")
    text = format_status({"state": "starting", "recovering": {"done": 1200, "total": 10000}, "started_at": 0})
    assert "recovering 1200/10000 records" in text


def test_amend_persists_a_new_priority_without_a_change_of_state_and_ranks_the_job_at_once(tmp_path):
    from daemon.ops.history import History

    book = make_book(tmp_path, 0)
    book.history = History(tmp_path / "history.sqlite3")
    recs = [book.set(make_record(n, seq=i + 1, token=n, state=None), JobState.QUEUED) for i, n in enumerate("abc")]
    assert [r.id for r in book.queue.ranked(10.0, None)] == ["a", "b", "c"]
    updated = book.amend(recs[2], "priority 0 -> 5 by bob@host", priority=5)
    assert [r.id for r in book.queue.ranked(10.0, None)] == ["c", "a", "b"]
    on_disk = book.spool.load("c")
    assert on_disk == updated and on_disk.state is JobState.QUEUED and on_disk.priority == 5
    assert on_disk.events[-1]["note"] == "priority 0 -> 5 by bob@host" and on_disk.events[-1]["state"] == "queued"
    assert book.queued_by_priority() == {0: 2, 5: 1}
    running = book.set(book.records["a"], JobState.RUNNING, attempts=1)
    book.amend(running, "priority 0 -> -3 by bob@host", priority=-3)  # kept for a requeue
    assert book.spool.load("a").priority == -3 and "a" not in book.queue
    assert book.set(book.records["a"], JobState.QUEUED).priority == -3
    assert [r.id for r in book.queue.ranked(10.0, None)] == ["c", "b", "a"]
    check_indexes(book)
    assert [r["status"] for r in book.history.rows_for_id("c")] == ["queued"]
    book.history.close()


def test_a_cancel_names_who_asked_and_an_old_empty_request_still_cancels(tmp_path):
    from daemon.control import cancel_dir, write_cancel
    from daemon.ops.history import History

    book = make_book(tmp_path, 0)
    book.history = History(tmp_path / "history.sqlite3")
    for i, name in enumerate(("a", "b", "c")):
        book.set(make_record(name, seq=i + 1, state=None), JobState.QUEUED)
    state = book.settings.paths.state
    write_cancel(state, "a", by="carol@host")
    (cancel_dir(state) / "b").write_text("")  # an older CLI's request
    book.set(book.records["c"], JobState.RUNNING, attempts=1)
    write_cancel(state, "c", by="dave@host")
    assert book.take_cancels() == ["c"]  # running: interrupted first, cancelled as it stops
    failed = book.outbox.failed
    assert json.loads((failed / "a.json").read_text())["message"] == (
        "cancelled by request of carol@host before it started"
    )
    assert json.loads((failed / "b.json").read_text())["message"] == "cancelled by request before it started"
    assert not (cancel_dir(state) / "a").exists() and not (cancel_dir(state) / "b").exists()
    assert book.take_cancels() == []  # asked once
    book.cancel(book.records["c"], "while it was running")
    assert json.loads((failed / "c.json").read_text())["message"] == (
        "cancelled by request of dave@host while it was running"
    )
    ops = {(o["job_id"], o["by"]) for o in book.history.operations() if o["op"] == "cancel"}
    assert ops == {("a", "carol@host"), ("b", "?"), ("c", "dave@host")}
    book.history.close()


def test_a_cancel_left_for_a_job_that_ended_or_for_an_earlier_job_of_its_id_cancels_nothing_later(tmp_path):
    """``retry`` reuses ids: a request written as a job ended, or before this job of the id was taken in, must not
    cancel the new one."""
    from daemon.control import REQUEST_SKEW_SECONDS, cancel_dir, write_cancel

    book = make_book(tmp_path, 0)
    state = book.settings.paths.state
    done = book.set(make_record("ended", seq=1, source="one.yaml", state=None), JobState.QUEUED)
    book.set(book.set(done, JobState.RUNNING, attempts=1), JobState.DONE)
    write_cancel(state, "ended", by="late@host")  # it ended as the request was written
    assert book.take_cancels() == [] and not (cancel_dir(state) / "ended").exists()
    # Running when asked, it finished anyway (being encoded): released with its file, the request goes with it.
    late = book.set(make_record("late", seq=2, source="two.yaml", state=None), JobState.QUEUED)
    late = book.set(late, JobState.RUNNING, attempts=1)
    write_cancel(state, "late", by="late@host")
    assert book.take_cancels() == ["late"]
    book.set(late, JobState.DONE)
    book.release_if_finished("two.yaml")
    assert "late" not in book.records and not (cancel_dir(state) / "late").exists()
    received = 10_000.0
    new = book.set(make_record("again", seq=3, state=None, received_at=received), JobState.QUEUED)
    write_cancel(state, "again", by="old@host", at=received - REQUEST_SKEW_SECONDS - 1)  # left for an earlier run
    assert book.take_cancels() == [] and book.records["again"].state is JobState.QUEUED
    assert not (cancel_dir(state) / "again").exists()
    write_cancel(state, "again", by="skewed@host", at=received - 5)  # a clock a little behind: still current
    book.take_cancels()
    assert json.loads((book.outbox.failed / "again.json").read_text())["error_category"] == "cancelled"
    assert new.state is JobState.QUEUED


def test_a_bulk_cancel_is_spread_over_rounds_of_bounded_work(tmp_path):
    from daemon.control import write_cancel
    from daemon.runtime.book import CANCELS_PER_ROUND

    book = make_book(tmp_path, 0)
    state = book.settings.paths.state
    n = CANCELS_PER_ROUND * 2 + 7
    for i in range(n):
        book.set(make_record(f"j{i}", seq=i + 1, state=None), JobState.QUEUED)
        write_cancel(state, f"j{i}", by="ops@host")
    rounds = []
    while book.count(JobState.QUEUED):
        before = book.count(JobState.QUEUED)
        book.take_cancels()
        rounds.append(before - book.count(JobState.QUEUED))
        assert len(rounds) <= 3
    assert rounds == [CANCELS_PER_ROUND, CANCELS_PER_ROUND, 7]
