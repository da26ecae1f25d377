"""The job history database (daemon.ops.history) and the analysis behind `wan-daemon tasks` / `analysis`
(daemon.ops.analysis), on real SQLite files. Rows are built from real JobRecord dumps and sidecar-shaped dicts."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from rich.console import Console

from daemon.errors import Category, JobError
from daemon.jobs import JobRecord, JobState
from daemon.jobspec.params import resolve_params
from daemon.jobspec.spec import JobSpec
from daemon.models import REGISTRY, LocatedModel
from daemon.ops.analysis import analyse, analyse_rows, percentile, render_analysis, render_tasks
from daemon.ops.history import COLUMNS, MIGRATIONS, History, HistoryError, SchemaTooNew, row_from_record

ROOT = Path(__file__).resolve().parents[1]
T2V, TI2V, I2V = "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.2-i2v-a14b"
NOW = 1_750_000_000.0


# ---- real-shaped JobRecords and sidecars ----------------------------------------------------------

_seq = iter(range(1, 10_000))


def make_record(
    job_id: str, *, model: str = T2V, queued_at: float = NOW - 3600, size: str | None = None, **spec: Any
) -> JobRecord:
    info = REGISTRY[model]
    fields: dict[str, Any] = {
        "id": job_id,
        "prompt": "A red fox trotting through fresh snow",
        "model": model,
        "seed": 42,
        **spec,
    }
    if size:
        fields["size"] = size
    if model == I2V:
        fields["image"] = "fox.png"
    params = resolve_params(JobSpec.model_validate(fields), info, max_side=2048, max_frames=481, max_steps=500)
    return JobRecord(
        id=job_id,
        token=f"tok-{job_id}",
        source=f"{next(_seq):06d}-{job_id}.yaml",
        source_name=f"{job_id}.yaml",
        seq=next(_seq),
        spec=fields,
        params=params,
        model=LocatedModel(info=info, path=Path(f"/hf/{info.name}"), source="hub-cache", revision="abc123"),
        received_at=queued_at,
        queued_at=queued_at,
    )


def move(rec: JobRecord, state: JobState, **changes: Any) -> JobRecord:
    """What Spool.transition does to the record (minus the disk)."""
    updated = rec.model_copy(update=changes)
    updated.state = state
    return updated


def sidecar_for(
    rec: JobRecord, *, vram: float | None = 30_000.0, instance: str = "gpu-host-1", device: str = "cuda"
) -> dict[str, Any]:
    """The keys of Daemon._sidecar that the history reads, with the same definitions."""
    started, now = rec.started_at, rec.finished_at
    return {
        "id": rec.id,
        "job_token": rec.token,
        "status": "done",
        "file": rec.source_name,
        "spec": rec.spec,
        "parameters": rec.params.model_dump(mode="json"),
        "model_used": {**rec.model.to_dict(), "cache": "miss", "load_seconds": 12.5},
        "device": {"type": device, "name": "NVIDIA H100 80GB HBM3"},
        "timings": {
            "queue_wait": round(started - rec.queued_at, 4),
            "model_load": 12.5,
            "denoise": 100.0,
            "total": round(now - started, 4),
        },
        "generation_time_seconds": round(now - started, 4),
        "peak_vram_usage_mb": vram,
        "peak_rss_mb": 2048.5,
        "optimizations_applied": ["vae_tiling"] if rec.params.vae_tiling else [],
        "degradations": rec.degradations,
        "attempts": rec.attempts,
        "instance": instance,
    }


def run_done(
    h: History,
    rec: JobRecord,
    *,
    wait: float,
    gen: float,
    vram: float | None = 30_000.0,
    degradations: list[dict] | None = None,
    last_error: JobError | None = None,
) -> JobRecord:
    """queued -> running -> done, recording every transition as the daemon does."""
    assert h.record(rec.summary())
    rec = move(rec, JobState.RUNNING, attempts=rec.attempts + 1, started_at=rec.queued_at + wait)
    assert h.record(rec.summary())
    changes: dict[str, Any] = {
        "finished_at": rec.started_at + gen,
        "outputs": {"video": f"/out/{rec.id}.mp4", "sidecar": f"/out/{rec.id}.json"},
    }
    if degradations:
        changes["degradations"] = degradations
    if last_error:
        changes["last_error"] = last_error.to_dict()
    rec = move(rec, JobState.DONE, **changes)
    assert h.record(rec.summary(), sidecar_for(rec, vram=vram))
    return rec


def run_failed(h: History, rec: JobRecord, category: Category, *, wait: float, ran: float = 5.0) -> JobRecord:
    assert h.record(rec.summary())
    rec = move(rec, JobState.RUNNING, attempts=rec.attempts + 1, started_at=rec.queued_at + wait)
    assert h.record(rec.summary())
    err = JobError(category, f"{category.value} while running {rec.id}")
    rec = move(
        rec,
        JobState.FAILED,
        finished_at=rec.started_at + ran,
        last_error=err.to_dict(),
        errors=[{**err.to_dict(), "attempt": rec.attempts}],
        outputs={"failure": f"/out/failed/{rec.id}.json"},
    )
    assert h.record(rec.summary())
    return rec


@pytest.fixture
def history(tmp_path):
    h = History(tmp_path / "state" / "history.sqlite3")
    yield h
    h.close()


@pytest.fixture
def errors_logged():
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="ERROR")
    yield messages
    logger.remove(sink)


def text_of(*renderables) -> str:
    console = Console(record=True, width=120)
    for r in renderables:
        console.print(r)
    # Compare words, not layout: rich wraps long lines, and table borders sit between cells.
    text = "".join(" " if 0x2500 <= ord(c) <= 0x257F else c for c in console.export_text())
    return " ".join(text.split())


# ---- schema and migrations -----------------------------------------------------------------------


def test_creates_folders_and_the_current_schema_from_nothing(tmp_path):
    path = tmp_path / "a" / "b" / "history.sqlite3"
    with History(path) as h:
        assert h.schema_version == h.latest_version == len(MIGRATIONS) == 2
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[1] for r in conn.execute("PRAGMA table_info(generation_tasks)")] == list(COLUMNS)
    assert [r[1] for r in conn.execute("PRAGMA table_info(generation_tasks)") if r[5]] == ["token"]  # primary key
    indexed = {
        conn.execute(f"PRAGMA index_info({name})").fetchone()[2]
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name = 'generation_tasks' AND name LIKE 'idx_%'"
        )
    }
    assert indexed == {"status", "finished_at", "model_used", "id"}
    assert [r[1] for r in conn.execute("PRAGMA table_info(operations)")] == [
        "at",
        "op",
        "job_id",
        "by",
        "instance",
        "detail",
    ]
    conn.close()


def test_reopening_is_idempotent_and_keeps_the_rows(tmp_path):
    path = tmp_path / "history.sqlite3"
    with History(path) as h:
        assert h.record(make_record("fox").summary())
    for _ in range(3):
        with History(path) as h:
            assert h.schema_version == len(MIGRATIONS)
            assert [r["id"] for r in h.tasks()] == ["fox"]


class _HistoryNext(History):
    migrations = (*MIGRATIONS, lambda conn: conn.execute("ALTER TABLE generation_tasks ADD COLUMN note TEXT"))


def test_upgrades_an_older_database_in_order_and_keeps_its_rows(tmp_path):
    path = tmp_path / "history.sqlite3"
    with History(path) as h:
        assert h.record(make_record("fox").summary())
    with _HistoryNext(path) as h:
        assert h.schema_version == len(MIGRATIONS) + 1
        assert h.tasks()[0]["id"] == "fox" and h.tasks()[0]["note"] is None
    with _HistoryNext(path) as h:  # and again: nothing left to do
        assert h.schema_version == len(MIGRATIONS) + 1
    with pytest.raises(SchemaTooNew):  # the older code now refuses it
        History(path)


def test_a_failing_migration_leaves_the_database_at_its_old_version(tmp_path):
    path = tmp_path / "history.sqlite3"
    History(path).close()

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    class Broken(History):
        migrations = (*MIGRATIONS, broken)

    with pytest.raises(HistoryError, match=f"version {len(MIGRATIONS) + 1}"):
        Broken(path)
    with History(path) as h:
        assert h.schema_version == len(MIGRATIONS)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    conn.close()


def test_a_database_from_a_newer_version_is_refused_clearly(tmp_path):
    path = tmp_path / "history.sqlite3"
    History(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(SchemaTooNew, match=r"schema version 7, newer than this wan-daemon supports \(2\)") as exc:
        History(path)
    assert str(path) in str(exc.value)


def test_several_processes_opening_a_fresh_file_at_once_all_succeed(tmp_path):
    path = tmp_path / "fresh.sqlite3"
    code = textwrap.dedent("""
        import sys
        from daemon.ops.history import History
        h = History(sys.argv[1])
        assert h.record({"id": sys.argv[2], "token": sys.argv[2], "status": "queued", "queued_at": 1.0})
        h.close()
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), f"p{i}"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with History(path) as h:
        assert h.schema_version == len(MIGRATIONS)
        assert sorted(r["id"] for r in h.tasks()) == ["p0", "p1", "p2", "p3"]


# ---- mapping and upserts -------------------------------------------------------------------------


def test_row_from_record_maps_a_real_job_record_dump():
    rec = make_record("fox", model=TI2V, size="1280x704", frames=121)
    row = row_from_record(rec.summary())
    assert row == {
        "id": "fox",
        "token": "tok-fox",
        "file": "fox.yaml",
        "model_used": TI2V,
        "task": "ti2v",
        "resolution": "1280x704",
        "frames": 121,
        "steps": 50,
        "attempts": 0,
        "queued_at": NOW - 3600,
        "degradations": [],
    }  # state is None before intake's transition
    assert set(row) <= set(COLUMNS)


def test_upsert_queued_running_done_keeps_earlier_fields(history):
    rec = make_record("fox", queued_at=NOW - 100)
    assert history.record(move(rec, JobState.QUEUED).summary())
    (row,) = history.tasks()
    assert (row["status"], row["model_used"], row["resolution"], row["frames"], row["steps"], row["task"]) == (
        "queued",
        T2V,
        "1280x720",
        81,
        40,
        "t2v",
    )
    assert row["started_at"] is None and row["updated_at"] is not None

    rec = move(rec, JobState.RUNNING, attempts=1, started_at=NOW - 70)
    assert history.record(rec.summary())
    (row,) = history.tasks()
    assert (row["status"], row["attempts"], row["queued_at"], row["started_at"], row["queue_wait_seconds"]) == (
        "running",
        1,
        NOW - 100,
        NOW - 70,
        30.0,
    )

    rec = move(rec, JobState.DONE, finished_at=NOW, outputs={"video": "/out/fox.mp4", "sidecar": "/out/fox.json"})
    assert history.record(rec.summary(), sidecar_for(rec, vram=41_000.0))
    (row,) = history.tasks()
    assert row["status"] == "done" and row["file"] == "fox.yaml" and row["queued_at"] == NOW - 100
    assert row["generation_time_seconds"] == 70.0 and row["queue_wait_seconds"] == 30.0
    assert (row["peak_vram_usage_mb"], row["peak_rss_mb"], row["device"], row["instance"]) == (
        41_000.0,
        2048.5,
        "cuda",
        "gpu-host-1",
    )
    assert row["optimizations_applied"] == [] and row["degradations"] == []
    assert (row["output_video"], row["output_sidecar"], row["failure_record"]) == (
        "/out/fox.mp4",
        "/out/fox.json",
        None,
    )

    # A JobRecord itself works too, and a partial row dict only touches what it names.
    assert history.record(rec)
    assert history.record({"token": "tok-fox", "instance": "other-host"})
    (row,) = history.tasks()
    assert row["instance"] == "other-host" and row["peak_vram_usage_mb"] == 41_000.0 and row["status"] == "done"


def test_retry_then_failure_records_the_error_and_the_failure_record(history):
    rec = make_record("big", queued_at=NOW - 100)
    history.record(rec.summary())
    rec = move(rec, JobState.RUNNING, attempts=1, started_at=NOW - 90)
    history.record(rec.summary())
    oom = JobError(Category.OUT_OF_MEMORY, "the device ran out of memory: CUDA out of memory")
    rec = move(
        rec, JobState.QUEUED, last_error=oom.to_dict(), params=rec.params.model_copy(update={"vae_tiling": True})
    )
    history.record(rec.summary())
    assert history.tasks()[0]["status"] == "queued" and history.tasks()[0]["error_category"] == "out_of_memory"

    rec = move(rec, JobState.RUNNING, attempts=2, started_at=NOW - 50)
    history.record(rec.summary())
    rec = move(
        rec,
        JobState.FAILED,
        finished_at=NOW - 40,
        last_error=oom.to_dict(),
        outputs={"failure": "/out/failed/big.json"},
    )
    history.record(rec.summary())
    (row,) = history.tasks()
    assert (row["status"], row["attempts"], row["error_category"], row["failure_record"]) == (
        "failed",
        2,
        "out_of_memory",
        "/out/failed/big.json",
    )
    assert row["error_message"].startswith("the device ran out of memory")
    assert row["recovery_suggestions"] == oom.all_suggestions() and isinstance(row["recovery_suggestions"], list)
    assert row["generation_time_seconds"] is None  # only done jobs have one


def test_record_never_raises(tmp_path, errors_logged):
    path = tmp_path / "history.sqlite3"
    h = History(path, busy_timeout_ms=50)
    assert h.record({"id": "x"}) is False  # no token
    # Another process holds the write lock for longer than the busy timeout.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    assert h.record(make_record("fox").summary()) is False
    other.execute("ROLLBACK")
    other.close()
    assert h.record(make_record("fox").summary()) is True  # and it recovers
    h.close()
    assert h.record(make_record("cat").summary()) is False  # closed
    assert len(errors_logged) == 3 and all("history.write_failed" in m for m in errors_logged)
    assert "locked" in errors_logged[1]


def test_a_v1_database_is_migrated_to_v2_with_its_rows_and_reopening_is_a_no_op(tmp_path):
    path = tmp_path / "history.sqlite3"

    class HistoryV1(History):
        migrations = MIGRATIONS[:1]

    with HistoryV1(path) as h:
        assert h.record(make_record("fox").summary()) and h.schema_version == 1
        assert h.record_operation("pause", by="alice@host") is False  # no operations table in v1
    with History(path) as h:
        assert h.schema_version == 2
        assert [r["id"] for r in h.tasks()] == ["fox"]
        assert h.record_operation("pause", by="alice@host", at=NOW, detail={"mode": "now"})
    with History(path) as h:  # again: nothing to migrate, nothing lost
        assert h.schema_version == 2
        assert [(o["op"], o["by"], o["detail"]) for o in h.operations()] == [("pause", "alice@host", {"mode": "now"})]


def test_record_many_upserts_every_job_in_one_transaction_all_or_none(history, tmp_path):
    recs = [move(make_record(f"j{n}", queued_at=NOW + n), JobState.QUEUED) for n in range(50)]
    statements: list[str] = []
    history._conn.set_trace_callback(statements.append)
    assert history.record_many(r.summary() for r in recs)
    history._conn.set_trace_callback(None)
    assert statements.count("COMMIT") == 1 and statements.count("BEGIN IMMEDIATE") == 1
    rows = history.tasks(last=None)
    assert sorted(r["id"] for r in rows) == sorted(f"j{n}" for n in range(50))
    assert {r["status"] for r in rows} == {"queued"}
    # Upserts: later facts added, earlier ones kept; a JobRecord itself is taken too.
    running = move(recs[0], JobState.RUNNING, attempts=1, started_at=NOW + 10)
    assert history.record_many([running, {"token": "tok-j1", "instance": "b"}])
    by_id = {r["id"]: r for r in history.tasks(last=None)}
    assert by_id["j0"]["status"] == "running" and by_id["j0"]["queued_at"] == NOW
    assert by_id["j1"]["instance"] == "b" and by_id["j1"]["status"] == "queued"
    # One bad job (no token): nothing of the call is written, and it says so without raising.
    late = move(make_record("late"), JobState.QUEUED)
    assert history.record_many([late.summary(), {"id": "no-token"}]) is False
    assert "late" not in {r["id"] for r in history.tasks(last=None)}
    assert history.record_many([]) is True


def test_operations_are_kept_newest_first_per_job_and_never_raise(history, tmp_path):
    assert history.record_operation("pause", by="alice@host", at=NOW, instance="a", detail={"mode": "drain"})
    assert history.record_operation("priority", by="bob@host", at=NOW + 1, job_id="fox", detail={"priority": 5})
    assert history.record_operation("cancel", by="carol@host", at=NOW + 2, job_id="fox")
    assert history.record_operation("resume", by="alice@host", at=NOW + 3)
    assert [o["op"] for o in history.operations()] == ["resume", "cancel", "priority", "pause"]
    assert [o["op"] for o in history.operations(last=2)] == ["resume", "cancel"]
    fox = history.operations("fox")
    assert [(o["op"], o["by"], o["detail"]) for o in fox] == [
        ("cancel", "carol@host", {}),
        ("priority", "bob@host", {"priority": 5}),
    ]
    assert history.operations()[-1] == {
        "at": NOW,
        "op": "pause",
        "job_id": None,
        "by": "alice@host",
        "instance": "a",
        "detail": {"mode": "drain"},
    }
    history.close()
    assert history.record_operation("pause", by="x") is False  # closed: logged, not raised


def test_rows_for_id_are_every_intake_of_a_job_oldest_first(history):
    first = move(make_record("fox", queued_at=NOW - 100), JobState.FAILED, finished_at=NOW - 90)
    again = move(make_record("fox", queued_at=NOW), JobState.QUEUED).model_copy(update={"token": "tok-fox-2"})
    history.record_many([again.summary(), first.summary(), move(make_record("cat"), JobState.QUEUED).summary()])
    rows = history.rows_for_id("fox")
    assert [(r["token"], r["status"]) for r in rows] == [("tok-fox", "failed"), ("tok-fox-2", "queued")]
    assert history.rows_for_id("nobody") == []


# ---- concurrency -----------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from daemon.ops.history import History
    h = History(sys.argv[1])
    for i in range(int(sys.argv[2])):
        assert h.record({"id": f"job-{i}", "token": f"tok-{i}", "status": "running", "queued_at": 1000.0 + i,
                         "started_at": 1000.1 + i}), "write failed"
        assert h.record({"token": f"tok-{i}", "status": "done", "finished_at": 1000.5 + i,
                         "generation_time_seconds": 0.4, "optimizations_applied": ["vae_tiling"]}), "write failed"
    h.close()
""")


def test_readers_in_other_processes_never_see_database_is_locked(tmp_path):
    path = tmp_path / "history.sqlite3"
    n = 300
    reader = History(path)
    # A reader that keeps one read transaction open across all the writes: in WAL mode it keeps its
    # snapshot and does not block the writer (with a rollback journal the writer would fail with "locked").
    snapshot = sqlite3.connect(path, isolation_level=None)
    snapshot.execute("BEGIN")
    assert snapshot.execute("SELECT count(*) FROM generation_tasks").fetchone()[0] == 0

    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(n)], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    seen, reads = 0, 0
    while writer.poll() is None:
        rows = reader.tasks(last=None)  # raises on "database is locked"
        assert len(rows) >= seen  # the reader sees the writer's progress, never less
        seen, reads = len(rows), reads + 1
        assert all(r["optimizations_applied"] == ["vae_tiling"] for r in rows if r["status"] == "done")
    _, err = writer.communicate()
    assert writer.returncode == 0, err
    assert reads > 1
    assert snapshot.execute("SELECT count(*) FROM generation_tasks").fetchone()[0] == 0  # still its snapshot
    snapshot.execute("COMMIT")
    snapshot.close()

    rows = reader.tasks(last=None)
    assert len(rows) == n and {r["status"] for r in rows} == {"done"}
    assert [r["id"] for r in reader.tasks(last=3)] == [f"job-{n - 1}", f"job-{n - 2}", f"job-{n - 3}"]
    reader.close()


# ---- reading -----------------------------------------------------------------------------------------


def test_tasks_are_newest_first_and_filter_by_status(history):
    history.record(
        {"id": "old-done", "token": "t1", "status": "done", "queued_at": 10.0, "started_at": 20.0, "finished_at": 30.0}
    )
    history.record({"id": "waiting", "token": "t2", "status": "queued", "queued_at": 35.0})
    history.record({"id": "running", "token": "t3", "status": "running", "queued_at": 5.0, "started_at": 40.0})
    history.record(
        {
            "id": "new-fail",
            "token": "t4",
            "status": "failed",
            "queued_at": 1.0,
            "started_at": 2.0,
            "finished_at": 50.0,
            "error_category": "timeout",
        }
    )
    history.record(
        {"id": "new-done", "token": "t5", "status": "done", "queued_at": 41.0, "started_at": 42.0, "finished_at": 45.0}
    )
    assert [r["id"] for r in history.tasks()] == ["new-fail", "new-done", "running", "waiting", "old-done"]
    assert [r["id"] for r in history.tasks(last=2)] == ["new-fail", "new-done"]
    assert [r["id"] for r in history.tasks(status="done")] == ["new-done", "old-done"]
    assert [r["id"] for r in history.tasks(status="failed")] == ["new-fail"]
    assert history.tasks(last=0) == []
    with pytest.raises(ValueError, match="unknown status"):
        history.tasks(status="exploded")
    assert [r["id"] for r in history.rows(since=40.0, until=46.0)] == ["new-done", "running"]


# ---- analysis ----------------------------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None and percentile([None], 95) is None
    values = [7, 1, 3, 9, 5, 2, 8, 4, 10, 6]
    assert (percentile(values, 0), percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (
        1,
        5,
        10,
        10,
    )
    assert percentile([640, 600, 900, 620, None, 660, 700], 50) == 640
    assert percentile([4.0], 95) == 4.0


@pytest.fixture
def busy_history(history):
    """A day on a GPU server: two models, OOMs at 1280x720 on the 14B model, a crash, a missing model,
    queue waits that grow, and a few jobs outside the window."""
    q = NOW - 6 * 3600
    # wan2.2-t2v-a14b at 1280x720: 6 done, 4 out of memory.
    for i, gen in enumerate([600, 620, 640, 660, 700, 900]):
        run_done(
            history, make_record(f"t2v-{i}", queued_at=q + i * 60), wait=60.0 * (i + 1), gen=gen, vram=60_000 + i * 1000
        )
    for i in range(4):
        run_failed(history, make_record(f"t2v-oom-{i}", queued_at=q + 1000 + i), Category.OUT_OF_MEMORY, wait=900.0 + i)
    # wan2.2-ti2v-5b at 1280x704: 8 done (one degraded, one saved by a retry after a crash), 1 worker crash.
    for i, gen in enumerate([200, 210, 220, 230, 240, 250, 260, 400]):
        run_done(
            history,
            make_record(f"ti2v-{i}", model=TI2V, queued_at=q + 2000 + i),
            wait=30.0,
            gen=gen,
            vram=22_000.0,
            degradations=[{"kind": "fewer_frames", "from": 121, "to": 57}] if i == 7 else None,
            last_error=JobError(Category.WORKER_CRASHED, "worker died") if i == 6 else None,
        )
    run_failed(history, make_record("ti2v-crash", model=TI2V, queued_at=q + 3000), Category.WORKER_CRASHED, wait=20.0)
    # wan2.2-i2v-a14b: weights missing.
    run_failed(
        history, make_record("i2v-missing", model=I2V, queued_at=q + 4000), Category.MODEL_NOT_FOUND, wait=1.0, ran=0.5
    )
    # Still waiting now.
    waiting = move(make_record("waiting", model=TI2V, queued_at=NOW - 60), JobState.QUEUED)
    history.record(waiting.summary())
    # Two days ago: outside a 24 h window.
    for i in range(3):
        run_failed(history, make_record(f"ancient-{i}", queued_at=NOW - 48 * 3600), Category.TIMEOUT, wait=5.0)
    return history


def test_analysis_of_a_realistic_history(busy_history):
    result = analyse(busy_history, hours=24, now=NOW)
    assert result["total"] == 21  # 10 + 9 + 1 + 1 queued; the three ancient ones are outside the window
    assert (result["done"], result["failed"], result["queued"], result["running"]) == (14, 6, 1, 0)
    assert result["success_rate"] == pytest.approx(14 / 20)
    assert result["failure_categories"] == {"out_of_memory": 4, "worker_crashed": 1, "model_not_found": 1}
    assert result["errors_seen"]["worker_crashed"] == 2  # including the job a retry saved
    assert "timeout" not in result["errors_seen"]

    groups = {(g["model_used"], g["resolution"]): g for g in result["per_model"]}
    assert set(groups) == {(T2V, "1280x720"), (TI2V, "1280x704"), (I2V, "1280x720")}
    t2v = groups[(T2V, "1280x720")]
    assert (t2v["count"], t2v["done"], t2v["failed"]) == (10, 6, 4)
    # Nearest rank over the 6 done jobs only: p50 = 3rd value, p95 = 6th.
    assert (t2v["generation_p50_seconds"], t2v["generation_p95_seconds"]) == (640, 900)
    assert t2v["queue_wait_mean_seconds"] == pytest.approx((60 + 120 + 180 + 240 + 300 + 360 + 900 * 4 + 6) / 10)
    assert t2v["peak_vram_max_mb"] == 65_000
    assert t2v["failure_categories"] == {"out_of_memory": 4}
    ti2v = groups[(TI2V, "1280x704")]
    assert (ti2v["count"], ti2v["done"], ti2v["failed"]) == (10, 8, 1)
    assert (ti2v["generation_p50_seconds"], ti2v["generation_p95_seconds"]) == (230, 400)
    assert result["per_model"][-1]["model_used"] == I2V  # biggest groups first
    assert groups[(I2V, "1280x720")]["generation_p50_seconds"] is None  # no done job: no generation time

    # Queue waits of the 20 jobs that started: 8×30, 20, 1, 60..360, 900..903 -> p50 = 10th, p95 = 19th.
    waits = sorted([30.0] * 8 + [20.0, 1.0] + [60.0 * k for k in range(1, 7)] + [900.0, 901.0, 902.0, 903.0])
    assert result["queue_wait_p50_seconds"] == waits[9] == 30.0
    assert result["queue_wait_p95_seconds"] == waits[18] == 902.0
    assert result["degraded"] == 1
    # Generation time over the 14 done jobs: 200..260, 400, 600..900 -> p50 = 7th, p95 = 14th.
    assert (result["generation_p50_seconds"], result["generation_p95_seconds"]) == (260, 900)

    recs = result["recommendations"]
    assert (
        "out_of_memory failed 4 of 10 jobs on wan2.2-t2v-a14b at 1280x720: allow `fallback: "
        "[lower_resolution]` or use a GPU with more memory"
    ) in recs
    assert "p95 queue wait is 15.0 min: add a GPU/worker or lower priorities" in recs
    assert any(r.startswith("worker_crashed on 2 jobs: check dmesg for the OOM killer") for r in recs)
    assert (
        "model_not_found on 1 job for wan2.2-i2v-a14b: download with `hf download Wan-AI/Wan2.2-I2V-A14B-Diffusers`"
    ) in recs
    assert any(r.startswith("success rate below 90%: 70% (14 of 20 finished jobs)") for r in recs)
    assert any(r.startswith("1 job finished degraded") for r in recs)
    assert not any("timeout" in r for r in recs)  # the ancient timeouts are outside the window

    # A wider window takes the ancient jobs in.
    wide = analyse(busy_history, hours=72, now=NOW)
    assert wide["total"] == 24 and wide["failure_categories"]["timeout"] == 3


def test_a_healthy_history_gets_no_recommendations(history):
    for i in range(5):
        run_done(history, make_record(f"ok-{i}", model=TI2V, queued_at=NOW - 3600 + i), wait=10.0, gen=200.0 + i)
    result = analyse(history, hours=24, now=NOW)
    assert result["success_rate"] == 1.0 and result["recommendations"] == []
    assert result["queue_wait_p95_seconds"] == 10.0 and result["generation_p50_seconds"] == 202.0
    assert "No recommendations" in text_of(*render_analysis(result))


def test_analysis_with_zero_rows_is_well_defined(history):
    for result in (analyse(history, hours=24, now=NOW), analyse_rows([])):
        assert (result["total"], result["done"], result["failed"]) == (0, 0, 0)
        assert result["success_rate"] is None
        assert result["generation_p50_seconds"] is None and result["generation_p95_seconds"] is None
        assert result["queue_wait_p50_seconds"] is None and result["queue_wait_p95_seconds"] is None
        assert result["per_model"] == [] and result["failure_categories"] == {}
        assert result["recommendations"] == []
    assert "No jobs in the last 24 h." in text_of(*render_analysis(analyse(history, hours=24, now=NOW)))
    assert "no jobs recorded" in text_of(render_tasks([]))
    # Only unfinished jobs: still no rate, no division by zero.
    history.record(move(make_record("waiting", queued_at=NOW - 10), JobState.QUEUED).summary())
    result = analyse(history, hours=1, now=NOW)
    assert (result["total"], result["queued"], result["success_rate"]) == (1, 1, None)
    assert result["per_model"][0]["success_rate"] is None
    text_of(*render_analysis(result))


# ---- rendering -----------------------------------------------------------------------------------------


def test_render_tasks(busy_history):
    text = text_of(render_tasks(busy_history.tasks(last=50)))
    for expected in (
        "wan-daemon tasks",
        "t2v-oom-3 failed wan2.2-t2v-a14b 1280x720 81 1",
        "out_of_memory",
        "ti2v-7 done wan2.2-ti2v-5b 1280x704 121 1",
        "400.0s 30.0s 22,000 ti2v-7.mp4",
        "65,000",
        "waiting queued",
        "model_not_found",
        "worker_crashed",
    ):
        assert expected in text, expected
    only_failed = text_of(render_tasks(busy_history.tasks(status="failed")))
    assert "t2v-oom-0" in only_failed and "ti2v-0 " not in only_failed


def test_render_analysis(busy_history):
    text = text_of(*render_analysis(analyse(busy_history, hours=24, now=NOW)))
    for expected in (
        "wan-daemon analysis (last 24 h)",
        "21 (14 done, 6 failed, 0 running, 1 queued)",
        "success rate 70%",
        "per model and resolution",
        "failures by category",
        "out_of_memory 4",
        "model_not_found 1",
        "Recommendations",
        "out_of_memory failed 4 of 10 jobs on wan2.2-t2v-a14b at 1280x720",
        "p95 queue wait is 15.0 min",
        "generation p50 / p95 260.0s / 15.0m",
        "wan2.2-t2v-a14b 1280x720 10 6 4 60% 10.7m 15.0m 486.6s 65,000",
        "wan2.2-i2v-a14b 1280x720 1 0 1 0% - - 1.0s -",
    ):
        assert expected in text, expected
