"""Folder-based, crash-safe persistence of claimed job files and job records, one spool per daemon.

```
<state>/owners/<owner>/files/<seq>.<owner>.<name>   claimed job files (renamed out of the inbox)
<state>/owners/<owner>/jobs/<id>/job.json           one record per job (daemon.jobs.JobRecord)
<state>/owners/<owner>/jobs/<id>/input.<ext>        the job's input image, copied at intake
```

The state folder is on the inbox's filesystem, so a claim is one atomic ``rename()``; several daemons
sharing an inbox each claim into their own folder, and exactly one of them wins each file. Claimed
names carry the owner, so they stay unique when a dead owner's spool is adopted (daemon.runtime.leases).

Invariants (each survives ``kill -9`` at any instant):
- a job file is in the inbox, or in a spool's ``files``, never lost in between (claim is one rename);
- a claimed file is removed only once every job it holds is terminal, i.e. its video or failure
  record is durable in the outbox; job folders are removed only after their file (the daemon
  decides when: ``Daemon._release_if_finished``);
- intake of a claimed file is idempotent, so a crash mid-intake is repaired by doing it again;
- a job never runs on a stale copy of its file: what intake read is remembered (size, mtime, SHA-256) and
  compared before each of its jobs starts (:meth:`Spool.changed_since_read`): a writer that still had the
  file open when it was claimed writes on into the spool's copy (the claim is a rename of the same file).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.fsutil import atomic_write_json, fsync_dir, read_json, rename
from daemon.jobs import JobRecord, JobState, check_transition


def original_name(claimed_name: str) -> str:
    """The name a claimed file had in the inbox (``<seq>.<owner>.<name>`` -> ``<name>``)."""
    parts = claimed_name.split(".", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() else claimed_name


@dataclass
class ReadAs:
    """A claimed file as intake read it."""

    size: int
    mtime_ns: int
    sha256: str


class Spool:
    def __init__(self, root: Path, owner: str, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.owner = owner
        self.files = self.root / "files"
        self.jobs = self.root / "jobs"
        self.clock = clock
        self.ensure()
        self._seq = self._max_seq()
        # Claimed file name -> what intake read (this process's claims: a restart or an adopted spool has none).
        self._read_as: dict[str, ReadAs] = {}

    def ensure(self) -> None:
        for d in (self.files, self.jobs):
            d.mkdir(parents=True, exist_ok=True)

    # ---- claimed files -------------------------------------------------------------------------

    def _max_seq(self) -> int:
        """The highest sequence number among the claimed files' names. Records carry higher ones (a batch's jobs
        are numbered after their file): :meth:`iter_records` raises the counter past each record it reads, and
        recovery reads them all before anything new is taken in. Reading every record here as well would double
        the cost of a restart."""
        best = 0
        for name in os.listdir(self.files):
            head = name.split(".", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
        return best

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def claim(self, path: Path, *, sync: bool = True) -> Path | None:
        """Move a job file out of the inbox into the spool, atomically. None if another claimant won.

        ``sync=False`` leaves the folders' fsync to one :meth:`sync_claims` after a whole round of claims: the
        rename is atomic either way, and until the folders are synced a power loss can only put the file back
        in the inbox, where it is claimed again; nothing is taken in before the sync."""
        dest = self.files / f"{self.next_seq():012d}.{self.owner}.{path.name}"
        try:
            rename(path, dest)
        except FileNotFoundError:
            # On NFS a retransmitted rename can report ENOENT although it succeeded: look before concluding.
            if dest.exists():
                return dest
            return None
        except OSError as exc:  # e.g. EACCES: the file stays in the inbox and the next rescan tries again
            logger.error("job.claim_failed file={} error={}", path.name, exc)
            return None
        if sync:
            self.sync_claims(path.parent)
        return dest

    def sync_claims(self, inbox: Path) -> None:
        fsync_dir(self.files)
        with contextlib.suppress(OSError):
            fsync_dir(inbox)

    def claimed_files(self) -> list[Path]:
        return sorted(p for p in self.files.iterdir() if not p.name.startswith("."))

    def note_read(self, source: str, size: int, mtime_ns: int, data: bytes) -> None:
        """Intake read ``data`` from the claimed file ``source``, whose fstat said ``size`` and ``mtime_ns``."""
        self._read_as[source] = ReadAs(size, mtime_ns, hashlib.sha256(data).hexdigest())

    def changed_since_read(self, source: str) -> str | None:
        """Why the claimed file ``source`` no longer holds what intake read (its jobs must not start on that
        copy), or None: unchanged, or not read by this process. A changed size or mtime is confirmed by the
        content's hash (a touch changes nothing)."""
        read = self._read_as.get(source)
        if read is None:
            return None
        path = self.files / source
        try:
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) == (read.size, read.mtime_ns):
                return None
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        except FileNotFoundError:
            return None  # released, or taken over: not ours to judge
        if digest == read.sha256:
            read.size, read.mtime_ns = st.st_size, st.st_mtime_ns
            return None
        return (
            f"the job file {original_name(source)} changed after it was claimed ({read.size} bytes read, "
            f"{st.st_size} now): it was still being written, so the job read an incomplete copy and is not run. "
            "Write job files under a dotfile or *.tmp name and rename them into the inbox, or use "
            "`wan-daemon submit`; then drop the file again"
        )

    # ---- job records ---------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def load(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate(read_json(self.job_dir(job_id) / "job.json"))
        except FileNotFoundError:
            return None

    def iter_records(self) -> Iterator[JobRecord]:
        # One listing (no Path per entry until needed) and pydantic parsing the JSON bytes itself: a restart
        # with ten thousand records reads them at disk speed.
        with os.scandir(self.jobs) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith("."))
        for name in names:
            d = self.jobs / name
            try:
                with open(d / "job.json", "rb") as fh:
                    rec = JobRecord.model_validate_json(fh.read())
                self._seq = max(self._seq, rec.seq)
                yield rec
            except FileNotFoundError:
                # A folder created at intake whose record was never written: intake will redo it.
                shutil.rmtree(d, ignore_errors=True)
            except ValueError as exc:
                logger.error("spool.corrupt_record dir={} error={}", d, exc)

    def transition(
        self, record: JobRecord, new: JobState, note: str = "", *, durable: bool = True, **changes: Any
    ) -> JobRecord:
        """The one way a job changes state: check the table, persist atomically, then log.

        The record is always replaced atomically, so the next process sees it whatever kills this one (kill -9
        included: the page cache outlives the process). ``durable=False`` skips the fsyncs, which only matter
        for a power cut or a kernel crash; callers pass it where such a loss costs nothing:
        - intake's first write: the claimed file stays in the spool until every job it holds has ended, so a
          record lost to a power cut is simply taken in again from it;
        - RUNNING (daemon.runtime.placement): a power cut that loses it also stops the worker; the job comes
          back QUEUED with that attempt not counted (the job was not at fault), and if its result had been
          published, the sidecar with its token says it is done (JobBook.done_if_published);
        - DONE (daemon.runtime.publishing): the sidecar in the outbox, fsynced, is the durable fact.
        Retries and FAILED (whose failure record is in the outbox) are fsynced."""
        check_transition(record.state, new)
        now = self.clock()
        updated = record.model_copy(update=changes)
        updated.state = new
        updated.events = [*record.events, {"state": new.value, "at": now, **({"note": note} if note else {})}]
        folder = self.job_dir(updated.id)
        folder.mkdir(exist_ok=True)
        atomic_write_json(folder / "job.json", updated.model_dump(mode="json"), durable=durable, compact=True)
        logger.bind(job=updated.id).info(
            "job.{} id={} attempts={}{}", new.value, updated.id, updated.attempts, f" note={note}" if note else ""
        )
        return updated

    def amend(self, record: JobRecord, note: str, **changes: Any) -> JobRecord:
        """Change a persisted record's fields without a change of state (an operator's new priority): written
        atomically and fsynced like a transition, with ``note`` added to its events; the state is kept."""
        if record.state is None:
            raise ValueError(f"job {record.id} is not persisted yet")
        updated = record.model_copy(update=changes)
        updated.events = [*record.events, {"state": record.state.value, "at": self.clock(), "note": note}]
        folder = self.job_dir(updated.id)
        atomic_write_json(folder / "job.json", updated.model_dump(mode="json"), compact=True)
        logger.bind(job=updated.id).info("job.amended id={} state={} note={}", updated.id, record.state.value, note)
        return updated

    # ---- clean-up ------------------------------------------------------------------------------

    def adopt(self, folder: Path) -> list[str]:
        """Merge a taken-over spool into this one: job folders first, then their files (a crash in
        between is finished by the next call). Returns the ids adopted."""
        adopted = []
        for d in sorted((folder / "jobs").glob("*")) if (folder / "jobs").is_dir() else []:
            target = self.job_dir(d.name)
            if target.exists():
                logger.error("spool.adopt_conflict id={} kept in {}", d.name, folder)
                continue
            os.rename(d, target)
            adopted.append(d.name)
        for f in sorted((folder / "files").glob("*")) if (folder / "files").is_dir() else []:
            os.rename(f, self.files / f.name)
        fsync_dir(self.jobs)
        fsync_dir(self.files)
        if not any((folder / "jobs").glob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        return adopted

    def remove_job_dir(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def remove_source(self, source: str) -> None:
        self._read_as.pop(source, None)
        with contextlib.suppress(FileNotFoundError):
            (self.files / source).unlink()
            fsync_dir(self.files)
