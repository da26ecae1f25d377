"""``wan-daemon validate`` and the daemon's intake accept and reject exactly the same job files.

Each case is a job file and, where it matters, a configuration. The same file is checked twice: by
``daemon.cli.main(["validate", "--config", CFG, FILE])`` and by the daemon's own intake
(:class:`daemon.runtime.intake.Intake` with a real spool and outbox built from the same settings, as the
daemon builds them). Both must accept, or both must reject the same jobs with the same message. Real files
throughout: the tiny models (fixture ``models_dir``), safetensors LoRA files sized from the tiny model's own
transformer header, PNG images. What only the daemon can know (an id already queued, a video already in the
outbox) is left out: validate cannot see it.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.cli import EXIT_INVALID, EXIT_OK, main
from daemon.config import load_settings
from daemon.jobspec.lora_files import transformer_header
from daemon.models import REGISTRY, default_model, hub_snapshot
from daemon.runtime.intake import Intake
from daemon.runtime.outbox import Outbox
from daemon.runtime.spool import Spool

ABSENT_REGISTRY_MODELS = ("wan2.2-i2v-a14b", "wan2.2-t2v-a14b")


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> Path:
    """A valid safetensors file of F32 zeros, written without torch."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def lora_for(model_folder: Path, modules: list[str], rank: int = 4, subfolder: str = "transformer") -> dict:
    """diffusers-named LoRA shapes that fit ``modules`` of the model's transformer exactly."""
    weights = transformer_header(model_folder, subfolder)
    shapes = {}
    for module in modules:
        out_f, in_f = weights[f"{module}.weight"]
        shapes[f"transformer.{module}.lora_A.weight"] = [rank, in_f]
        shapes[f"transformer.{module}.lora_B.weight"] = [out_f, rank]
    return shapes


@pytest.fixture(scope="module")
def world(models_dir, tmp_path_factory) -> dict[str, Path]:
    """Shared, read-only inputs: LoRA root, input-image root, an image outside it, a local model root."""
    from PIL import Image

    base = tmp_path_factory.mktemp("parity")
    loras, inputs, outside = base / "loras", base / "inputs", base / "outside"
    for d in (loras, inputs, outside):
        d.mkdir()
    attn = ["blocks.0.attn1.to_q", "blocks.0.attn1.to_v", "blocks.1.attn2.to_k"]
    write_safetensors(loras / "fits.safetensors", lora_for(models_dir / "tiny-ti2v-5b", attn))
    write_safetensors(loras / "fits_a14b.safetensors", lora_for(models_dir / "tiny-t2v-a14b", attn))
    write_safetensors(
        loras / "fits_a14b_low.safetensors",
        lora_for(models_dir / "tiny-t2v-a14b", attn, rank=2, subfolder="transformer_2"),
    )
    # made for a deeper model: block 7 does not exist in the 2-block tiny transformers
    write_safetensors(
        loras / "too_deep.safetensors",
        {f"transformer.blocks.7.attn1.to_q.lora_{x}.weight": s for x, s in (("A", [4, 32]), ("B", [32, 4]))},
    )
    # same modules, other sizes (a LoRA for a wider transformer)
    write_safetensors(
        loras / "too_wide.safetensors",
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": [4, 64],
            "transformer.blocks.0.attn1.to_q.lora_B.weight": [64, 4],
        },
    )
    (loras / "garbage.safetensors").write_bytes(b"\x07" * 300)
    (loras / "pickled.bin").write_bytes(b"\x80\x04K\x01.")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(inputs / "red.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(outside / "blue.png")
    Image.new("RGB", (300, 300), (0, 0, 0)).save(inputs / "big.png")
    (inputs / "fake.png").write_text("this is not a PNG")
    (inputs / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 32)
    return {"base": base, "loras": loras, "inputs": inputs, "outside": outside, "models": models_dir}


@dataclass
class Case:
    id: str
    text: str  # the job file; {models}, {inputs}, {outside} are filled in
    ok: bool  # what both must say
    config: dict[str, Any] = field(default_factory=dict)  # merged over the base config
    needs_absent: tuple[str, ...] = ()  # registry models that must not be in the local HF cache


CASES = [
    Case("valid_single", "model: tiny-ti2v-5b\nprompt: a red fox in snow\nseed: 3\n", True),
    Case(
        "valid_batch",
        "defaults: {model: tiny-t2v-a14b, steps: 2}\njobs:\n  - prompt: one\n"
        "  - prompt: two\n    guidance_scale_2: 2.0\n  - id: third\n    prompt: three\n",
        True,
    ),
    Case("unknown_field", "model: tiny-ti2v-5b\nprompt: a\ncolour: blue\n", False),
    Case("bad_size_multiple", "model: tiny-ti2v-5b\nprompt: a\nsize: 80x64\n", False),
    Case("size_over_max_side", "model: tiny-ti2v-5b\nprompt: a\nsize: 4096x64\n", False),
    Case("frames_not_4n_plus_1", "model: tiny-ti2v-5b\nprompt: a\nframes: 10\n", False),
    Case("malformed_yaml", "prompt: [a, b\nmodel: tiny-ti2v-5b\n", False),
    Case("yaml_alias", "prompt: &p hello\nnegative_prompt: *p\n", False),
    Case("yaml_1_2_scalars", "model: tiny-ti2v-5b\nid: NO\nprompt: yes\nseed: 010\n", True),
    Case("yaml_1_2_sexagesimal_is_text", "model: tiny-ti2v-5b\nprompt: a\nseed: 1:30\n", False),
    Case("quality_half", "model: tiny-ti2v-5b\nprompt: a\noutput: {quality: 0.5}\n", True),
    Case("model_empty", "model: ''\nprompt: a\n", False),
    Case("id_trailing_newline", 'model: tiny-ti2v-5b\nid: "nl\\n"\nprompt: a\n', False),
    Case("not_a_mapping", "- prompt: a\n", False),
    Case(
        "batch_one_bad_job",
        "defaults: {model: tiny-ti2v-5b}\njobs:\n  - prompt: fine\n  - prompt: bad\n    frames: 6\n",
        False,
    ),
    Case("lora_fits", "model: tiny-ti2v-5b\nprompt: a\nloras: [{path: fits.safetensors, strength: 0.7}]\n", True),
    Case(
        "lora_a14b_high_and_low",
        "model: tiny-t2v-a14b\nprompt: a\nloras:\n  - {path: fits_a14b.safetensors}\n"
        "  - {path: fits_a14b_low.safetensors, expert: low}\n",
        True,
    ),
    Case("lora_missing", "model: tiny-ti2v-5b\nprompt: a\nloras: [{path: nowhere.safetensors}]\n", False),
    Case("lora_not_safetensors", "model: tiny-ti2v-5b\nprompt: a\nloras: [{path: pickled.bin}]\n", False),
    Case(
        "lora_not_a_safetensors_file", "model: tiny-ti2v-5b\nprompt: a\nloras: [{path: garbage.safetensors}]\n", False
    ),
    Case("lora_modules_do_not_fit", "model: tiny-ti2v-5b\nprompt: a\nloras: [{path: too_deep.safetensors}]\n", False),
    Case("lora_sizes_do_not_fit", "model: tiny-t2v-a14b\nprompt: a\nloras: [{path: too_wide.safetensors}]\n", False),
    Case(
        "lora_low_expert_on_one_transformer",
        "model: tiny-ti2v-5b\nprompt: a\nloras: [{path: fits.safetensors, expert: low}]\n",
        False,
    ),
    Case("lora_outside_roots", "model: tiny-ti2v-5b\nprompt: a\nloras: [{path: '{outside}/x.safetensors'}]\n", False),
    Case(
        "preset_needs_both_experts",
        "model: tiny-t2v-a14b\nprompt: a\npreset: lightning-4step\nloras: [{path: fits_a14b.safetensors}]\n",
        False,
    ),
    Case("image_ok", "model: tiny-ti2v-5b\nprompt: a\nimage: red.png\n", True),
    Case("image_missing", "model: tiny-ti2v-5b\nprompt: a\nimage: gone.png\n", False),
    Case("image_outside_input_roots", "model: tiny-ti2v-5b\nprompt: a\nimage: '{outside}/blue.png'\n", False),
    Case("image_traversal", "model: tiny-ti2v-5b\nprompt: a\nimage: ../outside/blue.png\n", False),
    Case("image_not_an_image", "model: tiny-ti2v-5b\nprompt: a\nimage: fake.png\n", False),
    Case("image_unsupported_type", "model: tiny-ti2v-5b\nprompt: a\nimage: anim.gif\n", False),
    Case(
        "image_too_many_pixels",
        "model: tiny-ti2v-5b\nprompt: a\nimage: big.png\n",
        False,
        {"limits": {"max_input_pixels": 10_000}},
    ),
    Case("image_path_too_long", "model: tiny-ti2v-5b\nprompt: a\nimage: " + "x" * 300 + ".png\n", False),
    Case("task_i2v_without_image", "model: tiny-ti2v-5b\nprompt: a\ntask: i2v\n", False),
    Case("i2v_model_without_image", "model: tiny-i2v-a14b\nprompt: a\n", False),
    Case("t2v_model_given_an_image", "model: tiny-t2v-a14b\nprompt: a\nimage: red.png\n", False),
    Case("guidance_scale_2_on_one_transformer", "model: tiny-ti2v-5b\nprompt: a\nguidance_scale_2: 3.0\n", False),
    Case("unknown_model", "model: no-such-model\nprompt: a\n", False),
    Case("model_name_too_long", "model: " + "m" * 300 + "\nprompt: a\n", False),
    Case("local_model_folder", "model: '{models}/tiny-ti2v-5b'\nprompt: a\n", True),
    Case(
        "registry_model_absent_auto_download_off",
        "model: wan2.2-i2v-a14b\nprompt: a\nimage: red.png\n",
        False,
        {"models": {"auto_download": False}},
        ABSENT_REGISTRY_MODELS,
    ),
    Case(
        "registry_model_absent_auto_download_on",
        "model: wan2.2-i2v-a14b\nprompt: a\nimage: red.png\n",
        True,
        {"models": {"auto_download": True}},
        ABSENT_REGISTRY_MODELS,
    ),
    Case(
        "default_model_is_a_tiny_two_expert_model",
        "prompt: a\nguidance_scale_2: 2.5\n",
        True,
        {"models": {"default": "tiny-t2v-a14b"}},
    ),
    Case(
        "default_model_is_tiny_and_rejects_the_job",
        "prompt: a\nsize: 80x64\n",
        False,
        {"models": {"default": "tiny-ti2v-5b"}},
    ),
    Case(
        "default_model_is_absent",
        "prompt: a\n",
        False,
        {"models": {"default": "wan2.2-t2v-a14b", "auto_download": False}},
        ABSENT_REGISTRY_MODELS,
    ),
    Case(
        "default_model_is_absent_but_downloaded_on_demand",
        "prompt: a\n",
        True,
        {"models": {"default": "wan2.2-t2v-a14b", "auto_download": True}},
        ABSENT_REGISTRY_MODELS,
    ),
    Case("default_model_is_unknown", "prompt: a\n", False, {"models": {"default": "not-a-model"}}),
]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fill(text: str, world: dict[str, Path]) -> str:
    return re.sub(r"\{(models|inputs|outside)\}", lambda m: str(world[m.group(1)]), text)


def _no_address(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+>", " at 0x...>", text)


def _validate(cfg: Path, job: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["validate", "--config", str(cfg), str(job)])
    return code, capsys.readouterr().out


def _intake(cfg: Path, name: str, text: str) -> tuple[list[str], dict[str, str], list[str]]:
    """The daemon's intake on the file: (rejected ids, their failure messages, queued ids)."""
    settings = load_settings(cfg)
    spool = Spool(settings.paths.state / "owners" / settings.owner, settings.owner)
    outbox = Outbox(settings.paths.outbox, owner=settings.owner)
    intake = Intake(
        settings,
        spool,
        outbox,
        default_model=lambda: default_model(settings.models.default, cuda_available=False),
        is_active_id=lambda job_id: False,
        clock=time.time,
    )
    settings.paths.inbox.mkdir(parents=True, exist_ok=True)
    dropped = settings.paths.inbox / name
    dropped.write_text(text)
    claimed = spool.claim(dropped)
    assert claimed is not None
    result = intake.process(claimed)
    messages = {}
    for rejected in result.rejected:
        record = json.loads(outbox.failure_path(rejected).read_text())
        messages[rejected] = record["message"]
    return result.rejected, messages, [r.id for r in result.queued]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_validate_and_intake_agree(case: Case, world, tmp_path, capsys):
    for name in case.needs_absent:
        if hub_snapshot(REGISTRY[name].repo_id) is not None:
            pytest.skip(f"{name} is in the local Hugging Face cache")
    base = {
        "paths": {
            "inbox": str(tmp_path / "inbox"),
            "outbox": str(tmp_path / "outbox"),
            "models": str(world["models"]),
            "model_roots": [str(world["base"])],
            "input_roots": [str(world["inputs"])],
            "lora_roots": [str(world["loras"])],
        },
        "models": {"default": "tiny-ti2v-5b", "auto_download": False},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(_merge(base, case.config)))
    text = _fill(case.text, world)
    job = tmp_path / "jobs" / f"{case.id}.yaml"
    job.parent.mkdir()
    job.write_text(text)

    code, out = _validate(cfg, job, capsys)
    rejected, messages, queued = _intake(cfg, job.name, text)

    assert code == (EXIT_OK if case.ok else EXIT_INVALID), out
    assert (not rejected) == case.ok, (rejected, messages)
    if case.ok:
        assert queued and f"ok      {job}" in out
        return
    # The same jobs are rejected, each for the same reason.
    said = re.findall(r"^  - job ([A-Za-z0-9._-]+): ", out, re.M)
    if said:
        assert sorted(said) == sorted(rejected), out
    else:  # the whole file is refused: one record named after the file
        assert rejected == [case.id], out
    for message in messages.values():
        # (PIL names the in-memory file it was given by its address: the one part that differs)
        assert _no_address(message) in _no_address(out), f"intake said {message!r}; validate said:\n{out}"


def test_the_table_covers_both_answers_and_every_kind_of_check():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert any(c.ok for c in CASES) and any(not c.ok for c in CASES)
    kinds = {"lora", "image", "default_model", "registry_model", "batch", "yaml"}
    assert all(any(k in c.id for c in CASES) for k in kinds)
