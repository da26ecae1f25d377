"""LoRA support: the daemon-side checks without torch (daemon/jobspec/lora.py, lora_files.py, lora_keys.py), and
the worker-side adapter manager (daemon/worker/lora.py) on the real tiny Wan pipelines. The test LoRAs are made
with peft on the tiny transformers and saved with diffusers' own ``save_lora_weights``, plus copies renamed to
the original Wan / ComfyUI and musubi key names."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from daemon.errors import Category, JobError
from daemon.jobspec import lora as L
from daemon.jobspec import lora_files as F
from daemon.jobspec import lora_keys as K
from daemon.worker import lora as W

RANK = 4
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
FULL = ATTN + ["net.0.proj", "net.2"]

# diffusers module names -> original Wan names (the inverse of the mapping the loader applies)
_TO_WAN = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A valid safetensors file of F32 zeros, written without torch."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4 * int(np.prod(shape)) if shape else 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def _wan_module(module: str) -> str:
    """blocks.0.attn1.to_out.0 -> blocks.0.self_attn.o ; blocks.0.ffn.net.0.proj -> blocks.0.ffn.0"""
    if ".ffn.net.0.proj" in module:
        return module.replace(".ffn.net.0.proj", ".ffn.0")
    if ".ffn.net.2" in module:
        return module.replace(".ffn.net.2", ".ffn.2")
    parts = module.split(".")
    block, attn, proj = ".".join(parts[:2]), parts[2], ".".join(parts[3:])
    return f"{block}.{_TO_WAN[attn]}.{_TO_WAN[proj]}"


def to_wan(sd: dict) -> dict:
    import torch

    out = {}
    for key, value in sd.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        wan = "diffusion_model." + _wan_module(module)
        out[f"{wan}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{wan}.alpha"] = torch.tensor(float(RANK))
    return out


def to_musubi(sd: dict) -> dict:
    out = {}
    for key, value in to_wan(sd).items():
        module, suffix = re.match(r"^diffusion_model\.(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$", key).groups()
        out[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = value
    return out


@pytest.fixture(scope="module")
def lora_root(models_dir, tmp_path_factory) -> Path:
    """LoRA files made with peft on the tiny A14B transformer (its attention/ffn sizes are the tiny TI2V's too)."""
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("loras")
    transformer = WanTransformer3DModel.from_pretrained(models_dir / "tiny-t2v-a14b" / "transformer")

    def make(name: str, seed: int, targets: list[str]) -> dict:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(
                LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False), adapter_name=name
            )
        sd = get_peft_model_state_dict(transformer, adapter_name=name)
        WanPipeline.save_lora_weights(root, transformer_lora_layers=sd, weight_name=f"{name}.safetensors")
        return {f"transformer.{k}": v.clone() for k, v in sd.items()}

    a = make("a", 1, ATTN)
    make("b", 2, ["to_q", "to_v"])
    make("low", 3, ATTN)
    make("both", 4, ATTN)
    make("evict", 5, ATTN)
    full = make("full", 6, FULL)
    (root / "wan").mkdir()
    save_file(to_wan(full), str(root / "wan" / "full_wan.safetensors"))
    save_file(to_musubi(full), str(root / "wan" / "full_musubi.safetensors"))
    # peft's own naming: adapter segment in the key, no "transformer." prefix
    save_file(
        {k.removeprefix("transformer.").replace(".weight", ".default.weight"): v for k, v in a.items()},
        str(root / "a_default.safetensors"),
    )
    return root


# --------------------------------------------------------------------------------------------------
# Parent half
# --------------------------------------------------------------------------------------------------


def test_parent_half_imports_no_torch():
    code = (
        "import sys, daemon.jobspec.lora, daemon.jobspec.lora_files, daemon.jobspec.lora_keys, "
        "daemon.jobspec.resolve; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_lora_spec_is_strict():
    spec = L.LoraSpec.model_validate({"path": "x.safetensors"})
    assert (spec.strength, spec.expert) == (1.0, "high")
    assert L.LoraSpec.model_validate({"path": "x.safetensors", "strength": 2, "expert": "low"}).strength == 2.0
    for bad in (
        {"path": "x.safetensors", "strength": 4.5},
        {"path": "x.safetensors", "strength": -1},
        {"path": "x.safetensors", "strength": "1"},
        {"path": "x.safetensors", "expert": "mid"},
        {"path": "x.safetensors", "scale": 1.0},
        {"path": ""},
        {},
    ):
        with pytest.raises(ValidationError):
            L.LoraSpec.model_validate(bad)


def _invalid(fn, *args, match: str, **kwargs) -> JobError:
    with pytest.raises(JobError) as info:
        fn(*args, **kwargs)
    assert info.value.category is Category.INVALID_LORA, info.value
    assert match in info.value.message, info.value.message
    return info.value


def test_resolve_lora_path_confinement(tmp_path):
    root, outside = tmp_path / "loras", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    good = write_safetensors(root / "sub" / "ok.safetensors", {"x.lora_A.weight": [1, 1]})
    secret = write_safetensors(outside / "secret.safetensors", {"x.lora_A.weight": [1, 1]})
    assert L.resolve_lora_path("sub/ok.safetensors", [root]) == good.resolve()
    assert L.resolve_lora_path(str(good), [tmp_path / "nowhere", root]) == good.resolve()
    _invalid(L.resolve_lora_path, "../outside/secret.safetensors", [root], match="'..'")
    _invalid(L.resolve_lora_path, "sub/../sub/ok.safetensors", [root], match="'..'")
    _invalid(L.resolve_lora_path, str(secret), [root], match="outside the LoRA roots")
    os.symlink(secret, root / "link.safetensors")
    _invalid(L.resolve_lora_path, "link.safetensors", [root], match="symlink")
    os.symlink(outside, root / "linkdir")
    _invalid(L.resolve_lora_path, "linkdir/secret.safetensors", [root], match="symlink")
    (root / "model.bin").write_bytes(b"x")
    _invalid(L.resolve_lora_path, "model.bin", [root], match=".safetensors")
    _invalid(L.resolve_lora_path, "missing.safetensors", [root], match="not found")
    (root / "dir.safetensors").mkdir()
    _invalid(L.resolve_lora_path, "dir.safetensors", [root], match="not a regular file")
    _invalid(L.resolve_lora_path, "sub/ok.safetensors", [], match="no LoRA roots")


def test_read_safetensors_keys_rejects_garbage(tmp_path):
    good = write_safetensors(tmp_path / "ok.safetensors", {"a.lora_A.weight": [4, 32], "a.lora_B.weight": [32, 4]})
    assert F.read_safetensors_keys(good) == ["a.lora_A.weight", "a.lora_B.weight"]
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    _invalid(F.read_safetensors_keys, tmp_path / "short.safetensors", match="not a safetensors file")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    _invalid(F.read_safetensors_keys, tmp_path / "garbage.safetensors", match="not a safetensors file")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}" * 10)
    _invalid(F.read_safetensors_keys, tmp_path / "huge.safetensors", match="not a safetensors file")
    (tmp_path / "notjson.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8)
    _invalid(F.read_safetensors_keys, tmp_path / "notjson.safetensors", match="not JSON")
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    _invalid(F.read_safetensors_keys, tmp_path / "cut.safetensors", match="truncated")
    os.symlink(good, tmp_path / "link.safetensors")
    _invalid(F.read_safetensors_keys, tmp_path / "link.safetensors", match="symlink")
    _invalid(F.read_safetensors_keys, good, max_bytes=16, match="limit")


def test_transformer_keys_single_file_and_sharded_index(models_dir, tmp_path):
    keys = F.transformer_keys(models_dir / "tiny-t2v-a14b")
    assert "blocks.1.attn1.to_q.weight" in keys and not any(k.startswith("blocks.2.") for k in keys)
    assert F.transformer_header(models_dir / "tiny-t2v-a14b", "transformer_2")["blocks.0.attn1.to_q.weight"] == [32, 32]
    sharded = tmp_path / "m" / "transformer"
    sharded.mkdir(parents=True)
    write_safetensors(sharded / "s1.safetensors", {"blocks.0.attn1.to_q.weight": [8, 8]})
    write_safetensors(sharded / "s2.safetensors", {"proj_out.weight": [4, 8]})
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"blocks.0.attn1.to_q.weight": "s1.safetensors", "proj_out.weight": "s2.safetensors"},
            }
        )
    )
    assert F.transformer_header(tmp_path / "m") == {"blocks.0.attn1.to_q.weight": [8, 8], "proj_out.weight": [4, 8]}
    with pytest.raises(JobError) as info:
        F.transformer_keys(tmp_path / "nothing")
    assert info.value.category is Category.MODEL_NOT_FOUND


def test_check_lora_fits_names_and_shapes(models_dir):
    model = F.transformer_header(models_dir / "tiny-t2v-a14b")
    ok = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": [4, 32],
        "transformer.blocks.0.attn1.to_q.lora_B.weight": [32, 4],
        "transformer.blocks.1.ffn.net.2.lora_A.default.weight": [4, 64],
        "transformer.blocks.1.ffn.net.2.lora_B.default.weight": [32, 4],
    }
    assert K.check_lora_fits(ok, model).modules == ["blocks.0.attn1.to_q", "blocks.1.ffn.net.2"]
    K.check_lora_fits(list(ok), list(model))  # names only
    # made for a deeper model: blocks 2..7 do not exist in the 2-block tiny model
    deep = [f"transformer.blocks.{b}.attn1.{p}.lora_{ab}.weight" for b in range(8) for p in ATTN for ab in "AB"]
    err = _invalid(K.check_lora_fits, deep, model, match="24 of the 32 modules")
    assert "blocks.2.attn1.to_k" in err.message and err.details["missing_count"] == 24
    _invalid(
        K.check_lora_fits, ["transformer.blocks.0.attn1.to_qkv.lora_A.weight"], model, match="blocks.0.attn1.to_qkv"
    )
    # same names, other sizes (e.g. a LoRA for a model with a wider transformer)
    wide = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": [4, 64],
        "transformer.blocks.0.attn1.to_q.lora_B.weight": [64, 4],
    }
    _invalid(K.check_lora_fits, wide, model, match="other sizes")
    _invalid(K.check_lora_fits, ["transformer.blocks.0.attn1.to_q.alpha"], model, match="not a LoRA weight")
    _invalid(K.check_lora_fits, ["text_encoder.encoder.lora_A.weight"], model, match="no LoRA weights")
    _invalid(K.check_lora_fits, ["transformer.blocks.0.attn1.to_q.lokr_w1"], model, match="not a LoRA weight")


def test_check_lora_fits_wan_and_musubi_names(models_dir):
    model = F.transformer_header(models_dir / "tiny-t2v-a14b")
    wan = [
        "blocks.0.self_attn.q.DOWN.weight",
        "blocks.0.self_attn.q.UP.weight",
        "blocks.0.self_attn.q.alpha",
        "blocks.1.cross_attn.o.DOWN.weight",
        "blocks.1.cross_attn.o.UP.weight",
        "blocks.1.cross_attn.o.diff_b",
        "blocks.1.ffn.0.DOWN.weight",
        "blocks.1.ffn.2.UP.weight",
        "head.head.DOWN.weight",
        "time_embedding.0.DOWN.weight",
        "time_embedding.0.UP.weight",
        "blocks.0.norm3.diff",
        "blocks.0.norm3.diff_b",
        "blocks.0.modulation.diff",
    ]
    for down, up in (("lora_down", "lora_up"), ("lora_A", "lora_B")):  # ComfyUI / original Wan trainers
        keys = ["diffusion_model." + k.replace("DOWN", down).replace("UP", up) for k in wan]
        analysis = K.check_lora_fits(keys, model)
        assert analysis.format == "wan"
        assert analysis.modules == [
            "blocks.0.attn1.to_q",
            "blocks.1.attn2.to_out.0",
            "blocks.1.ffn.net.0.proj",
            "blocks.1.ffn.net.2",
            "condition_embedder.time_embedder.linear_1",
            "proj_out",
        ]
        assert len(analysis.ignored) == 3  # norm diffs and a full-weight diff: diffusers drops them
    _invalid(
        K.check_lora_fits,
        ["diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.k.lora_A.weight"],
        model,
        match="mixes",
    )
    _invalid(
        K.check_lora_fits, ["diffusion_model.blocks.7.self_attn.q.lora_down.weight"], model, match="blocks.7.attn1.to_q"
    )
    _invalid(
        K.check_lora_fits, ["diffusion_model.blocks.0.self_attn.norm_q.lora_down.weight"], model, match="no mapping"
    )
    # image-to-video projections (Wan2.1 I2V) do not exist in Wan2.2's transformers
    _invalid(
        K.check_lora_fits,
        [
            "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight",
            "diffusion_model.blocks.0.cross_attn.v_img.lora_down.weight",
        ],
        model,
        match="add_k_proj",
    )
    musubi = [
        f"lora_unet_blocks_{b}_{p}.{s}"
        for b in range(2)
        for p in [
            "self_attn_q",
            "self_attn_k",
            "self_attn_v",
            "self_attn_o",
            "cross_attn_q",
            "cross_attn_k",
            "cross_attn_v",
            "cross_attn_o",
            "ffn_0",
            "ffn_2",
        ]
        for s in ("lora_down.weight", "lora_up.weight", "alpha")
    ]
    assert K.check_lora_fits(musubi, model).format == "musubi"
    _invalid(K.check_lora_fits, musubi[3:], model, match="keys are missing")  # diffusers' converter would crash
    _invalid(K.check_lora_fits, [k.replace("blocks_1_", "blocks_7_") for k in musubi], model, match="numbered 0..1")


def test_presets():
    hi = L.LoraSpec(path="lightning/high_noise_model.safetensors", expert="high")
    lo = L.LoraSpec(path="lightning/low_noise_model.safetensors", expert="low")
    params, loras = L.apply_preset("lightning-4step", [hi, lo], {}, two_experts=True)
    assert params == {"steps": 4, "guidance_scale": 1.0, "guidance_scale_2": 1.0, "flow_shift": 5.0}
    assert loras == [hi, lo]
    params, _ = L.apply_preset("lightning-4step", [hi, lo], {"steps": 6, "flow_shift": None})
    assert params == {"guidance_scale": 1.0, "guidance_scale_2": 1.0, "flow_shift": 5.0}
    _invalid(L.apply_preset, "lightning-4step", [hi], {}, two_experts=True, match="two LoRA files")
    _invalid(
        L.apply_preset,
        "lightning-4step",
        [hi, hi.model_copy(update={"expert": "both"})],
        {},
        two_experts=True,
        match="two LoRA files",
    )
    params, _ = L.apply_preset("lightning-4step", [hi], {}, two_experts=False)  # TI2V-5B: one LoRA, expert high
    assert params == {"steps": 4, "guidance_scale": 1.0, "flow_shift": 5.0}
    _invalid(L.apply_preset, "lightning-4step", [hi, lo], {}, two_experts=False, match="expert: high")
    _invalid(L.apply_preset, "lightning-4step", [], {}, two_experts=False, match="expert: high")
    with pytest.raises(JobError) as info:
        L.apply_preset("turbo", [hi, lo], {})
    assert info.value.category is Category.INVALID_SPEC and "lightning-4step" in info.value.message
    assert "4 denoising steps" in L.apply_preset.__doc__


def test_validate(lora_root, models_dir):
    a14b, ti2v = models_dir / "tiny-t2v-a14b", models_dir / "tiny-ti2v-5b"
    specs = [L.LoraSpec(path="a.safetensors", strength=0.5), {"path": "wan/full_wan.safetensors", "expert": "both"}]
    resolved = L.validate(specs, [lora_root], a14b, two_experts=True)
    assert [r.expert for r in resolved] == ["high", "both"] and resolved[0].strength == 0.5
    assert resolved[0].path == str((lora_root / "a.safetensors").resolve())
    assert resolved[0].sha256 == hashlib.sha256((lora_root / "a.safetensors").read_bytes()).hexdigest()
    assert [r.format for r in resolved] == ["diffusers", "wan"]
    assert resolved[0].adapter_name == "l_" + resolved[0].sha256[:16]
    assert L.validate([], [lora_root], a14b, True) == []
    L.validate([L.LoraSpec(path="a.safetensors")], [lora_root], ti2v, two_experts=False)
    err = _invalid(
        L.validate, [L.LoraSpec(path="a.safetensors", expert="low")], [lora_root], ti2v, False, match="one transformer"
    )
    assert err.message.startswith("loras[0] (a.safetensors): ")
    _invalid(
        L.validate,
        [L.LoraSpec(path="a.safetensors"), L.LoraSpec(path="a.safetensors", expert="both")],
        [lora_root],
        a14b,
        True,
        match="already listed as loras[0]",
    )
    write_safetensors(
        lora_root / "deep.safetensors",
        {f"transformer.blocks.7.attn1.to_q.lora_{x}.weight": s for x, s in (("A", [4, 32]), ("B", [32, 4]))},
    )
    _invalid(L.validate, [L.LoraSpec(path="deep.safetensors")], [lora_root], ti2v, False, match="blocks.7")
    L.validate([L.LoraSpec(path="deep.safetensors")], [lora_root], None, False)  # no model folder: no fit check
    _invalid(L.validate, [L.LoraSpec(path="../x.safetensors")], [lora_root], a14b, True, match="loras[0]")


# --------------------------------------------------------------------------------------------------
# Worker half, on the real tiny pipelines
# --------------------------------------------------------------------------------------------------


class _Loaded:
    def __init__(self, pipe, two_experts: bool, loads: list[int]) -> None:
        self.pipe, self.two_experts, self.loads = pipe, two_experts, loads
        self.manager = W.LoraManager()
        self.transformer_id = id(pipe.transformer)
        self.base = self.generate()

    def generate(self) -> np.ndarray:
        import torch

        kwargs = dict(
            prompt="a red fox runs",
            negative_prompt="",
            height=64,
            width=64,
            num_frames=5,
            num_inference_steps=2,
            guidance_scale=4.0,
            output_type="np",
            generator=torch.Generator(device="cpu").manual_seed(7),
        )
        if self.two_experts:
            kwargs["guidance_scale_2"] = 3.0
        with torch.inference_mode():
            return self.pipe(**kwargs).frames[0]

    def run(self, loras) -> tuple[np.ndarray, W.LoraApplied]:
        applied = self.manager.apply(self.pipe, loras)
        return self.generate(), applied


def _load(models_dir, name: str, two_experts: bool) -> _Loaded:
    import torch
    from diffusers import WanPipeline

    loads: list[int] = []
    original = WanPipeline.from_pretrained

    def counting(*args, **kwargs):
        loads.append(1)
        return original(*args, **kwargs)

    WanPipeline.from_pretrained = counting
    try:
        pipe = WanPipeline.from_pretrained(models_dir / name, dtype=torch.float32)
    finally:
        WanPipeline.from_pretrained = original
    pipe.set_progress_bar_config(disable=True)
    return _Loaded(pipe, two_experts, loads)


@pytest.fixture(scope="module")
def a14b(models_dir) -> _Loaded:
    return _load(models_dir, "tiny-t2v-a14b", True)


@pytest.fixture(scope="module")
def ti2v(models_dir) -> _Loaded:
    return _load(models_dir, "tiny-ti2v-5b", False)


def _resolved(lora_root, path: str, model: Path, two_experts: bool = True, **kw) -> dict:
    [r] = L.validate([L.LoraSpec(path=path, **kw)], [lora_root], model, two_experts)
    return r.model_dump()


def test_lora_changes_output_and_disable_restores_base(a14b, lora_root, models_dir):
    a = _resolved(lora_root, "a.safetensors", models_dir / "tiny-t2v-a14b")
    out, applied = a14b.run([a])
    assert applied.active == [L.adapter_name(a["sha256"])]
    assert np.abs(out - a14b.base).max() > 1e-3
    out, applied = a14b.run([])
    assert applied == ([], False)
    assert np.array_equal(out, a14b.base)
    out, applied = a14b.run([{**a, "strength": 0.5}])  # re-enabled after the disable, at another strength
    assert not applied.loaded and 1e-4 < np.abs(out - a14b.base).max()
    assert np.array_equal(a14b.run([])[0], a14b.base)


def test_strength_zero_is_exactly_base(a14b, lora_root, models_dir):
    a = _resolved(lora_root, "a.safetensors", models_dir / "tiny-t2v-a14b", strength=0.0)
    out, applied = a14b.run([a])
    assert applied.active == [] and np.array_equal(out, a14b.base)
    # diffusers' own set_adapters(weight=0) is bit-exact too with peft's LoRA layers
    a14b.manager.apply(a14b.pipe, [{**a, "strength": 1.0}])
    a14b.pipe.transformer.set_adapters([L.adapter_name(a["sha256"])], [0.0])
    assert np.array_equal(a14b.generate(), a14b.base)


def test_switching_loras_keeps_base_model_and_caches_adapters(a14b, lora_root, models_dir, monkeypatch):
    model = models_dir / "tiny-t2v-a14b"
    a, b = _resolved(lora_root, "a.safetensors", model), _resolved(lora_root, "b.safetensors", model)
    calls: list[str] = []
    original = a14b.pipe.load_lora_weights

    def counting(source, **kwargs):
        calls.append(kwargs["adapter_name"])
        return original(source, **kwargs)

    monkeypatch.setattr(a14b.pipe, "load_lora_weights", counting)
    out_a, _ = a14b.run([a])
    out_b, applied_b = a14b.run([b])
    out_a2, applied_a2 = a14b.run([a])
    out_ab, applied_ab = a14b.run([a, {**b, "strength": 0.7}])
    assert not np.array_equal(out_a, out_b) and not np.array_equal(out_ab, out_a)
    assert np.array_equal(out_a, out_a2)
    assert not applied_a2.loaded and not applied_ab.loaded
    assert applied_ab.active == [L.adapter_name(a["sha256"]), L.adapter_name(b["sha256"])]
    assert calls.count(L.adapter_name(a["sha256"])) <= 1 and calls.count(L.adapter_name(b["sha256"])) == 1
    assert a14b.loads == [1] and id(a14b.pipe.transformer) == a14b.transformer_id
    names = W.LoraManager.adapters_on(a14b.pipe)["transformer"]
    assert {L.adapter_name(a["sha256"]), L.adapter_name(b["sha256"])} <= set(names)
    assert np.array_equal(a14b.run([])[0], a14b.base)


def test_expert_low_and_both_go_to_the_right_transformer(a14b, lora_root, models_dir):
    model = models_dir / "tiny-t2v-a14b"
    low = _resolved(lora_root, "low.safetensors", model, expert="low")
    out, applied = a14b.run([low])
    on = W.LoraManager.adapters_on(a14b.pipe)
    assert applied.loaded and L.adapter_name(low["sha256"]) in on["transformer_2"]
    assert L.adapter_name(low["sha256"]) not in on["transformer"]
    assert np.abs(out - a14b.base).max() > 1e-3  # the low-noise expert runs the last step
    both = _resolved(lora_root, "both.safetensors", model, expert="both")
    out_both, _ = a14b.run([both])
    on = W.LoraManager.adapters_on(a14b.pipe)
    assert L.adapter_name(both["sha256"]) in on["transformer"] and L.adapter_name(both["sha256"]) in on["transformer_2"]
    out_high, _ = a14b.run([{**both, "expert": "high"}])
    assert not np.array_equal(out_both, out_high)
    assert np.array_equal(a14b.run([])[0], a14b.base)
    assert a14b.loads == [1]


def test_wan_comfyui_musubi_and_peft_names_load_like_diffusers(a14b, lora_root, models_dir):
    model = models_dir / "tiny-t2v-a14b"
    reference, _ = a14b.run([_resolved(lora_root, "full.safetensors", model)])
    assert np.abs(reference - a14b.base).max() > 1e-3
    for path, fmt in (("wan/full_wan.safetensors", "wan"), ("wan/full_musubi.safetensors", "musubi")):
        lora = _resolved(lora_root, path, model)
        assert lora["format"] == fmt
        out, applied = a14b.run([lora])
        assert applied.loaded
        np.testing.assert_allclose(out, reference, atol=1e-5, err_msg=path)
    # peft's ".default" adapter segment and missing "transformer." prefix: renamed before diffusers sees them
    a_out, _ = a14b.run([_resolved(lora_root, "a.safetensors", model)])
    out, _ = a14b.run([_resolved(lora_root, "a_default.safetensors", model)])
    np.testing.assert_allclose(out, a_out, atol=1e-6)


def test_worker_refuses_changed_file_and_missing_expert(ti2v, lora_root, models_dir, tmp_path):
    model = models_dir / "tiny-ti2v-5b"
    a = _resolved(lora_root, "a.safetensors", model, two_experts=False)
    out, applied = ti2v.run([a])
    assert applied.loaded and np.abs(out - ti2v.base).max() > 1e-3
    _invalid(ti2v.manager.apply, ti2v.pipe, [{**a, "expert": "low"}], match="transformer_2")
    changed = tmp_path / "b.safetensors"
    changed.write_bytes((lora_root / "b.safetensors").read_bytes())
    _invalid(ti2v.manager.apply, ti2v.pipe, [{**a, "path": str(changed), "sha256": "0" * 64}], match="changed")
    assert np.array_equal(ti2v.run([])[0], ti2v.base)
    assert ti2v.loads == [1]


def test_least_recently_used_adapters_are_evicted(a14b, lora_root, models_dir):
    model = models_dir / "tiny-t2v-a14b"
    manager = W.LoraManager(max_adapters=1)
    evict, a = _resolved(lora_root, "evict.safetensors", model), _resolved(lora_root, "a.safetensors", model)
    manager.apply(a14b.pipe, [evict])
    manager.apply(a14b.pipe, [a])
    assert W.LoraManager.adapters_on(a14b.pipe)["transformer"] == [L.adapter_name(a["sha256"])]
    manager.apply(a14b.pipe, [])
    assert np.array_equal(a14b.generate(), a14b.base)
