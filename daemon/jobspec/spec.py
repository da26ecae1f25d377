"""The job file format: the pydantic ``JobSpec`` (one job), batches, and files -> specs.

Parsing never raises past this module's boundary: :func:`parse_job_file` returns, for each job in a
file, either a spec or a precise error (field, bad value, what is allowed). The YAML itself is read by
:mod:`daemon.jobspec.reader`; the JSON Schema is :mod:`daemon.jobspec.schema`; what a spec means for a
model (parameters, LoRAs, input image) is :mod:`daemon.jobspec.resolve`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from daemon.errors import Category, JobError
from daemon.jobspec.lora import LoraSpec
from daemon.jobspec.patterns import (
    ID_CHARS,
    ID_PATTERN,
    NONBLANK_PATTERN,
    NOT_BEFORE_PATTERN,
    SIZE_CHARS,
    SIZE_PATTERN,
    kind_of,
    parse_not_before,
)
from daemon.jobspec.reader import load_yaml_bytes
from daemon.speed import ATTENTION_BACKENDS, CacheOptions

_ID_RE = re.compile(ID_CHARS)
_SIZE_RE = re.compile(SIZE_CHARS)
_NONBLANK_RE = re.compile(NONBLANK_PATTERN)

MAX_STRING = 20_000
MAX_JOBS_PER_FILE = 1_000
#: Integer fields: an integral float (``seed: 7.0``) is that integer, as in JSON Schema.
INT_FIELDS = ("width", "height", "frames", "fps", "steps", "seed", "priority")
_FIX_FIELDS = "Fix the fields named in the message and drop the file into the inbox again."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_id(value: str | None, field: str) -> str | None:
    if value is not None and not _ID_RE.fullmatch(value):
        raise ValueError(f"{field} {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ - and must not start with '.'")
    return value


class OutputSpec(_Strict):
    """Where and how the video is written."""

    basename: str | None = Field(
        None,
        description="File name without extension for <basename>.mp4/.json. Default: the id.",
        json_schema_extra={"pattern": ID_PATTERN},
    )
    quality: float = Field(
        8.0, ge=0, le=10, description="H.264 quality, 0 (smallest file, CRF 51) to 10 (best, CRF 1; never lossless)."
    )

    @field_validator("basename")
    @classmethod
    def _valid_basename(cls, v: str | None) -> str | None:
        return _check_id(v, "basename")


_NOT_BEFORE_SCHEMA = {
    "anyOf": [{"type": "string", "pattern": NOT_BEFORE_PATTERN}, {"type": "null"}],
    "default": None,
    "description": "Do not start before this time: a date (2026-05-01, midnight) or a date and time "
    "(2026-05-01T18:30[:00[.ffffff]], `T` or a space), with an optional zone (Z, +02:00, +0200); "
    "no zone means UTC. Written as a string (YAML 1.2 reads dates as strings).",
}


class JobSpec(_Strict):
    """One generation job, as written in a job file. Unset fields take the model's defaults."""

    id: str | None = Field(
        None,
        description="Job id, 1-128 of A-Z a-z 0-9 . _ -, not starting with '.'; default: the file stem "
        "(batch: <stem>-<n>).",
        json_schema_extra={"pattern": ID_PATTERN},
    )
    task: Literal["t2v", "i2v", "ti2v"] | None = Field(
        None,
        description="t2v: text only; i2v: needs `image`; ti2v (TI2V-5B): text, plus an image if given. "
        "Default: i2v when an image is given, else the model's own task.",
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Registry name (wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b, tiny-*), a local "
        "diffusers folder, or a Hugging Face repo id in the local cache. Default: models.default from the config.",
    )
    prompt: str = Field(
        ...,
        min_length=1,
        max_length=MAX_STRING,
        description="What the video shows; not blank.",
        json_schema_extra={"pattern": NONBLANK_PATTERN},
    )
    negative_prompt: str | None = Field(None, max_length=MAX_STRING, description="Default: the standard Wan one.")
    image: str | None = Field(
        None, min_length=1, max_length=4096, description="Input image, relative to an input root."
    )
    size: str | None = Field(
        None,
        description="WIDTHxHEIGHT, e.g. 1280x704. Alternative to width/height.",
        json_schema_extra={"pattern": SIZE_PATTERN},
    )
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
    not_before: Annotated[datetime | None, WithJsonSchema(_NOT_BEFORE_SCHEMA)] = None
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
        json_schema_extra={"uniqueItems": True},
        description="Degradations allowed when the job runs out of memory after offload and VAE tiling were "
        "tried, in this order. Each one applied is recorded in the sidecar. Default: none (fail instead).",
    )

    @field_validator("fallback")
    @classmethod
    def _unique_fallbacks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each fallback may be listed once")
        return v

    @field_validator(*INT_FIELDS, mode="before")
    @classmethod
    def _integral_float_is_int(cls, v: Any) -> Any:
        return int(v) if isinstance(v, float) and v.is_integer() else v

    @field_validator("not_before", mode="before")
    @classmethod
    def _not_before(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_not_before(v)
        if v is None or isinstance(v, datetime):  # None, or given from Python
            return v
        raise ValueError("must be written as a date or a date and time, e.g. 2026-05-01T18:30:00Z")

    @field_validator("cache", mode="before")
    @classmethod
    def _strict_cache(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = CacheOptions.model_validate(v, strict=True)  # no "0.5" for 0.5, as everywhere in a job
            if v.mag_ratios is not None and not all(math.isfinite(r) and r > 0 for r in v.mag_ratios):
                raise ValueError("cache.mag_ratios must be positive numbers")
        return v

    @field_validator("size")
    @classmethod
    def _size_shape(cls, v: str | None) -> str | None:
        if v is not None and not _SIZE_RE.fullmatch(v):
            raise ValueError(f"size {v!r} must look like WIDTHxHEIGHT, e.g. 1280x704")
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
        if not _NONBLANK_RE.search(v):
            raise ValueError("prompt must not be blank")
        return v

    @model_validator(mode="after")
    def _fields_that_go_together(self, info: ValidationInfo) -> JobSpec:
        if info.context and info.context.get("partial"):
            return self  # a batch's defaults: these rules apply to each job once merged
        if self.size is not None:
            if self.width is not None or self.height is not None:
                raise ValueError("give either size or width/height, not both")
        elif (self.width is None) != (self.height is None):
            raise ValueError("width and height go together")
        if self.task == "i2v" and self.image is None:
            raise ValueError("task i2v needs an `image`")
        if self.task == "t2v" and self.image is not None:
            raise ValueError("task t2v takes no `image` (use i2v or ti2v)")
        return self

    def requested_size(self) -> tuple[int, int] | None:
        if self.size is not None:
            m = _SIZE_RE.fullmatch(self.size)
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


_SHAPE = (
    "A job file is one job (`prompt: ...` and the other fields, one per line) or a batch (`defaults:` and a "
    "`jobs:` list); see jobs/examples/."
)
# pydantic's messages for a wrong type name Python's types; these say it in words.
_TYPE_WORDS = {
    "model_type": "must be a mapping of fields (`key: value`)",
    "model_attributes_type": "must be a mapping of fields (`key: value`)",
    "dict_type": "must be a mapping of fields (`key: value`)",
    "list_type": "must be a list",
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_parsing": "must be a whole number",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
}


def _problem(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(job)"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field (allowed: {', '.join(JobSpec.model_fields)})"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    msg = _TYPE_WORDS.get(err["type"]) or err["msg"].removeprefix("Value error, ")
    inp = err.get("input")
    shown = "a mapping" if isinstance(inp, dict) else repr(inp)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{loc}: {msg} (got {shown})"


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    return "; ".join(prefix + _problem(err) for err in exc.errors())


def _invalid(exc: ValidationError, prefix: str = "") -> JobError:
    problems = [
        {"field": prefix + ".".join(str(p) for p in e["loc"]), "error": _problem(e), "type": e["type"]}
        for e in exc.errors()
    ]
    return JobError(
        Category.INVALID_SPEC,
        format_validation_error(exc, prefix),
        [_FIX_FIELDS],
        details={"validation_errors": problems},
    )


def _shape_error(message: str) -> JobError:
    return JobError(Category.INVALID_SPEC, message, [_SHAPE])


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
        return SpecEntry(default_id, None, _shape_error(f"a job must be a mapping of fields, not {kind_of(raw)}"), raw)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        given = raw.get("id")
        jid = given if isinstance(given, str) and _ID_RE.fullmatch(given) else default_id
        return SpecEntry(jid, None, _invalid(exc), raw)
    if spec.id is None:
        spec = spec.model_copy(update={"id": default_id})
        return SpecEntry(default_id, spec, None, raw)
    return SpecEntry(spec.id, spec, None, raw)


def _batch_error(doc: dict[Any, Any]) -> JobError | None:
    """What makes a batch file unreadable as a whole: its shape, or a default that no job could use."""
    extra = set(doc) - {"defaults", "jobs"}
    if extra:
        return _shape_error(
            f"a batch file holds only `defaults` and `jobs`; unknown top-level keys: {sorted(map(str, extra))}"
        )
    defaults, jobs = doc.get("defaults", {}), doc["jobs"]
    if not isinstance(defaults, dict):
        return _shape_error(f"`defaults` must be a mapping of job fields, not {kind_of(defaults)}")
    if "id" in defaults:
        return _shape_error("`defaults` cannot set `id` (every job needs its own)")
    if not isinstance(jobs, list):
        return _shape_error(f"expected a list of jobs under `jobs`, not {kind_of(jobs)}")
    if not jobs:
        return _shape_error("`jobs` is an empty list: give at least one job")
    if len(jobs) > MAX_JOBS_PER_FILE:
        return _shape_error(f"a batch holds at most {MAX_JOBS_PER_FILE} jobs, got {len(jobs)}")
    try:
        # Each default is checked on its own (a job may complete or override it): rules between fields apply
        # to every job once merged.
        JobSpec.model_validate({"prompt": "-", **defaults}, context={"partial": True})
    except ValidationError as exc:
        return _invalid(exc, "defaults.")
    return None


def parse_job_file(data: bytes, filename: str, *, max_bytes: int) -> tuple[list[SpecEntry], JobError | None]:
    """Parse a job file. Returns (entries, file_error); file_error is set when nothing could be read."""
    stem = safe_stem(filename)
    try:
        doc = load_yaml_bytes(data, max_bytes=max_bytes, name=filename.rsplit("/", 1)[-1])
    except JobError as exc:
        return [], exc
    if doc is None:
        return [], JobError(
            Category.INVALID_SPEC,
            "the file is empty (a job file must be a mapping of job fields)",
            ["Write at least `prompt: <what the video shows>`; see jobs/examples/."],
        )
    if not isinstance(doc, dict):
        return [], _shape_error(f"a job file must be a mapping of job fields, not {kind_of(doc)}")
    if "jobs" not in doc:
        if "defaults" in doc:
            return [], _shape_error("a batch file with `defaults` needs a `jobs:` list")
        return [_validate_one(doc, stem)], None
    problem = _batch_error(doc)
    if problem is not None:
        return [], problem
    defaults, jobs = doc.get("defaults", {}), doc["jobs"]
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
                    Category.INVALID_SPEC,
                    f"id {e.id!r} is used twice in this file (jobs {seen[e.id] + 1} and {i + 1})",
                    ["Give each job of a batch its own `id`, or leave ids out to get <file stem>-<n>."],
                ),
                e.raw,
            )
        seen.setdefault(e.id, i)
    return entries, None
