"""The job history: one row per job intake in an embedded SQLite database, for ``wan-daemon tasks`` and
``wan-daemon analysis``.

- The daemon calls :meth:`History.record` on every state transition (and once more with the sidecar's
  facts when a job is published). A row is keyed by the job's intake ``token``; each call upserts the
  fields it gives and keeps the others. A failed write is logged and reported as ``False``: the history
  is a report, never a reason for the daemon to stop.
- Other processes read it while the daemon writes: the database runs in WAL mode, where readers never
  block the writer nor the writer the readers, with a busy timeout for the rare writer/writer overlap.
- :meth:`History.record_many`: a round of intake in one transaction (a job has its row from intake on).
  :meth:`History.record_operation`: what operators asked (pause, cancel, priority...), table ``operations``.
- The schema is versioned with ``PRAGMA user_version``: :data:`MIGRATIONS` are applied in order, each in
  its own transaction, and re-opening is a no-op. A database written by a newer wan-daemon is refused
  with :class:`SchemaTooNew` rather than misread.

Pure bookkeeping: stdlib ``sqlite3`` only, no torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.errors import WanDaemonError

STATUSES = ("waiting_for_model", "queued", "running", "done", "failed")

# Every column of generation_tasks, in table order, with its SQL type.
COLUMNS: dict[str, str] = {
    "id": "TEXT",
    "token": "TEXT",
    "file": "TEXT",
    "model_used": "TEXT",
    "task": "TEXT",
    "resolution": "TEXT",
    "frames": "INTEGER",
    "steps": "INTEGER",
    "status": "TEXT",
    "attempts": "INTEGER",
    "queued_at": "REAL",
    "started_at": "REAL",
    "finished_at": "REAL",
    "generation_time_seconds": "REAL",
    "queue_wait_seconds": "REAL",
    "peak_vram_usage_mb": "REAL",
    "peak_rss_mb": "REAL",
    "optimizations_applied": "TEXT",
    "degradations": "TEXT",
    "error_category": "TEXT",
    "error_message": "TEXT",
    "recovery_suggestions": "TEXT",
    "output_video": "TEXT",
    "output_sidecar": "TEXT",
    "failure_record": "TEXT",
    "instance": "TEXT",
    "device": "TEXT",
    "updated_at": "REAL",
}
# Columns holding a JSON list: written with json.dumps, read back as lists.
JSON_COLUMNS = frozenset({"optimizations_applied", "degradations", "recovery_suggestions"})
# The time a row is sorted and windowed by: when it last moved forward.
ACTIVITY = "coalesce(finished_at, started_at, queued_at, updated_at)"


class HistoryError(WanDaemonError):
    """The history database cannot be opened or migrated."""


class SchemaTooNew(HistoryError):
    """The database was written by a newer wan-daemon, with a schema this one does not know."""


# ---- schema -------------------------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]


def _v1_generation_tasks(conn: sqlite3.Connection) -> None:
    cols = ",\n    ".join(
        f"{name} {sqltype}" + (" NOT NULL PRIMARY KEY" if name == "token" else "") for name, sqltype in COLUMNS.items()
    )
    conn.execute(f"CREATE TABLE generation_tasks (\n    {cols}\n)")
    conn.execute("CREATE INDEX idx_generation_tasks_status ON generation_tasks (status)")
    conn.execute("CREATE INDEX idx_generation_tasks_finished_at ON generation_tasks (finished_at)")
    conn.execute("CREATE INDEX idx_generation_tasks_model_used ON generation_tasks (model_used)")


def _v2_operations(conn: sqlite3.Connection) -> None:
    """What operators asked for (daemon.control): one row per request applied (``detail``: a JSON object)."""
    conn.execute(
        "CREATE TABLE operations (at REAL NOT NULL, op TEXT NOT NULL, job_id TEXT, by TEXT, instance TEXT, detail TEXT)"
    )
    conn.execute("CREATE INDEX idx_operations_job_id ON operations (job_id)")
    conn.execute("CREATE INDEX idx_operations_at ON operations (at)")
    conn.execute("CREATE INDEX idx_generation_tasks_id ON generation_tasks (id)")  # a job's story: rows_for_id


# Migration i (0-based) takes the schema from version i to i + 1. Append only: never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (_v1_generation_tasks, _v2_operations)


# ---- mapping a JobRecord (and its sidecar) to a row ---------------------------------------------


def resolution_of(params: dict[str, Any]) -> str | None:
    """``"1280x704"`` from a job's parameters; None when either side is unknown."""
    if params.get("width") is None or params.get("height") is None:
        return None
    return f"{params['width']}x{params['height']}"


def row_from_record(record: dict[str, Any], sidecar: dict[str, Any] | None = None) -> dict[str, Any]:
    """A row for :meth:`History.record` from ``JobRecord.model_dump(mode="json")`` and, once the job is
    published, its sidecar (``Daemon._sidecar``). Only known facts are included (no ``None`` values), so
    an upsert never erases what an earlier call recorded."""
    params = record.get("params") or {}
    model = record.get("model") or {}
    last_error = record.get("last_error") or {}
    outputs = record.get("outputs") or {}
    state = record.get("state")
    row: dict[str, Any] = {
        "id": record.get("id"),
        "token": record.get("token"),
        "file": record.get("source_name"),
        "model_used": model.get("name"),
        "task": params.get("task"),
        "frames": params.get("frames"),
        "steps": params.get("steps"),
        "status": getattr(state, "value", state),
        "attempts": record.get("attempts"),
        "queued_at": record.get("queued_at"),
        "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "error_category": last_error.get("error_category"),
        "error_message": last_error.get("message"),
        "recovery_suggestions": last_error.get("recovery_suggestions"),
        "output_video": outputs.get("video"),
        "output_sidecar": outputs.get("sidecar"),
        "failure_record": outputs.get("failure"),
    }
    row["resolution"] = resolution_of(params)
    if "degradations" in record:
        row["degradations"] = record["degradations"] or []
    started, queued, finished = record.get("started_at"), record.get("queued_at"), record.get("finished_at")
    # The sidecar's definitions, so that a row without a sidecar (failed, or found published after a
    # restart) is measured the same way.
    if started is not None and queued is not None:
        row["queue_wait_seconds"] = round(max(0.0, started - queued), 4)
    if row["status"] == "done" and started is not None and finished is not None:
        row["generation_time_seconds"] = round(max(0.0, finished - started), 4)
    if sidecar:
        timings = sidecar.get("timings") or {}
        device = sidecar.get("device")
        used = sidecar.get("model_used")
        row.update(
            {
                "generation_time_seconds": sidecar.get("generation_time_seconds"),
                "queue_wait_seconds": timings.get("queue_wait"),
                "peak_vram_usage_mb": sidecar.get("peak_vram_usage_mb"),
                "peak_rss_mb": sidecar.get("peak_rss_mb"),
                "optimizations_applied": sidecar.get("optimizations_applied"),
                "degradations": sidecar.get("degradations"),
                "instance": sidecar.get("instance"),
                "device": device.get("type") if isinstance(device, dict) else device,
            }
        )
        if isinstance(used, dict) and used.get("name"):
            row["model_used"] = used["name"]
        if sidecar.get("attempts") is not None and row.get("attempts") is None:
            row["attempts"] = sidecar["attempts"]
    return {k: v for k, v in row.items() if v is not None}


def _encode(column: str, value: Any) -> Any:
    if column in JSON_COLUMNS and not isinstance(value, str):
        return json.dumps(list(value) if isinstance(value, (tuple, set)) else value, ensure_ascii=False)
    return value


def _row_of(job: Any, sidecar: dict[str, Any] | None) -> dict[str, Any]:
    """The row :meth:`History.record` writes for ``job`` (a row, a record dump or a JobRecord)."""
    if hasattr(job, "model_dump"):  # a JobRecord itself
        job = job.model_dump(mode="json")
    extra = row_from_record({}, sidecar) if sidecar and "params" not in job else {}
    row = row_from_record(job, sidecar) if "params" in job else {**job, **extra}
    if not row.get("token"):
        raise ValueError("the job has no token")
    return row


@functools.lru_cache(maxsize=64)
def _upsert_sql(cols: tuple[str, ...]) -> str:
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "token")
    into = f"INSERT INTO generation_tasks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    return f"{into} ON CONFLICT (token) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING")


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(zip(row.keys(), tuple(row), strict=True))
    for column in JSON_COLUMNS & out.keys():
        if isinstance(out[column], str):
            try:
                out[column] = json.loads(out[column])
            except ValueError:  # written by hand: show it as it is
                pass
    return out


# ---- the database -------------------------------------------------------------------------------


class History:
    """The job history database at ``path`` (created with its folders if missing).

    Raises :class:`HistoryError` when the database cannot be opened or migrated (:class:`SchemaTooNew`
    when it is newer than this code). After that, :meth:`record` never raises; the read methods do.
    """

    migrations: Sequence[Migration] = MIGRATIONS

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise HistoryError(f"cannot open the history database {self.path}: {exc}") from exc
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._retry_locked(self._set_up, busy_timeout_ms / 1000)
        except HistoryError:
            self._conn.close()
            raise
        except sqlite3.Error as exc:
            self._conn.close()
            raise HistoryError(f"cannot open the history database {self.path}: {exc}") from exc

    def _set_up(self) -> None:
        # WAL is persistent in the file: switch only when it is not WAL yet (that needs an exclusive lock).
        mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("history.no_wal path={} journal_mode={}: readers may wait for the daemon", self.path, mode)
        self._migrate()

    @staticmethod
    def _retry_locked(step: Callable[[], None], timeout: float) -> None:
        """Run ``step``, retrying "database is locked" for up to ``timeout`` seconds. While several
        processes open the same fresh file, switching it to WAL can report "locked" at once, without
        SQLite's busy handler; each step is safe to repeat (migrations run in transactions)."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                return step()
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    # ---- schema ------------------------------------------------------------------------------

    @property
    def latest_version(self) -> int:
        return len(self.migrations)

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _check_not_newer(self, version: int) -> None:
        if version > self.latest_version:
            raise SchemaTooNew(
                f"the history database {self.path} has schema version {version}, newer than this wan-daemon "
                f"supports ({self.latest_version}): upgrade wan-daemon, or point it at another history file"
            )

    def _migrate(self) -> None:
        self._check_not_newer(self.schema_version)
        while self.schema_version < self.latest_version:
            # BEGIN IMMEDIATE takes the write lock first: two processes opening a fresh file at once
            # re-read the version under the lock and apply each migration exactly once.
            self._conn.execute("BEGIN IMMEDIATE")
            version = -1
            try:
                version = self.schema_version
                self._check_not_newer(version)
                if version < self.latest_version:
                    self.migrations[version](self._conn)
                    self._conn.execute(f"PRAGMA user_version = {version + 1}")
                    logger.info("history.migrated path={} version={}", self.path, version + 1)
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise HistoryError(
                        f"migrating the history database {self.path} to version {version + 1} failed: {exc}"
                    ) from exc
                raise

    # ---- writing -----------------------------------------------------------------------------

    def record(self, job: dict[str, Any], sidecar: dict[str, Any] | None = None) -> bool:
        """Upsert one job's row by its ``token``: the columns given are written, the others kept.

        ``job`` is a row (keys from :data:`COLUMNS`; JSON-list columns may be lists), or a
        ``JobRecord.model_dump(mode="json")`` dict (recognised by its ``params`` key; a JobRecord itself is
        dumped first), mapped with :func:`row_from_record` together with ``sidecar``; with a row, the sidecar's
        facts are added to it. ``updated_at`` defaults to now; unknown keys are ignored. Returns whether the row
        was written; never raises."""
        return self._write([(job, sidecar)])

    def record_many(self, jobs: Iterable[Any]) -> bool:
        """Upsert many jobs (as :meth:`record` takes ``job``) in one transaction, all or none; never raises."""
        return self._write([(job, None) for job in jobs])

    def _write(self, items: Sequence[tuple[Any, dict[str, Any] | None]]) -> bool:
        job: Any = None
        statements, now = [], time.time()
        try:
            for job, sidecar in items:
                row = _row_of(job, sidecar)
                row.setdefault("updated_at", now)
                if unknown := sorted(set(row) - COLUMNS.keys()):
                    logger.debug("history.ignored_fields token={} fields={}", row["token"], ",".join(unknown))
                cols = [c for c in COLUMNS if c in row]
                statements.append((_upsert_sql(tuple(cols)), [_encode(c, row[c]) for c in cols]))
            if statements:
                self._transaction(statements)
            return True
        except (sqlite3.Error, ValueError, TypeError, AttributeError) as exc:
            job_id = job.get("id") if isinstance(job, dict) else getattr(job, "id", None)
            logger.error("history.write_failed path={} id={} error={}", self.path, job_id, exc)
            return False

    def _transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, values in statements:
                    self._conn.execute(sql, values)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def record_operation(
        self,
        op: str,
        *,
        by: str,
        at: float | None = None,
        job_id: str | None = None,
        instance: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> bool:
        """One operator request (``op``: pause, resume, cancel, priority, submit, retry...), who asked (``by``:
        user@host), when (default now), on which job and by which daemon, with ``detail`` (a JSON object).
        Returns whether it was written; never raises."""
        try:
            text = json.dumps(detail or {}, ensure_ascii=False, default=str)
            values = [time.time() if at is None else float(at), str(op), job_id, str(by), instance, text]
            self._transaction([("INSERT INTO operations VALUES (?, ?, ?, ?, ?, ?)", values)])
            return True
        except (sqlite3.Error, ValueError, TypeError) as exc:
            logger.error("history.write_failed path={} op={} id={} error={}", self.path, op, job_id, exc)
            return False

    # ---- reading -----------------------------------------------------------------------------

    def _select(self, where: Iterable[str], args: Sequence[Any], limit: int | None) -> list[dict[str, Any]]:
        clauses = list(where)
        sql = (
            "SELECT * FROM generation_tasks"
            + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
            + f" ORDER BY {ACTIVITY} DESC, updated_at DESC, rowid DESC"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            return [_decode(r) for r in self._conn.execute(sql, list(args)).fetchall()]

    def tasks(self, last: int | None = 20, status: str | None = None) -> list[dict[str, Any]]:
        """The ``last`` most recent jobs (all when None), newest first, optionally of one ``status``.
        JSON-list columns come back as lists."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
        if last is not None and last < 0:
            raise ValueError("last must be >= 0")
        return self._select(["status = ?"] if status else [], [status] if status else [], last)

    def rows(self, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """Every job whose latest activity (finished, else started, else queued) lies in [since, until],
        newest first."""
        where, args = [], []
        if since is not None:
            where.append(f"{ACTIVITY} >= ?")
            args.append(since)
        if until is not None:
            where.append(f"{ACTIVITY} <= ?")
            args.append(until)
        return self._select(where, args, None)

    def rows_for_id(self, job_id: str) -> list[dict[str, Any]]:
        """Every row of this job id, whatever its intake token (a retried or resubmitted job has several),
        oldest first."""
        sql = "SELECT * FROM generation_tasks WHERE id = ? ORDER BY coalesce(queued_at, updated_at), rowid"
        with self._lock:
            return [_decode(r) for r in self._conn.execute(sql, [job_id]).fetchall()]

    def operations(self, job_id: str | None = None, last: int | None = 100) -> list[dict[str, Any]]:
        """The ``last`` operator requests recorded (all when None), of one job or of all, newest first;
        ``detail`` comes back as a dict."""
        sql = "SELECT at, op, job_id, by, instance, detail FROM operations"
        sql += " WHERE job_id = ?" if job_id is not None else ""
        sql += " ORDER BY at DESC, rowid DESC" + (f" LIMIT {int(last)}" if last is not None else "")
        with self._lock:
            rows = [dict(r) for r in self._conn.execute(sql, [job_id] if job_id is not None else []).fetchall()]
        for row in rows:
            with contextlib.suppress(ValueError):  # written by hand: shown as it is
                row["detail"] = json.loads(row["detail"]) if row["detail"] else {}
        return rows

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
