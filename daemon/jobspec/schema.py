"""The job-file JSON Schema (``jobs/schema.json``, ``wan-daemon schema``), generated from :class:`JobSpec`.

It accepts what :func:`daemon.jobspec.spec.parse_job_file` accepts, as far as JSON Schema can say it
(``tests/test_schema_agreement.py`` checks both directions). The top level is a ``oneOf`` of a single job and
a batch, told apart by the ``jobs`` key, so that an editor reports the mistake in the branch the file meant.
Rules between fields (size or width/height, width with height, a task and its image) hold for every job of a
batch *after* its defaults are merged: :func:`_batch_rules` spells that out for each shape the defaults can
take. What a schema cannot say is listed in :data:`NOT_EXPRESSED`.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from daemon.jobspec.reader import MAX_DEPTH, MAX_NODES, YAML_VERSION
from daemon.jobspec.spec import MAX_JOBS_PER_FILE, JobSpec

NOT_EXPRESSED = (
    "frames must be 4n+1",
    "a day the calendar lacks in not_before (2026-02-30)",
    "ids used twice in one batch",
    "the model's own size multiple, tasks and second expert (guidance_scale_2)",
    "the configured limits (limits.max_side, max_frames, max_steps, max_job_file_bytes)",
    "that the model, the image and the LoRA files exist and fit",
    f"the YAML limits: no anchors, aliases or tags, at most {MAX_DEPTH} levels and {MAX_NODES:,} nodes",
)
_TASKS = (None, "t2v", "i2v", "ti2v")
_JOBS = {"required": ["jobs"]}
_NO_JOBS = {"not": _JOBS}


def _has(key: str) -> dict[str, Any]:
    """The object sets ``key`` to something other than null (null means "not given"). (Rules name the type
    "object" so that validators rank their errors above the other branch's "required jobs".)"""
    return {"type": "object", "required": [key], "properties": {key: {"not": {"type": "null"}}}}


def _not(schema: dict[str, Any], message: str) -> dict[str, Any]:
    # errorMessage: the text yaml-language-server shows instead of "should not be valid under ...".
    return {"type": "object", "not": schema, "errorMessage": message}


def _lacks(key: str) -> dict[str, Any]:
    return {"not": _has(key)}


def _effective(key: str, in_defaults: bool) -> dict[str, Any]:
    """A job, merged over defaults that do (``in_defaults``) or do not set ``key``, has a value for it: its own
    (null erases the default), or the default's when the job does not name the key."""
    if not in_defaults:
        return _has(key)
    return {"type": "object", "anyOf": [_has(key), {"not": {"required": [key]}}]}


def _task_is(task: str, default_task: str | None) -> dict[str, Any]:
    own = {"required": ["task"], "properties": {"task": {"const": task}}}
    if default_task != task:
        return own
    return {"anyOf": [own, {"not": {"required": ["task"]}}]}


def _size_rules(size: bool, width: bool, height: bool) -> list[dict[str, Any]]:
    s, w, h = _effective("size", size), _effective("width", width), _effective("height", height)
    return [
        {"if": s, "then": _not({"anyOf": [w, h]}, "give either size or width/height, not both")},
        {"if": w, "then": h},  # width and height go together
        {"if": h, "then": w},
    ]


def _task_rules(task: str | None, image: bool) -> list[dict[str, Any]]:
    img = _effective("image", image)
    return [
        {"if": _task_is("i2v", task), "then": img},  # task i2v needs an image
        {"if": _task_is("t2v", task), "then": _not(img, "task t2v takes no `image` (use i2v or ti2v)")},
    ]


def _job_rules() -> list[dict[str, Any]]:
    """The rules between fields for a single job (no defaults)."""
    return _size_rules(False, False, False) + _task_rules(None, False)


def _defaults_shape(sets: dict[str, bool], task: str | None = None, tasks: bool = False) -> dict[str, Any]:
    parts = [_has(k) if given else _lacks(k) for k, given in sets.items()]
    if tasks:
        parts.append(_has("task") if task else _lacks("task"))
        if task:
            parts.append({"properties": {"task": {"const": task}}})
    shape: dict[str, Any] = {"properties": {"defaults": {"allOf": parts}}}
    if any(sets.values()) or task:
        shape["required"] = ["defaults"]
    return shape


def _batch_rules() -> list[dict[str, Any]]:
    """For each shape of ``defaults`` (which of size/width/height it sets; which task and whether an image), the
    rules every job of ``jobs`` must meet once merged over it."""
    rules: list[dict[str, Any]] = []
    for size, width, height in itertools.product((False, True), repeat=3):
        rules.append(
            {
                "if": _defaults_shape({"size": size, "width": width, "height": height}),
                "then": {"properties": {"jobs": {"items": {"allOf": _size_rules(size, width, height)}}}},
            }
        )
    for task, image in itertools.product(_TASKS, (False, True)):
        rules.append(
            {
                "if": _defaults_shape({"image": image}, task, tasks=True),
                "then": {"properties": {"jobs": {"items": {"allOf": _task_rules(task, image)}}}},
            }
        )
    rules.append(
        {
            "if": {"not": {"properties": {"defaults": _has("prompt")}, "required": ["defaults"]}},
            "then": {"properties": {"jobs": {"items": {"required": ["prompt"]}}}},
        }
    )
    return rules


def _cache_rules(defs: dict[str, Any]) -> None:
    cache = defs["CacheOptions"]
    is_mag = {"required": ["type"], "properties": {"type": {"const": "mag"}}}
    cache["allOf"] = [{"if": is_mag, "then": _has("mag_ratios")}, {"if": _has("mag_ratios"), "then": is_mag}]
    ratios = cache["properties"]["mag_ratios"]["anyOf"][0]
    ratios["items"] = {"type": "number", "exclusiveMinimum": 0}


def json_schema() -> dict[str, Any]:
    job = JobSpec.model_json_schema()
    defs = job.pop("$defs", {})
    _cache_rules(defs)
    fields = copy.deepcopy(job)
    fields.pop("required", None)
    fields.pop("title", None)
    job["allOf"] = _job_rules()
    defaults = copy.deepcopy(fields)
    del defaults["properties"]["id"]
    defaults["description"] = (
        "Fields shared by every job of the batch (any job field but `id`); a job's own fields win, `output` "
        "is merged key by key."
    )
    fields["description"] = "One job of a batch: any job field; `prompt` is required unless `defaults` gives it."
    batch = {
        "type": "object",
        "description": "A batch: `defaults` and a `jobs` list, nothing else.",
        "additionalProperties": False,
        "required": ["jobs"],
        "properties": {
            "defaults": {"$ref": "#/$defs/JobDefaults"},
            "jobs": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_JOBS_PER_FILE,
                "items": {"$ref": "#/$defs/BatchJob"},
            },
        },
        "allOf": _batch_rules(),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "wan-daemon job file",
        "description": (
            f"A wan-daemon job file, read as YAML {YAML_VERSION} (core schema: only true/false are booleans, "
            "010 is 10, 1:30 and 2026-05-01 are strings). Either one job (a mapping of job fields with "
            "`prompt`) or a batch (`defaults` + a `jobs` list). Integers may be written as integral numbers "
            "(7.0 is 7), as JSON Schema reads them. Not expressed here, checked by the daemon and "
            "`wan-daemon validate`: " + "; ".join(NOT_EXPRESSED) + "."
        ),
        "$defs": {**defs, "JobSpec": job, "JobDefaults": defaults, "BatchJob": fields, "Batch": batch},
        # Told apart by `jobs`; each branch checks its own shape only when the file has that shape, so a file
        # fails one branch with its real mistake and the other with one plain "required"/"not" (validators
        # that pick the best error, such as jsonschema's best_match, then name the real one).
        "oneOf": [
            {"if": _NO_JOBS, "then": {"$ref": "#/$defs/JobSpec"}, "else": _NO_JOBS},
            {"if": _JOBS, "then": {"$ref": "#/$defs/Batch"}, "else": _JOBS},
        ],
    }
