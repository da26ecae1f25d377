"""LoRA adapters for Wan2.2 jobs: checked in the daemon, applied in the worker on the warm pipeline.

The module has two halves:

**Parent side** (daemon process; imports neither torch nor diffusers):

- :class:`LoraSpec`: one ``loras:`` entry of a job file (``path`` relative to a LoRA root, ``strength``,
  ``expert``).
- :data:`PRESETS` / :func:`apply_preset`: named recipes, e.g. ``lightning-4step``.
- :func:`resolve_lora_path`: confine a path to the LoRA roots (no ``..``, no symlinks, ``.safetensors``).
- :func:`read_safetensors_keys` / :func:`read_safetensors_header`: parse a safetensors header in pure Python.
- :func:`check_lora_fits` / :func:`transformer_keys`: the LoRA's target modules must exist in the model
  (diffusers/peft names, and the original Wan / ComfyUI and musubi names that diffusers converts).
- :func:`validate`: all of the above for a job → :class:`ResolvedLora` entries (absolute path, sha256,
  strength, expert) that travel to the worker in the job payload.

Every refusal is a ``JobError(Category.INVALID_LORA, reason)``.

**Worker side** (imports torch / diffusers lazily, inside functions):

- :class:`LoraManager`: one per loaded pipeline. :meth:`LoraManager.apply` loads each adapter once per
  transformer (named after the file's sha256), activates exactly the job's adapters with their strengths
  on each expert, and disables LoRA for jobs without any, so the base weights are never reloaded.

Expert routing on the two-expert A14B models: ``high`` → ``pipe.transformer`` (high-noise expert, the early
steps), ``low`` → ``pipe.transformer_2`` (low-noise expert, the late steps; diffusers'
``load_lora_weights(..., load_into_transformer_2=True)``), ``both`` → both. TI2V-5B has one transformer: only
``high`` is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, NamedTuple, Sequence

from pydantic import BaseModel, ConfigDict, Field

from daemon.errors import Category, JobError, classify_exception
from daemon.fsutil import open_confined

Expert = Literal["high", "low", "both"]

#: A safetensors header longer than this is refused (the format itself allows 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest LoRA file accepted. Rank-64 A14B distill LoRAs are ~600 MB; full-rank "diff" files are bigger.
MAX_LORA_BYTES = 16 * 1024**3
#: How the components of a Wan pipeline are named in diffusers, per expert.
EXPERT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "high": ("transformer",),
    "low": ("transformer_2",),
    "both": ("transformer", "transformer_2"),
}

_SUGGEST_FIT = "Use a LoRA trained for this model (Wan2.2 A14B and TI2V-5B LoRAs are not interchangeable)."


def _lora_error(message: str, *suggestions: str, **details: Any) -> JobError:
    return JobError(Category.INVALID_LORA, message, list(suggestions), dict(details))


# --------------------------------------------------------------------------------------------------
# Job-file schema
# --------------------------------------------------------------------------------------------------


class LoraSpec(BaseModel):
    """One LoRA of a job, as written in the job file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: str = Field(..., min_length=1, max_length=4096,
                      description="A .safetensors file, relative to one of the LoRA roots (paths.lora_roots).")
    strength: float = Field(1.0, ge=0, le=4, description="Adapter weight; 0 leaves the model unchanged.")
    expert: Expert = Field(
        "high", description="Which transformer gets it on the two-expert A14B models: high (high-noise expert, "
        "early steps), low (low-noise expert, late steps) or both. TI2V-5B has one transformer: only high.")


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


def apply_preset(name: str, loras: Sequence[LoraSpec], overrides: Mapping[str, Any], *,
                 two_experts: bool | None = None) -> tuple[dict[str, Any], list[LoraSpec]]:
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
            raise _lora_error(
                f"preset {name!r} on a two-expert (A14B) model needs two LoRA files, one with expert: high (the "
                f"high-noise LoRA) and another with expert: low (the low-noise LoRA); got experts {experts or 'none'}",
                "List both files under `loras:`, e.g. high_noise_model.safetensors with expert: high and "
                "low_noise_model.safetensors with expert: low.",
            )
    else:
        if not any(e == "high" for e in experts):
            raise _lora_error(f"preset {name!r} needs its distill LoRA listed under `loras:` with expert: high")
        if any(e != "high" for e in experts):
            raise _lora_error(f"preset {name!r} on a one-transformer model (TI2V-5B) takes LoRAs with expert: high "
                              f"only; got experts {experts}")
    params = dict(preset["params"])
    if two_experts:
        params.update(preset["params_two_experts"])
    param_overrides = {k: v for k, v in params.items() if overrides.get(k) is None}
    return param_overrides, loras


# --------------------------------------------------------------------------------------------------
# Paths and safetensors headers (no torch)
# --------------------------------------------------------------------------------------------------


def resolve_lora_path(path: str, roots: Sequence[Path | str]) -> Path:
    """The absolute path of LoRA file ``path`` inside one of ``roots``, or JobError(invalid_lora).

    Same rules as :func:`daemon.fsutil.open_confined`: relative to a root (or absolute but inside one), no
    ``..``, no symlink anywhere below the root (the file included); it must be a regular ``.safetensors`` file.
    The roots themselves may be symlinks (configured by the operator). The file is opened with O_NOFOLLOW when
    it is read (:func:`read_safetensors_header`), so a symlink swapped in later is refused too.
    """
    if not isinstance(path, str) or not path.strip():
        raise _lora_error("LoRA path is empty")
    if "\x00" in path:
        raise _lora_error("LoRA path contains a NUL byte")
    raw = Path(path)
    if not raw.name.lower().endswith(".safetensors"):
        raise _lora_error(f"LoRA {path!r} must be a .safetensors file (pickled .bin/.pt/.ckpt files are refused)",
                          "Convert it to safetensors, or use the .safetensors release of the LoRA.")
    if ".." in raw.parts:
        raise _lora_error(f"LoRA path {path!r} contains '..'")
    if not roots:
        raise _lora_error("no LoRA roots are configured, so no LoRA can be used",
                          "Configure paths.lora_roots and put the LoRA files there.")
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
                raise _lora_error(f"cannot access LoRA {path!r}: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise _lora_error(f"LoRA path {path!r} goes through a symlink ({current.name}), which is not allowed",
                                  "Copy the file into the LoRA root instead of linking it.")
        if st is None:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise _lora_error(f"LoRA {path!r} is not a regular file")
        return current
    shown = ", ".join(str(r) for r in roots)
    if raw.is_absolute():
        raise _lora_error(f"LoRA {path!r} is outside the LoRA roots ({shown})",
                          "Give the path relative to a LoRA root (paths.lora_roots).")
    raise _lora_error(f"LoRA file {path!r} not found under the LoRA roots ({shown})")


def _not_safetensors(label: str, why: str) -> JobError:
    return _lora_error(f"{label}: not a safetensors file ({why})")


def _parse_header(fh: Any, size: int, label: str) -> tuple[dict[str, Any], bytes]:
    """Read and check the header from ``fh`` at offset 0. Returns (header, the raw bytes read)."""
    head = fh.read(8)
    if len(head) < 8:
        raise _not_safetensors(label, "shorter than 8 bytes")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise _not_safetensors(label, f"header length {n} is more than {MAX_HEADER_BYTES} bytes")
    if n < 2 or 8 + n > size:
        raise _not_safetensors(label, f"header length {n} does not fit a {size}-byte file")
    raw = fh.read(n)
    if len(raw) != n:
        raise _not_safetensors(label, "truncated header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _not_safetensors(label, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(label, "the header is not a JSON object")
    data_len = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict):
                raise _not_safetensors(label, "__metadata__ is not an object")
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and all(isinstance(d, int) for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(isinstance(o, int) for o in entry["data_offsets"])):
            raise _not_safetensors(label, f"bad tensor entry {key[:80]!r}")
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise _lora_error(f"{label}: safetensors file is truncated or corrupt (tensor {key[:80]!r} lies "
                              "outside the file)")
    return header, head + raw


def read_safetensors_header(path: Path | str, roots: Sequence[Path | str] | None = None, *,
                            max_bytes: int = MAX_LORA_BYTES) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name → dtype/shape/offsets, plus ``__metadata__``).

    Opened with :func:`daemon.fsutil.open_confined` (O_NOFOLLOW, regular file, at most ``max_bytes``)
    inside ``roots`` (default: the file's own folder, which checks only the file itself).
    """
    path = Path(path)
    roots = list(roots) if roots is not None else [path.parent]
    try:
        with open_confined(path, roots, max_bytes=max_bytes) as fh:
            size = os.fstat(fh.fileno()).st_size
            header, _ = _parse_header(fh, size, path.name)
    except ValueError as exc:
        raise _lora_error(f"LoRA {path.name}: {exc}") from None
    return header


def read_safetensors_keys(path: Path | str, roots: Sequence[Path | str] | None = None, *,
                          max_bytes: int = MAX_LORA_BYTES) -> list[str]:
    """The tensor names of a safetensors file, read from its header without torch (see
    :func:`read_safetensors_header`). Raises JobError(invalid_lora, "... not a safetensors file ...")."""
    return [k for k in read_safetensors_header(path, roots, max_bytes=max_bytes) if k != "__metadata__"]


# (st_dev, st_ino, st_size, st_mtime_ns) -> (sha256, header): a LoRA reused by many jobs is hashed once.
_INSPECT_CACHE: "OrderedDict[tuple[int, int, int, int], tuple[str, dict[str, Any]]]" = OrderedDict()
_INSPECT_CACHE_SIZE = 256


def _inspect_lora(path: Path, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """Open once (O_NOFOLLOW): parse the header and hash the whole file from the same descriptor."""
    try:
        with open_confined(path, [path.parent], max_bytes=max_bytes) as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = _INSPECT_CACHE.get(key)
            if cached is not None:
                _INSPECT_CACHE.move_to_end(key)
                return cached
            header, raw = _parse_header(fh, st.st_size, path.name)
            h = hashlib.sha256(raw)
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except ValueError as exc:
        raise _lora_error(f"LoRA {path.name}: {exc}") from None
    result = (h.hexdigest(), header)
    _INSPECT_CACHE[key] = result
    while len(_INSPECT_CACHE) > _INSPECT_CACHE_SIZE:
        _INSPECT_CACHE.popitem(last=False)
    return result


def _read_model_header(path: Path) -> dict[str, Any]:
    # Model folders are trusted (found by daemon.models); HF cache snapshots are symlinks, so follow them.
    with open(path, "rb") as fh:
        header, _ = _parse_header(fh, os.fstat(fh.fileno()).st_size, str(path))
    return header


_MODEL_CACHE: dict[tuple[str, int], dict[str, list[int] | None]] = {}


def transformer_header(model_folder: Path | str, subfolder: str = "transformer") -> dict[str, list[int] | None]:
    """Weight name → shape of a diffusers model folder's transformer, from its safetensors header(s).

    Reads ``<subfolder>/diffusion_pytorch_model.safetensors``, or the sharded
    ``diffusion_pytorch_model.safetensors.index.json`` and its shards' headers (headers only: a few hundred
    KB even for A14B). No torch. Raises JobError(model_not_found) when neither exists.
    """
    folder = Path(model_folder) / subfolder
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    source = index if index.is_file() else single if single.is_file() else None
    if source is None:
        raise JobError(Category.MODEL_NOT_FOUND, f"{folder} holds no diffusion_pytorch_model.safetensors (or its "
                       "sharded index), so LoRAs cannot be checked against it")
    cache_key = (str(source.resolve()), source.stat().st_mtime_ns)
    cached = _MODEL_CACHE.get(cache_key)
    if cached is not None:
        return cached
    shapes: dict[str, list[int] | None] = {}
    try:
        if source is index:
            if index.stat().st_size > MAX_HEADER_BYTES:
                raise ValueError("index file too large")
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError("no weight_map")
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / str(shard)
                if Path(str(shard)).is_absolute() or ".." in Path(str(shard)).parts:
                    raise ValueError(f"odd shard name {shard!r}")
                if shard_path.is_file():
                    for k, v in _read_model_header(shard_path).items():
                        if k != "__metadata__":
                            shapes[k] = v["shape"]
            for k in weight_map:
                shapes.setdefault(k, None)
        else:
            for k, v in _read_model_header(single).items():
                if k != "__metadata__":
                    shapes[k] = v["shape"]
    except JobError as exc:
        raise JobError(Category.MODEL_NOT_FOUND, f"transformer weights of {model_folder} are unreadable: "
                       f"{exc.message}") from None
    except (OSError, ValueError) as exc:
        raise JobError(Category.MODEL_NOT_FOUND, f"transformer weights of {model_folder} are unreadable: {exc}") \
            from None
    if len(_MODEL_CACHE) > 32:
        _MODEL_CACHE.clear()
    _MODEL_CACHE[cache_key] = shapes
    return shapes


def transformer_keys(model_folder: Path | str, subfolder: str = "transformer") -> list[str]:
    """Weight names (``blocks.0.attn1.to_q.weight``, ...) of a model folder's transformer; no torch."""
    return list(transformer_header(model_folder, subfolder))


# --------------------------------------------------------------------------------------------------
# LoRA key names → diffusers module names
# --------------------------------------------------------------------------------------------------

# Original Wan (and ComfyUI, "diffusion_model." prefix) module names → diffusers WanTransformer3DModel names,
# exactly the ones diffusers' _convert_non_diffusers_wan_lora_to_diffusers maps.
_WAN_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_WAN_IMG = {"k_img": "add_k_proj", "v_img": "add_v_proj"}
_WAN_FFN = {"0": "net.0.proj", "2": "net.2"}
_WAN_TOP = {
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_WAN_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(?:(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)|ffn\.(0|2))$")
_WAN_KEY_RE = re.compile(r"^(.+)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha|diff|diff_b)$")
_WAN_KIND = {"lora_down.weight": "A", "lora_A.weight": "A", "lora_up.weight": "B", "lora_B.weight": "B",
             "alpha": "alpha", "diff": "full", "diff_b": "bias"}

_MUSUBI_MOD_RE = re.compile(r"^blocks_(\d+)_(?:(self_attn|cross_attn)_(q|k|v|o|k_img|v_img)|ffn_(0|2))$")

# diffusers / peft: [transformer. | base_model.model.]<module>.lora_A[.<adapter>].weight, lora_B ... .bias, ...
_PEFT_KEY_RE = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.([A-Za-z0-9_\-]+))?\.(weight|bias)$")
_PEFT_MAG_RE = re.compile(r"^(.+)\.lora_magnitude_vector(?:\.([A-Za-z0-9_\-]+))?(?:\.weight)?$")
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "unet.", "vae.")


def _map_wan_module(name: str, is_i2v: bool) -> str | None:
    m = _WAN_BLOCK_RE.match(name)
    if m:
        block, attn, proj, ffn = m.groups()
        if ffn is not None:
            return f"blocks.{block}.ffn.{_WAN_FFN[ffn]}"
        which = "attn1" if attn == "self_attn" else "attn2"
        if proj in _WAN_IMG:
            return f"blocks.{block}.attn2.{_WAN_IMG[proj]}" if (attn == "cross_attn" and is_i2v) else None
        return f"blocks.{block}.{which}.{_WAN_ATTN[proj]}"
    return _WAN_TOP.get(name)


def canonical_diffusers_key(key: str) -> str | None:
    """The key diffusers' Wan loader expects (``transformer.<module>.lora_A.weight``) for a diffusers / peft
    LoRA key; None for keys of other components (text encoder, ...) that the Wan loader skips."""
    if key.startswith(_OTHER_COMPONENTS):
        return None
    rest = key
    for prefix in ("transformer.", "base_model.model."):
        if rest.startswith(prefix):
            rest = rest[len(prefix):]
            break
    m = _PEFT_KEY_RE.match(rest)
    if m:
        module, kind, _adapter, param = m.groups()
        return f"transformer.{module}.{kind}.{param}"
    m = _PEFT_MAG_RE.match(rest)
    if m:
        return f"transformer.{m.group(1)}.lora_magnitude_vector"
    return f"transformer.{rest}"


@dataclass
class KeyAnalysis:
    """What diffusers would do with a LoRA file's keys."""

    format: Literal["diffusers", "wan", "musubi"]
    # (diffusers module name, kind: A | B | bias | alpha | full | magnitude, original key)
    targets: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # keys diffusers skips (norm diffs, other components)
    problems: list[str] = field(default_factory=list)  # reasons diffusers would refuse the file

    @property
    def modules(self) -> list[str]:
        return sorted({t[0] for t in self.targets})

    @property
    def needs_rename(self) -> bool:
        """A diffusers/peft file whose keys diffusers would skip or misread as they are (``.default`` adapter
        segments, no ``transformer.`` prefix): the worker renames them before loading."""
        return self.format == "diffusers" and any(canonical_diffusers_key(k) not in (None, k)
                                                  for _, _, k in self.targets)


def _analyse_wan(keys: list[str]) -> KeyAnalysis:
    a = KeyAnalysis("wan")
    stripped = {}
    for k in keys:
        if not k.startswith("diffusion_model."):
            a.problems.append(f"key {k!r} lacks the 'diffusion_model.' prefix the other keys have")
            continue
        stripped[k] = k[len("diffusion_model."):]
    names = list(stripped.values())
    if not any(n.startswith("blocks.") for n in names):
        a.problems.append("a Wan-format LoRA needs weights for at least one transformer block (blocks.N.*)")
    is_i2v = any("k_img" in n for n in names) and any("v_img" in n for n in names)
    has_tp_weight = any(n.startswith("time_projection") and n.endswith(".weight") for n in names)
    for new, old in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
        # the converter uses one name per file: with any lora_A key, lora_down keys are left over (and refused)
        if any(new in n for n in names) and any(old in n for n in names):
            a.problems.append(f"the file mixes {new} and {old} names")
    modules_with_a = {m.group(1) for n in names if (m := _WAN_KEY_RE.match(n)) and _WAN_KIND[m.group(2)] == "A"}
    for k, n in stripped.items():
        m = _WAN_KEY_RE.match(n)
        if not m:
            a.problems.append(f"unsupported key {k!r}")
            continue
        module, suffix = m.groups()
        kind = _WAN_KIND[suffix]
        if kind in ("full", "bias") and "norm" in n:
            a.ignored.append(k)  # diffusers drops norm-layer diffs
            continue
        if "time_projection" in n and not has_tp_weight:
            a.ignored.append(k)
            continue
        mapped = _map_wan_module(module, is_i2v)
        if kind == "full":
            if module == "head.head":
                if "head.head.diff_b" not in names:  # the converter sizes the identity lora_B from diff_b
                    a.problems.append(f"key {k!r}: diffusers' converter needs head.head.diff_b with it")
                a.targets.append(("proj_out", "full", k))
            else:
                a.ignored.append(k)  # full-weight diffs: diffusers' converter leaves them out
            continue
        if kind == "bias":
            if mapped is None:
                a.ignored.append(k)
            elif module.startswith(("text_embedding.", "time_embedding.")) and module not in modules_with_a:
                a.problems.append(f"key {k!r}: diffusers' converter needs the lora_down/lora_up weights of "
                                  f"{module} too")
            else:
                a.targets.append((mapped, "bias", k))
            continue
        if mapped is None:
            a.problems.append(f"key {k!r}: diffusers has no mapping for module {module!r}")
            continue
        a.targets.append((mapped, kind, k))
    return a


def _analyse_musubi(keys: list[str]) -> KeyAnalysis:
    a = KeyAnalysis("musubi")
    present: set[tuple[str, str]] = set()
    for k in keys:
        if not k.startswith("lora_unet_"):
            a.problems.append(f"key {k!r} lacks the 'lora_unet_' prefix the other keys have")
            continue
        module, _, suffix = k[len("lora_unet_"):].partition(".")
        m = _MUSUBI_MOD_RE.match(module)
        if not m or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            a.problems.append(f"unsupported key {k!r}")
            continue
        present.add((module, suffix))
        block, attn, proj, ffn = m.groups()
        wan = f"blocks.{block}." + (f"ffn.{ffn}" if ffn is not None else f"{attn}.{proj}")
        mapped = _map_wan_module(wan, is_i2v=True)
        if mapped is None:  # k_img / v_img under self_attn
            a.problems.append(f"unsupported key {k!r}")
            continue
        a.targets.append((mapped, _WAN_KIND[suffix], k))
    # diffusers' musubi converter pops every projection of every block 0..n-1, with its alpha.
    blocks = {int(mod.split("_")[1]) for mod, _ in present}
    if blocks and blocks != set(range(len(blocks))):
        a.problems.append(f"musubi LoRA blocks must be numbered 0..{len(blocks) - 1}; got {sorted(blocks)[:8]}")
    is_i2v = any("k_img" in mod for mod, _ in present) and any("v_img" in mod for mod, _ in present)
    projections = [f"self_attn_{p}" for p in "qkvo"] + [f"cross_attn_{p}" for p in "qkvo"] + ["ffn_0", "ffn_2"]
    if is_i2v:
        projections += ["cross_attn_k_img", "cross_attn_v_img"]
    missing = [f"lora_unet_blocks_{b}_{p}.{s}" for b in sorted(blocks) for p in projections
               for s in ("lora_down.weight", "lora_up.weight", "alpha") if (f"blocks_{b}_{p}", s) not in present]
    if missing:
        a.problems.append(f"diffusers' musubi converter needs every attention/ffn projection of every block with "
                          f"its alpha; {len(missing)} keys are missing, e.g. {', '.join(missing[:3])}")
    return a


def _analyse_diffusers(keys: list[str]) -> KeyAnalysis:
    a = KeyAnalysis("diffusers")
    for k in keys:
        if "dora_scale" in k:
            a.ignored.append(k)  # diffusers filters DoRA scales out
            continue
        if "lora" not in k:  # LoKr (lokr_w1 ...) and plain weights: WanLoraLoaderMixin refuses the whole file
            a.problems.append(f"key {k!r} is not a LoRA weight (diffusers' Wan loader requires 'lora' in every key)")
            continue
        canon = canonical_diffusers_key(k)
        if canon is None:
            a.ignored.append(k)  # another component's weights (text encoder, ...): the Wan loader skips them
            continue
        rest = canon[len("transformer."):]
        m = _PEFT_KEY_RE.match(rest)
        if m:
            module, kind, _, param = m.groups()
            a.targets.append((module, "bias" if param == "bias" else kind[-1], k))
            continue
        m = _PEFT_MAG_RE.match(rest)
        if m:
            a.targets.append((m.group(1), "magnitude", k))
            continue
        a.problems.append(f"unrecognised LoRA key {k!r}")
    return a


def analyse_lora_keys(keys: Iterable[str]) -> KeyAnalysis:
    """Classify a LoRA file's keys the way diffusers' ``WanLoraLoaderMixin.lora_state_dict`` would: Wan /
    ComfyUI (``diffusion_model.``), musubi (``lora_unet_``) or diffusers / peft, and map every key to the
    diffusers module it changes."""
    keys = [k for k in keys if k != "__metadata__"]
    if any(k.startswith("diffusion_model.") for k in keys):
        return _analyse_wan(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return _analyse_musubi(keys)
    return _analyse_diffusers(keys)


def _as_shapes(keys: Iterable[str] | Mapping[str, Any]) -> dict[str, list[int] | None]:
    if isinstance(keys, Mapping):
        out: dict[str, list[int] | None] = {}
        for k, v in keys.items():
            if k == "__metadata__":
                continue
            shape = v.get("shape") if isinstance(v, Mapping) else v
            out[k] = list(shape) if isinstance(shape, (list, tuple)) else None
        return out
    return {k: None for k in keys if k != "__metadata__"}


def _examples(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (", ..." if len(items) > n else "")


def check_lora_fits(lora_keys: Iterable[str] | Mapping[str, Any],
                    transformer_keys: Iterable[str] | Mapping[str, Any]) -> KeyAnalysis:
    """Raise JobError(invalid_lora) unless every module the LoRA changes exists in the transformer.

    ``lora_keys`` / ``transformer_keys``: tensor names, or safetensors headers / name → shape mappings; when
    both carry shapes, the LoRA's input/output sizes must match the model's layers too (this is what tells a
    Wan2.1-1.3B or TI2V-5B LoRA from an A14B one). LoRA names may be diffusers/peft
    (``transformer.blocks.0.attn1.to_q.lora_A[.default].weight``), original Wan / ComfyUI
    (``diffusion_model.blocks.0.self_attn.q.lora_down.weight``, ``.alpha``, ``.diff``, ``.diff_b``) or
    musubi (``lora_unet_blocks_0_self_attn_q.lora_down.weight``). Returns the key analysis.
    """
    lora = _as_shapes(lora_keys)
    model = _as_shapes(transformer_keys)
    analysis = analyse_lora_keys(lora)
    if analysis.problems:
        more = len(analysis.problems) - 3
        raise _lora_error(f"diffusers cannot load this LoRA ({analysis.format} format): "
                          f"{'; '.join(analysis.problems[:3])}" + (f" (and {more} more problems)" if more > 0 else ""),
                          problems=analysis.problems[:20])
    if not analysis.targets:
        raise _lora_error("the file holds no LoRA weights for the Wan transformer"
                          + (f" ({len(analysis.ignored)} keys for other components)" if analysis.ignored else ""))
    model_modules = {k.rsplit(".", 1)[0] for k in model if "." in k}
    modules = analysis.modules
    missing = [m for m in modules if m not in model_modules]
    if missing:
        raise _lora_error(
            f"LoRA does not fit this model: {len(missing)} of the {len(modules)} modules it changes do not exist "
            f"in the transformer (e.g. {_examples(missing)})", _SUGGEST_FIT, missing_modules=missing[:50],
            missing_count=len(missing))
    mismatched: list[str] = []
    rank_of: dict[str, int] = {}
    for module, kind, key in analysis.targets:
        shape, weight = lora.get(key), model.get(module + ".weight")
        if not shape or not weight or len(weight) != 2:
            continue
        out_f, in_f = weight
        if kind == "A":
            if len(shape) != 2 or shape[1] != in_f:
                mismatched.append(f"{module} (LoRA input size {shape[-1]}, model {in_f})")
            elif module in rank_of and rank_of[module] != shape[0]:
                mismatched.append(f"{module} (lora_A and lora_B ranks differ)")
            else:
                rank_of.setdefault(module, shape[0])
        elif kind == "B":
            if len(shape) != 2 or shape[0] != out_f:
                mismatched.append(f"{module} (LoRA output size {shape[0]}, model {out_f})")
            elif module in rank_of and rank_of[module] != shape[1]:
                mismatched.append(f"{module} (lora_A and lora_B ranks differ)")
            else:
                rank_of.setdefault(module, shape[1])
        elif kind == "bias" and shape != [out_f]:
            mismatched.append(f"{module} (LoRA bias size {shape}, model {out_f})")
        elif kind == "full" and shape != weight:
            mismatched.append(f"{module} (LoRA diff shape {shape}, model {weight})")
    if mismatched:
        mismatched = sorted(set(mismatched))
        raise _lora_error(f"LoRA does not fit this model: {len(mismatched)} layers have other sizes "
                          f"(e.g. {_examples(mismatched)})", _SUGGEST_FIT, mismatched=mismatched[:50])
    return analysis


# --------------------------------------------------------------------------------------------------
# Everything, for one job
# --------------------------------------------------------------------------------------------------


def validate(loras: Sequence[LoraSpec | Mapping[str, Any]], roots: Sequence[Path | str],
             model_folder: Path | str | None, two_experts: bool, *,
             max_bytes: int = MAX_LORA_BYTES) -> list[ResolvedLora]:
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
                raise _lora_error(f"expert {spec.expert!r} needs a two-expert (A14B) model with a low-noise "
                                  "transformer; this model has one transformer", "Use expert: high.")
            path = resolve_lora_path(spec.path, roots)
            sha, header = _inspect_lora(path, max_bytes)
            for comp in EXPERT_COMPONENTS[spec.expert]:
                if (sha, comp) in seen:
                    raise _lora_error(f"the same LoRA file is already listed as loras[{seen[sha, comp]}] for "
                                      f"{comp}", "List each LoRA once per expert; use strength to weight it.")
                seen[sha, comp] = i
            fmt = analyse_lora_keys(header).format
            if model_folder is not None:
                for comp in EXPERT_COMPONENTS[spec.expert]:
                    sub = comp if (Path(model_folder) / comp).is_dir() else "transformer"
                    fmt = check_lora_fits(header, transformer_header(model_folder, sub)).format
        except JobError as exc:
            if exc.category is not Category.INVALID_LORA:
                raise
            raise JobError(Category.INVALID_LORA, f"{where}: {exc.message}", exc.suggestions,
                           {**exc.details, "lora_index": i, "lora_path": spec.path}) from None
        out.append(ResolvedLora(path=str(path), sha256=sha, strength=float(spec.strength), expert=spec.expert,
                                format=fmt))
    return out


# --------------------------------------------------------------------------------------------------
# Worker side: adapters on a warm pipeline
# --------------------------------------------------------------------------------------------------


class LoraApplied(NamedTuple):
    active: list[str]  # adapter names active for this job (for the sidecar), in job order
    loaded: bool  # whether any adapter was loaded from disk for this job


class LoraManager:
    """Keeps LoRA adapters on one loaded pipeline (one per pipeline cache entry; pipelines made with
    ``from_pipe`` share its transformers and can share its manager too).

    Adapters stay loaded once loaded (named ``l_<sha256[:16]>``, so a file is loaded once per transformer);
    each :meth:`apply` activates exactly the job's ones on each transformer and disables the rest, so the
    base weights are never touched or reloaded. At most ``max_adapters`` adapters stay per transformer; the
    least recently used inactive ones are deleted beyond that.

    Strength 0 is treated as "not active" (not loaded, not computed): the output is then exactly the base
    model's. (``set_adapters`` with weight 0 is bit-exact too with peft's LoRA layers, as tested, but costs the
    extra matmuls.)
    """

    def __init__(self, max_adapters: int = 8) -> None:
        self.max_adapters = max(1, int(max_adapters))
        self._verified: set[str] = set()  # sha256s checked against the file content
        self._lru: "OrderedDict[tuple[str, str], None]" = OrderedDict()  # (component, adapter name)

    @staticmethod
    def adapters_on(pipe: Any) -> dict[str, list[str]]:
        """Adapter names loaded on each transformer of ``pipe``."""
        out = {}
        for comp in ("transformer", "transformer_2"):
            model = getattr(pipe, comp, None)
            if model is not None:
                out[comp] = list(getattr(model, "peft_config", None) or {})
        return out

    def apply(self, pipe: Any, loras: Sequence[Mapping[str, Any] | ResolvedLora]) -> LoraApplied:
        wanted: dict[str, list[tuple[str, float]]] = {"transformer": [], "transformer_2": []}
        plan: list[tuple[dict[str, Any], str, str]] = []
        for item in loras:
            entry = item.model_dump() if isinstance(item, ResolvedLora) else dict(item)
            strength = float(entry.get("strength", 1.0))
            expert = entry.get("expert", "high")
            if expert not in EXPERT_COMPONENTS:
                raise _lora_error(f"unknown LoRA expert {expert!r}")
            for comp in EXPERT_COMPONENTS[expert]:
                if getattr(pipe, comp, None) is None:
                    raise _lora_error(f"LoRA {Path(entry['path']).name}: expert {expert!r} needs {comp}, which "
                                      "this pipeline does not have (one-transformer model)", "Use expert: high.")
            if strength == 0:
                continue
            name = adapter_name(entry["sha256"])
            for comp in EXPERT_COMPONENTS[expert]:
                if any(n == name for n, _ in wanted[comp]):
                    raise _lora_error(f"LoRA {Path(entry['path']).name} is listed twice for {comp}")
                wanted[comp].append((name, strength))
                plan.append((entry, comp, name))
        loaded = False
        for entry, comp, name in plan:
            model = getattr(pipe, comp)
            if name not in (getattr(model, "peft_config", None) or {}):
                self._load(pipe, comp, name, entry)
                loaded = True
            self._lru.pop((comp, name), None)
            self._lru[(comp, name)] = None
        self._evict(pipe, wanted)
        for comp in ("transformer", "transformer_2"):
            model = getattr(pipe, comp, None)
            if model is None or not getattr(model, "peft_config", None):
                continue
            if wanted[comp]:
                # disable_lora() sticks: set_adapters() alone does not turn the layers back on.
                model.enable_lora()
                model.set_adapters([n for n, _ in wanted[comp]], [w for _, w in wanted[comp]])
            else:
                model.disable_lora()
        active: list[str] = []
        for _, _, name in plan:
            if name not in active:
                active.append(name)
        return LoraApplied(active, loaded)

    def _evict(self, pipe: Any, wanted: dict[str, list[tuple[str, float]]]) -> None:
        for comp in ("transformer", "transformer_2"):
            model = getattr(pipe, comp, None)
            names = list(getattr(model, "peft_config", None) or {}) if model is not None else []
            excess = len(names) - self.max_adapters
            if excess <= 0:
                continue
            keep = {n for n, _ in wanted[comp]}
            order = [n for (c, n) in self._lru if c == comp]
            candidates = [n for n in names if n not in order] + order  # unknown ones first, then LRU order
            victims = [n for n in candidates if n in names and n not in keep][:excess]
            if victims:
                model.delete_adapters(victims)
                for n in victims:
                    self._lru.pop((comp, n), None)

    def _load(self, pipe: Any, comp: str, name: str, entry: Mapping[str, Any]) -> None:
        path = Path(entry["path"])
        label = path.name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise _lora_error(f"LoRA {label} is gone ({path})") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise _lora_error(f"LoRA {label} is no longer a regular file")
        sha = entry["sha256"]
        if sha not in self._verified:
            digest = hashlib.sha256()
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != sha:
                raise _lora_error(f"LoRA {label} changed after the job was accepted (sha256 differs)",
                                  "Submit the job again.")
            self._verified.add(sha)
        source: Any = str(path)
        keys = read_safetensors_keys(path)
        analysis = analyse_lora_keys(keys)
        if analysis.needs_rename:
            # diffusers would skip un-prefixed keys and misread ".default" adapter segments (it then keeps the
            # freshly initialised LoRA weights): hand it the renamed state dict instead of the path.
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
            source = {}
            for k, v in raw.items():
                canon = canonical_diffusers_key(k)
                if canon is not None:
                    source[canon] = v
        kwargs: dict[str, Any] = {"adapter_name": name}
        if isinstance(source, str):
            kwargs.update(use_safetensors=True, local_files_only=True)  # never fall back to pickle
        if comp == "transformer_2":
            kwargs["load_into_transformer_2"] = True
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters per model is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(source, **kwargs)
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated at this boundary
            classified = classify_exception(exc)
            if classified.category in (Category.OUT_OF_MEMORY, Category.DISK_FULL):
                raise classified from exc
            raise _lora_error(f"diffusers could not load LoRA {label} into {comp}: {type(exc).__name__}: "
                              f"{str(exc)[:500]}") from exc
        model = getattr(pipe, comp)
        if name not in (getattr(model, "peft_config", None) or {}):
            raise _lora_error(f"LoRA {label}: diffusers found no weights for the Wan transformer in it")


__all__ = [
    "LoraSpec", "ResolvedLora", "PRESETS", "apply_preset", "resolve_lora_path", "read_safetensors_header",
    "read_safetensors_keys", "transformer_header", "transformer_keys", "analyse_lora_keys", "check_lora_fits",
    "canonical_diffusers_key", "validate", "adapter_name", "LoraManager", "LoraApplied", "EXPERT_COMPONENTS",
    "MAX_LORA_BYTES", "MAX_HEADER_BYTES",
]
