"""LoRAs end to end through the daemon and the real tiny A14B pipeline: a LoRA changes the video, strength 0
and no LoRA give the base model's video for the same seed, the base model is loaded once across switches, and
bad LoRAs are refused before the job runs."""

from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import pytest


@pytest.fixture(scope="module")
def loras(models_dir, tmp_path_factory):
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora-root")
    transformer = WanTransformer3DModel.from_pretrained(models_dir / "tiny-t2v-a14b" / "transformer")
    torch.manual_seed(7)
    # init_lora_weights=False: with peft's default init lora_B is zero and the adapter would change nothing.
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False),
        adapter_name="style",
    )
    sd = get_peft_model_state_dict(transformer, adapter_name="style")
    WanPipeline.save_lora_weights(root, transformer_lora_layers=sd, weight_name="style.safetensors")
    (root / "notes.txt").write_text("not a lora")
    return root


def frames(path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def test_lora_changes_the_video_and_switching_never_reloads_the_base(harness_factory, loras):
    h = harness_factory(paths={"lora_roots": [str(loras)]}).start()
    base = "model: tiny-t2v-a14b\nprompt: same seed\nseed: 5\nsteps: 2\n"
    h.drop("j1.yaml", base)
    h.sidecar("j1")
    h.drop("j2.yaml", base + "loras: [{path: style.safetensors, strength: 1.0}]\n")
    h.sidecar("j2")
    h.drop("j3.yaml", base + "loras: [{path: style.safetensors, strength: 0.0}]\n")
    h.sidecar("j3")
    h.drop("j4.yaml", base)
    sides = [h.sidecar(f"j{n}") for n in range(1, 5)]
    videos = [frames(h.outbox / f"j{n}.mp4") for n in range(1, 5)]
    assert not np.array_equal(videos[0], videos[1]), "the LoRA must change the output"
    assert np.array_equal(videos[0], videos[2]), "strength 0 must give the base model's output"
    assert np.array_equal(videos[0], videos[3]), "after a LoRA job, no LoRA must give the base output again"
    assert [s["model_used"]["cache"] for s in sides] == ["loaded", "cached", "cached", "cached"]
    assert any(o.startswith("lora:") for o in sides[1]["optimizations_applied"])
    assert not any(o.startswith("lora:") for o in sides[2]["optimizations_applied"] + sides[3]["optimizations_applied"])
    assert sides[1]["parameters"]["loras"][0]["expert"] == "high"


@pytest.mark.parametrize(
    "entry,needle",
    [
        ("{path: ../escape.safetensors}", ".."),
        ("{path: missing.safetensors}", "missing.safetensors"),
        ("{path: notes.txt}", ".safetensors"),
        ("{path: style.safetensors, expert: low}", None),
    ],
)
def test_bad_loras_are_refused_before_the_job_runs(harness_factory, loras, entry, needle):
    h = harness_factory(paths={"lora_roots": [str(loras)]}).start()
    model = "tiny-ti2v-5b" if "low" in entry else "tiny-t2v-a14b"
    h.drop("bad.yaml", f"model: {model}\nprompt: x\nsteps: 2\nloras: [{entry}]\n")
    record = h.failure("bad")
    assert record["error_category"] == "invalid_lora" and record["attempts"] == 0, record
    if needle:
        assert needle in record["message"]
