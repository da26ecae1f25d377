"""Folder-based, crash-safe persistence of claimed job files and job records.

```
<state>/spool/files/<seq>-<name>.yaml   claimed job files (renamed out of the inbox: same filesystem)
<state>/spool/jobs/<id>/job.json        one record per job (daemon.jobs.JobRecord)
<state>/spool/jobs/<id>/input.<ext>     the job's input image, copied at intake
```

Invariants (each survives ``kill -9`` at any instant):
- a job file is in the inbox, or in ``spool/files``, never lost in between (claim is one rename);
- a claimed file is removed only once every job it holds is terminal, i.e. its video or failure
  record is durable in the outbox; job folders are removed only after their file (the daemon
  decides when: ``Daemon._release_if_finished``);
- intake of a claimed file is idempotent, so a crash mid-intake is repaired by doing it again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from loguru import logger

from .fsutil import atomic_write_json, fsync_dir, read_json
from .jobs import JobRecord, JobState, check_transition

class Spool:
    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(state_dir) / "spool"
        self.files = self.root / "files"
        self.jobs = self.root / "jobs"
        self.clock = clock
        for d in (self.files, self.jobs):
            d.mkdir(parents=True, exist_ok=True)
        self._seq = self._max_seq()

    # ---- claimed files -------------------------------------------------------------------------

    def _max_seq(self) -> int:
        best = 0
        for p in self.files.iterdir():
            head = p.name.split("-", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
        for rec in self.iter_records():
            best = max(best, rec.seq)
        return best

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def claim(self, path: Path) -> Path | None:
        """Move a job file out of the inbox into the spool, atomically. None if another claimant won."""
        dest = self.files / f"{self.next_seq():012d}-{path.name}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            # On NFS a retransmitted rename can report ENOENT although it succeeded: look before concluding.
            if dest.exists():
                return dest
            return None
        except OSError as exc:  # e.g. EACCES: the file stays in the inbox and the next rescan tries again
            logger.error("job.claim_failed file={} error={}", path.name, exc)
            return None
        fsync_dir(self.files)
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)
        return dest

    def claimed_files(self) -> list[Path]:
        return sorted(p for p in self.files.iterdir() if not p.name.startswith("."))

    # ---- job records ---------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def load(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate(read_json(self.job_dir(job_id) / "job.json"))
        except FileNotFoundError:
            return None

    def iter_records(self) -> Iterator[JobRecord]:
        for d in sorted(self.jobs.iterdir()):
            if d.name.startswith("."):
                continue
            try:
                yield JobRecord.model_validate(read_json(d / "job.json"))
            except FileNotFoundError:
                # A folder created at intake whose record was never written: intake will redo it.
                shutil.rmtree(d, ignore_errors=True)
            except ValueError as exc:
                logger.error("spool.corrupt_record dir={} error={}", d, exc)

    def transition(self, record: JobRecord, new: JobState, note: str = "", **changes: Any) -> JobRecord:
        """The one way a job changes state: check the table, persist atomically, then log."""
        check_transition(record.state, new)
        now = self.clock()
        updated = record.model_copy(update=changes)
        updated.state = new
        updated.events = [*record.events, {"state": new.value, "at": now, **({"note": note} if note else {})}]
        folder = self.job_dir(updated.id)
        folder.mkdir(exist_ok=True)
        atomic_write_json(folder / "job.json", updated.model_dump(mode="json"))
        logger.bind(job=updated.id).info(
            "job.{} id={} attempts={}{}", new.value, updated.id, updated.attempts, f" note={note}" if note else ""
        )
        return updated

    # ---- clean-up ------------------------------------------------------------------------------

    def remove_job_dir(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def remove_source(self, source: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.files / source).unlink()
            fsync_dir(self.files)
