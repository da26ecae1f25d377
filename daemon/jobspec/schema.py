"""The job-file JSON Schema (``jobs/schema.json``, ``wan-daemon schema``), generated from :class:`JobSpec`."""

from __future__ import annotations

from typing import Any

from daemon.jobspec.spec import MAX_JOBS_PER_FILE, JobSpec


def json_schema() -> dict[str, Any]:
    single = JobSpec.model_json_schema()
    defs = single.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "wan-daemon job file",
        "description": "One job (a JobSpec), or a batch: `defaults` (any JobSpec fields) + `jobs` (list of JobSpec).",
        "$defs": {**defs, "JobSpec": single},
        "anyOf": [
            {"$ref": "#/$defs/JobSpec"},
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["jobs"],
                "properties": {
                    "defaults": {"type": "object", "description": "Fields shared by every job of the batch."},
                    "jobs": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_JOBS_PER_FILE,
                        "items": {"type": "object"},
                    },
                },
            },
        ],
    }
