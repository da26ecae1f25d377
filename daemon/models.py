"""Which models exist, what they are, where their weights live, and their per-model job defaults.

Pure bookkeeping: no torch import, so the daemon's main process stays light. The worker loads what
:func:`locate` returns through ``from_pretrained``; the tiny models are built by :mod:`daemon.worker.tiny`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from daemon.errors import Category, JobError
from daemon.hub.cache import snapshot_path

# Architectures we know how to drive: the one list of them (other modules key their own tables by these
# names). Each maps to the tasks it can do.
T2V_A14B = "wan2.2-t2v-a14b"
I2V_A14B = "wan2.2-i2v-a14b"
TI2V_5B = "wan2.2-ti2v-5b"
T2V_SINGLE = "wan-t2v"  # one-transformer text-to-video (Wan2.1 style), for local folders

#: What a job asks for: text-to-video, image-to-video, or the TI2V models' own mode.
Task = Literal["t2v", "i2v", "ti2v"]
TASKS_BY_ARCH: dict[str, tuple[Task, ...]] = {
    T2V_A14B: ("t2v",),
    I2V_A14B: ("i2v",),
    TI2V_5B: ("ti2v", "t2v", "i2v"),
    T2V_SINGLE: ("t2v",),
}
ARCHITECTURES: tuple[str, ...] = tuple(TASKS_BY_ARCH)
#: Architectures whose pipeline has a second expert, ``transformer_2`` (the low-noise one).
TWO_EXPERT_ARCHITECTURES: tuple[str, ...] = (T2V_A14B, I2V_A14B)

# The standard Wan2.2 negative prompt (Wan2.2 repo, wan/configs/shared_config.py).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class ModelInfo:
    """A model the daemon can run, and the defaults a job gets when it does not say otherwise.

    The defaults are passed to diffusers explicitly: its own call defaults (480x832, 50 steps,
    guidance 5.0) are not Wan2.2's recommended settings.
    """

    name: str
    architecture: str
    repo_id: str | None
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    flow_shift: float
    multiple: int  # width and height must be multiples of this (VAE stride x patch size)
    tiny: bool = False
    description: str = ""

    @property
    def tasks(self) -> tuple[Task, ...]:
        return TASKS_BY_ARCH[self.architecture]

    @property
    def two_experts(self) -> bool:
        return self.architecture in TWO_EXPERT_ARCHITECTURES


REGISTRY: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        ModelInfo(
            T2V_A14B,
            T2V_A14B,
            "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
            1280,
            720,
            81,
            16,
            40,
            4.0,
            3.0,
            12.0,
            16,
            description="Wan2.2 text-to-video, two 14B experts (boundary 0.875)",
        ),
        ModelInfo(
            I2V_A14B,
            I2V_A14B,
            "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
            1280,
            720,
            81,
            16,
            40,
            3.5,
            3.5,
            5.0,
            16,
            description="Wan2.2 image-to-video, two 14B experts (boundary 0.9)",
        ),
        ModelInfo(
            TI2V_5B,
            TI2V_5B,
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            1280,
            704,
            121,
            24,
            50,
            5.0,
            None,
            5.0,
            32,
            description="Wan2.2 text/image-to-video 5B, 48-channel VAE",
        ),
        # Tiny twins: the same architectures with random weights, built locally. The video is noise.
        ModelInfo(
            "tiny-t2v-a14b",
            T2V_A14B,
            None,
            64,
            64,
            9,
            16,
            3,
            4.0,
            3.0,
            12.0,
            16,
            tiny=True,
            description="TEST MODEL: T2V-A14B architecture, tiny, random weights (video is noise)",
        ),
        ModelInfo(
            "tiny-i2v-a14b",
            I2V_A14B,
            None,
            64,
            64,
            9,
            16,
            3,
            3.5,
            3.5,
            5.0,
            16,
            tiny=True,
            description="TEST MODEL: I2V-A14B architecture, tiny, random weights (video is noise)",
        ),
        ModelInfo(
            "tiny-ti2v-5b",
            TI2V_5B,
            None,
            64,
            64,
            9,
            24,
            3,
            5.0,
            None,
            5.0,
            32,
            tiny=True,
            description="TEST MODEL: TI2V-5B architecture, tiny, random weights (video is noise)",
        ),
        # For small GPUs (about 8 GB of VRAM): Wan2.1 1.3B text-to-video, one transformer, 16-channel VAE;
        # Wan2.1's recommended 480p settings (50 steps, guidance 5.0, shift 3.0).
        ModelInfo(
            "wan2.1-t2v-1.3b",
            T2V_SINGLE,
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            832,
            480,
            81,
            16,
            50,
            5.0,
            None,
            3.0,
            16,
            description="Wan2.1 text-to-video 1.3B, one transformer (small GPUs, about 8 GB)",
        ),
        ModelInfo(
            "tiny-t2v-1.3b",
            T2V_SINGLE,
            None,
            64,
            64,
            9,
            16,
            3,
            5.0,
            None,
            3.0,
            16,
            tiny=True,
            description="TEST MODEL: Wan2.1 T2V-1.3B architecture, tiny, random weights (video is noise)",
        ),
    ]
}

TINY_FOR: dict[str, str] = {
    T2V_A14B: "tiny-t2v-a14b",
    I2V_A14B: "tiny-i2v-a14b",
    TI2V_5B: "tiny-ti2v-5b",
    T2V_SINGLE: "tiny-t2v-1.3b",
}


class LocatedModel(BaseModel):
    """A model resolved to something the worker can load; persisted in every job record and sent to the
    worker with each job. Records written before this was typed held only the flat summary
    (:meth:`to_dict`); they still load (the model's defaults then come from the registry, or stay unknown)."""

    model_config = ConfigDict(frozen=True)

    info: ModelInfo
    path: Path | None = None  # None: a tiny model not built yet (the worker builds it), or not downloaded yet
    source: Literal["tiny", "hub-cache", "local"]
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_flat_summary(cls, data: Any) -> Any:
        if isinstance(data, dict) and "info" not in data and "name" in data:
            known = REGISTRY.get(data["name"])
            info = (
                known
                if known is not None and known.architecture == data.get("architecture")
                else ModelInfo(
                    data["name"],
                    data.get("architecture", ""),
                    data.get("repo_id"),
                    0,
                    0,
                    0,
                    0,
                    0,
                    0.0,
                    None,
                    0.0,
                    int(data.get("multiple") or 16),
                    tiny=bool(data.get("tiny_random_weights")),
                )
            )
            return {
                "info": info,
                "path": data.get("path"),
                "source": data.get("source", "local"),
                "revision": data.get("revision"),
            }
        return data

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def architecture(self) -> str:
        return self.info.architecture

    @property
    def repo_id(self) -> str | None:
        return self.info.repo_id

    @property
    def tiny(self) -> bool:
        return self.info.tiny

    @property
    def multiple(self) -> int:
        return self.info.multiple

    def to_dict(self) -> dict[str, Any]:
        """The summary users read in sidecars and failure records."""
        return {
            "name": self.info.name,
            "architecture": self.info.architecture,
            "repo_id": self.info.repo_id,
            "revision": self.revision,
            "path": str(self.path) if self.path else None,
            "source": self.source,
            "tiny_random_weights": self.info.tiny,
            "multiple": self.info.multiple,
        }


def needed_patterns(architecture: str) -> list[str]:
    """``allow_patterns`` for the files a diffusers Wan pipeline of ``architecture`` loads
    (for :func:`daemon.hub.download.download`).

    ``architecture`` is one of :data:`ARCHITECTURES` (``wan2.2-ti2v-5b``, ``wan2.2-t2v-a14b``,
    ``wan2.2-i2v-a14b``, ``wan-t2v``) or a registry model name. The patterns keep ``model_index.json``, the
    whole ``scheduler/`` and ``tokenizer/`` folders (small; the tokenizer needs ``spiece.model``), and for
    each weight folder (``text_encoder``, ``transformer``, ``transformer_2`` for the two-expert A14B models,
    ``vae``) only its ``*.json`` (config, safetensors index) and ``*.safetensors`` files. Anything else in the
    repo — ``*.bin``/``*.pth``/``*.pt`` duplicates, original checkpoints, README and example media — is
    not fetched. Patterns use fnmatch, as ``snapshot_download`` does (``*`` also matches ``/``).
    """
    arch = architecture
    if arch not in ARCHITECTURES:
        info = REGISTRY.get(arch)
        if info is None:
            raise ValueError(
                f"unknown architecture or model {architecture!r}; expected one of "
                f"{', '.join(ARCHITECTURES)} or a registry name"
            )
        arch = info.architecture
    weights = ["text_encoder", "transformer", "vae"]
    if arch in TWO_EXPERT_ARCHITECTURES:
        weights.insert(2, "transformer_2")
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*"]
    for folder in weights:
        patterns += [f"{folder}/*.json", f"{folder}/*.safetensors"]
    return patterns


def tiny_model_dir(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / name


def hub_snapshot(repo_id: str) -> tuple[Path, str] | None:
    """The local Hugging Face cache snapshot of ``repo_id`` (path, revision), or None. Never downloads."""
    path = snapshot_path(repo_id)  # finds snapshots fetched with allow_patterns too (wan-daemon's own)
    if path is None:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:  # LocalEntryNotFoundError, offline mode, bad repo id: all mean "not here"
            return None
    if not (path / "model_index.json").is_file():
        return None
    return path, path.name


def inspect_folder(path: Path) -> str:
    """Tell a Wan diffusers folder's architecture from its configs. Raises JobError if it is not one."""
    try:
        index = json.loads((path / "model_index.json").read_text())
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise JobError(Category.MODEL_NOT_FOUND, f"{path} is not a diffusers model folder: {exc}") from None
    if index.get("_class_name") not in ("WanPipeline", "WanImageToVideoPipeline"):
        raise JobError(
            Category.MODEL_NOT_FOUND,
            f"{path} holds a {index.get('_class_name')!r}, not a Wan pipeline (WanPipeline / WanImageToVideoPipeline)",
        )
    if index.get("expand_timesteps") or vae.get("z_dim") == 48:
        return TI2V_5B
    if transformer.get("in_channels") == 36:
        return I2V_A14B
    if index.get("transformer_2") and index["transformer_2"][0] is not None:
        return T2V_A14B
    return T2V_SINGLE


def _folder_multiple(path: Path) -> int:
    transformer = json.loads((path / "transformer" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    patch = transformer.get("patch_size", [1, 2, 2])
    return int(vae.get("scale_factor_spatial", 8)) * int(patch[1])


def info_for_folder(name: str, path: Path, repo_id: str | None = None) -> ModelInfo:
    arch = inspect_folder(path)
    base = REGISTRY["wan2.1-t2v-1.3b"] if arch == T2V_SINGLE else (REGISTRY.get(arch) or REGISTRY[TI2V_5B])
    return replace(
        base,
        name=name,
        architecture=arch,
        repo_id=repo_id,
        multiple=_folder_multiple(path),
        tiny=False,
        description=f"local diffusers folder ({arch})",
    )


def locate(model: str, *, models_dir: Path, model_roots: list[Path]) -> LocatedModel:
    """Resolve a job's ``model:`` value: a registry name, a local diffusers folder, or a hub repo id.

    Raises JobError(model_not_found) with what to do when the weights are not on this machine.
    """
    info = REGISTRY.get(model)
    if info is not None and info.tiny:
        folder = tiny_model_dir(models_dir, info.name)
        return LocatedModel(info=info, path=folder if (folder / "model_index.json").is_file() else None, source="tiny")
    if info is not None:
        assert info.repo_id is not None  # every registry model that is not tiny names its hub repo
        snap = hub_snapshot(info.repo_id)
        if snap is None:
            raise JobError(
                Category.MODEL_NOT_FOUND,
                f"model {model!r} ({info.repo_id}) is not in the local Hugging Face cache",
                [
                    f"Download it: `wan-daemon models download {info.name}` (about 30-120 GB), "
                    "or turn on models.auto_download.",
                    f"Or set `model:` to {TINY_FOR[info.architecture]!r} to test the daemon with a tiny random model.",
                ],
                {"repo_id": info.repo_id},
            )
        return LocatedModel(info=info, path=snap[0], source="hub-cache", revision=snap[1])
    # A local folder: absolute, or relative to one of the configured model roots.
    raw = Path(os.path.expanduser(model))
    candidates = [raw] if raw.is_absolute() else [Path(r) / raw for r in model_roots]
    for cand in candidates:
        if (cand / "model_index.json").is_file():
            cand = cand.resolve()
            return LocatedModel(info=info_for_folder(model, cand), path=cand, source="local")
    if "/" in model and not raw.is_absolute() and model.count("/") == 1:
        snap = hub_snapshot(model)
        if snap is not None:
            return LocatedModel(
                info=info_for_folder(model, snap[0], repo_id=model), path=snap[0], source="hub-cache", revision=snap[1]
            )
        raise JobError(
            Category.MODEL_NOT_FOUND,
            f"model {model!r} is neither a registry name, a local diffusers folder, nor a repo in the local "
            "Hugging Face cache",
            [f"Download it: `wan-daemon models download {model}` (any hub repo id), then drop the job again."],
        )
    known = ", ".join(REGISTRY)
    raise JobError(
        Category.MODEL_NOT_FOUND,
        f"unknown model {model!r}: not a registry name ({known}) and no diffusers folder (model_index.json) found "
        f"at {', '.join(str(c) for c in candidates)}",
    )


def default_model(configured: str, *, cuda_available: bool) -> str:
    """The model for jobs that name none. ``auto``: real TI2V-5B when its weights are here and a GPU is
    present, otherwise the tiny TI2V-5B test model (and the daemon says so loudly)."""
    if configured != "auto":
        return configured
    repo_id = REGISTRY[TI2V_5B].repo_id
    assert repo_id is not None  # a real registry model
    if cuda_available and hub_snapshot(repo_id) is not None:
        return TI2V_5B
    return "tiny-ti2v-5b"
