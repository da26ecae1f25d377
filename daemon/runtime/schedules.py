"""Cron batches: job files dropped into the inbox on a schedule.

Each entry of ``schedules:`` in the config is a cron expression plus a job file or an inline template,
with ``{date}``-style substitutions. APScheduler's ``CronTrigger`` computes the fire times; the daemon's
loop drives them with its own (injectable) clock, so there is no extra thread and tests control time.

Every fire is recorded in ``<state>/fires/<schedule>/<stamp>``, created with O_EXCL *before* the job file
is submitted: a restart (or a second daemon on the same inbox) never submits a fire twice, and a crash
between the record and the submission is finished at the next start. The submitted job's id is derived
from the fire (``<name>-<stamp>``), so even a repeated submission is refused as a duplicate, never run
twice.

Misfires (fires that fell while the daemon was down) follow ``misfire``:
``skip`` (drop them; fire on time only, within ``misfire_grace_seconds``), ``run_once`` (submit once for
the latest missed fire), ``run_all`` (submit every missed fire, at most 100).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.config import Schedule
from daemon.fsutil import atomic_write_bytes, fsync_dir

MAX_CATCH_UP = 100
_FIELDS = re.compile(r"\{(date|time|datetime|name|timestamp|year|month|day|hour|minute)\}")


def substitute(text: str, name: str, fire: datetime) -> str:
    """Fill {date} {time} {datetime} {name} {timestamp} {year} {month} {day} {hour} {minute}; other
    braces (YAML flow mappings) are left alone."""
    values = {
        "date": fire.strftime("%Y-%m-%d"),
        "time": fire.strftime("%H%M%S"),
        "datetime": fire.strftime("%Y%m%dT%H%M%S"),
        "name": name,
        "timestamp": str(int(fire.timestamp())),
        "year": fire.strftime("%Y"),
        "month": fire.strftime("%m"),
        "day": fire.strftime("%d"),
        "hour": fire.strftime("%H"),
        "minute": fire.strftime("%M"),
    }
    return _FIELDS.sub(lambda m: values[m.group(1)], text)


class CronSubmitter:
    def __init__(
        self, schedules: list[Schedule], *, state_dir: Path, inbox: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self.schedules = [s for s in schedules if s.enabled]
        self.fires = Path(state_dir) / "fires"
        self.inbox = Path(inbox)
        self.clock = clock
        self._triggers = {s.name: s.trigger() for s in self.schedules}

    # ---- records -------------------------------------------------------------------------------

    def _folder(self, s: Schedule) -> Path:
        return self.fires / s.name

    @staticmethod
    def _stamp(fire: datetime) -> str:
        return fire.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    def _last_fire(self, s: Schedule) -> datetime | None:
        folder = self._folder(s)
        stamps = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        if not stamps:
            return None
        return datetime.strptime(stamps[-1], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)

    def _record(self, s: Schedule, fire: datetime, state: str) -> bool:
        """Claim a fire (O_EXCL: exactly once, across restarts and daemons). False if already claimed."""
        folder = self._folder(s)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self._stamp(fire)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"schedule": s.name, "fire": fire.isoformat(), "state": state, "at": self.clock()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(folder)
        return True

    def _mark(self, s: Schedule, fire: datetime, **data: Any) -> None:
        path = self._folder(s) / self._stamp(fire)
        record = json.loads(path.read_text())
        record.update(data)
        atomic_write_bytes(path, json.dumps(record).encode())

    # ---- firing --------------------------------------------------------------------------------

    def due(self, s: Schedule, now: datetime) -> tuple[list[datetime], list[datetime]]:
        """(fires to submit, fires missed and dropped) up to ``now``, by the misfire policy."""
        trigger = self._triggers[s.name]
        last = self._last_fire(s)
        if last is None:
            # Never fired: start from now, do not backfill history (first start, or a new schedule).
            last = now - timedelta(seconds=s.misfire_grace_seconds)
        fires: list[datetime] = []
        t = trigger.get_next_fire_time(None, last + timedelta(microseconds=1))
        while t is not None and t <= now and len(fires) < 10 * MAX_CATCH_UP:
            fires.append(t)
            t = trigger.get_next_fire_time(t, t)
        if not fires:
            return [], []
        on_time = [f for f in fires if (now - f).total_seconds() <= s.misfire_grace_seconds]
        late = [f for f in fires if f not in on_time]
        if s.misfire == "skip" or not late:
            return on_time, late
        if s.misfire == "run_once":
            return [fires[-1]], fires[:-1]
        return fires[-MAX_CATCH_UP:], fires[:-MAX_CATCH_UP]

    def tick(self) -> list[Path]:
        """Submit whatever is due; finish submissions a crash interrupted. Returns the files dropped."""
        now = datetime.fromtimestamp(self.clock(), tz=timezone.utc)
        dropped = []
        for s in self.schedules:
            dropped += self._finish_interrupted(s)
            submit, missed = self.due(s, now)
            for fire in missed:
                if self._record(s, fire, "missed"):
                    logger.warning("schedule.missed name={} fire={} policy={}", s.name, fire.isoformat(), s.misfire)
            for fire in submit:
                if self._record(s, fire, "submitting"):
                    dropped.append(self._submit(s, fire))
        return dropped

    def _finish_interrupted(self, s: Schedule) -> list[Path]:
        folder = self._folder(s)
        done = []
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.name.startswith("."):
                continue
            try:
                record = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if record.get("state") == "submitting":
                fire = datetime.fromisoformat(record["fire"])
                logger.info("schedule.resubmit name={} fire={}", s.name, record["fire"])
                done.append(self._submit(s, fire))
        return done

    def _submit(self, s: Schedule, fire: datetime) -> Path:
        local = fire.astimezone(self._triggers[s.name].timezone)
        stamp = local.strftime("%Y%m%dT%H%M%S")
        text = s.job.read_text() if s.job is not None else (s.template or "")
        text = substitute(text, s.name, local)
        text = self._with_default_id(text, f"{s.name}-{stamp}")
        final = self.inbox / f"{s.name}-{stamp}.yaml"
        if final.exists():
            logger.info("schedule.already_in_inbox name={} file={}", s.name, final.name)
        else:
            self.inbox.mkdir(parents=True, exist_ok=True)
            # A dotfile, then a rename: the watcher sees a complete file arrive.
            tmp = self.inbox / f".{final.name}.tmp"
            atomic_write_bytes(tmp, text.encode())
            os.replace(tmp, final)
            fsync_dir(self.inbox)
            logger.info("schedule.fired name={} fire={} file={}", s.name, fire.isoformat(), final.name)
        self._mark(s, fire, state="submitted", file=final.name)
        return final

    @staticmethod
    def _with_default_id(text: str, job_id: str) -> str:
        """Single jobs without an id get ``<name>-<stamp>`` (batches get ``<name>-<stamp>-<n>`` from the
        file stem already): a resubmitted fire then collides with itself and is not run twice."""
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            return text  # the daemon's intake reports the error properly
        if isinstance(doc, dict) and "jobs" not in doc and "id" not in doc:
            return f"id: {job_id}\n{text}"
        return text
