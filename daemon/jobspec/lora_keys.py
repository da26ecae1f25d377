"""What diffusers would do with a LoRA file's tensor names, and whether they fit a model. Pure: no I/O, no torch.

LoRA files come in three namings, all of which diffusers' ``WanLoraLoaderMixin`` loads: diffusers / peft
(``transformer.blocks.0.attn1.to_q.lora_A[.default].weight``), original Wan / ComfyUI
(``diffusion_model.blocks.0.self_attn.q.lora_down.weight``, ``.alpha``, ``.diff``, ``.diff_b``) and musubi
(``lora_unet_blocks_0_self_attn_q.lora_down.weight``). :func:`analyse_lora_keys` maps each key to the diffusers
module it changes (or says why diffusers would refuse the file); :func:`check_lora_fits` checks those modules,
and their sizes when known, against a transformer's weights (read by :mod:`daemon.jobspec.lora_files`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.errors import Category, JobError

SUGGEST_FIT = "Use a LoRA trained for this model (Wan2.2 A14B and TI2V-5B LoRAs are not interchangeable)."


def lora_error(message: str, *suggestions: str, **details: Any) -> JobError:
    """Every LoRA refusal: ``JobError(invalid_lora, message, suggestions, details)``."""
    return JobError(Category.INVALID_LORA, message, list(suggestions), dict(details))


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
_WAN_KIND = {
    "lora_down.weight": "A",
    "lora_A.weight": "A",
    "lora_up.weight": "B",
    "lora_B.weight": "B",
    "alpha": "alpha",
    "diff": "full",
    "diff_b": "bias",
}

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
            rest = rest[len(prefix) :]
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
        return self.format == "diffusers" and any(
            canonical_diffusers_key(k) not in (None, k) for _, _, k in self.targets
        )


def _analyse_wan(keys: list[str]) -> KeyAnalysis:
    a = KeyAnalysis("wan")
    stripped = {}
    for k in keys:
        if not k.startswith("diffusion_model."):
            a.problems.append(f"key {k!r} lacks the 'diffusion_model.' prefix the other keys have")
            continue
        stripped[k] = k[len("diffusion_model.") :]
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
        if kind == "alpha" and not module.startswith("blocks."):
            # diffusers' converter scales by alpha only inside the blocks: any other alpha is left over, refused
            a.problems.append(f"key {k!r}: diffusers' converter reads alpha only for transformer blocks")
            continue
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
                a.problems.append(
                    f"key {k!r}: diffusers' converter needs the lora_down/lora_up weights of {module} too"
                )
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
        module, _, suffix = k[len("lora_unet_") :].partition(".")
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
    missing = [
        f"lora_unet_blocks_{b}_{p}.{s}"
        for b in sorted(blocks)
        for p in projections
        for s in ("lora_down.weight", "lora_up.weight", "alpha")
        if (f"blocks_{b}_{p}", s) not in present
    ]
    if missing:
        a.problems.append(
            f"diffusers' musubi converter needs every attention/ffn projection of every block with "
            f"its alpha; {len(missing)} keys are missing, e.g. {', '.join(missing[:3])}"
        )
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
        rest = canon[len("transformer.") :]
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


def check_lora_fits(
    lora_keys: Iterable[str] | Mapping[str, Any], transformer_keys: Iterable[str] | Mapping[str, Any]
) -> KeyAnalysis:
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
        raise lora_error(
            f"diffusers cannot load this LoRA ({analysis.format} format): "
            f"{'; '.join(analysis.problems[:3])}" + (f" (and {more} more problems)" if more > 0 else ""),
            problems=analysis.problems[:20],
        )
    if not analysis.targets:
        raise lora_error(
            "the file holds no LoRA weights for the Wan transformer"
            + (f" ({len(analysis.ignored)} keys for other components)" if analysis.ignored else "")
        )
    model_modules = {k.rsplit(".", 1)[0] for k in model if "." in k}
    modules = analysis.modules
    missing = [m for m in modules if m not in model_modules]
    if missing:
        raise lora_error(
            f"LoRA does not fit this model: {len(missing)} of the {len(modules)} modules it changes do not exist "
            f"in the transformer (e.g. {_examples(missing)})",
            SUGGEST_FIT,
            missing_modules=missing[:50],
            missing_count=len(missing),
        )
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
        raise lora_error(
            f"LoRA does not fit this model: {len(mismatched)} layers have other sizes (e.g. {_examples(mismatched)})",
            SUGGEST_FIT,
            mismatched=mismatched[:50],
        )
    return analysis
