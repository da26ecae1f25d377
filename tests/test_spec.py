"""Job files: the hardened YAML reader, JobSpec validation, batches, and per-model resolution."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from daemon.errors import Category, JobError
from daemon.jobspec.params import resolve_params
from daemon.jobspec.schema import json_schema
from daemon.jobspec.spec import parse_job_file
from daemon.models import REGISTRY, WAN_NEGATIVE_PROMPT

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 1 << 20


def parse(text: str | bytes, name: str = "job.yaml"):
    data = text.encode() if isinstance(text, str) else text
    return parse_job_file(data, name, max_bytes=LIMIT)


def one(text: str):
    entries, err = parse(text)
    assert err is None, err
    assert len(entries) == 1
    return entries[0]


def resolve(spec, model="tiny-ti2v-5b"):
    return resolve_params(spec, REGISTRY[model], max_side=2048, max_frames=481, max_steps=500)


def test_single_job_takes_the_file_stem_as_id():
    e = one("prompt: a cat\n")
    assert e.error is None and e.id == "job" and e.spec.prompt == "a cat"


@pytest.mark.parametrize(
    "text,needles",
    [
        ("prompt: a\nfoo: 1\n", ["foo", "unknown field", "allowed"]),
        ("frames: 80\nprompt: a\n", ["frames", "4n+1", "77 or 81", "80"]),
        ("prompt: a\nsteps: '20'\n", ["steps", "'20'"]),
        ("prompt: a\nsteps: true\n", ["steps"]),
        ("prompt: a\nsize: big\n", ["size", "WIDTHxHEIGHT"]),
        ("prompt: a\nsize: 64x64\nwidth: 64\nheight: 64\n", ["either size or width/height"]),
        ("prompt: a\nwidth: 64\n", ["width and height go together"]),
        ("prompt: a\ntask: i2v\n", ["i2v needs an `image`"]),
        ("prompt: a\ntask: t2v\nimage: x.png\n", ["t2v takes no `image`"]),
        ("prompt: '   '\n", ["prompt", "blank"]),
        ("negative_prompt: x\n", ["prompt", "required"]),
        ("prompt: a\nid: ../evil\n", ["id", "A-Z"]),
        ("prompt: a\nid: .hidden\n", ["id", "must not start with '.'"]),
        ("prompt: a\nseed: -1\n", ["seed"]),
        ("prompt: a\nfps: 0\n", ["fps"]),
        ("prompt: a\noutput: {basename: a/b}\n", ["output.basename"]),
        ("prompt: a\noutput: {quality: 11}\n", ["output.quality"]),
    ],
)
def test_invalid_fields_are_named_with_the_bad_value_and_what_is_allowed(text, needles):
    e = one(text)
    assert e.spec is None and e.error.category is Category.INVALID_SPEC
    for needle in needles:
        assert needle in e.error.message, e.error.message


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"a: &x [1, 2]\nb: *x\nprompt: hi\n", "anchors"),
        (b"prompt: hi\nprompt: again\n", "duplicate key 'prompt'"),
        (b"prompt: !!python/object/apply:os.system [ls]\n", "python/object"),
        (b"prompt: a\x00\n", "NUL byte"),
        (b"prompt: caf\xe9\n", "not valid UTF-8"),
        (b"prompt: " + b"[" * 200 + b"]" * 200 + b"\n", "nested deeper"),
        (b"prompt: [unclosed\n", "malformed YAML"),
        (b"- just\n- a list\n", "must be a mapping of job fields, not a list"),
        (b"", "the file is empty"),
        (b"prompt: a\nseed: 1\nseed: 2\n", "job.yaml, line 3, column 1: duplicate key 'seed'"),
        (b"prompt: a\nsteps: [1, 2\n", "job.yaml, line 3, column 1:"),
        (b"prompt: !!timestamp 2020-01-01\n", "job.yaml, line 1"),
        (b"x" * (LIMIT + 1), "limit"),
    ],
)
def test_hostile_or_broken_files_are_rejected_whole(data, needle):
    entries, err = parse(data)
    assert entries == [] and err is not None
    assert err.category is Category.INVALID_SPEC
    assert needle in err.message, err.message


def test_a_billion_laughs_file_is_refused_without_expanding_it():
    lol = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
        for i in range(8)
    )
    entries, err = parse(lol + "prompt: hi\n")
    assert err is not None and "anchors" in err.message


def test_batch_merges_defaults_and_numbers_ids():
    entries, err = parse(
        "defaults:\n  model: tiny-t2v-a14b\n  steps: 2\n  output: {quality: 5}\n"
        "jobs:\n  - prompt: a\n  - prompt: b\n    steps: 4\n    output: {basename: bee}\n  - id: c\n    prompt: c\n",
        "shots.yml",
    )
    assert err is None
    assert [e.id for e in entries] == ["shots-1", "shots-2", "c"]
    assert entries[0].spec.model == "tiny-t2v-a14b" and entries[0].spec.steps == 2
    assert entries[1].spec.steps == 4
    assert entries[1].spec.output.basename == "bee" and entries[1].spec.output.quality == 5


def test_batch_rejects_bad_jobs_one_by_one_and_repeated_ids():
    entries, err = parse(
        "jobs:\n  - prompt: ok\n  - prompt: bad\n    frames: 2\n  - id: x\n    prompt: a\n  - id: x\n    prompt: b\n",
        "b.yaml",
    )
    assert err is None
    assert [e.error is None for e in entries] == [True, False, True, False]
    assert "used twice" in entries[3].error.message


@pytest.mark.parametrize(
    "text,needle",
    [
        ("defaults: {prompt: a}\n", "needs a `jobs:` list"),
        ("jobs: []\n", "empty list"),
        ("jobs: {prompt: a}\n", "expected a list of jobs under `jobs`, not a mapping"),
        ("defaults: [1]\njobs: [{prompt: a}]\n", "`defaults` must be a mapping of job fields, not a list"),
        ("defaults: {frames: 8}\njobs: [{prompt: a, frames: 9}]\n", "defaults.frames: must be 4n+1"),
        ("jobs: [{prompt: a}]\nextra: 1\n", "unknown top-level keys"),
        ("defaults: {id: x}\njobs: [{prompt: a}]\n", "cannot set `id`"),
    ],
)
def test_malformed_batches_are_rejected(text, needle):
    entries, err = parse(text)
    assert err is not None and needle in err.message


@pytest.mark.parametrize(
    "model,expected",
    [
        ("wan2.2-t2v-a14b", (1280, 720, 81, 16, 40, 4.0, 3.0, 12.0)),
        ("wan2.2-i2v-a14b", (1280, 720, 81, 16, 40, 3.5, 3.5, 5.0)),
        ("wan2.2-ti2v-5b", (1280, 704, 121, 24, 50, 5.0, None, 5.0)),
        ("tiny-ti2v-5b", (64, 64, 9, 24, 3, 5.0, None, 5.0)),
    ],
)
def test_model_defaults_are_filled_in_explicitly(model, expected):
    extra = "image: a.png\n" if "i2v-a14b" in model else ""
    spec = one(f"prompt: a\n{extra}").spec
    p = resolve(spec, model)
    assert (p.width, p.height, p.frames, p.fps, p.steps, p.guidance_scale, p.guidance_scale_2, p.flow_shift) == expected
    assert p.negative_prompt == WAN_NEGATIVE_PROMPT
    assert p.seed_was_drawn and 0 <= p.seed < 2**32


def test_explicit_values_win_and_a_given_seed_is_kept():
    spec = one(
        "prompt: a\nsize: 1280x704\nframes: 121\nsteps: 7\nguidance_scale: 2.5\nflow_shift: 3\nseed: 11\n"
        "negative_prompt: ''\n"
    ).spec
    p = resolve(spec, "wan2.2-ti2v-5b")
    assert (p.width, p.height, p.steps, p.guidance_scale, p.flow_shift, p.seed) == (1280, 704, 7, 2.5, 3.0, 11)
    assert not p.seed_was_drawn and p.negative_prompt == ""


@pytest.mark.parametrize(
    "text,model,needles",
    [
        ("prompt: a\nsize: 1280x720\n", "wan2.2-ti2v-5b", ["height", "720", "multiple of 32", "704 or 736"]),
        ("prompt: a\nsize: 1288x720\n", "wan2.2-t2v-a14b", ["width", "1288", "multiple of 16"]),
        ("prompt: a\nsize: 4096x704\n", "wan2.2-ti2v-5b", ["width", "4096", "max_side"]),
        ("prompt: a\nframes: 1001\n", "wan2.2-ti2v-5b", ["frames", "1001", "max_frames"]),
        ("prompt: a\nimage: x.png\n", "wan2.2-t2v-a14b", ["task", "cannot do 'i2v'"]),
        ("prompt: a\n", "wan2.2-i2v-a14b", ["image"]),
        ("prompt: a\nguidance_scale_2: 2\n", "wan2.2-ti2v-5b", ["guidance_scale_2", "one transformer"]),
    ],
)
def test_model_dependent_checks_name_the_field(text, model, needles):
    spec = one(text).spec
    with pytest.raises(JobError) as info:
        resolve(spec, model)
    assert info.value.category is Category.INVALID_SPEC
    for needle in needles:
        assert needle in info.value.message, info.value.message


def test_task_defaults_to_i2v_with_an_image_and_ti2v_picks_the_pipeline():
    assert resolve(one("prompt: a\nimage: x.png\n").spec).pipeline == "i2v"
    assert resolve(one("prompt: a\n").spec).task == "ti2v"
    assert resolve(one("prompt: a\n").spec).pipeline == "t2v"


def test_committed_schema_is_current_and_examples_validate_against_it():
    committed = json.loads((ROOT / "jobs" / "schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema())), "run `make schema` after changing JobSpec"
    examples = sorted((ROOT / "jobs" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=../schema.json"), path
        jsonschema.validate(yaml.safe_load(text), committed)
        entries, err = parse(text, path.name)
        assert err is None and all(e.error is None for e in entries), path


def test_schema_rejects_unknown_fields():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"prompt": "a", "colour": "blue"}, json_schema())


def test_resolve_retry_switches_the_model_keeping_seed_frames_and_the_snapped_size(models_dir, tmp_path):
    """The out-of-memory fallback to a smaller model resolves the job again for it, through the same code as
    intake: seed, frames and the size (snapped to the new model's multiple) of this attempt are kept, the job's
    guidance_scale_2 is dropped (one transformer), offload / VAE tiling / seed_was_drawn carry over."""
    from daemon.config import load_settings
    from daemon.jobspec.resolve import resolve_job, resolve_retry

    settings = load_settings(
        None,
        {"paths": {"inbox": str(tmp_path / "in"), "models": str(models_dir)}, "models": {"default": "tiny-t2v-a14b"}},
    )
    raw = {"prompt": "a", "size": "112x80", "frames": 17, "guidance_scale_2": 2.0, "fallback": ["smaller_model"]}
    entry = one(yaml.safe_dump(raw))
    job = resolve_job(entry, settings, "tiny-t2v-a14b")
    assert (job.model.name, job.params.width, job.params.guidance_scale_2, job.waiting) == (
        "tiny-t2v-a14b",
        112,
        2.0,
        False,
    )
    before = job.params.model_copy(update={"offload": "model", "vae_tiling": True})
    params, model = resolve_retry(raw, "job", before, {"model": "tiny-ti2v-5b"}, settings)
    assert model.name == "tiny-ti2v-5b" and model.path == models_dir / "tiny-ti2v-5b"
    assert (params.width, params.height, params.frames) == (96, 64, 17)  # 112x80 snapped to multiples of 32
    assert params.seed == before.seed and params.seed_was_drawn == before.seed_was_drawn is True
    assert (params.offload, params.vae_tiling, params.guidance_scale_2) == ("model", True, None)
    assert params.basename == "job" and params.steps == REGISTRY["tiny-ti2v-5b"].steps
    from daemon.models import hub_snapshot

    if hub_snapshot(REGISTRY["wan2.2-ti2v-5b"].repo_id) is None:
        with pytest.raises(JobError) as info:  # the new model must be on this machine: no download on a retry
            resolve_retry(raw, "job", before, {"model": "wan2.2-ti2v-5b"}, settings)
        assert info.value.category is Category.MODEL_NOT_FOUND


@pytest.mark.parametrize(
    "data,advice,not_advice",
    [
        (b"prompt: [a\n", "Fix the YAML at the line named", "Fix the fields"),
        (b"", "Write at least `prompt:", "Fix the fields"),
        (b"- a\n", "A job file is one job", "Fix the fields"),
        (b"a: &x 1\nprompt: a\n", "no anchors, aliases or tags", "Fix the fields"),
        (b"prompt: a\nsteps: x\n", "Fix the fields named", "YAML"),
    ],
)
def test_suggestions_follow_what_went_wrong_and_messages_use_plain_words(data, advice, not_advice):
    entries, err = parse(data)
    err = err or entries[0].error
    said = " ".join(err.all_suggestions())
    assert advice in said and not_advice not in " ".join(err.suggestions), said
    assert "<unicode string>" not in err.message and "NoneType" not in err.message and "got str" not in err.message
