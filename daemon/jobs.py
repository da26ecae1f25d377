"""A job's lifecycle: the one state machine, and the record persisted for every job.

```
 (intake) ──► WAITING_FOR_MODEL ──► QUEUED      (auto-download; FAILED when the download fails)
 (intake) ──► QUEUED ──► RUNNING ──► DONE
                 ▲  │        │
                 │  │        ├──► QUEUED   retry (backoff in not_before), crash recovery
                 │  ▼        ▼
                 └─ FAILED ◄─┘            failure record durable in outbox/failed/
```

- ``WAITING_FOR_MODEL``: accepted, but its model's weights are being downloaded in the background; other
  jobs keep running. Queued when the download completes, failed (``model_download``) when it fails.
- ``QUEUED``: accepted and persisted in the spool; waits for a worker (and for ``not_before`` after a
  retryable failure).
- ``RUNNING``: handed to a worker; ``attempts`` was incremented on disk *before* the hand-over, so a
  job that kills its worker every time still runs out of attempts.
- ``DONE``: the video and then its sidecar are durable in the outbox. Terminal.
- ``FAILED``: the failure record is durable in ``outbox/failed/``. Terminal.

The only way to change a state is :meth:`daemon.runtime.book.JobBook.set` (through
:meth:`daemon.runtime.spool.Spool.transition`), which checks this table, persists the record atomically,
then logs a fixed event name (``job.<state>``).
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from daemon.errors import WanDaemonError
from daemon.jobspec.params import ResolvedParams
from daemon.models import LocatedModel


class JobState(str, enum.Enum):
    WAITING_FOR_MODEL = "waiting_for_model"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)

    @property
    def active(self) -> bool:
        """Holds its id and output name: waiting, queued or running."""
        return not self.terminal


# state -> states it may move to. None is "not yet persisted" (intake).
TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.QUEUED, JobState.WAITING_FOR_MODEL}),
    JobState.WAITING_FOR_MODEL: frozenset({JobState.QUEUED, JobState.FAILED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
}


class InvalidTransition(WanDaemonError):
    pass


def check_transition(current: JobState | None, new: JobState) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"job cannot go from {current.value if current else 'new'} to {new.value}")


class JobRecord(BaseModel):
    """Everything the daemon knows about one job; ``spool/jobs/<id>/job.json``."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    id: str
    token: str = Field(description="Unique per intake; written into the sidecar so a restart can tell its own output.")
    state: JobState | None = None
    source: str = Field(description="Claimed file name in spool/files/.")
    source_name: str = Field(description="The file's name when it was dropped into the inbox.")
    file_jobs: int | None = Field(
        None,
        description="How many jobs its file holds: when the spool has a record for each, a restart need not "
        "take the file in again.",
    )
    seq: int = Field(description="Intake order: FIFO within a priority.")
    priority: int = 0
    spec: dict[str, Any] = Field(description="The job exactly as given (batch defaults merged).")
    params: ResolvedParams = Field(description="Every generation parameter, resolved at intake.")
    model: LocatedModel = Field(description="The model, located at intake (or when its download finished).")
    input_image: str | None = Field(None, description="Copy of the input image inside the job's spool folder.")
    attempts: int = 0
    worker: str | None = Field(None, description="The worker (gpu<N> or cpu) that runs or last ran it.")
    received_at: float
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    not_before: float = 0.0
    last_error: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(default_factory=list, description="(state, at, note) history.")
    outputs: dict[str, str] = Field(default_factory=dict)
    degradations: list[dict[str, Any]] = Field(
        default_factory=list, description="Out-of-memory fallbacks applied (the output is not what was asked for)."
    )

    def summary(self) -> dict[str, Any]:
        """The record as plain JSON with the model as its flat summary: what the history stores."""
        return {**self.model_dump(mode="json"), "model": self.model.to_dict()}
