"""Every failure a job can meet, classified once, by what happens next.

```
JobError(category, message, suggestions)
├── REJECT       the job itself is wrong; running it again cannot help
│   ├── invalid_spec      malformed YAML, unknown fields, impossible values
│   ├── invalid_input     missing / unreadable / hostile input image or path
│   ├── invalid_lora      LoRA file missing, not safetensors, keys do not fit
│   └── duplicate_job     an output with this name is already in the outbox
├── FINAL        the environment cannot run it as configured; a person must act
│   ├── model_not_found   weights absent locally (and not downloadable here)
│   ├── model_download    the download failed
│   ├── insufficient_vram no device can hold the job (incl. a real model on CPU)
│   ├── cancelled         a person asked for it to stop
│   └── internal          a bug: anything we did not foresee
├── RETRY_DEGRADED   retried with stronger memory measures, then the job's allowed fallbacks
│   └── out_of_memory     the device ran out of memory while running it
└── RETRY        transient; the job goes back to the queue until its attempts run out
    ├── worker_crashed    the worker process died (segfault, kill -9, OOM killer)
    ├── timeout           no progress for longer than the stall limit
    ├── disk_full         no space left for the output (retried without counting an attempt)
    ├── unwritable        a folder the daemon writes is read-only, refuses it, or is gone (not counted)
    └── io_error          any other OS error while reading or writing
```

Backends translate exceptions at their boundary with :func:`classify_exception`; the daemon
never inspects exception types itself. The retry *decision* lives in :mod:`daemon.policy`.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass, field
from typing import Any


class Outcome(str, enum.Enum):
    REJECT = "reject"
    FINAL = "final"
    RETRY = "retry"
    RETRY_DEGRADED = "retry_degraded"


class Category(str, enum.Enum):
    INVALID_SPEC = "invalid_spec"
    INVALID_INPUT = "invalid_input"
    INVALID_LORA = "invalid_lora"
    DUPLICATE_JOB = "duplicate_job"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_DOWNLOAD = "model_download"
    INSUFFICIENT_VRAM = "insufficient_vram"
    OUT_OF_MEMORY = "out_of_memory"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    WORKER_CRASHED = "worker_crashed"
    TIMEOUT = "timeout"
    DISK_FULL = "disk_full"
    UNWRITABLE = "unwritable"
    IO_ERROR = "io_error"


OUTCOME: dict[Category, Outcome] = {
    Category.INVALID_SPEC: Outcome.REJECT,
    Category.INVALID_INPUT: Outcome.REJECT,
    Category.INVALID_LORA: Outcome.REJECT,
    Category.DUPLICATE_JOB: Outcome.REJECT,
    Category.MODEL_NOT_FOUND: Outcome.FINAL,
    Category.MODEL_DOWNLOAD: Outcome.FINAL,
    Category.INSUFFICIENT_VRAM: Outcome.FINAL,
    Category.OUT_OF_MEMORY: Outcome.RETRY_DEGRADED,
    Category.CANCELLED: Outcome.FINAL,
    Category.INTERNAL: Outcome.FINAL,
    Category.WORKER_CRASHED: Outcome.RETRY,
    Category.TIMEOUT: Outcome.RETRY,
    Category.DISK_FULL: Outcome.RETRY,
    Category.UNWRITABLE: Outcome.RETRY,
    Category.IO_ERROR: Outcome.RETRY,
}

# What a user can do about each category. Specific errors add their own suggestions first.
DEFAULT_SUGGESTIONS: dict[Category, list[str]] = {
    Category.INVALID_SPEC: [
        # What to fix is suggested by each error (daemon.jobspec); this holds for all of them.
        "Check a file before submitting it with `wan-daemon validate FILE`; editors with the YAML language "
        "server check it against jobs/schema.json as you type.",
    ],
    Category.INVALID_INPUT: [
        "Put the input file under one of the configured input roots (paths.input_roots) and refer to it "
        "by a relative path.",
    ],
    Category.INVALID_LORA: [
        "Check the LoRA path, that it is a .safetensors file, and that it was trained for this model."
    ],
    Category.DUPLICATE_JOB: [
        "Give the job a new `id` (or `output.basename`), or remove the existing output from the outbox "
        "if you really want it made again.",
    ],
    Category.MODEL_NOT_FOUND: [
        "Download the weights, e.g. `hf download <repo>`, or point `model:` at a local diffusers folder.",
        "`wan-daemon models build-tiny` builds the tiny random-weight test models.",
    ],
    Category.MODEL_DOWNLOAD: ["Check network access and HF_TOKEN, then submit the job again."],
    Category.INSUFFICIENT_VRAM: [
        "Run the job on a machine with a CUDA GPU that has enough free memory.",
        "Use a smaller model (wan2.2-ti2v-5b) or a smaller size / fewer frames.",
    ],
    Category.OUT_OF_MEMORY: [
        "Reduce size or frames, or use a smaller model.",
        "Free GPU memory used by other processes (see nvidia-smi).",
    ],
    Category.CANCELLED: ["Submit the job again if it was cancelled by mistake."],
    Category.INTERNAL: ["This is a bug in wan-daemon: please report it with this record and the daemon log."],
    Category.WORKER_CRASHED: [
        "Check the daemon log and `dmesg` for the OS out-of-memory killer or a driver error.",
        "A job that crashes its worker every time is failed after worker.max_attempts attempts.",
    ],
    Category.TIMEOUT: ["Raise worker.stall_timeout_seconds if this model legitimately takes longer per step."],
    Category.DISK_FULL: ["Free space on the outbox / spool filesystem; the job is retried automatically."],
    Category.UNWRITABLE: [
        "Make the outbox and the state folder writable again (a read-only remount, lost permissions, an "
        "unmounted share); the daemon pauses meanwhile and the job is retried automatically."
    ],
    Category.IO_ERROR: ["Check permissions and the health of the filesystem holding the inbox and outbox."],
}


class WanDaemonError(Exception):
    """The root of every error wan-daemon raises on purpose (config, lease, history, download, job errors)."""


@dataclass
class JobError(WanDaemonError):
    """A classified failure. Raise it anywhere below the daemon; it crosses process boundaries as a dict."""

    category: Category
    message: str
    suggestions: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.category = Category(self.category)
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.category.value}: {self.message}"

    @property
    def outcome(self) -> Outcome:
        return OUTCOME[self.category]

    def all_suggestions(self) -> list[str]:
        seen: list[str] = []
        for s in [*self.suggestions, *DEFAULT_SUGGESTIONS.get(self.category, [])]:
            if s not in seen:
                seen.append(s)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_category": self.category.value,
            "message": self.message,
            "recovery_suggestions": self.all_suggestions(),
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobError:
        return cls(
            Category(data["error_category"]),
            data["message"],
            list(data.get("recovery_suggestions", [])),
            dict(data.get("details", {})),
        )


class JobInterrupted(WanDaemonError):
    """Not a failure: the daemon asked the worker to stop the job at its next step (shutdown). The job goes
    back to the queue with its attempt given back."""


def classify_exception(exc: BaseException) -> JobError:
    """Map any exception met while running a job to a :class:`JobError`. The one place that does so."""
    if isinstance(exc, JobError):
        return exc
    name = type(exc).__name__
    if name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return JobError(Category.OUT_OF_MEMORY, f"the device ran out of memory: {exc}")
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):
        return JobError(Category.OUT_OF_MEMORY, f"the host ran out of memory: {exc}")
    if "No space left on device" in str(exc):  # ffmpeg and friends report ENOSPC in text
        return JobError(Category.DISK_FULL, f"no space left on device: {exc}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return JobError(Category.DISK_FULL, f"no space left on device: {exc}")
        # The errno travels with the error (a worker's error crosses as a dict): daemon.runtime.disk tells by it,
        # and by trying the folders, whether the daemon's own folders are at fault.
        code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else None
        return JobError(Category.IO_ERROR, f"{name}: {exc}", details={"errno": code} if code else {})
    return JobError(Category.INTERNAL, f"{name}: {exc}")
