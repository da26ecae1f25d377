"""Typed job records for tests that need a JobRecord without a job file (scheduler, policy, book)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from daemon.jobs import JobRecord, JobState
from daemon.jobspec.params import ResolvedParams
from daemon.models import REGISTRY, LocatedModel

PARAMS: dict[str, Any] = {
    "task": "t2v",
    "pipeline": "t2v",
    "prompt": "a fox",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "frames": 9,
    "fps": 16,
    "steps": 3,
    "guidance_scale": 5.0,
    "guidance_scale_2": None,
    "flow_shift": 5.0,
    "seed": 1,
    "seed_was_drawn": False,
    "quality": 8.0,
    "basename": "job",
}


def make_params(**overrides: Any) -> ResolvedParams:
    return ResolvedParams.model_validate({**PARAMS, **overrides})


def make_model(name: str = "tiny-ti2v-5b", architecture: str | None = None) -> LocatedModel:
    """A registry model by name, or any name (e.g. "m1") standing for a model of ``architecture``."""
    info = REGISTRY.get(name) or replace(REGISTRY["tiny-ti2v-5b"], name=name)
    if architecture is not None:
        info = replace(info, architecture=architecture)
    return LocatedModel(info=info, source="tiny" if info.tiny else "hub-cache")


def make_record(
    job_id: str = "j",
    *,
    seq: int = 1,
    params: dict[str, Any] | None = None,
    model: str = "tiny-ti2v-5b",
    architecture: str | None = None,
    state: JobState | None = JobState.QUEUED,
    **fields: Any,
) -> JobRecord:
    base: dict[str, Any] = dict(
        id=job_id,
        token="t",
        source=f"{seq:012d}.me.f.yaml",
        source_name="f.yaml",
        seq=seq,
        spec={},
        received_at=0.0,
        state=state,
    )
    base.update(fields)
    return JobRecord(
        params=make_params(**{"basename": job_id, **(params or {})}), model=make_model(model, architecture), **base
    )
