"""LoRA adapters in job files, checked in the daemon (no torch, no diffusers).

- :class:`LoraSpec`: one ``loras:`` entry of a job file (``path`` relative to a LoRA root, ``strength``,
  ``expert``).
- :data:`PRESETS` / :func:`apply_preset`: named recipes, e.g. ``lightning-4step``.
- :func:`resolve_lora_path`: confine a path to the LoRA roots (no ``..``, no symlinks, ``.safetensors``).
- :func:`validate`: everything for one job → :class:`ResolvedLora` entries (absolute path, sha256, strength,
  expert, key format) that travel to the worker in the job payload. It reads the file's header and the
  model's transformer headers (:mod:`daemon.jobspec.lora_files`) and checks the fit
  (:mod:`daemon.jobspec.lora_keys`).

Every refusal is a ``JobError(Category.INVALID_LORA, reason)``. The worker applies the resolved LoRAs on its
warm pipeline with :class:`daemon.worker.lora.LoraManager`.

Expert routing on the two-expert A14B models: ``high`` → ``pipe.transformer`` (high-noise expert, the early
steps), ``low`` → ``pipe.transformer_2`` (low-noise expert, the late steps; diffusers'
``load_lora_weights(..., load_into_transformer_2=True)``), ``both`` → both. TI2V-5B has one transformer: only
``high`` is allowed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from daemon.errors import Category, JobError
from daemon.jobspec.lora_files import MAX_LORA_BYTES, inspect_lora, transformer_header
from daemon.jobspec.lora_keys import analyse_lora_keys, check_lora_fits, lora_error

Expert = Literal["high", "low", "both"]

#: How the components of a Wan pipeline are named in diffusers, per expert.
EXPERT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "high": ("transformer",),
    "low": ("transformer_2",),
    "both": ("transformer", "transformer_2"),
}


# --------------------------------------------------------------------------------------------------
# Job-file schema
# --------------------------------------------------------------------------------------------------


class LoraSpec(BaseModel):
    """One LoRA of a job, as written in the job file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="A .safetensors file, relative to one of the LoRA roots (paths.lora_roots).",
    )
    strength: float = Field(1.0, ge=0, le=4, description="Adapter weight; 0 leaves the model unchanged.")
    expert: Expert = Field(
        "high",
        description="Which transformer gets it on the two-expert A14B models: high (high-noise expert, "
        "early steps), low (low-noise expert, late steps) or both. TI2V-5B has one transformer: only high.",
    )


class ResolvedLora(BaseModel):
    """A checked LoRA, as handed to the worker: everything :meth:`LoraManager.apply` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # absolute, inside a LoRA root, no symlink on the way
    sha256: str
    strength: float
    expert: Expert
    format: Literal["diffusers", "wan", "musubi"] = "diffusers"

    @property
    def adapter_name(self) -> str:
        return adapter_name(self.sha256)


def adapter_name(sha256: str) -> str:
    """The peft adapter name of a LoRA file: derived from its content, so a file is loaded once per pipeline."""
    return "l_" + sha256[:16]


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "lightning-4step": {
        "description": "Wan2.2 Lightning (lightx2v) 4-step distill: CFG-free, 4 steps, shift 5",
        "source": "https://huggingface.co/lightx2v/Wan2.2-Lightning",
        # Applied unless the job sets the field itself.
        "params": {"steps": 4, "guidance_scale": 1.0, "flow_shift": 5.0},
        "params_two_experts": {"guidance_scale_2": 1.0},
        # Which experts must each get a LoRA file of their own.
        "experts_two": ("high", "low"),
        "experts_one": ("high",),
    },
}


def apply_preset(
    name: str, loras: Sequence[LoraSpec], overrides: Mapping[str, Any], *, two_experts: bool | None = None
) -> tuple[dict[str, Any], list[LoraSpec]]:
    """Apply preset ``name``: returns ``(param_overrides, loras)``.

    ``overrides`` holds the job's explicitly set fields (``JobSpec`` field names; a value of None counts as
    not set). ``param_overrides`` holds the preset's values for the fields the job did not set, to be used in
    place of the model's defaults. ``loras`` is returned as given (a new list) once it matches the recipe.

    ``two_experts``: whether the model is a two-expert A14B model. Pass it; when None it is inferred from
    the LoRAs (a ``low`` one means A14B), which cannot catch an A14B job that forgot its low-noise LoRA.

    **lightning-4step**, the published Wan2.2 Lightning recipe (lightx2v, "Wan2.2-Lightning",
    e.g. ``Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1`` / ``Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1``):

    - the distillation is step *and* CFG distillation: 4 denoising steps, ``guidance_scale`` 1.0 (and
      ``guidance_scale_2`` 1.0 for the low-noise expert of A14B), which also turns classifier-free guidance
      off (one transformer pass per step instead of two, and the negative prompt no longer matters);
    - ``flow_shift`` 5.0;
    - A14B: two LoRA files, each for its own expert: ``high_noise_model.safetensors`` with ``expert: high``
      (loaded into ``transformer``) and ``low_noise_model.safetensors`` with ``expert: low`` (loaded into
      ``transformer_2``), both at strength 1.0. The experts' boundary stays the model's own (0.875 T2V, 0.9
      I2V), so with 4 steps the high-noise expert usually runs the first 2 steps.
    - TI2V-5B: one transformer, so one 4-step distill LoRA with ``expert: high``.
    - lightx2v sample with an Euler flow-matching solver on fixed timesteps (1000, 750, 500, 250); the daemon
      keeps the model's own scheduler (UniPC in flow mode) with the preset's shift, which is close but not
      identical. Other LoRAs (style, motion) may be listed alongside the distill ones.
    """
    preset = PRESETS.get(name)
    if preset is None:
        raise JobError(Category.INVALID_SPEC, f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    loras = list(loras)
    experts = [lo.expert for lo in loras]
    if two_experts is None:
        two_experts = "low" in experts
    if two_experts:
        high = {lo.path for lo in loras if lo.expert == "high"}
        low = {lo.path for lo in loras if lo.expert == "low"}
        if not high or not low or (len(high | low) < 2):
            raise lora_error(
                f"preset {name!r} on a two-expert (A14B) model needs two LoRA files, one with expert: high (the "
                f"high-noise LoRA) and another with expert: low (the low-noise LoRA); got experts {experts or 'none'}",
                "List both files under `loras:`, e.g. high_noise_model.safetensors with expert: high and "
                "low_noise_model.safetensors with expert: low.",
            )
    else:
        if not any(e == "high" for e in experts):
            raise lora_error(f"preset {name!r} needs its distill LoRA listed under `loras:` with expert: high")
        if any(e != "high" for e in experts):
            raise lora_error(
                f"preset {name!r} on a one-transformer model (TI2V-5B) takes LoRAs with expert: high "
                f"only; got experts {experts}"
            )
    params = dict(preset["params"])
    if two_experts:
        params.update(preset["params_two_experts"])
    param_overrides = {k: v for k, v in params.items() if overrides.get(k) is None}
    return param_overrides, loras


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


def resolve_lora_path(path: str, roots: Sequence[Path | str]) -> Path:
    """The absolute path of LoRA file ``path`` inside one of ``roots``, or JobError(invalid_lora).

    Same rules as :func:`daemon.fsutil.open_confined`: relative to a root (or absolute but inside one), no
    ``..``, no symlink anywhere below the root (the file included); it must be a regular ``.safetensors`` file.
    The roots themselves may be symlinks (configured by the operator). The file is opened with O_NOFOLLOW when
    it is read (:func:`read_safetensors_header`), so a symlink swapped in later is refused too.
    """
    if not isinstance(path, str) or not path.strip():
        raise lora_error("LoRA path is empty")
    if "\x00" in path:
        raise lora_error("LoRA path contains a NUL byte")
    raw = Path(path)
    if not raw.name.lower().endswith(".safetensors"):
        raise lora_error(
            f"LoRA {path!r} must be a .safetensors file (pickled .bin/.pt/.ckpt files are refused)",
            "Convert it to safetensors, or use the .safetensors release of the LoRA.",
        )
    if ".." in raw.parts:
        raise lora_error(f"LoRA path {path!r} contains '..'")
    if not roots:
        raise lora_error(
            "no LoRA roots are configured, so no LoRA can be used",
            "Configure paths.lora_roots and put the LoRA files there.",
        )
    for root in roots:
        root_res = Path(root).resolve()
        if raw.is_absolute():
            rel = None
            for base in (root_res, Path(root).absolute()):
                try:
                    rel = raw.relative_to(base)
                    break
                except ValueError:
                    continue
            if rel is None:
                continue
        else:
            rel = raw
        if not rel.parts:
            continue
        current = root_res
        st = None
        for part in rel.parts:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                st = None
                break
            except OSError as exc:
                raise lora_error(f"cannot access LoRA {path!r}: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise lora_error(
                    f"LoRA path {path!r} goes through a symlink ({current.name}), which is not allowed",
                    "Copy the file into the LoRA root instead of linking it.",
                )
        if st is None:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise lora_error(f"LoRA {path!r} is not a regular file")
        return current
    shown = ", ".join(str(r) for r in roots)
    if raw.is_absolute():
        raise lora_error(
            f"LoRA {path!r} is outside the LoRA roots ({shown})",
            "Give the path relative to a LoRA root (paths.lora_roots).",
        )
    raise lora_error(f"LoRA file {path!r} not found under the LoRA roots ({shown})")


# --------------------------------------------------------------------------------------------------
# Everything, for one job
# --------------------------------------------------------------------------------------------------


def validate(
    loras: Sequence[LoraSpec | Mapping[str, Any]],
    roots: Sequence[Path | str],
    model_folder: Path | str | None,
    two_experts: bool,
    *,
    max_bytes: int = MAX_LORA_BYTES,
) -> list[ResolvedLora]:
    """Check a job's LoRAs against the LoRA roots and the model; returns them resolved, in order.

    ``model_folder``: the model's diffusers folder (its transformer headers are read to check the fit); None
    skips the fit check (e.g. a tiny model that the worker has not built yet). ``two_experts``: A14B.
    Raises JobError(invalid_lora) naming the entry (``loras[i]``) and the reason.
    """
    out: list[ResolvedLora] = []
    seen: dict[tuple[str, str], int] = {}
    for i, item in enumerate(loras):
        spec = item if isinstance(item, LoraSpec) else LoraSpec.model_validate(item)
        where = f"loras[{i}] ({spec.path})"
        try:
            if spec.expert != "high" and not two_experts:
                raise lora_error(
                    f"expert {spec.expert!r} needs a two-expert (A14B) model with a low-noise "
                    "transformer; this model has one transformer",
                    "Use expert: high.",
                )
            path = resolve_lora_path(spec.path, roots)
            sha, header = inspect_lora(path, max_bytes)
            for comp in EXPERT_COMPONENTS[spec.expert]:
                if (sha, comp) in seen:
                    raise lora_error(
                        f"the same LoRA file is already listed as loras[{seen[sha, comp]}] for {comp}",
                        "List each LoRA once per expert; use strength to weight it.",
                    )
                seen[sha, comp] = i
            fmt = analyse_lora_keys(header).format
            if model_folder is not None:
                for comp in EXPERT_COMPONENTS[spec.expert]:
                    sub = comp if (Path(model_folder) / comp).is_dir() else "transformer"
                    fmt = check_lora_fits(header, transformer_header(model_folder, sub)).format
        except JobError as exc:
            if exc.category is not Category.INVALID_LORA:
                raise
            raise JobError(
                Category.INVALID_LORA,
                f"{where}: {exc.message}",
                exc.suggestions,
                {**exc.details, "lora_index": i, "lora_path": spec.path},
            ) from None
        out.append(
            ResolvedLora(path=str(path), sha256=sha, strength=float(spec.strength), expert=spec.expert, format=fmt)
        )
    return out


__all__ = [
    "LoraSpec",
    "ResolvedLora",
    "Expert",
    "PRESETS",
    "apply_preset",
    "resolve_lora_path",
    "validate",
    "adapter_name",
    "EXPERT_COMPONENTS",
    "MAX_LORA_BYTES",
]
