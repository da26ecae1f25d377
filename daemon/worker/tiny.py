"""Build the tiny random-weight Wan2.2 test models, deterministically, in diffusers format.

They have the three real architectures (two experts + boundary ratio; 36 input channels and no image
encoder; 48-channel VAE + expand_timesteps) at a size that runs a job in well under a second on a CPU.
They are saved with ``save_pretrained`` and loaded back through the same ``from_pretrained`` path as
the real models. Their weights are random: the videos they make are noise, and every sidecar says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from daemon.models import I2V_A14B, REGISTRY, T2V_A14B, T2V_SINGLE, TI2V_5B, tiny_model_dir

# Bump when the recipe changes so that stale builds are rebuilt.
BUILD_VERSION = 1
MARKER = "wan_daemon_tiny.json"

# A character-level sentencepiece vocabulary: built locally, no download.
_VOCAB = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [
    (c, -2.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?-'"
]


def _build_pipeline(architecture: str):
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = T5Tokenizer(vocab=_VOCAB, extra_ids=0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(_VOCAB),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )

    transformer = tiny_transformer

    experts: tuple[WanTransformer3DModel, WanTransformer3DModel | None]  # (high-noise, low-noise or None)
    boundary: float | None
    cls: type[WanPipeline] | type[WanImageToVideoPipeline]
    if architecture == TI2V_5B:
        vae = AutoencoderKLWan(
            base_dim=4,
            decoder_base_dim=4,
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
        )
        experts, boundary, expand, cls = (transformer(48, 48), None), None, True, WanPipeline
    elif architecture == T2V_SINGLE:  # Wan2.1 1.3B: one transformer, 16-channel VAE, no boundary
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        experts, boundary, expand, cls = (transformer(16, 16), None), None, False, WanPipeline
    else:
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        in_ch = 36 if architecture == I2V_A14B else 16
        experts = (transformer(in_ch, 16), transformer(in_ch, 16))
        boundary = 0.9 if architecture == I2V_A14B else 0.875
        expand = False
        cls = WanImageToVideoPipeline if architecture == I2V_A14B else WanPipeline
    # The published Wan2.2 diffusers repos ship UniPC in flow mode; flow_shift is replaced per job.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=boundary,
        expand_timesteps=expand,
    )


def is_built(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def tiny_transformer(in_channels: int = 16, out_channels: int = 16, *, image_dim: int | None = None):
    """The tiny models' Wan transformer (random weights): two blocks, hidden size 32. ``image_dim``: with the
    image-conditioning projections (add_k_proj / add_v_proj) a Wan2.1 I2V transformer has."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=in_channels,
        out_channels=out_channels,
        ffn_dim=64,
        text_dim=32,
        freq_dim=32,
        image_dim=image_dim,
        added_kv_proj_dim=32 if image_dim else None,
        rope_max_seq_len=64,
        qk_norm="rms_norm_across_heads",
    )


def build_tiny(name: str, models_dir: Path) -> Path:
    """Build (once) and return the folder of tiny model ``name``. Safe against concurrent builders."""
    info = REGISTRY[name]
    assert info.tiny, name
    folder = tiny_model_dir(models_dir, name)
    if is_built(folder):
        return folder
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(folder):
            return folder
        staging = models_dir / f".{name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        pipe = _build_pipeline(info.architecture)
        pipe.save_pretrained(staging)
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "version": BUILD_VERSION,
                    "name": name,
                    "architecture": info.architecture,
                    "note": "random weights: videos made with this model are noise; for testing only",
                },
                indent=2,
            )
        )
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)
        os.rename(staging, folder)
    return folder


def build_all(models_dir: Path) -> list[Path]:
    return [build_tiny(n, models_dir) for n in ("tiny-t2v-a14b", "tiny-i2v-a14b", "tiny-ti2v-5b", "tiny-t2v-1.3b")]


__all__ = ["build_tiny", "build_all", "is_built", "T2V_A14B", "I2V_A14B", "TI2V_5B", "T2V_SINGLE"]
