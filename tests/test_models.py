"""Model registry and location, the tiny model builder, and the real-model-on-CPU refusal (end to end)."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from daemon.errors import Category, JobError
from daemon.models import I2V_A14B, REGISTRY, T2V_A14B, T2V_SINGLE, TI2V_5B, inspect_folder, locate
from daemon.worker.tiny import build_tiny


@pytest.mark.parametrize(
    "name,arch",
    [
        ("tiny-t2v-a14b", T2V_A14B),
        ("tiny-i2v-a14b", I2V_A14B),
        ("tiny-ti2v-5b", TI2V_5B),
        ("tiny-t2v-1.3b", T2V_SINGLE),
    ],
)
def test_tiny_models_have_the_real_architectures(models_dir, name, arch):
    folder = models_dir / name
    assert inspect_folder(folder) == arch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    cls = WanImageToVideoPipeline if arch == I2V_A14B else WanPipeline
    pipe = cls.from_pretrained(folder)
    if arch == TI2V_5B:
        assert pipe.transformer_2 is None and pipe.config.expand_timesteps
        assert pipe.vae.config.z_dim == 48
    elif arch == T2V_SINGLE:  # Wan2.1 1.3B: one transformer, 16-channel VAE, no expert boundary
        assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None and pipe.vae.config.z_dim == 16
    else:
        assert pipe.transformer_2 is not None
        assert pipe.config.boundary_ratio == (0.9 if arch == I2V_A14B else 0.875)
    if arch == I2V_A14B:
        assert pipe.transformer.config.in_channels == 36 and pipe.image_encoder is None


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_tiny_build_is_deterministic(tmp_path, models_dir):
    again = build_tiny("tiny-t2v-a14b", tmp_path)
    assert _digest(again) == _digest(models_dir / "tiny-t2v-a14b")
    assert build_tiny("tiny-t2v-a14b", tmp_path) == again  # built once, then reused


def test_locate_registry_local_folder_and_unknown(models_dir, tmp_path):
    tiny = locate("tiny-ti2v-5b", models_dir=models_dir, model_roots=[tmp_path])
    assert tiny.source == "tiny" and tiny.path == models_dir / "tiny-ti2v-5b"
    local_dir = tmp_path / "my-wan"
    shutil.copytree(models_dir / "tiny-i2v-a14b", local_dir)
    local = locate("my-wan", models_dir=models_dir, model_roots=[tmp_path])
    assert local.source == "local" and local.info.architecture == I2V_A14B and not local.info.tiny
    assert local.info.multiple == 16 and local.info.width == 1280  # the architecture's real defaults
    with pytest.raises(JobError) as info:
        locate("nope", models_dir=models_dir, model_roots=[tmp_path])
    assert info.value.category is Category.MODEL_NOT_FOUND and "unknown model 'nope'" in info.value.message


def test_real_model_missing_from_the_cache_says_how_to_get_it(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(JobError) as info:
        locate("wan2.2-ti2v-5b", models_dir=models_dir, model_roots=[])
    assert info.value.category is Category.MODEL_NOT_FOUND
    assert "wan-daemon models download wan2.2-ti2v-5b" in " ".join(info.value.suggestions)
    assert REGISTRY["wan2.2-ti2v-5b"].repo_id == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"


def test_a_non_wan_folder_is_refused(tmp_path):
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "vae").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (tmp_path / "m" / "transformer" / "config.json").write_text("{}")
    (tmp_path / "m" / "vae" / "config.json").write_text("{}")
    with pytest.raises(JobError, match="not a Wan pipeline"):
        inspect_folder(tmp_path / "m")


def test_real_model_on_cpu_is_refused_with_a_clear_error(harness_factory, tmp_path, models_dir):
    """A non-tiny model on a CPU-only worker fails with insufficient_vram, unless explicitly allowed."""
    shutil.copytree(models_dir / "tiny-t2v-a14b", tmp_path / "local-model")
    h = harness_factory().start()
    h.drop("big.yaml", "model: local-model\nprompt: hi\nsize: 64x64\nframes: 5\nsteps: 2\n")
    record = h.failure("big")
    assert record["error_category"] == "insufficient_vram"
    assert "CPU" in record["message"] and "allow_cpu_for_real_models" in " ".join(record["recovery_suggestions"])
    assert record["attempts"] == 1


def test_real_model_on_cpu_runs_when_allowed(harness_factory, tmp_path, models_dir):
    shutil.copytree(models_dir / "tiny-t2v-a14b", tmp_path / "local-model")
    h = harness_factory(worker={"allow_cpu_for_real_models": True}).start()
    h.drop("big.yaml", "model: local-model\nprompt: hi\nsize: 64x64\nframes: 5\nsteps: 2\n")
    side = h.sidecar("big")
    assert side["model_used"]["source"] == "local" and side["video"]["frames"] == 5
    assert "note" not in side


def test_small_model_and_its_tiny_twin(harness):
    info = REGISTRY["wan2.1-t2v-1.3b"]
    assert (info.repo_id, info.width, info.height, info.frames, info.fps) == (
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        832,
        480,
        81,
        16,
    )
    harness.drop("small.yaml", "model: tiny-t2v-1.3b\nprompt: small gpu\nsteps: 2\n")
    side = harness.sidecar("small")
    assert side["model_used"]["architecture"] == "wan-t2v" and side["video"]["frames"] == 9


def test_input_images_are_resized_and_centre_cropped_never_stretched():
    from PIL import Image

    from daemon.worker.media import fit_image

    img = Image.new("RGB", (100, 50), (0, 0, 255))
    for x in range(48, 52):
        for y in range(50):
            img.putpixel((x, y), (255, 0, 0))  # a red stripe at the centre
    out = fit_image(img, 32, 32)
    assert out.size == (32, 32)
    assert out.getpixel((16, 16))[0] > 200 and out.getpixel((2, 16))[2] > 200  # centre kept, blue around it
    tall = fit_image(Image.new("RGB", (30, 90)), 64, 48)
    assert tall.size == (64, 48)


def test_warm_cache_evicts_the_least_recently_used_pipeline_over_its_memory_budget(harness_factory, models_dir):
    from daemon.worker.cache import weights_mb

    one = max(weights_mb(models_dir / n) for n in ("tiny-t2v-a14b", "tiny-ti2v-5b"))
    h = harness_factory(worker={"max_cached_pipelines": 5, "cache_budget_mb": one * 1.2}).start()
    h.drop("a1.yaml", "model: tiny-t2v-a14b\nprompt: a\nsteps: 2\n")
    first = h.sidecar("a1")
    h.drop("b1.yaml", "model: tiny-ti2v-5b\nprompt: b\nsteps: 2\n")
    second = h.sidecar("b1")
    h.drop("a2.yaml", "model: tiny-t2v-a14b\nprompt: a again\nsteps: 2\n")
    third = h.sidecar("a2")
    assert first["model_used"]["cache"] == "loaded" and second["model_used"]["cache"] == "loaded"
    assert second["model_used"]["evicted"] and second["model_used"]["evicted"][0].endswith("tiny-t2v-a14b")
    assert third["model_used"]["cache"] == "loaded"  # it had been evicted to make room


def test_oversized_input_images_are_refused(harness_factory):
    from PIL import Image

    h = harness_factory(limits={"max_input_pixels": 1000}).start()
    Image.new("RGB", (64, 64)).save(h.inbox / "big.png")
    h.drop("px.yaml", "model: tiny-i2v-a14b\nprompt: hi\nimage: big.png\n")
    record = h.failure("px")
    assert record["error_category"] == "invalid_input" and "max_input_pixels" in record["message"]
