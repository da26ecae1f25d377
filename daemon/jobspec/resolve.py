"""One path from a parsed job to everything needed to run it, shared by the daemon's intake, ``wan-daemon
validate`` / ``submit`` and the out-of-memory retry that switches to a smaller model.

:func:`resolve_job` does every check that depends on the job, the configuration and the files it names:
the model (located on this machine, or a registry model that the daemon downloads first when
``models.auto_download`` is on), the generation parameters (:func:`daemon.jobspec.params.resolve_params`),
the LoRAs (:func:`daemon.jobspec.lora.validate`) and the input image (type, confined to
``paths.input_roots``, size and pixel limits, readable). What depends on the daemon's own state (an id or
an output name already queued, a video already published) stays with the intake
(:mod:`daemon.runtime.intake`). No torch: PIL only reads the image's header and checks it.
"""

from __future__ import annotations

import errno
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.errors import Category, JobError
from daemon.fsutil import open_confined
from daemon.jobspec.lora import validate as validate_loras
from daemon.jobspec.params import ResolvedParams, resolve_params
from daemon.jobspec.spec import JobSpec, SpecEntry
from daemon.models import REGISTRY, LocatedModel, locate

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
#: OSErrors that are the machine's fault, not the job's: the daemon pauses and tries again instead of
#: rejecting the job.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


@dataclass(frozen=True)
class InputImage:
    """A job's input image, read and checked; the intake writes ``data`` into the job's spool folder."""

    data: bytes
    suffix: str  # lower case, one of IMAGE_SUFFIXES


@dataclass(frozen=True)
class ResolvedJob:
    """A job the daemon accepts, as far as the job, the configuration and the files it names go."""

    spec: JobSpec
    model: LocatedModel
    params: ResolvedParams  # LoRAs resolved (ResolvedLora dicts)
    waiting: bool  # the model is a registry model not downloaded yet: the job waits for its download
    image: InputImage | None


def unusable_path(exc: OSError) -> JobError:
    """A path in a job that the OS refuses outright (ENAMETOOLONG, ELOOP, ...): the job is at fault."""
    return JobError(Category.INVALID_SPEC, f"a path in this job cannot be used: {exc.strerror} ({exc.filename!r:.80})")


def resolve_job(entry: SpecEntry | JobSpec, settings: Settings, default_model: str | Callable[[], str]) -> ResolvedJob:
    """Everything a job needs, checked. Raises the JobError that rejects it.

    ``entry``: a parsed job (a :class:`SpecEntry` carrying a parse error raises that error).
    ``default_model``: the model for jobs that name none, as :func:`daemon.models.default_model` resolves
    ``models.default`` (or a callable giving it, called only when the job names no model).
    An OSError that is the disk's fault (:data:`DISK_ERRNOS`) propagates; any other becomes
    :func:`unusable_path`.
    """
    if isinstance(entry, SpecEntry):
        if entry.error is not None:
            raise entry.error
        assert entry.spec is not None
        spec = entry.spec
    else:
        spec = entry
    try:
        name = spec.model or (default_model() if callable(default_model) else default_model)
        located, waiting = locate_for_job(name, settings)
        params = resolve_params(
            spec,
            located.info,
            max_side=settings.limits.max_side,
            max_frames=settings.limits.max_frames,
            max_steps=settings.limits.max_steps,
            vae_tiling=settings.models.vae_tiling,
            speed=settings.speed,
        )
        if spec.loras:
            loras = validate_loras(spec.loras, settings.paths.lora_roots, located.path, located.info.two_experts)
            params = params.model_copy(update={"loras": [r.model_dump(mode="json") for r in loras]})
        image = check_input_image(spec.image, settings) if spec.image else None
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise
        raise unusable_path(exc) from None
    return ResolvedJob(spec=spec, model=located, params=params, waiting=waiting, image=image)


def locate_for_job(name: str, settings: Settings) -> tuple[LocatedModel, bool]:
    """``(located model, waiting)``. A registry model whose weights are absent is accepted when
    ``models.auto_download`` is on: the job then waits while the daemon downloads it (``waiting``)."""
    try:
        return locate(name, models_dir=settings.paths.models, model_roots=settings.paths.model_roots), False
    except JobError as err:
        info = REGISTRY.get(name)
        if not (
            err.category is Category.MODEL_NOT_FOUND
            and settings.models.auto_download
            and info is not None
            and info.repo_id
        ):
            raise
        return LocatedModel(info=info, source="hub-cache"), True


def check_input_image(image: str, settings: Settings) -> InputImage:
    """Read a job's ``image``: a known image type, inside ``paths.input_roots`` (no ``..``, no symlink), at
    most ``limits.max_input_bytes`` and ``limits.max_input_pixels``, and readable by PIL.
    Raises JobError(invalid_input)."""
    from PIL import Image

    suffix = Path(image).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise JobError(
            Category.INVALID_INPUT,
            f"image {image!r}: unsupported type {suffix or '(none)'!r} (allowed: {', '.join(sorted(IMAGE_SUFFIXES))})",
        )
    limits = settings.limits
    try:
        with open_confined(Path(image), list(settings.paths.input_roots), max_bytes=limits.max_input_bytes) as fh:
            data = fh.read()
    except ValueError as exc:
        raise JobError(Category.INVALID_INPUT, f"image: {exc}") from None
    except OSError as exc:  # ENAMETOOLONG and friends: the path itself is unusable
        raise JobError(Category.INVALID_INPUT, f"image: cannot use {image[:80]!r}...: {exc.strerror}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = img.size[0] * img.size[1]
            if pixels > limits.max_input_pixels:
                raise JobError(
                    Category.INVALID_INPUT,
                    f"image {image!r} is {img.size[0]}x{img.size[1]} = "
                    f"{pixels:,} pixels, more than limits.max_input_pixels "
                    f"({limits.max_input_pixels:,})",
                )
            img.verify()
    except JobError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise JobError(Category.INVALID_INPUT, f"image {image!r} is not a readable image: {exc}") from None
    return InputImage(data, suffix)


def resolve_retry(
    spec: dict[str, Any], job_id: str, params: ResolvedParams, changes: dict[str, Any], settings: Settings
) -> tuple[ResolvedParams, LocatedModel]:
    """The parameters and model of the next attempt after an out-of-memory retry that switches the model
    (``changes["model"]``, from :func:`daemon.policy.decide`; other keys of ``changes`` are parameter changes).

    The job is resolved again for the new model from its spec as given, keeping this attempt's seed, frames
    and (snapped to the new model's multiple) size; the model's own guidance_scale_2 replaces the job's; the
    offload mode, VAE tiling and whether the seed was drawn carry over. The model must be on this machine
    (no download). Raises JobError when the job does not fit the new model.
    """
    current = {**params.model_dump(mode="json"), **{k: v for k, v in changes.items() if k != "model"}}
    located = locate(changes["model"], models_dir=settings.paths.models, model_roots=settings.paths.model_roots)
    info = located.info
    job = {**spec, "id": job_id, "model": changes["model"], "seed": current["seed"], "frames": current["frames"]}
    for key in ("width", "height", "guidance_scale_2"):
        job.pop(key, None)
    job["size"] = (
        f"{max(info.multiple, current['width'] // info.multiple * info.multiple)}x"
        f"{max(info.multiple, current['height'] // info.multiple * info.multiple)}"
    )
    lim = settings.limits
    new = resolve_params(
        JobSpec.model_validate(job),
        info,
        max_side=lim.max_side,
        max_frames=lim.max_frames,
        max_steps=lim.max_steps,
        vae_tiling=current["vae_tiling"],
        speed=settings.speed,
    )
    return new.model_copy(update={"offload": current["offload"], "seed_was_drawn": current["seed_was_drawn"]}), located


__all__ = [
    "ResolvedJob",
    "InputImage",
    "resolve_job",
    "resolve_retry",
    "locate_for_job",
    "check_input_image",
    "unusable_path",
    "IMAGE_SUFFIXES",
    "DISK_ERRNOS",
]
