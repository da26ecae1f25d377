"""The job file format: the pydantic ``JobSpec`` (one job), batches, and files -> specs.

Parsing never raises past this module's boundary: :func:`parse_job_file` returns, for each job in a
file, either a spec or a precise error (field, bad value, what is allowed). The YAML itself is read by
:mod:`daemon.jobspec.reader`; the JSON Schema is :mod:`daemon.jobspec.schema`; what a spec means for a
model (parameters, LoRAs, input image) is :mod:`daemon.jobspec.resolve`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon.errors import Category, JobError
from daemon.jobspec.lora import LoraSpec
from daemon.jobspec.reader import load_yaml_bytes
from daemon.speed import ATTENTION_BACKENDS, CacheOptions

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)
_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")

MAX_STRING = 20_000
MAX_JOBS_PER_FILE = 1_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class OutputSpec(_Strict):
    """Where and how the video is written."""

    basename: str | None = Field(
        None, pattern=ID_PATTERN, description="File name without extension for <basename>.mp4/.json. Default: the id."
    )
    quality: float = Field(8.0, ge=0, le=10, description="H.264 quality, 0 (smallest) to 10 (best).")


def _check_id(value: str | None, field: str) -> str | None:
    if value is not None and (value.startswith(".") or not _ID_RE.match(value)):
        raise ValueError(f"{field} {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ - and must not start with '.'")
    return value


class JobSpec(_Strict):
    """One generation job, as written in a job file. Unset fields take the model's defaults."""

    id: str | None = Field(None, description="Job id; default: the file stem (batch: <stem>-<n>).")
    task: Literal["t2v", "i2v", "ti2v"] | None = Field(
        None,
        description="t2v: text only; i2v: needs `image`; ti2v (TI2V-5B): text, plus an image if given. "
        "Default: i2v when an image is given, else the model's own task.",
    )
    model: str | None = Field(
        None,
        max_length=1024,
        description="Registry name (wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b, tiny-*), a local "
        "diffusers folder, or a Hugging Face repo id in the local cache. Default: models.default from the config.",
    )
    prompt: str = Field(..., min_length=1, max_length=MAX_STRING)
    negative_prompt: str | None = Field(None, max_length=MAX_STRING, description="Default: the standard Wan one.")
    image: str | None = Field(None, max_length=4096, description="Input image, relative to an input root.")
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 1280x704. Alternative to width/height.")
    width: int | None = Field(None, ge=16)
    height: int | None = Field(None, ge=16)
    frames: int | None = Field(None, ge=1, description="Number of frames; must be 4n+1 (e.g. 81, 121).")
    fps: int | None = Field(None, ge=1, le=120)
    steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="CFG scale (high-noise expert on A14B).")
    guidance_scale_2: float | None = Field(None, ge=0, le=50, description="CFG scale of the low-noise expert (A14B).")
    flow_shift: float | None = Field(None, gt=0, le=100, description="Scheduler flow shift.")
    seed: int | None = Field(None, ge=0, lt=2**32, description="Drawn at random and recorded when absent.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first; FIFO within a priority.")
    not_before: datetime | None = Field(
        None, strict=False, description="Do not start before this time (ISO 8601; UTC if no zone)."
    )
    timeout: float | None = Field(
        None,
        gt=0,
        le=7 * 86400,
        description="Seconds the job may go without progress before its worker is "
        "killed and the job retried. Default: worker.stall_timeout_seconds.",
    )
    output: OutputSpec = Field(default_factory=OutputSpec)
    loras: list[LoraSpec] = Field(
        default_factory=list,
        max_length=8,
        description="LoRAs: [{path (under paths.lora_roots), strength (0-4, default 1), expert: high|low|both}]. "
        "On the two-expert A14B models `high` loads into the high-noise transformer, `low` into transformer_2.",
    )
    preset: Literal["lightning-4step"] | None = Field(
        None,
        description="lightning-4step: the Wan2.2 Lightning distill recipe (4 steps, guidance 1.0, shift 5) "
        "for its high- and low-noise LoRAs; fields the job sets explicitly win.",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the transformer's repeated blocks, once per "
        "warm pipeline (the first job pays the compile). Default: speed.compile.",
    )
    cache: CacheOptions | None = Field(
        None,
        description="Step cache: {type: first_block|mag|none, threshold, mag_ratios}. Turned off (and "
        "recorded) for distill presets, few-step runs and, for mag, the two-expert models. Default: speed.cache.",
    )
    attention_backend: Literal[tuple(ATTENTION_BACKENDS)] | None = Field(  # type: ignore[valid-type]
        None,
        description="native (torch SDPA), flash, flash_3, sage, cudnn, efficient, flex or xformers; one that "
        "is not installed runs as native (recorded). Default: speed.attention_backend.",
    )
    fallback: list[Literal["lower_resolution", "fewer_frames", "smaller_model"]] = Field(
        default_factory=list,
        max_length=3,
        description="Degradations allowed when the job runs out of memory after offload and VAE tiling were "
        "tried, in this order. Each one applied is recorded in the sidecar. Default: none (fail instead).",
    )

    @field_validator("fallback")
    @classmethod
    def _unique_fallbacks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each fallback may be listed once")
        return v

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str | None) -> str | None:
        return _check_id(v, "id")

    @field_validator("frames")
    @classmethod
    def _frames_4n_plus_1(cls, v: int | None) -> int | None:
        if v is not None and v % 4 != 1:
            lower = v - (v % 4) + 1 if v % 4 else v - 3
            raise ValueError(f"must be 4n+1 (nearest allowed: {max(1, lower)} or {lower + 4})")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    @model_validator(mode="after")
    def _size_xor_width_height(self) -> JobSpec:
        if self.size is not None:
            if self.width is not None or self.height is not None:
                raise ValueError("give either size or width/height, not both")
            if not _SIZE_RE.match(self.size):
                raise ValueError(f"size {self.size!r} must look like WIDTHxHEIGHT, e.g. 1280x704")
        elif (self.width is None) != (self.height is None):
            raise ValueError("width and height go together")
        if self.task == "i2v" and not self.image:
            raise ValueError("task i2v needs an `image`")
        if self.task == "t2v" and self.image:
            raise ValueError("task t2v takes no `image` (use i2v or ti2v)")
        return self

    def requested_size(self) -> tuple[int, int] | None:
        if self.size is not None:
            m = _SIZE_RE.match(self.size)
            assert m
            return int(m.group(1)), int(m.group(2))
        if self.width is not None and self.height is not None:
            return self.width, self.height
        return None


# --------------------------------------------------------------------------------------------------
# Files -> specs
# --------------------------------------------------------------------------------------------------


@dataclass
class SpecEntry:
    """One job of a file: its id, and either a spec or the error that rejects it."""

    id: str
    spec: JobSpec | None
    error: JobError | None
    raw: Any


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(job)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(JobSpec.model_fields)
            parts.append(f"{loc}: unknown field (allowed: {allowed})")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required field is missing")
        else:
            inp = err.get("input")
            shown = repr(inp) if not isinstance(inp, dict) else "{...}"
            if len(shown) > 80:
                shown = shown[:77] + "..."
            parts.append(f"{loc}: {msg} (got {shown})")
    return "; ".join(parts)


def safe_stem(name: str) -> str:
    """A file stem reduced to id characters, for naming records of files that carry no usable id."""
    stem = name.rsplit("/", 1)[-1]
    for ext in (".yaml", ".yml"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")[:128]
    return cleaned or "job"


def _validate_one(raw: Any, default_id: str) -> SpecEntry:
    if not isinstance(raw, dict):
        return SpecEntry(
            default_id,
            None,
            JobError(Category.INVALID_SPEC, f"a job must be a mapping of fields, got {type(raw).__name__}"),
            raw,
        )
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        given = raw.get("id")
        jid = given if isinstance(given, str) and _ID_RE.match(given) and not given.startswith(".") else default_id
        problems = [
            {
                "field": ".".join(str(p) for p in e["loc"]),
                "error": e["msg"].removeprefix("Value error, "),
                "type": e["type"],
            }
            for e in exc.errors()
        ]
        return SpecEntry(
            jid,
            None,
            JobError(Category.INVALID_SPEC, format_validation_error(exc), details={"validation_errors": problems}),
            raw,
        )
    if spec.id is None:
        spec = spec.model_copy(update={"id": default_id})
        return SpecEntry(default_id, spec, None, raw)
    return SpecEntry(spec.id, spec, None, raw)


def parse_job_file(data: bytes, filename: str, *, max_bytes: int) -> tuple[list[SpecEntry], JobError | None]:
    """Parse a job file. Returns (entries, file_error); file_error is set when nothing could be read."""
    stem = safe_stem(filename)
    try:
        doc = load_yaml_bytes(data, max_bytes=max_bytes)
    except JobError as exc:
        return [], exc
    if not isinstance(doc, dict):
        return [], JobError(Category.INVALID_SPEC, f"a job file must be a mapping, got {type(doc).__name__}")
    if "jobs" not in doc:
        if "defaults" in doc:
            return [], JobError(Category.INVALID_SPEC, "a batch file with `defaults` needs a `jobs:` list")
        return [_validate_one(doc, stem)], None
    extra = set(doc) - {"defaults", "jobs"}
    if extra:
        return [], JobError(
            Category.INVALID_SPEC,
            f"a batch file holds only `defaults` and `jobs`; unknown top-level keys: {sorted(extra)}",
        )
    defaults, jobs = doc.get("defaults") or {}, doc["jobs"]
    if not isinstance(defaults, dict):
        return [], JobError(Category.INVALID_SPEC, "`defaults` must be a mapping of job fields")
    if "id" in defaults:
        return [], JobError(Category.INVALID_SPEC, "`defaults` cannot set `id` (every job needs its own)")
    if not isinstance(jobs, list) or not jobs:
        return [], JobError(Category.INVALID_SPEC, "`jobs` must be a non-empty list")
    if len(jobs) > MAX_JOBS_PER_FILE:
        return [], JobError(Category.INVALID_SPEC, f"a batch holds at most {MAX_JOBS_PER_FILE} jobs, got {len(jobs)}")
    entries = []
    for n, job in enumerate(jobs, start=1):
        merged = job
        if isinstance(job, dict):
            merged = {**defaults, **job}
            if isinstance(defaults.get("output"), dict) and isinstance(job.get("output"), dict):
                merged["output"] = {**defaults["output"], **job["output"]}
        entries.append(_validate_one(merged, f"{stem}-{n}"))
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.id in seen and e.error is None:
            entries[i] = SpecEntry(
                e.id,
                None,
                JobError(
                    Category.INVALID_SPEC, f"id {e.id!r} is used twice in this file (jobs {seen[e.id] + 1} and {i + 1})"
                ),
                e.raw,
            )
        seen.setdefault(e.id, i)
    return entries, None
