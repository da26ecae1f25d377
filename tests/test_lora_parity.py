"""LoRA parity with diffusers: each key naming we accept (diffusers / peft, original Wan, ComfyUI, musubi) goes
through our mapping (daemon.jobspec.lora_keys, which the intake checks and the worker's renaming use) and through
diffusers' own loading of the same state dict (``WanPipeline.lora_state_dict`` + ``load_lora_into_transformer``,
what ``load_lora_weights`` runs) into the tiny transformer; the same modules must receive the same weights.

"Weights" are each module's effective change, ``scale * lora_B @ lora_A`` (and its bias), so that where alpha
goes (folded into the tensors by diffusers' converters, or kept as peft's scaling) does not matter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.jobspec.lora_keys import analyse_lora_keys, canonical_diffusers_key  # noqa: E402
from daemon.worker.tiny import tiny_transformer  # noqa: E402

RANK = 4
BLOCKS = 2
ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
WAN_TOP = {  # original Wan names -> diffusers (what _convert_non_diffusers_wan_lora_to_diffusers maps)
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}


def linears(model) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def wan_modules(i2v: bool) -> dict[str, str]:
    """Original Wan module name -> the diffusers module it is (the oracle the file is built from)."""
    out = dict(WAN_TOP)
    for b in range(BLOCKS):
        for attn, which in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for p, d in ATTN.items():
                out[f"blocks.{b}.{attn}.{p}"] = f"blocks.{b}.{which}.{d}"
        out[f"blocks.{b}.ffn.0"] = f"blocks.{b}.ffn.net.0.proj"
        out[f"blocks.{b}.ffn.2"] = f"blocks.{b}.ffn.net.2"
        if i2v:
            out[f"blocks.{b}.cross_attn.k_img"] = f"blocks.{b}.attn2.add_k_proj"
            out[f"blocks.{b}.cross_attn.v_img"] = f"blocks.{b}.attn2.add_v_proj"
    return out


def lora_pair(shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = shape
    return torch.randn(RANK, in_f, generator=gen), torch.randn(out_f, RANK, generator=gen)


def make_file(naming: str, model, i2v: bool) -> dict[str, torch.Tensor]:
    """A small LoRA in ``naming`` for every linear layer the naming can reach, random values, alpha != rank."""
    gen = torch.Generator().manual_seed(0)
    shapes = linears(model)
    sd: dict[str, torch.Tensor] = {}
    if naming in ("diffusers", "peft"):
        for name, shape in shapes.items():
            a, b = lora_pair(shape, gen)
            if naming == "diffusers":
                sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
            else:  # peft's own save: base_model.model.<module>.lora_A.default.weight
                sd[f"base_model.model.{name}.lora_A.default.weight"] = a
                sd[f"base_model.model.{name}.lora_B.default.weight"] = b
        return sd
    for wan, diffusers_name in wan_modules(i2v).items():
        a, b = lora_pair(shapes[diffusers_name], gen)
        alpha = torch.tensor(float(RANK * 2))
        if naming == "musubi":
            if not wan.startswith("blocks."):
                continue  # musubi trains the blocks only
            stem = "lora_unet_" + wan.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"], sd[f"{stem}.alpha"] = a, b, alpha
        elif naming == "wan":  # original Wan: lora_down / lora_up, alpha (blocks only), bias diffs
            stem = f"diffusion_model.{wan}"
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = a, b
            if wan.startswith("blocks."):
                sd[f"{stem}.alpha"] = alpha
            sd[f"{stem}.diff_b"] = torch.randn(shapes[diffusers_name][0], generator=gen)
        else:  # ComfyUI's save of a Wan LoRA: lora_A / lora_B names under diffusion_model.
            stem = f"diffusion_model.{wan}"
            sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = a, b
    return sd


def ours(sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each module's (weight delta, bias delta) as our key analysis reads the file."""
    analysis = analyse_lora_keys(list(sd))
    assert not analysis.problems, analysis.problems
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for module, kind, key in analysis.targets:
        parts.setdefault(module, {})[kind] = sd[key]
    out = {}
    for module, p in parts.items():
        delta = None
        if "A" in p and "B" in p:
            scale = float(p["alpha"]) / p["A"].shape[0] if "alpha" in p else 1.0
            delta = scale * p["B"] @ p["A"]
        out[module] = (delta, p.get("bias"))
    return out


def diffusers_loaded(sd: dict[str, torch.Tensor], model) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Each module's (weight delta, bias delta) after diffusers loaded the same state dict into ``model``."""
    from diffusers import WanPipeline

    state, metadata = WanPipeline.lora_state_dict({k: v.clone() for k, v in sd.items()}, return_lora_metadata=True)
    WanPipeline.load_lora_into_transformer(state, transformer=model, adapter_name="p", metadata=metadata)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "p" in module.lora_A:
            a, b, scale = module.lora_A["p"].weight, module.lora_B["p"].weight, module.scaling["p"]
            bias = module.lora_B["p"].bias
            out[name] = (scale * b @ a, None if bias is None else scale * bias)
    return out


@pytest.mark.parametrize("naming", ["diffusers", "peft", "wan", "comfyui", "musubi"])
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_our_mapping_and_diffusers_loading_give_every_module_the_same_weights(naming, i2v):
    torch.manual_seed(0)
    model = tiny_transformer(image_dim=32 if i2v else None)
    sd = make_file(naming, model, i2v)
    # What the worker hands diffusers: the file itself, or (diffusers / peft keys diffusers would misread) the
    # renamed state dict (daemon.worker.lora.LoraManager._load).
    fed = sd
    if analyse_lora_keys(list(sd)).needs_rename:
        fed = {c: v for k, v in sd.items() if (c := canonical_diffusers_key(k)) is not None}
    expected, got = ours(sd), diffusers_loaded(fed, model)
    assert sorted(got) == sorted(expected)
    for module, (delta, bias) in expected.items():
        got_delta, got_bias = got[module]
        if delta is not None:
            torch.testing.assert_close(got_delta, delta, msg=f"{naming}: {module} weight")
        if bias is not None:
            torch.testing.assert_close(got_bias, bias, msg=f"{naming}: {module} bias")


def test_an_alpha_outside_the_blocks_is_refused_by_both():
    """diffusers' Wan converter applies alpha only inside the transformer blocks and refuses a file with any
    other alpha left over; our analysis says so before the job runs."""
    from diffusers import WanPipeline

    model = tiny_transformer()
    sd = make_file("wan", model, i2v=False)
    sd["diffusion_model.head.head.alpha"] = torch.tensor(8.0)
    assert any("head.head.alpha" in p for p in analyse_lora_keys(list(sd)).problems)
    with pytest.raises(ValueError, match="head.head.alpha"):
        WanPipeline.lora_state_dict(sd)
