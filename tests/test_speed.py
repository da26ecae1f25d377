"""Speed options (compile, step caches, attention backends): the pure plan, the job spec and config, and
end to end through the real tiny pipelines, where each option shows in the sidecar's optimizations_applied."""

from __future__ import annotations

import pytest
from conftest import wait_for

from daemon.jobspec.params import resolve_params
from daemon.jobspec.spec import JobSpec
from daemon.models import REGISTRY
from daemon.speed import SpeedConfig, plan_speed

FBC = {"type": "first_block", "threshold": 0.2, "mag_ratios": None}
MAG = {"type": "mag", "threshold": None, "mag_ratios": [1.0, 0.99, 0.98, 0.97]}


def _params(**over):
    return {
        "steps": 30,
        "preset": None,
        "min_cache_steps": 10,
        "cache": None,
        "compile": False,
        "attention_backend": "native",
        **over,
    }


def test_the_plan_applies_what_was_asked_with_default_thresholds():
    plan = plan_speed(
        _params(cache={"type": "first_block", "threshold": None}, compile=True), two_experts=True, device="cuda"
    )
    assert plan.compile and plan.cache == {"type": "first_block", "threshold": 0.05, "mag_ratios": None}
    assert plan.applied() == ["compile:repeated_blocks", "cache:first_block@0.05"] and not plan.notes
    mag = plan_speed(_params(cache=MAG), two_experts=False, device="cuda")
    assert mag.cache["threshold"] == 0.06 and mag.applied() == ["cache:mag@0.06"]


@pytest.mark.parametrize(
    "params, two_experts, note",
    [
        (_params(cache=FBC, steps=4), False, "cache:first_block off (4 steps < speed.min_cache_steps 10)"),
        (_params(cache=FBC, preset="lightning-4step", steps=40), True, "cache:first_block off (distill preset"),
        (_params(cache=MAG), True, "cache:mag off (two-expert model"),
    ],
)
def test_a_cache_is_turned_off_where_it_harms_quality_and_the_sidecar_says_why(params, two_experts, note):
    plan = plan_speed(params, two_experts=two_experts, device="cuda")
    assert plan.cache is None
    assert any(n.startswith(note) for n in plan.notes), plan.notes


def test_an_attention_backend_that_cannot_run_here_runs_as_native_and_says_why():
    cpu = plan_speed(_params(attention_backend="flash"), two_experts=False, device="cpu")
    assert cpu.attention_backend == "native" and cpu.notes == ["attention:native (flash needs a CUDA GPU)"]
    missing = plan_speed(
        _params(attention_backend="sage"),
        two_experts=False,
        device="cuda",
        attention_problem="sageattention is not installed",
    )
    assert missing.attention_backend == "native" and "sageattention is not installed" in missing.notes[0]
    ok = plan_speed(_params(attention_backend="flash"), two_experts=False, device="cuda")
    assert ok.attention_backend == "flash" and ok.applied() == ["attention:flash"]


def test_job_fields_win_over_the_config_defaults():
    info = REGISTRY["tiny-ti2v-5b"]
    speed = SpeedConfig(compile=True, cache={"type": "first_block", "threshold": 0.1}, attention_backend="sage")
    limits = dict(max_side=4096, max_frames=1000, max_steps=1000)
    p = resolve_params(JobSpec(prompt="x"), info, speed=speed, **limits)
    assert (p.compile, p.cache["type"], p.cache["threshold"], p.attention_backend) == (True, "first_block", 0.1, "sage")
    p = resolve_params(
        JobSpec(prompt="x", compile=False, cache={"type": "none"}, attention_backend="native"),
        info,
        speed=speed,
        **limits,
    )
    assert (p.compile, p.cache, p.attention_backend) == (False, None, "native")
    assert resolve_params(JobSpec(prompt="x"), info, **limits).cache is None  # built-in default: no cache


def test_bad_speed_options_are_rejected_at_intake_with_what_is_allowed():
    from daemon.jobspec.spec import parse_job_file

    cases = {
        "cache: {type: mag}": "mag needs mag_ratios",
        "cache: {type: warp}": "first_block",
        "cache: {type: first_block, threshold: 3}": "threshold",
        "attention_backend: turbo": "flash",
        "compile: maybe": "compile",
    }
    for line, expected in cases.items():
        entries, file_error = parse_job_file(f"prompt: x\n{line}\n".encode(), "bad.yaml", max_bytes=1 << 20)
        assert file_error is None and entries[0].error is not None, line
        assert expected in entries[0].error.message, (line, entries[0].error.message)


def test_mag_ratios_only_with_mag():
    with pytest.raises(ValueError, match="only to cache type mag"):
        SpeedConfig(cache={"type": "first_block", "mag_ratios": [1.0, 0.9]})


# ---- end to end through the real tiny pipelines ----------------------------------------------------------


def test_first_block_cache_changes_the_run_and_is_gone_for_the_next_job(harness):
    wait_for(harness.daemon.workers_ready, 60, what="worker")
    base = "model: tiny-t2v-a14b\nprompt: same seed\nseed: 3\nsteps: 12\n"
    harness.drop("a.yaml", base)
    plain = harness.sidecar("a")
    harness.drop("b.yaml", base + "cache: {type: first_block, threshold: 0.2}\n")
    cached = harness.sidecar("b")
    harness.drop("c.yaml", base)
    after = harness.sidecar("c")
    assert "cache:first_block@0.2" in cached["optimizations_applied"]
    assert not any(o.startswith("cache:") for o in plain["optimizations_applied"] + after["optimizations_applied"])
    # Skipped blocks change the frames; once the hooks are removed the same seed makes the same video again.
    assert cached["video"]["sha256"] != plain["video"]["sha256"]
    assert after["video"]["sha256"] == plain["video"]["sha256"]
    harness.drop(
        "d.yaml", "model: tiny-t2v-a14b\nprompt: few\nsteps: 4\ncache: {type: first_block}\nattention_backend: flash\n"
    )
    few = harness.sidecar("d")["optimizations_applied"]
    assert "cache:first_block off (4 steps < speed.min_cache_steps 10)" in few
    assert "attention:native (flash needs a CUDA GPU)" in few


def test_compile_happens_once_per_warm_pipeline_and_later_jobs_reuse_it(harness):
    wait_for(harness.daemon.workers_ready, 60, what="worker")
    job = "model: tiny-ti2v-5b\nprompt: compiled\nseed: 5\nsteps: 2\n"
    harness.drop("c1.yaml", job + "compile: true\n")
    first = harness.sidecar("c1", timeout=300)
    harness.drop("c2.yaml", job + "compile: true\n")
    second = harness.sidecar("c2")
    harness.drop("c3.yaml", job)
    third = harness.sidecar("c3")
    assert "compile:repeated_blocks" in first["optimizations_applied"]
    assert any(o.startswith("compile:compiled by this job") for o in first["optimizations_applied"])
    assert "compile:reused from an earlier job" in second["optimizations_applied"]
    assert "compile:repeated_blocks (warm pipeline compiled by an earlier job)" in third["optimizations_applied"]
    # The compile happens in the first job's first step, not again.
    assert first["timings"]["first_step"] > 3 * second["timings"]["first_step"]
    assert first["video"]["sha256"] and second["video"]["frames"] == first["video"]["frames"]


def test_speed_options_in_the_config_apply_to_jobs_that_say_nothing(harness_factory):
    h = harness_factory(speed={"cache": {"type": "first_block", "threshold": 0.3}}).start()
    wait_for(h.daemon.workers_ready, 60, what="worker")
    h.drop("cfg.yaml", "model: tiny-ti2v-5b\nprompt: from config\nsteps: 12\n")
    assert "cache:first_block@0.3" in h.sidecar("cfg")["optimizations_applied"]


def test_a_bad_speed_section_in_the_config_is_refused():
    from daemon.config import Settings

    with pytest.raises(Exception, match="mag_ratios"):
        Settings.model_validate({"speed": {"cache": {"type": "mag"}}})
    with pytest.raises(Exception, match="attention_backend"):
        Settings.model_validate({"speed": {"attention_backend": "turbo"}})
